// Row helpers for the softmax and the tile packing, with an AVX2+FMA+F16C path chosen at run time
// (GCC/Clang target attributes, so the build needs no -march flag and runs on any x86-64 or other CPU)
// and a portable scalar path.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_X86 1
#include <immintrin.h>
#define FA_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#include "vec512.h"
#include "vec512_grad.h"  // the backward's rows: grad_row, grad_pair, exp_lse_row

namespace fastattn::cpu::vec {

// Prefetch the cache line at a to L1 (and L2) or to L2 only. Inline assembly on x86: GCC 12 emitted no instruction
// for __builtin_prefetch in decode.cpp (objdump of the built extension: not one prefetch; a one-function file with the
// same flags and headers kept it; cause not found), which left decode's prefetch_block without effect from its first
// commit.
inline void prefetch(const char* a, bool l1) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (l1) asm volatile("prefetcht0 %0" : : "m"(*a));
  else asm volatile("prefetcht1 %0" : : "m"(*a));
#else
  if (l1) __builtin_prefetch(a, 0, 3);
  else __builtin_prefetch(a, 0, 2);
#endif
}

// Prefetch the first `n` elements of a row into L1, a row or more before a pass reads it: a float mask's rows lie a
// whole row of the mask apart (4 KB at 1024 keys), and a tile reads a 2 KB piece of each, too short for the hardware
// prefetchers to run ahead of the pass.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* a = reinterpret_cast<const char*>(row);
  for (int64_t c = 0; c < n * int64_t(sizeof(T)); c += 64) prefetch(a + c, true);
}

inline bool use_avx2() {
#ifdef FASTATTN_X86
  static const bool on = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && isa_cap() >= 1;
  return on;
#else
  return false;
#endif
}

#ifdef FASTATTN_X86
// 2^t for 8 lanes, as vec512::exp2_16 computes it: f = t - floor(t), exp2_poly's degree-5 polynomial for 2^f
// (relative error 1.4e-7, p(0) = 1 exactly, so a row's top score gives P = 1) and 2^floor(t) built in the exponent
// bits. t < -125 (incl. -inf) gives exactly 0, never a denormal; t >= 128 gives +inf; NaN stays NaN (a NaN score must
// poison its row, as in PyTorch). It replaced a Cody-Waite exp with a degree-6 polynomial: 6 fewer instructions a
// vector, the fp32 forward 2-8% faster at D = 64-256 (AMD EPYC Zen 3, one thread, B1-4 H8 S512-2048).
FA_AVX2 inline __m256 exp2_8(__m256 t) {
  const __m256 keep = _mm256_cmp_ps(t, _mm256_set1_ps(-125.f), _CMP_NLT_UQ);  // t >= -125 or NaN
  // (max and min return their second operand when either is NaN: t stays NaN)
  t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-125.f), t));
  const __m256 k = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, k);
  __m256 p = _mm256_set1_ps(0.0018671181751415133f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.009017054922878742f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.05579989403486252f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24016445875167847f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931512951850891f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);  // (a NaN f gives a NaN p)
}

// exp(x - m) for 8 lanes, the max subtracted first as in PyTorch's softmax (vec512's Exact form).
FA_AVX2 inline __m256 exp_sub8(__m256 x, __m256 m) {
  return exp2_8(_mm256_mul_ps(_mm256_sub_ps(x, m), _mm256_set1_ps(1.44269504088896341f)));
}

FA_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

FA_AVX2 inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four running maxima, as vec512::max_row (one leaves the loop bound by vmaxps's latency).
FA_AVX2 inline float max_row_avx2(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + j + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + j + 24));
  }
  for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
  float r = hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; j < n; ++j) r = std::max(r, x[j]);
  return r;
}

