// Block helpers of the CPU decode kernel (decode.cpp): the scores S = q . k and the update acc += P V of one block
// of keys for the M query rows of a work item, each row reading its KV head's slice of every key (krows[j] + koff[r]).
// Portable, AVX2 and AVX-512 versions; scores / pv pick one (bf16 caches on AVX512-BF16: decode_bf16.h).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"     // use_avx2, hsum8, load8, prefetch: the same vector helpers as the prefill kernels
#include "vec512.h"  // load16, tail, available, native_bf16: AVX-512 where the CPU has it
#include "decode_fetch.h"  // Stream, Ahead, fetch_ahead, row_ahead: how the helpers fetch rows ahead

namespace fastattn::cpu::decode {
namespace {

// ---------------------------------------------------------------- block helpers, portable versions
// S[r * ldS + j] = q_r . k_j for the M query rows (fp32, pre-scaled) and the n keys of the block; row r reads
// its KV head at krows[j] + koff[r]. Key-major order: one key's heads are adjacent in memory.
template <typename T>
void scores_scalar(const float* Qf, int64_t M, int64_t D, const T* const* krows, const int64_t* koff, int64_t n,
                   float* S, int64_t ldS) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < M; ++r) {
      const float* q = Qf + r * D;
      const T* k = krows[j] + koff[r];
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
      S[r * ldS + j] = s;
    }
  }
}

// acc_r += sum_j P[r, j] v_j (v_j of row r's KV head at vrows[j] + voff[r]) for the rows marked live.
template <typename T>
void pv_scalar(const float* P, int64_t ldP, const uint8_t* live, int64_t M, const T* const* vrows,
               const int64_t* voff, int64_t n, int64_t Dv, float* acc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < M; ++r) {
      const float p = P[r * ldP + j];
      if (!live[r] || p == 0.f) continue;
      const T* v = vrows[j] + voff[r];
      float* a = acc + r * Dv;
      for (int64_t d = 0; d < Dv; ++d) a[d] += p * static_cast<float>(v[d]);
    }
  }
}


#ifdef FASTATTN_X86
// ---------------------------------------------------------------- block helpers, AVX2 + FMA + F16C

