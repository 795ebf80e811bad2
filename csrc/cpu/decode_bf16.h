// bf16 block helpers of the CPU decode kernel (decode.cpp) on AVX512-BF16's dot products (vdpbf16ps: 32 bf16 pairs
// multiplied and added pairwise into 16 fp32 lanes): the scores S = q . k, reading the keys as bf16 with no widening
// to fp32. Where the CPU lacks AVX512-BF16 the helpers of decode_tiles.h run.
// The update acc += P V stays on pv_bf16_rows' widen-and-FMA: the same update on vdpbf16ps (P rounded to bf16, two
// keys' values interleaved into pairs, half the instructions) read 3-5% slower (bf16 MHA D=64 one-token steps, 512
// keys, one thread, Intel Xeon AMX, 2026-12-05): vdpbf16ps on 512 bits issues one every ~2 cycles there against two
// FMAs a cycle (a loop of 16 independent chains of each), so its 32 products cost what 4 FMAs' 64 do.
#pragma once
#include "decode_tiles.h"  // hsum16x16 (and, through it, decode_fetch.h: Stream, Ahead, fetch_ahead, row_ahead)

namespace fastattn::cpu::decode {
namespace {

#ifdef FASTATTN_VEC512
// Two query rows (q, q + D) that read the same KV head against keys krows[0, nk) (nk <= 16), 8 keys a pass: each
// key chunk is loaded once for both rows (the loads, not the dot products, were the hot spots with one row). Every
// score is summed in the order scores_bf16_dp's one-row loop uses, so the results are the same bits.
FA_AVX512BF16 inline void scores_bf16_dp_pair(const c10::BFloat16* q, int64_t D, const c10::BFloat16* const* krows,
                                              int64_t koff, int64_t nk, __m512 vscale, float* S, int64_t ldS,
                                              Ahead ahead) {
  for (int64_t h = 0; h < nk; h += 8) {
    __m512 acc[16];  // [u]: row 0 with key h + u; [8 + u]: row 1 with it
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
    const c10::BFloat16* k[8];
    for (int u = 0; u < 8; ++u) k[u] = krows[std::min<int64_t>(h + u, nk - 1)] + koff;
    fetch_ahead(k, 8, ahead, D * 2);
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : __mmask32((1u << (D - d)) - 1);
      const __m512bh q0 = (__m512bh)_mm512_maskz_loadu_epi16(m, q + d);
      const __m512bh q1 = (__m512bh)_mm512_maskz_loadu_epi16(m, q + D + d);
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) {
        const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(m, k[u] + d);
        acc[u] = _mm512_dpbf16_ps(acc[u], q0, kv);
        acc[8 + u] = _mm512_dpbf16_ps(acc[8 + u], q1, kv);
      }
    }
    const __m512 s = _mm512_mul_ps(hsum16x16(acc), vscale);
    const __mmask16 w = vec512::tail(std::min<int64_t>(8, nk - h));
    _mm512_mask_storeu_ps(S + h, w, s);                         // lanes 0-7: row 0
    _mm512_mask_storeu_ps(S + ldS + h - 8, __mmask16(w << 8), s);  // lanes 8-15: row 1
  }
}

// scores_bf16_dp for one row against n keys (a multiple of 16) a fixed stride ks apart (a dense cache; k0: key 0 at
// the row's KV head): the same sums in the same order (the same bits) with each key's address from its index, not a
// table. Its memory order is scores_bf16_dp's (two passes of 8 keys, each fetching its rows ahead first): one pass
// over 16 keys, their 32 lines fetched at once, read caches from the L3 3-8% slower (bf16 MHA D=64, one thread,
// Intel Xeon AMX).
FA_AVX512BF16 inline void scores_bf16_dp_strided(const c10::BFloat16* q, int64_t D, const c10::BFloat16* k0, int64_t ks,
                                                 int64_t n, __m512 vscale, float* S, Ahead ahead) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const c10::BFloat16* kb = k0 + j0 * ks;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int h = 0; h < 16; h += 8) {
      const c10::BFloat16* kh = kb + h * ks;
      fetch_ahead_strided(reinterpret_cast<const char*>(kh), 8, ks * 2, ahead, D * 2);
      for (int64_t d = 0; d < D; d += 32) {
        const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : __mmask32((1u << (D - d)) - 1);
        const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, q + d);
#pragma GCC unroll 8
        for (int u = 0; u < 8; ++u) {
          acc[h + u] = _mm512_dpbf16_ps(acc[h + u], qv, (__m512bh)_mm512_maskz_loadu_epi16(m, kh + u * ks + d));
        }
      }
    }
    _mm512_storeu_ps(S + j0, _mm512_mul_ps(hsum16x16(acc), vscale));
  }
}

