// AVX-512 row helpers for the matrix-unit path (fwd_lowp.cpp, bwd_lowp.cpp): the fused softmax pieces between
// the two products and the fp32 -> bf16/fp16 roundings of P (the backward's dS rows: vec512_grad.h). Only called
// where mm::path() chose brgemm, which requires AVX-512 (F, BW, DQ, VL), so there is no scalar twin: target
// attributes keep the build free of -march flags.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
#define FA_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,f16c")))
#include <cpuid.h>
#define FASTATTN_VEC512 1
#endif

namespace fastattn::cpu {
// FASTATTN_CPU_ISA=avx2 or =scalar (read once) holds the vector paths picked at run time below what the CPU has, so
// that one machine can test every path (tests/test_cpu_isa_cap.py): 2 no cap, 1 AVX2 at most, 0 scalar only.
inline int isa_cap() {
  static const int cap = [] {
    const char* e = std::getenv("FASTATTN_CPU_ISA");
    if (e == nullptr) return 2;
    return std::strcmp(e, "avx2") == 0 ? 1 : std::strcmp(e, "scalar") == 0 ? 0 : 2;
  }();
  return cap;
}
}  // namespace fastattn::cpu

namespace fastattn::cpu::vec512 {

#ifdef FASTATTN_VEC512
// Lanes [0, n) of 16 (n < 16 for row tails).
FA_AVX512 inline __mmask16 tail(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// 2^f on 0 <= f < 1 by a polynomial of degree Deg fitted to the relative error with p(0) = 1 exactly (so a row's
// top score gives P = 1, and a one-key row returns V exactly): relative error 3.0e-6 (4), 1.4e-7 (5).
template <int Deg>
FA_AVX512 inline __m512 exp2_poly(__m512 f) {
  static_assert(Deg == 4 || Deg == 5, "exp2_poly: degree 4 or 5");
  constexpr float c4[] = {0.013426518067717552f, 0.052242740988731384f, 0.24128007888793945f, 0.6930448412895203f,
                          1.f};
  constexpr float c5[] = {0.0018671181751415133f, 0.009017054922878742f, 0.05579989403486252f,
                          0.24016445875167847f, 0.6931512951850891f, 1.f};
  const float* c = Deg == 4 ? c4 : c5;
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i <= Deg; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return p;
}

// 2^t for 16 lanes: f = t - floor(t) in one vreduceps, exp2_poly for 2^f and vscalefps for 2^floor(t) (it floors
// its exponent operand itself; rounding to nearest took a vrndscaleps and a subtraction, ~3-5% of a bf16 forward).
// t < -125 (incl. -inf) gives exactly 0 through the lane mask, never through a denormal: an underflowing result
// costs a microcode assist (~100 cycles) per element on Intel, which made masked (causal) tiles 2x slower. NaN
// stays NaN: a NaN score must poison its row, as in PyTorch.
template <int Deg = 5>
FA_AVX512 inline __m512 exp2_16(__m512 t) {
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);  // t >= -125 or NaN
  t = _mm512_max_ps(_mm512_set1_ps(-125.f), t);  // NaN in the second operand is what max returns
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_maskz_scalef_ps(keep, exp2_poly<Deg>(f), t);
}

// The degree of P's exponential for a tile of T: P is rounded to T before it multiplies V (and dS to T), so its
// error need only stay well under T's rounding (bf16 2^-9 = 2.0e-3, fp16 2^-12 = 2.4e-4, relative): degree 4
// (3.0e-6) keeps it 80x under fp16's and the fp32 lse accurate to ~3e-6, as the blocks of a context-parallel call
// need to merge to the unsplit call; degree 3 (7.5e-5) measured 2-4% faster on a bf16 forward but moved lse by
// 1e-4. fp32 keeps degree 5 (its 1e-5 tolerance).
template <typename T>
constexpr int kExpDegree = std::is_same_v<T, float> ? 5 : 4;

constexpr float kLog2e = 1.44269504088896341f;

// The exponent's argument, 2^arg = exp(x * scale + b - m), in one of two forms. Fused: fma(x, scale * log2(e), b *
// log2(e) - m * log2(e)), one instruction, but m * log2(e) is rounded: P of the whole row is off by a factor 2^c,
// |c| ~ |m| * 2^-24. The row sum cancels c in the output, not in lse = m + log l, so a backward's P = exp(s - lse)
// carried it (fp32 dV 1.6e-3 off at scores ~1e4, where torch's subtracting kernel is exact), and from |m| ~ 1e9 c
// overflowed to NaN rows. Exact: ((x * scale + b) - m) * log2(e), rounded step by step, the max subtracted first as
// in PyTorch's softmax (the row's max scores give 2^0 = 1 exactly). fp32 rows always take it (two more instructions
// per 16 scores); bf16/fp16 rows from |m| >= kExactArgFrom, where |c| nears a tenth of their own rounding.
constexpr float kExactArgFrom = 2048.f;

// FASTATTN_CPU_PLANT=fused_arg (tests only, read once): every row takes the fused form, the bug the large-score
// check must catch (tests/test_cpu_kernels.py).
inline bool plant_fused_arg() {
  static const bool on = [] {
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e != nullptr && std::strcmp(e, "fused_arg") == 0;
  }();
  return on;
}

template <typename T>
inline bool exact_arg(float m) {
  // (a NaN m: exact, NaN either way)
  return (std::is_same_v<T, float> || !(std::fabs(m) < kExactArgFrom)) && !plant_fused_arg();
}

// 16 fp32 lanes stored as fp32, or rounded to bf16 (round to nearest even; NaN stays a quiet NaN) or fp16 (F16C
// rounding).
template <typename T>
FA_AVX512 inline void store16(T* dst, __m512 x, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(dst, m, x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_mask_storeu_epi16(dst, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T>
FA_AVX512 inline __m512 load16(const T* src, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, src);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src));
  }
}