// x = exp(x - m); returns the sum. The tail runs through the same vector exp (masked load) so every
// element is computed the same way. Two sums, one for even and one for odd 8-lane vectors (one add chain would bound
// the loop), met at the end: a row's sum then has the same bits whatever zeros (masked keys) pad its end, as the
// packed grouped-query rows need (tests/test_cpu_kernels.py, test_packed_gqa_rows_are_their_own_heads).
FA_AVX2 inline float exp_sum_row_avx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 e0 = exp_sub8(_mm256_loadu_ps(x + j), vm), e1 = exp_sub8(_mm256_loadu_ps(x + j + 8), vm);
    _mm256_storeu_ps(x + j, e0);
    _mm256_storeu_ps(x + j + 8, e1);
    s[0] = _mm256_add_ps(s[0], e0);
    s[1] = _mm256_add_ps(s[1], e1);
  }
  if (j + 8 <= n) {  // an even vector
    const __m256 e = exp_sub8(_mm256_loadu_ps(x + j), vm);
    _mm256_storeu_ps(x + j, e);
    s[0] = _mm256_add_ps(s[0], e);
    j += 8;
  }
  if (j < n) {
    alignas(32) float t[8];
    for (int u = 0; u < 8; ++u) t[u] = j + u < n ? x[j + u] : -INFINITY;
    const __m256 e = exp_sub8(_mm256_load_ps(t), vm);
    _mm256_store_ps(t, e);
    s[(j >> 3) & 1] = _mm256_add_ps(s[(j >> 3) & 1], e);
    for (int u = 0; j + u < n; ++u) x[j + u] = t[u];
  }
  return hsum8(_mm256_add_ps(s[0], s[1]));
}

// 8 consecutive elements of fp32, bf16 (the high half of an fp32) or fp16 (F16C) as fp32 lanes.
template <typename T>
FA_AVX2 inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

FA_AVX2 inline __m256i abs_bits16_bf16(const c10::BFloat16* x) {  // 16 bf16 magnitudes as uint16
  return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), _mm256_set1_epi16(0x7fff));
}

template <typename T>
FA_AVX2 inline __m256i abs_bits8(const T* x) {  // 8 magnitudes as fp32 bits
  return _mm256_and_si256(_mm256_castps_si256(load8(x)), _mm256_set1_epi32(0x7fffffff));
}

// max |x[0, n)| as fp32, NaN when any element is NaN, on the bits as vec512::max_abs_row: |x| as an int32 (a bf16's
// as a uint16) orders like the magnitude and a NaN's lies above +inf's. Four running maxima; the scalar loop it
// replaced was ~4% of a padded fp32 forward (the bound pass of key_end.cpp; AMD EPYC Zen 3, B2 H2 S512 D128).
template <typename T>
FA_AVX2 inline float max_abs_row_avx2(const T* x, int64_t n) {
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  int32_t top;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // 16 words a load, no widening
    for (; j + 64 <= n; j += 64) {
      m0 = _mm256_max_epu16(m0, abs_bits16_bf16(x + j));
      m1 = _mm256_max_epu16(m1, abs_bits16_bf16(x + j + 16));
      m2 = _mm256_max_epu16(m2, abs_bits16_bf16(x + j + 32));
      m3 = _mm256_max_epu16(m3, abs_bits16_bf16(x + j + 48));
    }
    for (; j + 16 <= n; j += 16) m0 = _mm256_max_epu16(m0, abs_bits16_bf16(x + j));
    const __m256i m = _mm256_max_epu16(_mm256_max_epu16(m0, m1), _mm256_max_epu16(m2, m3));
    alignas(32) uint16_t w[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w), m);
    uint16_t t = *std::max_element(w, w + 16);
    for (; j < n; ++j) {
      uint16_t b;
      std::memcpy(&b, x + j, sizeof(b));
      t = std::max<uint16_t>(t, b & 0x7fff);
    }
    top = int32_t(t) << 16;
  } else {  // fp32, or fp16 widened (F16C): the widened magnitude orders the same
    for (; j + 32 <= n; j += 32) {
      m0 = _mm256_max_epi32(m0, abs_bits8<T>(x + j));
      m1 = _mm256_max_epi32(m1, abs_bits8<T>(x + j + 8));
      m2 = _mm256_max_epi32(m2, abs_bits8<T>(x + j + 16));
      m3 = _mm256_max_epi32(m3, abs_bits8<T>(x + j + 24));
    }
    for (; j + 8 <= n; j += 8) m0 = _mm256_max_epi32(m0, abs_bits8<T>(x + j));
    const __m256i m = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
    alignas(32) int32_t w[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w), m);
    top = *std::max_element(w, w + 8);
    for (; j < n; ++j) {
      const float f = static_cast<float>(x[j]);
      int32_t b;
      std::memcpy(&b, &f, sizeof(b));  // (the mask below drops the sign)
      top = std::max(top, b & 0x7fffffff);
    }
  }
  if (top > 0x7f800000) return std::numeric_limits<float>::quiet_NaN();
  float out;
  std::memcpy(&out, &top, sizeof(out));
  return out;
}

