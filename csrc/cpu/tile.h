// Tile building blocks shared by the forward and the backward: fp32 operands of a (rows, D) slice, the
// tile gemm, and the score tile S = (scale*Q) K^T with softcap, alibi, bias and the visibility mask applied.
#pragma once

#include <functional>
#include <string>
#include <type_traits>

#include "params.h"
#include "vec.h"
#include "workspace.h"

namespace fastattn::cpu {

// Tile sizes: BLOCK_Q query rows per task (forward, dQ) and BLOCK_K keys per inner step. Measured on
// AVX2 with MKL (benchmarks/bench_cpu.py): large K blocks amortise the per-gemm overhead.
constexpr int64_t BLOCK_Q = 64;
constexpr int64_t BLOCK_K = 256;

// Row-major fp32 matrices, C = alpha * op(A) op(B) + beta * C (see blas.cpp: the BLAS torch links, i.e.
// MKL's sgemm on x86 wheels, found at run time; ATen's addmm otherwise).
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// S (bq x bk, ldS; row-major) = Qs (alpha K)^T with the key tile K (bk x D) packed, times pack_kt's alpha, once in
// MKL's packed-GEMM format and reused by every query tile that meets it: sgemm repacks K on each call (~15% of the
// product at 128 x 512 x 128). The same MKL kernels as gemm_rm (bitwise equal at D = 64, 72, 128; the last bit
// differs at D = 40); whether a tile is packed depends on the shape only, so results stay the same across thread
// counts. Available when the BLAS is MKL with sgemm_pack/sgemm_compute (torch's x86 wheels), the CPU is Intel's
// (cpu_vendor) and FASTATTN_CPU_NO_PACKED_GEMM is unset. A packed buffer (packed_kt_floats) must not move once
// packed (MKL's rule).
bool packed_kt_available();
int64_t packed_kt_floats(int64_t bk, int64_t D);
void pack_kt(const float* k, int64_t ldk, int64_t bk, int64_t D, float* dst, float alpha = 1.f);
// pack_kt on brgemm (only) from K rows of the input dtype (unit last stride), converted in the same pass: the same
// bits as converting the rows to fp32 first and packing those.
template <typename T>
void pack_kt_rows(const T* k, int64_t ldk, int64_t bk, int64_t D, float* dst, float alpha);
// On brgemm a packed tile may be wider than the bk keys used (ldp: its row length; 0 = bk): a causal diagonal tile
// packed whole once serves the query blocks that see part of it. MKL's packed format takes ldp = 0 only.
void gemm_packed_kt(const float* packed, int64_t bk, int64_t D, const float* qs, int64_t ldq, int64_t bq, float* S,
                    int64_t ldS, int64_t ldp = 0);

// S (bq x bk, ldS) = alpha Qs K^T with K (bk x D, ldk) as given: on brgemm the tile is packed here as pack_kt packs
// it, so a tile's scores have the same bits whether its keys were packed once or not (the backward recomputes the
// forward's scores, and P = exp(S - lse) must see the same S: a last-bit difference between the two showed in the
// context-parallel tests' large-magnitude fp32 cases); on sgemm, gemm_rm with the transposed K.
// on_rows: sgemm on K's rows as given on either engine (scores_on_rows).
void gemm_scores(int64_t bq, int64_t bk, int64_t D, float alpha, const float* qs, int64_t ldq, const float* k,
                 int64_t ldk, float* S, int64_t ldS, bool on_rows = false);
// Whether the fp32 score tiles of a sequence of sq query rows and sk keys take gemm_scores' on_rows form, unpacked,
// instead of brgemm's transposed K. The shape alone decides, so the backward recomputes the forward's scores bit for
// bit. On brgemm CPUs without AVX-512: up to 32 query rows, 256 keys or more, head dim <= 64, where transposing
// each key tile for so few rows cost more than brgemm saves (blas.cpp has the measurements).
bool scores_on_rows(int64_t sq, int64_t sk, int64_t D);
void scores_on_rows_force(int mode);  // tests: 0 the rule, 1 never, 2 always
std::string scores_on_rows_describe();  // the rule where this CPU takes it, for `info` ("" where it does not)

// The fp32 engine (blas.cpp): "sgemm (...)" or "brgemm (...)" with the timing that chose it, for `info`; whether
// gemm_rm's plain products and the packed key tiles run on oneDNN's brgemm; tests force one (0: as decided, 1:
// sgemm, 2: brgemm). The choice is made once per process (the shape alone decides a product's path after that).
std::string fp32_gemm_describe();
// cpuid's vendor string ("GenuineIntel", "AuthenticAMD"; "unknown" elsewhere). MKL's kernels differ by vendor: the
// packed key tiles above are MKL's on Intel CPUs only, and the auto rules were measured per vendor, because torch's
// fp32 SDPA multiplies through MKL too (fastattn/backends/cpu.py).
std::string cpu_vendor();
bool amd_cpu();  // cpu_vendor() == "AuthenticAMD", asked once: the kernel paths measured per vendor
int cpu_family();  // cpuid's display family (AMD: 23 Zen 1-2, 25 Zen 3-4, 26 Zen 5); 0 where unknown; asked once
bool fp32_gemm_brgemm();
void fp32_gemm_force(int engine);
// Whether the fp32 backward's packed key blocks on brgemm take the transposed form (all five products on brgemm; CPUs
// with AVX-512) rather than the plain one (dV, dK, dQ on sgemm); bwd.cpp, which tests force (bwd_form_force).
bool bwd_transposed_form();
// Seconds per call of f: the best of five batches of four after a warm-up call (the engines' start-up timings).
double best_seconds(const std::function<void()>& f);

// Keeps BLAS single-threaded on this thread for the guard's lifetime (our tasks are the parallelism; a
// nested multi-threaded gemm would oversubscribe and could change the summation order).
struct BlasSingleThread {
  int prev;
  BlasSingleThread();
  ~BlasSingleThread();
};

constexpr int64_t kMaxLd = std::numeric_limits<int>::max();

// Whether fp32 rows `ld` floats apart, `cols` wide, are read in place: back to back, or spread over at least half
// of the L1's sets. The L1 (64 sets of 64-byte lines on x86) maps addresses 4 KB apart to one set, so rows whose
// stride shares a large power-of-two factor g with 4 KB start on 4 KB / g set offsets only, and rows of fewer than g
// bytes leave the sets between unused: a tile of them evicts itself from a fraction of the L1. transformers' (B, S,
// H, D) layout puts rows H * D floats apart: 4 KB at H8 D128 and H16 D64 (1/8 and 1/16 of the sets), 3 KB at H12
// D64 (1/4). AMD EPYC Zen 3, one thread, fp32 B1 S1024, such inputs read in place against copied (K, V a head at a
// time, Q, dO a tile): forward 0.71-0.79x torch -> 1.00-1.06x on 4 KB rows, 0.94-0.98x -> 0.98-1.04x on 3 KB / 6 KB
// rows; forward+backward 0.93-0.97x -> 0.99-1.05x (benchmarks/test_auto_rule.py, transformers_layout).
inline bool rows_in_place(int64_t ld, int64_t cols) {
  if (ld == cols) return true;
  const int64_t offset = (ld * int64_t(sizeof(float))) % 4096;
  const int64_t g = offset == 0 ? 4096 : offset & -offset;  // the largest power of two dividing the stride, <= 4 KB
  return 2 * cols * int64_t(sizeof(float)) >= g;
}

// Whether fp32 rows `ss` elements apart (unit stride `sd` within a row), `cols` wide, are used in place: BLAS takes
// its leading dimension as int, and rows_in_place.
inline bool rows_usable(int64_t ss, int64_t sd, int64_t cols) {
  return sd == 1 && ss >= cols && ss <= kMaxLd && rows_in_place(ss, cols);
}

// How many rows ahead a pass over rows that are not back to back fetches them (copy_rows, store_rows). Such rows
// (transformers' (B, S, H, D) layout: 4 KB apart at H16 D64) each lie on their own page, and the hardware prefetchers
// stay within a page, so the pass otherwise waits on each row's misses in turn. AMD EPYC Zen 3, one thread, fp32
// (B, S, H, D) inputs, interleaved with torch in one process, against no prefetch: forward +4-10% at B4 H16 S512
// D64 / B2 H12 S512 D64 / B1 H8 S1024 D128 (level at B1 H16 S1024 D64), forward+backward 0-5%; 2, 4, 8 and 16 rows
// ahead read alike within the noise.
constexpr int64_t kRowsAhead = 4;

// Before row r of a pass over `rows` rows `stride` apart: fetches row r + kRowsAhead (and at r == 0 the first
// kRowsAhead rows).
template <typename T>
inline void fetch_ahead(const T* base, int64_t stride, int64_t r, int64_t rows, int64_t cols) {
  if (r == 0) {
    for (int64_t a = 0; a < std::min(rows, kRowsAhead); ++a) vec::prefetch_row(base + a * stride, cols);
  }
  if (r + kRowsAhead < rows) vec::prefetch_row(base + (r + kRowsAhead) * stride, cols);
}

// rows x cols elements of rows `ss` apart (unit stride sd within a row) to fp32 rows ldd apart, times mul; rows
// apart are fetched ahead.
template <typename T>
inline void copy_rows(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, float* dst, int64_t ldd,
                      float mul) {
  const bool apart = sd == 1 && ss != cols;
  for (int64_t r = 0; r < rows; ++r) {
    if (apart) fetch_ahead(src, ss, r, rows, cols);
    vec::load_row<T>(src + r * ss, sd, dst + r * ldd, cols, mul);
  }
}

// A (rows, cols) fp32 view: either straight into an fp32 input (rows_usable) or a packed copy in a thread-local
// buffer (other dtypes, other strides, or when `mul` != 1).
struct Operand {
  const float* ptr;
  int64_t ld;
};

template <typename T>
inline Operand operand(const T* base, int64_t ss, int64_t sd, int64_t rows, int64_t cols, float* buf,
                       float mul = 1.f) {
  if constexpr (std::is_same_v<T, float>) {
    if (mul == 1.f && rows_usable(ss, sd, cols)) return {base, ss};
  }
  copy_rows<T>(base, ss, sd, rows, cols, buf, cols, mul);
  return {buf, cols};
}

// Where the score scale of S = scale * Q K^T goes: qk_alpha * q_mul = scale. Other dtypes than fp32 are converted
// to fp32 anyway, with the scale folded into that copy of Q. fp32 Q rows on brgemm are multiplied in place and the
// scale rides the key tiles, which every score product there packs (pack_kt's alpha). On sgemm, where a tile is
// packed (alpha in the pack) or not (alpha after the product) by counts that differ between the forward and the
// backward, the scale goes into a copy of Q instead (the forward ~4% slower there): with it split two ways,
// the backward's scores missed the forward's lse by rounding and P = exp(S - lse) with them (a fuzz case, D=256,
// scores ~80: dV 1.0e-5 of max|dV| against brgemm's 1.5e-6, dQ 2.0e-5 against 0.7e-5; test_cpu_fp32_engine).
template <typename T>
inline float q_mul(float scale) {
  return std::is_same_v<T, float> && fp32_gemm_brgemm() ? 1.f : scale;
}
template <typename T>
inline float qk_alpha(float scale) {
  return std::is_same_v<T, float> && fp32_gemm_brgemm() ? scale : 1.f;
}

// How many rows ahead of a bias pass prefetch_row fetches a float mask's rows. A dense (1, 1, S, S) or (B, H, S, S)
// mask, B1 H8 S1024 D64, AMD EPYC Zen 3, one thread (benchmarks/test_auto_rule.py, dense_float_mask): the fp32
// forward 0.97-1.00x torch without, 1.06-1.10x with; forward+backward 1.02-1.06x / 1.07-1.12x; bf16 forward 1.02-1.04x
// / 1.07-1.12x. perf: the forward's fused bias pass fell from 11% of its samples to 5%. Four rows ahead read no better.
constexpr int64_t kBiasAhead = 2;

// Everything a score tile needs to know about its (sequence, head) besides the operands.
template <typename T>
struct ScoreCtx {
  const CpuParams& p;
  const SeqInfo& s;
  const Visibility& vis;
  int64_t h;
  float slope;        // alibi slope of this (sequence, head); 0 without alibi
  const T* bias_row0; // bias at (b, h, q0, k0): row i at bias_row(i), key j at + j * bias_st.d; nullptr without
  bool on_rows;       // scores_on_rows: every score tile of the sequence unpacked (callers then skip scores_packed)

