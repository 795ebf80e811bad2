// AVX-512 row helpers of the backward's softmax gradient (bwd_lowp.cpp, tile.h): P = exp(eff * s - lse) from the
// forward's lse, dS = P * (dP - delta), and their roundings to the input dtype for the products that follow. Beside
// vec512.h (the forward's row pieces, which these build on), with the same target attributes and no scalar twin.
#pragma once
#include "vec512.h"  // exp_step, exp2_16, kExpDegree, kLog2e, tail, load16, store16: the forward's row pieces

namespace fastattn::cpu::vec512 {

#ifdef FASTATTN_VEC512
// The backward's P = exp(eff * s - lse) = 2^arg for 16 scores s, arg in exp_step's two forms (the forward's lse
// was formed in the same one): vs, vl from lse_scale and lse_term.
template <bool Exact>
FA_AVX512 inline __m512 lse_arg(__m512 s, __m512 vs, __m512 vl) {
  if constexpr (Exact) return _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(s, vs), vl), _mm512_set1_ps(kLog2e));
  return _mm512_fmadd_ps(s, vs, vl);
}

template <bool Exact>
FA_AVX512 inline __m512 lse_scale(float eff) { return _mm512_set1_ps(Exact ? eff : eff * kLog2e); }

template <bool Exact>
FA_AVX512 inline __m512 lse_term(float lse) { return _mm512_set1_ps(Exact ? lse : -lse * kLog2e); }

// Backward row: P = exp(eff * S - lse) into S, dS = P * (dP - delta) into dP (no dropout, no softcap); T: the tile
// dtype (its kExpDegree and exact_arg).
template <typename T, bool Exact>
FA_AVX512 inline void grad_row_as(float* S, float* dP, int64_t n, float eff, float lse, float delta) {
  const __m512 vs = lse_scale<Exact>(eff), vl = lse_term<Exact>(lse), vd = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    const __m512 P = exp2_16<kExpDegree<T>>(lse_arg<Exact>(_mm512_maskz_loadu_ps(t, S + j), vs, vl));
    _mm512_mask_storeu_ps(S + j, t, P);
    _mm512_mask_storeu_ps(dP + j, t, _mm512_mul_ps(P, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dP + j), vd)));
  }
}

template <typename T>
FA_AVX512 inline void grad_row(float* S, float* dP, int64_t n, float eff, float lse, float delta) {
  if (exact_arg<T>(lse)) return grad_row_as<T, true>(S, dP, n, eff, lse, delta);
  grad_row_as<T, false>(S, dP, n, eff, lse, delta);
}

// P = exp(eff * S - lse) in place (T as grad_row's).
template <typename T, bool Exact>
FA_AVX512 inline void exp_lse_row_as(float* S, int64_t n, float eff, float lse) {
  const __m512 vs = lse_scale<Exact>(eff), vl = lse_term<Exact>(lse);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    const __m512 arg = lse_arg<Exact>(_mm512_maskz_loadu_ps(t, S + j), vs, vl);
    _mm512_mask_storeu_ps(S + j, t, exp2_16<kExpDegree<T>>(arg));
  }
}

template <typename T>
FA_AVX512 inline void exp_lse_row(float* S, int64_t n, float eff, float lse) {
  if (exact_arg<T>(lse)) return exp_lse_row_as<T, true>(S, n, eff, lse);
  exp_lse_row_as<T, false>(S, n, eff, lse);
}