// x[0, n) = x * a + float(b[0, n)): a score row's scale and bias in one pass.
template <typename T>
FA_AVX512 inline void fma_row(float* x, const T* b, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    _mm512_mask_storeu_ps(x + j, t, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, x + j), va, load16<T>(b + j, t)));
  }
}

// max |x[0, n)| as fp32; NaN when any element is NaN. On the bits: |x| as an int32 orders like the magnitude, and
// a NaN's lies above +inf's, so one integer max finds both. Four accumulators: with one, the max's latency bound
// the loop (a bound pass over Q and the padding of a masked bf16 forward was ~7% of it).
template <typename T>
FA_AVX512 inline __m512i abs_bits16(const T* x, __mmask16 t) {  // masked-off lanes load 0
  return _mm512_and_si512(_mm512_castps_si512(load16<T>(x, t)), _mm512_set1_epi32(0x7fffffff));
}

// bf16: the same on 32 words a load (a bf16 is the high word of an fp32), with no widening.
FA_AVX512 inline float max_abs_row_bf16(const c10::BFloat16* x, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 128 <= n; j += 128) {
    m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_loadu_si512(x + j), magnitude));
    m1 = _mm512_max_epu16(m1, _mm512_and_si512(_mm512_loadu_si512(x + j + 32), magnitude));
    m2 = _mm512_max_epu16(m2, _mm512_and_si512(_mm512_loadu_si512(x + j + 64), magnitude));
    m3 = _mm512_max_epu16(m3, _mm512_and_si512(_mm512_loadu_si512(x + j + 96), magnitude));
  }
  for (; j < n; j += 32) {  // masked-off words load 0
    const __mmask32 t = n - j >= 32 ? ~__mmask32(0) : __mmask32((1u << (n - j)) - 1);
    m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_maskz_loadu_epi16(t, x + j), magnitude));
  }
  const __m512i m = _mm512_max_epu16(_mm512_max_epu16(m0, m1), _mm512_max_epu16(m2, m3));
  const int32_t top = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(m)),
                                                               _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m, 1))));
  if (top > 0x7f80) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t wide = uint32_t(top) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