  ScoreCtx(const CpuParams& p_, const SeqInfo& s_, const Visibility& vis_, int64_t h_)
      : p(p_), s(s_), vis(vis_), h(h_) {
    slope = p.alibi ? p.alibi[s.n * p.alibi_sb + h] : 0.f;
    bias_row0 = p.bias ? static_cast<const T*>(p.bias) + s.b * p.bias_st.b + h * p.bias_st.h +
                             s.q0 * p.bias_st.s + s.k0 * p.bias_st.d
                       : nullptr;
    on_rows = std::is_same_v<T, float> && scores_on_rows(s.sq, s.sk, p.D);
  }

  // S (bq, bk; ld ldS) = scale Q K^T for query rows [i0, i0+bq) and keys [j0, j0+bk) (qs: Q times q_mul<T>, the
  // product's alpha the rest of the scale), then softcap (storing tanh in `tanh_out` when given, for the backward),
  // alibi, bias and -inf outside the visible band.
  // product_only: the scaled product alone, for a caller that adds a bias_only() context's bias itself on a fully
  // visible tile (nothing else left to finish).
  void scores(const float* qs, int64_t ldq, Operand kt, int64_t i0, int64_t bq, int64_t j0, int64_t bk, float* S,
              int64_t ldS, float* tanh_out, bool product_only = false) const {
    gemm_scores(bq, bk, p.D, qk_alpha<T>(p.scale), qs, ldq, kt.ptr, kt.ld, S, ldS, on_rows);
    if (!product_only) finish(i0, bq, j0, bk, S, ldS, tanh_out);
  }