// One lane each: r[u] = sum of the 8 lanes of v[u] (hadd tree, then the two 128-bit halves; ~1 instruction per
// vector instead of a full horizontal sum each).
FA_AVX2 inline __m256 hsum8x8(const __m256* v) {
  // s0 = [lanes 0-3 summed of v0, v1, v2, v3 | lanes 4-7 summed of the same] (pairs, then pairs of pairs)
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// The last D % 8 products of q . k, summed after the vector lanes (scalar tail of scores_avx2).
template <typename T>
inline float dot_tail(const float* q, const T* k, int64_t d, int64_t D) {
  float s = 0.f;
  for (; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

// Scores of R rows of one KV head (R = 1, 2, 4) and 8 / R keys a pass, reduced together by hsum8x8. Each key's row
// is read from start to end before the next key's (one ascending run of memory, see scores_avx512) and each load of
// it feeds the R rows' FMA chains. Each (row, key) sum runs over d in the same order whatever R, so the same bits.
template <typename T, int R>
FA_AVX2 inline void scores_rows_avx2(const float* q, int64_t D, const T* const* kb, int64_t koff, int64_t nk,
                                     float* s, int64_t ldS) {
  constexpr int U = 8 / R;
  const int64_t D8 = D & ~int64_t{7};
  for (int64_t u0 = 0; u0 < nk; u0 += U) {
    const T* k[U];
    for (int u = 0; u < U; ++u) k[u] = kb[std::min<int64_t>(u0 + u, nk - 1)] + koff;  // tail: repeat
    __m256 acc[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      for (int64_t d = 0; d < D8; d += 8) {
        const __m256 kv = vec::load8(k[u] + d);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          acc[i * U + u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * D + d), kv, acc[i * U + u]);
        }
      }
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, hsum8x8(acc));
    const int64_t nu = std::min<int64_t>(U, nk - u0);
    for (int i = 0; i < R; ++i) {
      for (int u = 0; u < nu; ++u) {
        s[i * ldS + u0 + u] = D8 == D ? t[i * U + u] : t[i * U + u] + dot_tail(q + i * D, k[u], D8, D);
      }
    }
  }
}

// Scores of 8 keys at a time: rows of one KV head four or two at a time, so that a key's row loaded once feeds
// several FMA chains. One row at a time (8 keys' chains each a loop of its own) the op read 1.12x / 0.73x / 0.50x
// PyTorch's SDPA on fp32 MHA 12 D=64 steps of 2 / 4 / 8 tokens at 512 keys, now 1.26x / 0.83x / 0.66x; GQA 16/4
// D=128 at 2 / 4 tokens 1.44x / 0.82x, now 1.68x / 0.90x (AMD EPYC Zen 3, one thread). Two rows at a time in the P V
// update as well read 5-10% slower there. One dot product at a time with its own horizontal sum spent
// more on the sums than on the products at D = 64 (0.65-0.76x PyTorch on MHA decode steps, AMD EPYC Zen 1). Key by
// key as scores_avx512 (on AMD EPYC Zen 4 held to AVX2 by FASTATTN_CPU_ISA=avx2, fp32 MHA D=64 steps from memory, one
// thread: 0.89-0.96x PyTorch's SDPA chunk by chunk, 1.48x key by key).
template <typename T>
FA_AVX2 void scores_avx2(const float* Qf, int64_t M, int64_t D, const T* const* krows, const int64_t* koff,
                         int64_t n, float* S, int64_t ldS, const Stream& st) {
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nk = std::min<int64_t>(8, n - j0);
    for (int64_t r = 0; r < M;) {
      int64_t run = 1;  // rows from r on that read r's KV head (at most 4)
      while (run < 4 && r + run < M && koff[r + run] == koff[r]) ++run;
      const T* k[8];  // (for the fetch ahead: scores_rows_avx2 addresses the keys itself)
      for (int u = 0; u < nk; ++u) k[u] = krows[j0 + u] + koff[r];
      fetch_ahead(k, nk, row_ahead(koff, r, st.k_ahead), D * sizeof(T));
      const float* q = Qf + r * D;
      float* s = S + r * ldS + j0;
      if (run == 4) {
        scores_rows_avx2<T, 4>(q, D, krows + j0, koff[r], nk, s, ldS);
      } else if (run >= 2) {
        scores_rows_avx2<T, 2>(q, D, krows + j0, koff[r], nk, s, ldS);
        run = 2;
      } else {
        scores_rows_avx2<T, 1>(q, D, krows + j0, koff[r], nk, s, ldS);
      }
      r += run;
    }
  }
}

// acc_r += sum_j P[r, j] v_j, 64 columns and 16 keys at a time with the row's accumulator in registers across
// the 16 keys (a load and a store of acc per key and row had bound the AVX2 path). Rows run inside the 16 keys so
// that rows of one KV head find its 16 value rows in L1 (4 KB of fp32 per 64 columns; the rows of a whole 64-key
// block, 32 KB at D = 128, would not stay there). The sum over j runs in pv_scalar's order per element, one FMA each.
template <typename T>
FA_AVX2 void pv_avx2(const float* P, int64_t ldP, const uint8_t* live, int64_t M, const T* const* vrows,
                     const int64_t* voff, int64_t n, int64_t Dv, float* acc, const Stream& st) {
  constexpr int64_t kKeys = 16;
  const int64_t Dv8 = Dv & ~int64_t{7};
  for (int64_t d0 = 0; d0 < Dv8; d0 += 64) {
    const int64_t nc = std::min<int64_t>(64, Dv8 - d0) / 8;  // vectors in this column chunk
    for (int64_t j0 = 0; j0 < n; j0 += kKeys) {
      const int64_t j1 = std::min(n, j0 + kKeys);
      for (int64_t r = 0; r < M; ++r) {
        if (!live[r]) continue;
        const float* p = P + r * ldP;
        float* a = acc + r * Dv + d0;
        const Ahead ahead = row_ahead(voff, r, st.v_ahead);
        __m256 c[8];
#pragma GCC unroll 8
        for (int u = 0; u < 8; ++u) c[u] = u < nc ? _mm256_loadu_ps(a + 8 * u) : _mm256_setzero_ps();
        for (int64_t j = j0; j < j1; ++j) {
          const T* v = vrows[j] + voff[r] + d0;
          fetch_ahead(&v, 1, ahead, nc * 8 * sizeof(T));
          if (p[j] == 0.f) continue;
          const __m256 vp = _mm256_set1_ps(p[j]);
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) {
            if (u < nc) c[u] = _mm256_fmadd_ps(vp, vec::load8(v + 8 * u), c[u]);
          }
        }
#pragma GCC unroll 8
        for (int u = 0; u < 8; ++u) {
          if (u < nc) _mm256_storeu_ps(a + 8 * u, c[u]);
        }
      }
    }
  }
  if (Dv8 == Dv) return;
  for (int64_t r = 0; r < M; ++r) {  // the last Dv % 8 columns, fused as pv_rows' masked FMAs (same bits in any build)
    if (!live[r]) continue;
    for (int64_t j = 0; j < n; ++j) {
      const float p = P[r * ldP + j];
      if (p == 0.f) continue;
      const T* v = vrows[j] + voff[r];
      for (int64_t d = Dv8; d < Dv; ++d) acc[r * Dv + d] = std::fma(p, static_cast<float>(v[d]), acc[r * Dv + d]);
    }
  }
}