template <typename T>
FA_AVX512 inline float max_abs_row(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return max_abs_row_bf16(x, n);
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_epi32(m0, abs_bits16<T>(x + j, 0xffff));
    m1 = _mm512_max_epi32(m1, abs_bits16<T>(x + j + 16, 0xffff));
    m2 = _mm512_max_epi32(m2, abs_bits16<T>(x + j + 32, 0xffff));
    m3 = _mm512_max_epi32(m3, abs_bits16<T>(x + j + 48, 0xffff));
  }
  for (; j < n; j += 16) m0 = _mm512_max_epi32(m0, abs_bits16<T>(x + j, tail(n - j)));
  const int32_t top = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(m0, m1), _mm512_max_epi32(m2, m3)));
  if (top > 0x7f800000) return std::numeric_limits<float>::quiet_NaN();
  float out;
  std::memcpy(&out, &top, sizeof(out));
  return out;
}

// max over x[0, n) (NaN lanes may be dropped here; exp16 keeps them, so a NaN still reaches the row sum).
// Four running maxima: with one, vmaxps's latency bound the loop (4 cycles a vector; the pass measured ~1/3 of
// the exp pass after it, now ~1/8).
FA_AVX512 inline float max_row(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + j + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + j + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + j + 48));
  }
  for (; j < n; j += 16) m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(ninf, tail(n - j), x + j));
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// One 16-lane step of a softmax row: e = 2^arg on lanes t (0 elsewhere), added to sum; amax keeps the largest
// argument. Fused (vs = scale * log2(e), vm = -m * log2(e)): arg = x * vs + b * log2(e) + vm; Exact (vs = scale,
// vm = m): arg = ((x * vs + b) - vm) * log2(e). b: a bias row (nullptr: none).
template <int Deg, bool Exact, typename B = float>
FA_AVX512 inline __m512 exp_step(const float* x, __mmask16 t, __m512 vs, __m512 vm, __m512& sum, __m512& amax,
                                 const B* b = nullptr) {
  const __m512 xv = _mm512_maskz_loadu_ps(t, x);
  __m512 arg;
  if constexpr (Exact) {
    const __m512 s = b ? _mm512_fmadd_ps(xv, vs, load16<B>(b, t)) : _mm512_mul_ps(xv, vs);
    arg = _mm512_mul_ps(_mm512_sub_ps(s, vm), _mm512_set1_ps(kLog2e));
  } else {
    arg = _mm512_fmadd_ps(xv, vs, b ? _mm512_fmadd_ps(load16<B>(b, t), _mm512_set1_ps(kLog2e), vm) : vm);
  }
  amax = _mm512_mask_max_ps(amax, t, amax, arg);
  const __m512 e = _mm512_maskz_mov_ps(t, exp2_16<Deg>(arg));
  sum = _mm512_add_ps(sum, e);
  return e;
}

// The lanes of the second half of a 32-lane step at column j of an n-column row (none past the end).
FA_AVX512 inline __mmask16 tail_hi(int64_t n, int64_t j) { return n - j > 16 ? tail(n - j - 16) : __mmask16(0); }

// P = exp(scale * x - m) rounded to T into p[0, n), zero-filling p[n, n_pad); returns the fp32 sum of the
// unrounded P (the softmax denominator, as FlashAttention sums in fp32). With `keep_fp32`, x is overwritten
// with the fp32 P (dropout then works on it). With `arg_max`, also stores max (scale * x - m) * log2(e): how far
// above m the row went, for a caller that passed a running max instead of the row's own. With `bias`, x is
// scale * x + bias (the bias pass fused into this one). 32 lanes a step with two sums: with one, the sum's add
// latency bounded the loop (measured 9% slower).
// One 32-column step of exp_row (t0, t1: the two halves' lane masks; constant all-ones masks fold away).
template <typename T, bool Exact>
FA_AVX512 __attribute__((always_inline)) inline void exp_row_step(float* x, int64_t j, __mmask16 t0, __mmask16 t1,
                                                                  __m512 vs, __m512 vm, __m512& s0, __m512& s1,
                                                                  __m512& a0, __m512& a1, T* p, bool keep_fp32,
                                                                  const T* bias) {
  const T* b = bias ? bias + j : nullptr;
  const __m512 e0 = exp_step<kExpDegree<T>, Exact>(x + j, t0, vs, vm, s0, a0, b);
  const __m512 e1 = exp_step<kExpDegree<T>, Exact>(x + j + 16, t1, vs, vm, s1, a1, b ? b + 16 : nullptr);
  if (keep_fp32) {
    _mm512_mask_storeu_ps(x + j, t0, e0);
    _mm512_mask_storeu_ps(x + j + 16, t1, e1);
  } else {
    store16<T>(p + j, e0, t0);
    store16<T>(p + j + 16, e1, t1);
  }
}