  // The same with the key tile given packed (pack_kt, with alpha qk_alpha<T>).
  void scores_packed(const float* qs, int64_t ldq, const float* kt_packed, int64_t i0, int64_t bq, int64_t j0,
                     int64_t bk, float* S, int64_t ldS, float* tanh_out = nullptr, int64_t ldp = 0,
                     bool product_only = false) const {
    gemm_packed_kt(kt_packed, bk, p.D, qs, ldq, bq, S, ldS, ldp);
    if (!product_only) finish(i0, bq, j0, bk, S, ldS, tanh_out);
  }

  // Query row i's bias row (key 0).
  const T* bias_row(int64_t i) const { return bias_row0 + p.row_offset(i, p.bias_st.s, p.bias_sg); }

  // Before a pass reads bias row i0 + r of a tile of bq rows (keys [j0, j0 + bk)): fetch the row kBiasAhead rows on
  // (and at r = 0 the rows up to it).
  void prefetch_bias(int64_t i0, int64_t r, int64_t bq, int64_t j0, int64_t bk) const {
    const int64_t end = std::min(bq, r + kBiasAhead + 1);
    for (int64_t a = r == 0 ? 0 : end - 1; a < end; ++a) vec::prefetch_row(bias_row(i0 + a) + j0, bk);
  }