#endif

#ifdef FASTATTN_VEC512
// ---------------------------------------------------------------- block helpers, AVX-512
// One lane each: r[i] = sum of the 16 lanes of v[i] (a transposing tree, ~2 instructions per vector instead of a
// full horizontal sum each).
FA_AVX512 inline __m512 hsum16x16(const __m512* v) {
  __m512 x[4];
  for (int g = 0; g < 4; ++g) {  // x[g] lane L = [sum_L v[4g], sum_L v[4g+1], sum_L v[4g+2], sum_L v[4g+3]]
    const __m512* a = v + 4 * g;
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    x[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Sum the four 128-bit lanes: pairs of lanes, then the two halves.
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of 16 keys at a time per row: 16 independent FMA chains over D, reduced together by hsum16x16. The row's
// q sits in registers (C chunks of 16, up to 128 values a pass) and each key's row is read from start to end
// before the next key's. Reading 8 keys' rows chunk by chunk instead (one q load shared by the 8 keys) interleaves
// 8 runs of memory, which the hardware prefetchers follow worse than one ascending run: with one KV head per item
// (work_heuristic) that order read a cache coming from memory 0.78-0.80x as fast as PyTorch's SDPA, key by key
// 0.95-1.10x (fp32 MHA D=64 one-token steps, one thread, AMD EPYC Zen 4, 2026-12-05). Each key's sum runs over d in
// the same order either way, so the scores are the same bits.
template <typename T, int C>
FA_AVX512 void scores_avx512_c(const float* Qf, int64_t M, int64_t D, const T* const* krows, const int64_t* koff,
                               int64_t n, float* S, int64_t ldS, const Stream& st) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n - j0);
    for (int64_t r = 0; r < M; ++r) {
      const float* q = Qf + r * D;
      const Ahead ahead = row_ahead(koff, r, st.k_ahead);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t d0 = 0; d0 < D; d0 += 16 * C) {
        __mmask16 m[C];
        __m512 qv[C];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          m[c] = vec512::tail(std::max<int64_t>(D - d0 - 16 * c, 0));
          qv[c] = _mm512_maskz_loadu_ps(m[c], q + d0 + 16 * c);
        }
#pragma GCC unroll 2
        for (int h = 0; h < 16; h += 8) {  // two passes of 8 keys: 16 key pointers do not fit the general registers
          const T* k[8];
          for (int u = 0; u < 8; ++u) k[u] = krows[j0 + std::min<int64_t>(h + u, nk - 1)] + koff[r] + d0;
          if (d0 == 0) fetch_ahead(k, 8, ahead, D * sizeof(T));
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) {
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
              acc[h + u] = _mm512_fmadd_ps(qv[c], vec512::load16(k[u] + 16 * c, m[c]), acc[h + u]);
            }
          }
        }
      }
      _mm512_mask_storeu_ps(S + r * ldS + j0, vec512::tail(nk), hsum16x16(acc));
    }
  }
}