template <typename T, bool Exact>
FA_AVX512 inline float exp_row_as(float* x, int64_t n, int64_t n_pad, float scale, float m, T* p, bool keep_fp32,
                                  float* arg_max, const T* bias) {
  const __m512 vs = _mm512_set1_ps(Exact ? scale : scale * kLog2e), vm = _mm512_set1_ps(Exact ? m : -m * kLog2e);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, a0 = _mm512_set1_ps(-INFINITY), a1 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {  // whole steps with constant masks (~8% of the loop, see grad_pair)
    exp_row_step<T, Exact>(x, j, __mmask16(0xffff), __mmask16(0xffff), vs, vm, s0, s1, a0, a1, p, keep_fp32, bias);
  }
  if (j < n) exp_row_step<T, Exact>(x, j, tail(n - j), tail_hi(n, j), vs, vm, s0, s1, a0, a1, p, keep_fp32, bias);
  for (int64_t j = n; j < n_pad; ++j) p[j] = T(0.f);
  if (arg_max) *arg_max = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

template <typename T>
FA_AVX512 inline float exp_row(float* x, int64_t n, int64_t n_pad, float scale, float m, T* p, bool keep_fp32,
                               float* arg_max = nullptr, const T* bias = nullptr) {
  return exact_arg<T>(m) ? exp_row_as<T, true>(x, n, n_pad, scale, m, p, keep_fp32, arg_max, bias)
                         : exp_row_as<T, false>(x, n, n_pad, scale, m, p, keep_fp32, arg_max, bias);
}

// r[c] = column c of the 16 x 16 block of 32-bit words whose row i is r[i]: three shuffle stages in registers (pairs
// of rows interleaved, then 4-row groups per 128-bit lane, then lanes gathered).
FA_AVX512 inline void transpose_regs16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i] lane L = rows i, i+1 at columns 4L, 4L+1; t[i+1]: 4L+2, 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + k] lane L = rows g..g+3 of column 4L + k
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // column 4L + k gathers lane L of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512i v0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), v1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    t[0 + k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int c = 0; c < 16; ++c) r[c] = t[c];
}

// dst (cols x rows, ld ldd; fp32) = mul * src (rows x cols of T, ld lds) transposed, for rows, cols <= 16 (rows past
// `rows` read as zeros, only the valid part stored).
template <typename T>
FA_AVX512 inline void transpose16(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd,
                                  float mul) {
  __m512i r[16];
  const __mmask16 cm = tail(cols), rm = tail(rows);
  const __m512 vmul = _mm512_set1_ps(mul);
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_castps_si512(i < rows ? _mm512_mul_ps(load16<T>(src + i * lds, cm), vmul) : _mm512_setzero_ps());
  }
  transpose_regs16(r);
  for (int c = 0; c < cols; ++c) _mm512_mask_storeu_ps(dst + c * ldd, rm, _mm512_castsi512_ps(r[c]));
}

// True where the CPU has AVX-512 F/BW/DQ/VL (checked once); the fp32 helpers of vec.h route here then.
inline bool available() {
  static const bool on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && isa_cap() >= 2;
  return on;
}

// x = exp(x - m) in place (fp32 tiles); returns the sum. Relative error 1.4e-7 (exp2_16). exp_row reads each
// lane before it writes it, so P may be x itself.
FA_AVX512 inline float exp_sum_row_f32(float* x, int64_t n, float m) {
  return exp_row<float>(x, n, n, 1.f, m, x, false);
}