// x = x * a + float(b) (a bias row in the input's dtype), with one rounding as vec512::fma_row: the AVX2 bias pass
// of a masked tile, where a copy of the bias and an SSE2 loop had been.
template <typename T>
FA_AVX2 inline void fma_row_avx2(float* x, const T* b, int64_t n, float a) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), va, load8(b + j)));
  for (; j < n; ++j) x[j] = std::fma(x[j], a, static_cast<float>(b[j]));
}

// x += float(b); returns the new max over x[0, n) (NaN lanes may be dropped, as max_row_avx2): a float mask's bias
// pass and the softmax's max pass in one (the forward on fully visible tiles).
template <typename T>
FA_AVX2 inline float add_max_row_avx2(float* x, const T* b, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(x + j), load8(b + j));
    const __m256 s1 = _mm256_add_ps(_mm256_loadu_ps(x + j + 8), load8(b + j + 8));
    _mm256_storeu_ps(x + j, s0);
    _mm256_storeu_ps(x + j + 8, s1);
    m0 = _mm256_max_ps(m0, s0);
    m1 = _mm256_max_ps(m1, s1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(x + j), load8(b + j));
    _mm256_storeu_ps(x + j, s0);
    m0 = _mm256_max_ps(m0, s0);
  }
  float r = hmax8(_mm256_max_ps(m0, m1));
  for (; j < n; ++j) r = std::max(r, x[j] += static_cast<float>(b[j]));
  return r;
}

// dst (8 x 8, ld ldd) = mul * src (8 x 8, rows ss apart, unit stride) transposed, in registers.
template <typename T>
FA_AVX2 inline void transpose8(const T* src, int64_t ss, float* dst, int64_t ldd, __m256 vmul) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(load8(src + i * ss), vmul);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then quads: each 128-bit lane holds a 4 x 4 block's column
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // rows 0-3 and 4-7's halves joined
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// transpose() with unit-stride rows: 8 x 8 blocks in registers, the edges element by element. Packing K^T for
// brgemm took 2.6% of the fp32 forward's samples with the scalar loop, 2.1% with this (AMD EPYC Zen 3, B2 H2 S512
// D128, one thread): what is left is mostly the first read of the K rows from memory.
template <typename T>
FA_AVX2 inline void transpose_avx2(const T* src, int64_t ss, int64_t rows, int64_t cols, float* dst, int64_t ldd,
                                   float mul) {
  const __m256 vmul = _mm256_set1_ps(mul);
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < r8; r0 += 8) {
    for (int64_t c0 = 0; c0 < c8; c0 += 8) transpose8<T>(src + r0 * ss + c0, ss, dst + c0 * ldd + r0, ldd, vmul);
  }
  for (int64_t r = 0; r < rows; ++r) {  // the edges: columns past c8 of every row, rows past r8 of the rest
    for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * ldd + r] = static_cast<float>(src[r * ss + c]) * mul;
  }
}

template <typename T>
FA_AVX2 inline void load_row_avx2(const T* src, float* dst, int64_t n, float mul) {
  const __m256 vmul = _mm256_set1_ps(mul);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(load8(src + j), vmul));
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]) * mul;
}

// sum_j float(a[j]) * float(b[j]) (delta = rowsum(dO * O)).
template <typename T>
FA_AVX2 inline float dot_row_avx2(const T* a, const T* b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) s = _mm256_fmadd_ps(load8(a + j), load8(b + j), s);
  float r = hsum8(s);
  for (; j < n; ++j) r += static_cast<float>(a[j]) * static_cast<float>(b[j]);
  return r;
}
#endif

inline float max_row(const float* x, int64_t n) {
#ifdef FASTATTN_X86
  if (vec512::available()) return vec512::max_row(x, n);
  if (use_avx2()) return max_row_avx2(x, n);
#endif
  float r = -INFINITY;
  for (int64_t j = 0; j < n; ++j) r = std::max(r, x[j]);
  return r;
}