// scores_avx512_c for one row at head dim <= 64 (an item whose row alone reads its KV head, as a one-token MHA step
// on SDPA's layout: the keys stream from memory once): 8 keys a pass, each key's row read start to end by a loop over
// d, q reloaded from L1. The unrolled chunk loop with q in registers read such a cache 0.94-0.98x as fast as
// PyTorch's SDPA, this loop 1.02-1.17x (fp32 MHA D=64, one thread, AMD EPYC Zen 4, 2026-12-05; at D=128 the chunk
// loop stays ahead, 1.99x against 1.69x); the same bits either way (test_cpu_kernel_head_alone_same_bits). Taken
// where lone_stream (decode_fetch.h): on an Intel Xeon the chunk loop is the faster one (see pv_avx512).
template <typename T>
FA_AVX512 void scores_avx512_row(const float* q, int64_t D, const T* const* krows, int64_t koff, int64_t n,
                                 float* S, Ahead ahead) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, n - j0);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int h = 0; h < 16; h += 8) {
      const T* k[8];
      for (int u = 0; u < 8; ++u) k[u] = krows[j0 + std::min<int64_t>(h + u, nk - 1)] + koff;
      fetch_ahead(k, 8, ahead, D * sizeof(T));
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) {
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = vec512::tail(D - d);
          acc[h + u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), vec512::load16(k[u] + d, m), acc[h + u]);
        }
      }
    }
    _mm512_mask_storeu_ps(S + j0, vec512::tail(nk), hsum16x16(acc));
  }
}

// Scores of 4 rows of one KV head (q: 4 rows D apart), 4 keys a pass: each chunk of a key's row loaded once feeds
// the 4 rows (their q chunks read from L1), 16 FMA chains reduced together by hsum16x16 (lane 4 i + u: row i, key u).
// Each (row, key) chain runs over d in scores_avx512_c's order and hsum16x16 reduces every chain by the same tree,
// so the scores are the same bits.
template <typename T>
FA_AVX512 void scores_avx512_rows4(const float* q, int64_t D, const T* const* krows, int64_t koff, int64_t n,
                                   float* S, int64_t ldS, Ahead ahead) {
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const int64_t nk = std::min<int64_t>(4, n - j0);
    const T* k[4];
    for (int u = 0; u < 4; ++u) k[u] = krows[j0 + std::min<int64_t>(u, nk - 1)] + koff;
    fetch_ahead(k, nk, ahead, D * sizeof(T));
    __m512 acc[16] = {};
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 m = vec512::tail(D - d0);
      __m512 kv[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) kv[u] = vec512::load16(k[u] + d0, m);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + i * D + d0);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[4 * i + u] = _mm512_fmadd_ps(qv, kv[u], acc[4 * i + u]);
      }
    }
    alignas(64) float s[16];
    _mm512_store_ps(s, hsum16x16(acc));
    for (int i = 0; i < 4; ++i) std::copy(s + 4 * i, s + 4 * i + nk, S + i * ldS + j0);
  }
}

// Runs of 4 rows on one KV head by scores_avx512_rows4, the rest by scores_avx512_c with as few q chunks as the
// head dim needs (a chunk past D is masked off: zeros). AMD EPYC Zen 5, one thread, 2026-12-07, the op with the runs
// of 4 against scores_avx512_c for every row, in one process (4-12 rows per KV head, MHA and groups of 4 and 8, head
// dims 32-128, 256 and 1024 keys): the one-pass backward (bwd_rows.cpp) fp32 1.03-1.10x, bf16 1.08-1.31x faster,
// the decode kernel's fp32 forward 1.04-1.18x (bf16 there takes scores_dp: unchanged).
template <typename T>
FA_AVX512 void scores_avx512(const float* Qf, int64_t M, int64_t D, const T* const* krows, const int64_t* koff,
                             int64_t n, float* S, int64_t ldS, const Stream& st) {
  if (M == 1 && D <= 64 && st.lone) return scores_avx512_row<T>(Qf, D, krows, koff[0], n, S, st.k_ahead);
  int64_t r = 0;
  for (; r + 4 <= M && koff[r + 1] == koff[r] && koff[r + 2] == koff[r] && koff[r + 3] == koff[r]; r += 4) {
    scores_avx512_rows4<T>(Qf + r * D, D, krows, koff[r], n, S + r * ldS, ldS, row_ahead(koff, r, st.k_ahead));
  }
  if (r == M) return;
  Qf += r * D, M -= r, koff += r, S += r * ldS;  // (the rest's first row fetches ahead again: fetches change no bits)
  if (D <= 16) return scores_avx512_c<T, 1>(Qf, M, D, krows, koff, n, S, ldS, st);
  if (D <= 32) return scores_avx512_c<T, 2>(Qf, M, D, krows, koff, n, S, ldS, st);
  if (D <= 64) return scores_avx512_c<T, 4>(Qf, M, D, krows, koff, n, S, ldS, st);
  return scores_avx512_c<T, 8>(Qf, M, D, krows, koff, n, S, ldS, st);
}