// AVX512-BF16's one-instruction rounding (vcvtneps2bf16, round to nearest even like store16) where the CPU has it.
inline bool native_bf16() {
  static const bool on = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  }();
  return on;
}

// store16 for bf16 with vcvtneps2bf16 (call only where native_bf16()): one instruction for the emulated eight.
FA_AVX512BF16 __attribute__((always_inline)) inline void store16_native(c10::BFloat16* dst, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(x));
}

// One 32-column step of exp_row_native (t0, t1: the halves' lane masks; constant all-ones masks fold away).
template <bool Exact>
FA_AVX512BF16 __attribute__((always_inline)) inline void exp_native_step(
    float* x, int64_t j, __mmask16 t0, __mmask16 t1, __m512 vs, __m512 vm, __m512& s0, __m512& s1, __m512& a0,
    __m512& a1, c10::BFloat16* p, const c10::BFloat16* bias) {
  constexpr int Deg = kExpDegree<c10::BFloat16>;
  const c10::BFloat16* b = bias ? bias + j : nullptr;
  const __m512 e0 = exp_step<Deg, Exact>(x + j, t0, vs, vm, s0, a0, b);
  const __m512 e1 = exp_step<Deg, Exact>(x + j + 16, t1, vs, vm, s1, a1, b ? b + 16 : nullptr);
  store16_native(p + j, e0, t0);
  store16_native(p + j + 16, e1, t1);
}

template <bool Exact>
FA_AVX512BF16 inline float exp_row_native_as(float* x, int64_t n, int64_t n_pad, float scale, float m,
                                             c10::BFloat16* p, float* arg_max, const c10::BFloat16* bias) {
  const __m512 vs = _mm512_set1_ps(Exact ? scale : scale * kLog2e), vm = _mm512_set1_ps(Exact ? m : -m * kLog2e);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, a0 = _mm512_set1_ps(-INFINITY), a1 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {  // whole steps with constant masks (~8% of this loop, see grad_pair)
    exp_native_step<Exact>(x, j, __mmask16(0xffff), __mmask16(0xffff), vs, vm, s0, s1, a0, a1, p, bias);
  }
  if (j < n) exp_native_step<Exact>(x, j, tail(n - j), tail_hi(n, j), vs, vm, s0, s1, a0, a1, p, bias);
  for (int64_t j = n; j < n_pad; ++j) p[j] = c10::BFloat16(0.f);
  if (arg_max) *arg_max = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// exp_row (without keep_fp32) for bf16 rounding with vcvtneps2bf16 (call only where native_bf16()).
FA_AVX512BF16 inline float exp_row_native(float* x, int64_t n, int64_t n_pad, float scale, float m,
                                          c10::BFloat16* p, float* arg_max = nullptr,
                                          const c10::BFloat16* bias = nullptr) {
  return exact_arg<c10::BFloat16>(m) ? exp_row_native_as<true>(x, n, n_pad, scale, m, p, arg_max, bias)
                                     : exp_row_native_as<false>(x, n, n_pad, scale, m, p, arg_max, bias);
}

// p[0, n) = T(x[0, n)), p[n, n_pad) = 0.
template <typename T>
FA_AVX512 inline void round_row(const float* x, int64_t n, int64_t n_pad, T* p) {
  for (int64_t j = 0; j < n; j += 16) store16<T>(p + j, _mm512_maskz_loadu_ps(tail(n - j), x + j), tail(n - j));
  for (int64_t j = n; j < n_pad; ++j) p[j] = T(0.f);
}

// The upper 16-bit halves of a's 32-bit lanes, then b's: 32 bf16 from two vectors of bf16-exact fp32 values.
FA_AVX512 __attribute__((always_inline)) inline __m512i upper_halves(__m512 a, __m512 b) {
  const __m512i idx = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                       31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), idx, _mm512_castps_si512(b));
}