// bf16 scores on AVX512-BF16's dot products: vdpbf16ps multiplies 32 bf16 pairs and adds them pairwise into 16 fp32
// lanes, so keys are read as bf16 with no conversion to fp32 (the conversions, not the products, bound the AVX-512
// path: 2 shuffle-port uops per 16 elements). Qb: the M query rows in bf16, unscaled (the scale multiplies the sums).
// bf16 denormals count as zero here (the instruction's rule), well inside bf16's tolerance.
FA_AVX512BF16 void scores_bf16_dp(const c10::BFloat16* Qb, int64_t M, int64_t D, const c10::BFloat16* const* krows,
                                  const int64_t* koff, int64_t n, float scale, float* S, int64_t ldS,
                                  const Stream& st) {
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t whole = 0;  // keys already scored: a dense cache's whole groups of 16 for a lone row
  if (M == 1 && st.k_stride != 0) {
    whole = n & ~int64_t{15};
    scores_bf16_dp_strided(Qb, D, krows[0] + koff[0], st.k_stride, whole, vscale, S, st.k_ahead);
  }
  for (int64_t j0 = whole; j0 < n; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n - j0);
    for (int64_t r = 0; r < M; ++r) {
      const Ahead ahead = row_ahead(koff, r, st.k_ahead);
      if (r + 1 < M && koff[r + 1] == koff[r]) {  // two rows of one KV head (a GQA group)
        scores_bf16_dp_pair(Qb + r * D, D, krows + j0, koff[r], nk, vscale, S + r * ldS + j0, ldS, ahead);
        ++r;
        continue;
      }
      const c10::BFloat16* q = Qb + r * D;
      __m512 acc[16];
#pragma GCC unroll 16
      for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
#pragma GCC unroll 2
      for (int h = 0; h < 16; h += 8) {  // two passes of 8 key pointers, as scores_avx512
        const c10::BFloat16* k[8];
        for (int u = 0; u < 8; ++u) k[u] = krows[j0 + std::min<int64_t>(h + u, nk - 1)] + koff[r];
        fetch_ahead(k, 8, ahead, D * 2);
        for (int64_t d = 0; d < D; d += 32) {
          const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : __mmask32((1u << (D - d)) - 1);
          const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, q + d);
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) {
            acc[h + u] = _mm512_dpbf16_ps(acc[h + u], qv, (__m512bh)_mm512_maskz_loadu_epi16(m, k[u] + d));
          }
        }
      }
      _mm512_mask_storeu_ps(S + r * ldS + j0, vec512::tail(nk), _mm512_mul_ps(hsum16x16(acc), vscale));
    }
  }
}

#endif  // FASTATTN_VEC512

// bf16 caches take scores_bf16_dp where the CPU has AVX512-BF16.
template <typename T>
bool bf16_dot_products() {
#ifdef FASTATTN_VEC512
  if constexpr (std::is_same_v<T, c10::BFloat16>) return vec512::available() && vec512::native_bf16();
#endif
  return false;
}

inline void scores_dp(const c10::BFloat16* Qb, int64_t M, int64_t D, const void* const* krows, const int64_t* koff,
                      int64_t n, float scale, float* S, int64_t ldS, const Stream& st) {
#ifdef FASTATTN_VEC512
  scores_bf16_dp(Qb, M, D, reinterpret_cast<const c10::BFloat16* const*>(krows), koff, n, scale, S, ldS, st);
#endif
}

}  // namespace
}  // namespace fastattn::cpu::decode