// acc_r += sum_j P[r, j] v_j for R rows of one KV head (voff) at a time over C chunks of 16 values: each value
// load is shared by the R rows and R * C accumulators (8 or 16) are independent FMA chains (one row of 64 values
// had 4 chains waiting on each other's latency). A key whose P is 0, or a row not live, leaves the accumulator as
// it was (masked FMA): every row gets the same products and sums in the same order whatever R is.
template <typename T, int R, int C>
FA_AVX512 inline void pv_rows(const float* P, int64_t ldP, const uint8_t* live, const T* const* vrows, int64_t voff,
                              int64_t n, int64_t Dv, float* acc, Ahead ahead) {
  for (int64_t d0 = 0; d0 < Dv; d0 += 16 * C) {
    __mmask16 m[C];
    for (int c = 0; c < C; ++c) m[c] = vec512::tail(std::max<int64_t>(Dv - d0 - 16 * c, 0));
    __m512 a[R][C];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[i][c] = _mm512_maskz_loadu_ps(m[c], acc + i * Dv + d0 + 16 * c);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* v = vrows[j] + voff + d0;
      fetch_ahead(&v, 1, ahead, std::min<int64_t>(16 * C, Dv - d0) * sizeof(T));
      __m512 vv[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) vv[c] = vec512::load16(v + 16 * c, m[c]);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const float p = P[i * ldP + j];
        const __mmask16 k = live[i] && p != 0.f ? __mmask16(0xffff) : __mmask16(0);
        const __m512 vp = _mm512_set1_ps(p);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) a[i][c] = _mm512_mask3_fmadd_ps(vp, vv[c], a[i][c], k);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(acc + i * Dv + d0 + 16 * c, m[c], a[i][c]);
    }
  }
}

// Whether every key counts in rows [0, R) of a block (n keys): each row live, no P zero (NaN counts, as p != 0).
template <int R>
FA_AVX512 inline bool all_count(const float* P, int64_t ldP, const uint8_t* live, int64_t n) {
  for (int i = 0; i < R; ++i) {
    if (!live[i]) return false;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 t = vec512::tail(n - j);
      const __m512 p = _mm512_maskz_loadu_ps(t, P + i * ldP + j);
      if (_mm512_mask_cmp_ps_mask(t, p, _mm512_setzero_ps(), _CMP_NEQ_UQ) != t) return false;
    }
  }
  return true;
}

// The key loop of pv_bf16_rows at one column chunk (voff: the rows' offset plus the chunk's first column; w: the C
// chunks' lane masks; bytes: of each value row it reads): E, O += P[., j] times key j's even and odd values. Every:
// each key counts (all_count), no key's mask to test.
template <int R, int C, bool Every>
FA_AVX512 __attribute__((always_inline)) inline void pv_bf16_keys(const float* P, int64_t ldP, const uint8_t* live,
                                                                  const c10::BFloat16* const* vrows, int64_t voff,
                                                                  int64_t vs, int64_t n, const __mmask32* w,
                                                                  int64_t bytes, Ahead ahead, __m512 (&E)[R][C],
                                                                  __m512 (&O)[R][C]) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const c10::BFloat16* v0 = vrows[0] + voff;  // key 0's values where they are vs apart (vs != 0)
  for (int64_t j = 0; j < n; ++j) {
    const c10::BFloat16* v = vs != 0 ? v0 + j * vs : vrows[j] + voff;
    if (vs != 0) fetch_ahead_strided(reinterpret_cast<const char*>(v), 1, 0, ahead, bytes);
    else fetch_ahead(&v, 1, ahead, bytes);
    __m512 ve[C], vo[C];
#pragma GCC unroll 4
    for (int g = 0; g < C; ++g) {
      const __m512i x = _mm512_maskz_loadu_epi16(w[g], v + 32 * g);
      ve[g] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      vo[g] = _mm512_castsi512_ps(_mm512_and_si512(x, high_half));
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const float p = P[i * ldP + j];
      const __mmask16 k = Every || (live[i] && p != 0.f) ? __mmask16(0xffff) : __mmask16(0);
      const __m512 vp = _mm512_set1_ps(p);
#pragma GCC unroll 4
      for (int g = 0; g < C; ++g) {
        E[i][g] = _mm512_mask3_fmadd_ps(vp, ve[g], E[i][g], k);
        O[i][g] = _mm512_mask3_fmadd_ps(vp, vo[g], O[i][g], k);
      }
    }
  }
}