// 16 lanes rounded to T, as the low 16 bits of 32-bit lanes.
template <typename T>
FA_AVX512 inline __m512i round16(__m512 x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  } else {
    return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Two rows r0, r1 (r1 null: zeros) of n fp32 as VNNI pairs: dst[2j] = T(r0[j]), dst[2j+1] = T(r1[j]).
template <typename T>
FA_AVX512 inline void store_pair(T* dst, const float* r0, const float* r1, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    const __m512i lo = round16<T>(_mm512_maskz_loadu_ps(t, r0 + j));
    const __m512i hi = r1 ? round16<T>(_mm512_maskz_loadu_ps(t, r1 + j)) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + 2 * j, t, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// One 16-column step of grad_pair (t: the columns' lane mask; a constant all-ones mask folds away).
template <typename T, bool Exact>
FA_AVX512 __attribute__((always_inline)) inline void grad_pair_step(
    const float* S0, const float* S1, const float* dP0, const float* dP1, int64_t j, __mmask16 t, __m512 vs,
    __m512 vl0, __m512 vd0, __m512 vl1, __m512 vd1, T* Pv, T* dSv, T* dSa0, T* dSa1) {
  constexpr int Deg = kExpDegree<T>;
  const __m512 P0 = exp2_16<Deg>(lse_arg<Exact>(_mm512_maskz_loadu_ps(t, S0 + j), vs, vl0));
  const __m512 dS0 = _mm512_mul_ps(P0, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dP0 + j), vd0));
  __m512 P1 = _mm512_setzero_ps(), dS1 = P1;
  if (S1) {
    P1 = exp2_16<Deg>(lse_arg<Exact>(_mm512_maskz_loadu_ps(t, S1 + j), vs, vl1));
    dS1 = _mm512_mul_ps(P1, _mm512_sub_ps(_mm512_maskz_loadu_ps(t, dP1 + j), vd1));
  }
  const __m512i dS0r = round16<T>(dS0), dS1r = round16<T>(dS1);
  _mm512_mask_storeu_epi32(Pv + 2 * j, t, _mm512_or_si512(round16<T>(P0), _mm512_slli_epi32(round16<T>(P1), 16)));
  _mm512_mask_storeu_epi32(dSv + 2 * j, t, _mm512_or_si512(dS0r, _mm512_slli_epi32(dS1r, 16)));
  _mm256_mask_storeu_epi16(dSa0 + j, t, _mm512_cvtepi32_epi16(dS0r));
  if (dSa1) _mm256_mask_storeu_epi16(dSa1 + j, t, _mm512_cvtepi32_epi16(dS1r));
}

// Backward rows r0, r1 of a tile in one pass (r1 absent: S1 null, its lanes 0): P = exp(eff * S - lse) and
// dS = P * (dP - delta) as grad_row computes them, rounded to T straight into the three layouts the products take:
// P and dS as VNNI row pairs (Pv, dSv: as store_pair) and dS rows (dSa0, dSa1, zero-filled to n_pad: as
// round_row). The fp32 P and dS never go back to memory (writing them and reading them twice more cost ~10% of a
// bf16 backward). Whole steps run with a constant mask (masked loads and stores with a mask known at run time only
// cost ~8% of a bf16 forward's exp pass loop, measured there).
template <typename T, bool Exact>
FA_AVX512 inline void grad_pair_as(const float* S0, const float* S1, const float* dP0, const float* dP1, int64_t n,
                                   int64_t n_pad, float eff, const float lse[2], const float delta[2], T* Pv, T* dSv,
                                   T* dSa0, T* dSa1) {
  const __m512 vs = lse_scale<Exact>(eff);
  const __m512 vl0 = lse_term<Exact>(lse[0]), vd0 = _mm512_set1_ps(delta[0]);
  const __m512 vl1 = S1 ? lse_term<Exact>(lse[1]) : _mm512_setzero_ps(), vd1 = _mm512_set1_ps(S1 ? delta[1] : 0.f);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    grad_pair_step<T, Exact>(S0, S1, dP0, dP1, j, __mmask16(0xffff), vs, vl0, vd0, vl1, vd1, Pv, dSv, dSa0, dSa1);
  }
  if (j < n) grad_pair_step<T, Exact>(S0, S1, dP0, dP1, j, tail(n - j), vs, vl0, vd0, vl1, vd1, Pv, dSv, dSa0, dSa1);
  for (int64_t j = n; j < n_pad; ++j) {
    dSa0[j] = T(0.f);
    if (dSa1) dSa1[j] = T(0.f);
  }
}

template <typename T>
FA_AVX512 inline void grad_pair(const float* S0, const float* S1, const float* dP0, const float* dP1, int64_t n,
                                int64_t n_pad, float eff, const float lse[2], const float delta[2], T* Pv, T* dSv,
                                T* dSa0, T* dSa1) {
  if (exact_arg<T>(lse[0]) || (S1 && exact_arg<T>(lse[1]))) {
    return grad_pair_as<T, true>(S0, S1, dP0, dP1, n, n_pad, eff, lse, delta, Pv, dSv, dSa0, dSa1);
  }
  grad_pair_as<T, false>(S0, S1, dP0, dP1, n, n_pad, eff, lse, delta, Pv, dSv, dSa0, dSa1);
}
#endif

}  // namespace fastattn::cpu::vec512