  // True when the scores need more than the visibility mask (so they must be scaled before `finish`).
  bool transforms() const { return p.softcap > 0.f || p.alibi != nullptr || bias_row0 != nullptr; }

  // S = S * mul + bias[i0:i0+bq, j0:j0+bk]: one pass per row where the bias's keys are adjacent (vec::fma_row),
  // else converted to fp32 a chunk at a time (a bias broadcast over query rows, i.e. key padding, once per chunk). A
  // scalar bf16 loop here cost ~30% of a masked bf16 forward.
  void add_bias(int64_t i0, int64_t bq, int64_t j0, int64_t bk, float* S, int64_t ldS, float mul) const {
    const int64_t sd = p.bias_st.d;
    if (sd == 1) {
      for (int64_t r = 0; r < bq; ++r) {
        prefetch_bias(i0, r, bq, j0, bk);
        vec::fma_row<T>(S + r * ldS, bias_row(i0 + r) + j0, bk, mul);
      }
      return;
    }
    constexpr int64_t kChunk = 256;
    alignas(64) float b[kChunk];
    for (int64_t c0 = 0; c0 < bk; c0 += kChunk) {
      const int64_t w = std::min(kChunk, bk - c0);
      const T* loaded = nullptr;  // rows that share a bias row (key padding) convert it once
      for (int64_t r = 0; r < bq; ++r) {
        const T* row = bias_row(i0 + r);
        if (row != loaded) vec::load_row<T>(row + (j0 + c0) * sd, sd, b, w, 1.f);
        loaded = row;
        vec::fma_row<float>(S + r * ldS + c0, b, w, mul);
      }
    }
  }