// pv_rows for bf16 values, R query rows of one KV head at a time (a GQA group shares each value load and its
// widening) over C chunks of 32 values: 2 * R * C independent accumulators (8 or 16), where one row of 64 had 4 FMA
// chains waiting on each other's latency. 32 values a load, split into their even and odd elements (a bf16 is the
// high half of an fp32: even = word << 16, odd = word & 0xffff0000); the accumulators hold even/odd order inside the
// key loop and natural order outside it. A key whose P is 0 (or a row not live) leaves the accumulator untouched
// (masked FMA), so each row gets pv_rows' products and sums in its order: the results are the same bits. vs != 0
// (Stream's v_stride, a dense cache): key j's values at key 0's + j * vs, fetched ahead row by row without the
// table (with scores_bf16_dp_strided, bf16 MHA D=64 one-token steps on one 512-key cache, one thread, Intel Xeon
// AMX: 0.86-0.89x -> 0.92-0.94x PyTorch's SDPA).
template <int R, int C>
FA_AVX512 inline void pv_bf16_rows(const float* P, int64_t ldP, const uint8_t* live,
                                   const c10::BFloat16* const* vrows, int64_t voff, int64_t n, int64_t Dv,
                                   float* acc, Ahead ahead, int64_t vs) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const bool every = all_count<R>(P, ldP, live, n);
  for (int64_t d0 = 0; d0 < Dv; d0 += 32 * C) {
    __mmask16 m[2 * C];
    __mmask32 w[C];
    __m512 E[R][C], O[R][C];
    for (int g = 0; g < C; ++g) {
      const int64_t left = std::clamp<int64_t>(Dv - d0 - 32 * g, 0, 32);
      w[g] = left == 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1);
      m[2 * g] = vec512::tail(std::min<int64_t>(left, 16));
      m[2 * g + 1] = vec512::tail(std::max<int64_t>(left - 16, 0));
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const float* a = acc + i * Dv + d0;
#pragma GCC unroll 4
      for (int g = 0; g < C; ++g) {
        const __m512 n0 = _mm512_maskz_loadu_ps(m[2 * g], a + 32 * g);
        const __m512 n1 = _mm512_maskz_loadu_ps(m[2 * g + 1], a + 32 * g + 16);
        E[i][g] = _mm512_permutex2var_ps(n0, even, n1);
        O[i][g] = _mm512_permutex2var_ps(n0, odd, n1);
      }
    }
    const int64_t bytes = std::min<int64_t>(32 * C, Dv - d0) * 2;  // of each value row this pass reads
    if (every) pv_bf16_keys<R, C, true>(P, ldP, live, vrows, voff + d0, vs, n, w, bytes, ahead, E, O);
    else pv_bf16_keys<R, C, false>(P, ldP, live, vrows, voff + d0, vs, n, w, bytes, ahead, E, O);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      float* a = acc + i * Dv + d0;
#pragma GCC unroll 4
      for (int g = 0; g < C; ++g) {
        _mm512_mask_storeu_ps(a + 32 * g, m[2 * g], _mm512_permutex2var_ps(E[i][g], lo, O[i][g]));
        _mm512_mask_storeu_ps(a + 32 * g + 16, m[2 * g + 1], _mm512_permutex2var_ps(E[i][g], hi, O[i][g]));
      }
    }
  }
}

// The R-row kernel of T with V values a pass (64 or 128): pv_bf16_rows for bf16, pv_rows otherwise.
template <typename T, int R, int V>
FA_AVX512 inline void pv_kernel(const float* P, int64_t ldP, const uint8_t* live, const T* const* vrows,
                                int64_t voff, int64_t n, int64_t Dv, float* acc, Ahead ahead, int64_t vs) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    pv_bf16_rows<R, V / 32>(P, ldP, live, vrows, voff, n, Dv, acc, ahead, vs);
  } else {
    pv_rows<T, R, V / 16>(P, ldP, live, vrows, voff, n, Dv, acc, ahead);
  }
}