inline float exp_sum_row(float* x, int64_t n, float m) {
#ifdef FASTATTN_X86
  if (vec512::available()) return vec512::exp_sum_row_f32(x, n, m);
  if (use_avx2()) return exp_sum_row_avx2(x, n, m);
#endif
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    s += x[j];
  }
  return s;
}

// x = x * a + float(b).
template <typename T>
inline void fma_row(float* x, const T* b, int64_t n, float a) {
#ifdef FASTATTN_X86
  if (vec512::available()) return vec512::fma_row<T>(x, b, n, a);
  if (use_avx2()) return fma_row_avx2<T>(x, b, n, a);
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] * a + static_cast<float>(b[j]);
}

// x += float(b); returns max over x (NaN lanes may be dropped: exp keeps them, so a NaN still reaches the row sum).
template <typename T>
inline float add_max_row(float* x, const T* b, int64_t n) {
#ifdef FASTATTN_X86
  if (vec512::available()) {
    vec512::fma_row<T>(x, b, n, 1.f);
    return vec512::max_row(x, n);
  }
  if (use_avx2()) return add_max_row_avx2<T>(x, b, n);
#endif
  float r = -INFINITY;
  for (int64_t j = 0; j < n; ++j) r = std::max(r, x[j] += static_cast<float>(b[j]));
  return r;
}

// max |x[0, n)| as fp32; NaN when any element is NaN.
template <typename T>
inline float max_abs_row(const T* x, int64_t n) {
#ifdef FASTATTN_X86
  if (vec512::available()) return vec512::max_abs_row<T>(x, n);
  if (use_avx2()) return max_abs_row_avx2<T>(x, n);
#endif
  float m = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float a = std::abs(static_cast<float>(x[j]));
    if (a != a) return a;
    m = std::max(m, a);
  }
  return m;
}

// sum_j float(a[j * sa]) * float(b[j * sb]).
template <typename T>
inline float dot_row(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
#ifdef FASTATTN_X86
  if (sa == 1 && sb == 1 && vec512::available()) return vec512::dot_row<T>(a, b, n);
  if (sa == 1 && sb == 1 && use_avx2()) return dot_row_avx2<T>(a, b, n);
#endif
  float r = 0.f;
  for (int64_t j = 0; j < n; ++j) r += static_cast<float>(a[j * sa]) * static_cast<float>(b[j * sb]);
  return r;
}

// dst[j] = float(src[j * stride]) * mul.
template <typename T>
inline void load_row(const T* src, int64_t stride, float* dst, int64_t n, float mul) {
#ifdef FASTATTN_X86
  if (stride == 1 && vec512::available()) return vec512::load_row<T>(src, dst, n, mul);
  if (stride == 1 && use_avx2()) return load_row_avx2<T>(src, dst, n, mul);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]) * mul;
}

// dst (cols x rows, ld ldd; fp32) = mul * src (rows x cols; row r at r * ss, column c at c * sd) transposed and
// converted, 16 x 16 blocks at a time (AVX-512 registers for rows with unit stride; AVX2: transpose_avx2).
template <typename T>
inline void transpose(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, float* dst, int64_t ldd,
                      float mul = 1.f) {
#ifdef FASTATTN_X86
  if (sd == 1 && !vec512::available() && use_avx2()) return transpose_avx2<T>(src, ss, rows, cols, dst, ldd, mul);
#endif
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nr = std::min<int64_t>(16, rows - r0), nc = std::min<int64_t>(16, cols - c0);
#ifdef FASTATTN_X86
      if (sd == 1 && vec512::available()) {
        vec512::transpose16<T>(src + r0 * ss + c0, ss, nr, nc, dst + c0 * ldd + r0, ldd, mul);
        continue;
      }
#endif
      for (int64_t c = c0; c < c0 + nc; ++c) {
        for (int64_t r = r0; r < r0 + nr; ++r) dst[c * ldd + r] = static_cast<float>(src[r * ss + c * sd]) * mul;
      }
    }
  }
}

// dst[j * stride] = T(src[j] * mul).
template <typename T>
inline void store_row(const float* src, T* dst, int64_t stride, int64_t n, float mul) {
#ifdef FASTATTN_X86
  if (stride == 1 && vec512::available()) return vec512::store_row<T>(src, dst, n, mul);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j * stride] = static_cast<T>(src[j] * mul);
}

inline void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

}  // namespace fastattn::cpu::vec