  // Only a bias besides the visibility mask: the score scale can ride the bias pass (finish's `mul`).
  bool bias_only() const { return bias_row0 != nullptr && p.softcap == 0.f && p.alibi == nullptr; }

  // Everything after the product, on scaled scores S: softcap, alibi, bias, visibility mask. mul (bias_only()
  // contexts): a scale still to apply, fused into the bias pass.
  void finish(int64_t i0, int64_t bq, int64_t j0, int64_t bk, float* S, int64_t ldS, float* tanh_out,
              float mul = 1.f) const {
    if (p.softcap > 0.f) {
      const float c = p.softcap, inv_c = 1.f / p.softcap;
      for (int64_t r = 0; r < bq; ++r) {
        float* Sr = S + r * ldS;
        float* tr = tanh_out ? tanh_out + r * ldS : nullptr;
        for (int64_t j = 0; j < bk; ++j) {
          const float t = std::tanh(Sr[j] * inv_c);
          Sr[j] = c * t;
          if (tr) tr[j] = t;
        }
      }
    }
    if (p.alibi) {
      // -slope * |q_pos - k_pos| = -slope * |i + alibi_off - j|
      for (int64_t r = 0; r < bq; ++r) {
        float* Sr = S + r * ldS;
        const int64_t d0 = i0 + r + s.alibi_off - j0;
        for (int64_t j = 0; j < bk; ++j) Sr[j] -= slope * static_cast<float>(std::abs(d0 - j));
      }
    }
    if (bias_row0) add_bias(i0, bq, j0, bk, S, ldS, mul);
    if (!vis.full(i0, i0 + bq, j0, j0 + bk)) {
      for (int64_t r = 0; r < bq; ++r) {
        float* Sr = S + r * ldS;
        const int64_t lo = std::clamp<int64_t>(vis.key_lo(i0 + r) - j0, 0, bk);
        const int64_t hi = std::clamp<int64_t>(vis.key_hi(i0 + r) - j0, lo, bk);
        std::fill(Sr, Sr + lo, kNegInf);
        std::fill(Sr + hi, Sr + bk, kNegInf);
      }
    }
  }
};

// One backward row without dropout (bwd.cpp's tiles, bwd_rows.cpp): P = exp(S - lse) into S (lse = +inf, a row
// with no visible key, gives P = 0), dS = P (dP - d) into dP, times 1 - t^2 with softcap (t: the row's tanh, else
// null). AVX-512 CPUs take P and dS in one pass.
inline void grad_scores_row(float* S, float* dP, int64_t n, float lse, float d, const float* t) {
#ifdef FASTATTN_VEC512
  if (t == nullptr && vec512::available()) return vec512::grad_row<float>(S, dP, n, 1.f, lse, d);
#endif
  vec::exp_sum_row(S, n, lse);
  for (int64_t j = 0; j < n; ++j) dP[j] = S[j] * (dP[j] - d);
  if (t) {
    for (int64_t j = 0; j < n; ++j) dP[j] *= 1.f - t[j] * t[j];
  }
}

// How far (log2 units) a block's scores may rise above the running max m before the row is rescaled: P stays
// below 2^8, far inside bf16/fp16 and fp32 range, and m need not be the exact max (out = acc / l and
// lse = m + log l hold for any reference m), so most blocks skip their max pass (FlashAttention-4's lazy rescaling).
constexpr float kLazyRescaleLog2 = 8.f;

inline bool has_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) return true;
  }
  return false;
}