// Rows in runs that read one KV head (voff equal): four at a time, then two, then one; 64 values a pass for four
// rows, 128 for fewer (64 where the head has no more). Where lone_stream, a row alone on a head of at most 64 values
// takes pv_avx2's 8 chains of 8 lanes: fp32 MHA one-token steps on SDPA's layout, caches from memory, read 1.32-1.48x
// PyTorch's SDPA that way against 1.09-1.15x with pv_rows' 4 chains of 16 (D = 48 and 64, one thread, AMD EPYC Zen 4,
// 2026-12-05; fp16 +10%, D = 32 and bf16 level; the same loop in 16 lanes, plain or masked loads, read as pv_rows:
// the lane width, not the loop, makes the difference). On an Intel Xeon (AMX, 2026-12-05, the two ways switched
// per call in one process, caches from memory) the reverse: the 16-lane kernels with scores_avx512_c read, one
// thread, fp32 MHA D=64 1.01-1.05x / 1.16-1.17x torch at 512 / 2048 keys against 0.90-0.92x / 1.02-1.05x, D=48 1.00x
// against 0.91x, D=32 0.98x against 0.92x, bf16 0.71-0.84x against 0.70-0.79x, fp16 1.54x against 1.31x; two threads
// fp32 +6-8%, fp16 +19%, bf16 level (+-10% run to run). Both sum each value over the keys in order, one FMA each:
// the same bits.
template <typename T>
FA_AVX512 void pv_avx512(const float* P, int64_t ldP, const uint8_t* live, int64_t M, const T* const* vrows,
                         const int64_t* voff, int64_t n, int64_t Dv, float* acc, const Stream& st) {
  for (int64_t r = 0; r < M;) {
    int64_t run = 1;
    while (run < 4 && r + run < M && voff[r + run] == voff[r]) ++run;
    const float* p = P + r * ldP;
    float* a = acc + r * Dv;
    const Ahead ahead = row_ahead(voff, r, st.v_ahead);
    if (run == 1 && Dv <= 64 && st.lone) {
      pv_avx2<T>(p, ldP, live + r, 1, vrows, voff + r, n, Dv, a, st);
    } else if (run == 4) {
      pv_kernel<T, 4, 64>(p, ldP, live + r, vrows, voff[r], n, Dv, a, ahead, st.v_stride);
    } else if (run >= 2) {
      run = 2;
      if (Dv > 64) pv_kernel<T, 2, 128>(p, ldP, live + r, vrows, voff[r], n, Dv, a, ahead, st.v_stride);
      else pv_kernel<T, 2, 64>(p, ldP, live + r, vrows, voff[r], n, Dv, a, ahead, st.v_stride);
    } else if (live[r] && Dv <= 64) {
      pv_kernel<T, 1, 64>(p, ldP, live + r, vrows, voff[r], n, Dv, a, ahead, st.v_stride);
    } else if (live[r]) {
      pv_kernel<T, 1, 128>(p, ldP, live + r, vrows, voff[r], n, Dv, a, ahead, st.v_stride);
    }
    r += run;
  }
}
#endif

template <typename T>
void scores(const float* Qf, int64_t M, int64_t D, const T* const* krows, const int64_t* koff, int64_t n, float* S,
            int64_t ldS, const Stream& st) {
#ifdef FASTATTN_VEC512
  if (vec512::available()) return scores_avx512<T>(Qf, M, D, krows, koff, n, S, ldS, st);
#endif
#ifdef FASTATTN_X86
  if (vec::use_avx2()) return scores_avx2<T>(Qf, M, D, krows, koff, n, S, ldS, st);
#endif
  scores_scalar<T>(Qf, M, D, krows, koff, n, S, ldS);
}

template <typename T>
void pv(const float* P, int64_t ldP, const uint8_t* live, int64_t M, const T* const* vrows, const int64_t* voff,
        int64_t n, int64_t Dv, float* acc, const Stream& st) {
#ifdef FASTATTN_VEC512
  if (vec512::available()) return pv_avx512<T>(P, ldP, live, M, vrows, voff, n, Dv, acc, st);
#endif
#ifdef FASTATTN_X86
  if (vec::use_avx2()) return pv_avx2<T>(P, ldP, live, M, vrows, voff, n, Dv, acc, st);
#endif
  pv_scalar<T>(P, ldP, live, M, vrows, voff, n, Dv, acc);
}


}  // namespace
}  // namespace fastattn::cpu::decode