// hi[0, n) = bf16(x), lo[0, n) = bf16(x - hi) for fp16 x; zeros in [n, n_pad). Exact: hi keeps the top 8 of fp16's
// 11 significant bits (truncated), so x - hi has at most 3 and bf16 holds it. A NaN stays NaN in both (F16C quiets
// it, so its top half is a NaN too). hi0 (nullptr: x has no +-inf, as P): hi with +-inf as 0, and lo 0 there (x - hi
// is NaN): the operand of the cross products, so that only hi hi carries an inf and 0 * inf arises only where
// IEEE's product would give it. zero_lo: lo all zeros (the tests' planted bug, mm::plant_pairs_lo). 32 columns a step.
FA_AVX512 inline void split_bf16_row(const c10::Half* x, int64_t n, int64_t n_pad, c10::BFloat16* hi,
                                     c10::BFloat16* lo, c10::BFloat16* hi0, bool zero_lo = false) {
  const __m512i top = _mm512_set1_epi32(int32_t(0xffff0000u));
  for (int64_t j = 0; j < n; j += 32) {
    const __mmask16 t0 = tail(n - j), t1 = tail_hi(n, j);
    const __m512 v0 = load16<c10::Half>(x + j, t0), v1 = load16<c10::Half>(x + j + 16, t1);
    const __m512 h0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), top));
    const __m512 h1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), top));
    const __mmask32 t = __mmask32(t0) | (__mmask32(t1) << 16);
    __mmask16 f0 = 0xffff, f1 = 0xffff;  // finite lanes
    if (hi0 != nullptr) {
      f0 = __mmask16(~_mm512_fpclass_ps_mask(v0, 0x18));  // 0x18: +inf, -inf
      f1 = __mmask16(~_mm512_fpclass_ps_mask(v1, 0x18));
      _mm512_mask_storeu_epi16(hi0 + j, t, upper_halves(_mm512_maskz_mov_ps(f0, h0), _mm512_maskz_mov_ps(f1, h1)));
    }
    if (zero_lo) f0 = f1 = 0;
    _mm512_mask_storeu_epi16(hi + j, t, upper_halves(h0, h1));
    _mm512_mask_storeu_epi16(lo + j, t, upper_halves(_mm512_maskz_sub_ps(f0, v0, h0), _mm512_maskz_sub_ps(f1, v1, h1)));
  }
  for (int64_t j = n; j < n_pad; ++j) {
    hi[j] = lo[j] = c10::BFloat16(0.f);
    if (hi0 != nullptr) hi0[j] = c10::BFloat16(0.f);
  }
}

// x[0, n) *= a.
FA_AVX512 inline void scale_row(float* x, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    _mm512_mask_storeu_ps(x + j, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, x + j), va));
  }
}

// store_row for bf16 with store16_native (call only where native_bf16()).
FA_AVX512BF16 inline void store_row_native(const float* src, c10::BFloat16* dst, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    store16_native(dst + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, src + j), va), t);
  }
}

// dst[0, n) = float(src[0, n)) * a (unit stride input rows): 16 conversions an instruction where AVX2 took 8 (the
// fp32 tiles' conversion of fp16 K/V rows was ~10% of an fp16 8-token step, Intel Xeon, one thread).
template <typename T>
FA_AVX512 inline void load_row(const T* src, float* dst, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    _mm512_mask_storeu_ps(dst + j, t, _mm512_mul_ps(load16<T>(src + j, t), va));
  }
}

// dst[0, n) = T(src[0, n) * a) (unit stride output rows).
template <typename T>
FA_AVX512 inline void store_row(const float* src, T* dst, int64_t n, float a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (native_bf16()) return store_row_native(src, dst, n, a);
  }
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, src + j), va);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(dst + j, t, y);
    } else {
      store16<T>(dst + j, y, t);
    }
  }
}

// sum_j a[j] * b[j] in fp32 over n elements of T (delta = rowsum(dO * O)).
template <typename T>
FA_AVX512 inline float dot_row(const T* a, const T* b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 t = tail(n - j);
    s = _mm512_fmadd_ps(load16<T>(a + j, t), load16<T>(b + j, t), s);
  }
  return _mm512_reduce_add_ps(s);
}
#endif

}  // namespace fastattn::cpu::vec512