// The forward's epilogue for query rows [i0, i0 + bq) of (sequence s, head h): out = acc / l, lse = m + log l;
// rows with no visible key get out = 0, lse = +inf (the backward's exp(s - lse) is then 0). out is T, or float32
// with p.out_fp32 (block calls: the caller merges blocks in fp32 and rounds once).
template <typename T>
void store_rows(const CpuParams& p, const SeqInfo& s, int64_t h, int64_t i0, int64_t bq, const float* acc,
                const float* m, const float* l) {
  if constexpr (!std::is_same_v<T, float>) {
    if (p.out_fp32) return store_rows<float>(p, s, h, i0, bq, acc, m, l);
  }
  T* out = static_cast<T*>(p.out) + s.b * p.o_st.b + h * p.o_st.h + (s.q0 + i0) * p.o_st.s;
  float* lse = p.lse + s.b * p.lse_sb + h * p.lse_sh + s.q0 + i0;
  const bool apart = p.o_st.d == 1 && p.o_st.s != p.Dv;
  for (int64_t r = 0; r < bq; ++r) {
    if (apart) fetch_ahead(out, p.o_st.s, r, bq, p.Dv);
    const bool empty = l[r] == 0.f;
    vec::store_row<T>(acc + r * p.Dv, out + r * p.o_st.s, p.o_st.d, p.Dv, empty ? 0.f : 1.f / l[r]);
    lse[r] = empty ? kInf : m[r] + std::log(l[r]);
  }
}

// The backward's write of one gradient row: dst[c * stride] = T(src[c] * mul), or with p.accumulate (bwd_acc) dst
// is the caller's float32 accumulator and gets += src[c] * mul, never rounded to T. `at` is the row's offset in
// elements from the base pointer (dq/dk/dv), so the element type is chosen here, once per row.
template <typename T>
inline void grad_row(const CpuParams& p, void* base, int64_t at, int64_t stride, const float* src, int64_t n,
                     float mul) {
  if (p.accumulate) {
    float* d = static_cast<float*>(base) + at;
    for (int64_t c = 0; c < n; ++c) d[c * stride] += src[c] * mul;
  } else {
    vec::store_row<T>(src, static_cast<T*>(base) + at, stride, n, mul);
  }
}

// A thread's fp32 scratch, from its workspace (64-byte aligned; inside a WorkspaceScope).
struct Scratch {
  float* base = nullptr;
  int64_t size = 0, used = 0;
  explicit Scratch(int64_t n) : base(workspace_take<float>(n)), size(n) {}
  // Carves n floats rounded up to 16 so every piece stays 64-byte aligned.
  float* take(int64_t n) {
    float* r = base + used;
    used += (n + 15) / 16 * 16;
    TORCH_INTERNAL_ASSERT(used <= size);
    return r;
  }
  static int64_t round(int64_t n) { return (n + 15) / 16 * 16; }
};

}  // namespace fastattn::cpu
