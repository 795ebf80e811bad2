// The backward of calls with few query rows per KV head (register.cpp, few_rows_in_one_pass: the calls whose forward
// runs on the decode kernel and more), in one pass over each KV head's keys. The tile backward (bwd.cpp) packs and
// transposes every key block for five products of those few rows; here each key's and value's row is read once where
// it lies and its dK and dV rows are written once. Per block of kBlockN keys, for the R = G * sq rows of a
// (sequence, kv head):
//
//   S = Qs K^T, dP = dO V^T                      decode::scores (Qs = scale Q, as the decode forward's scores)
//   P = exp(S - lse), dS = P (dP - delta)        ScoreCtx::finish and grad_scores_row (tile.h), as bwd.cpp
//   dQ_r += dS K                                 decode::pv
//   dV_j = sum_r P[r, j] dO_r, dK_j = sum_r dS[r, j] Qs_r    outer_rows
//
// Deterministic as bwd.cpp: a (sequence, kv head) is cut into key chunks by the shape alone, each chunk writes its
// own dK/dV rows, and the chunks' dQ partials are summed in chunk order.
//
// AMD EPYC Zen 5 (AVX-512, AVX512-BF16), 2026-12-07, training calls of the rule through the SDPA function, forward
// and backward, interleaved with torch's SDPA (benchmarks/bench_few_rows.py --training; MHA B2 H1, B1 H12, B8 H2 and
// GQA 8/2, 4/2, 1-4 rows, 64-4096 keys, D = 64 and 128), this path over the tile kernels, one thread: fp32 median
// 1.61x (0.96-3.74x), bf16 1.55x (1.11-2.94x), fp16 1.71x (1.18-2.55x); two threads fp32 1.51x, bf16 1.52x. The fp32
// calls read 1.94x torch (median; the tile kernels 1.15x); one-token fp32 calls of 1-2 heads, which had read
// 0.54-0.88x, 1.00-2.49x. The lows of either column are calls whose fresh dK and dV fault in pages, which whichever
// side of an interleaved pair meets glibc's trimmed heap pays (B2 H1 4096 keys D = 64: 0.57x interleaved, 2x torch
// run alone).
#include <ATen/Parallel.h>

#include "decode_fetch.h"  // how the decode kernel reads its rows on this CPU: fetch_mode, lone_row_stream
#include "decode_tiles.h"  // decode::scores, decode::pv: the decode kernel's block helpers
#include "kernels.h"
#include "tile.h"

namespace fastattn::cpu {

namespace {

constexpr int64_t kBlockN = 64;  // keys per step: S, dP of R rows stay in L1

// out_j = sum_r W[r, j] X_r (r in order) for the n keys of a block: out rows `ldo` apart, W (R, ldW), X (R, cols)
// back to back. dV = P^T dO and dK = dS^T Qs of a few rows, as R scaled row additions per key instead of a product.
inline void outer_rows_loop(const float* W, int64_t ldW, const float* X, int64_t R, int64_t n, int64_t cols,
                            float* out, int64_t ldo) {
  for (int64_t j = 0; j < n; ++j) {
    float* o = out + j * ldo;
    const float w0 = W[j];
    for (int64_t c = 0; c < cols; ++c) o[c] = w0 * X[c];
    for (int64_t r = 1; r < R; ++r) {
      const float w = W[r * ldW + j];
      const float* x = X + r * cols;
      for (int64_t c = 0; c < cols; ++c) o[c] += w * x[c];
    }
  }
}

#ifdef FASTATTN_X86
FA_AVX2 void outer_rows_avx2(const float* W, int64_t ldW, const float* X, int64_t R, int64_t n, int64_t cols,
                             float* out, int64_t ldo) {
  outer_rows_loop(W, ldW, X, R, n, cols, out, ldo);  // (the same loop, vectorised for AVX2 here)
}
#endif

#ifdef FASTATTN_VEC512
// Columns [c0, c0 + 16 V) of outer_rows_avx512 for every key of the block: V vectors of 16 columns that hold any
// column (the last masked), so a head dim short of a whole 64-column pass (32, 48, 80, 96, 160) spends no FMAs on
// empty vectors; the masks are set once for all the keys.
template <int V>
FA_AVX512 void outer_cols(const float* W, int64_t ldW, const float* X, int64_t R, int64_t n, int64_t cols,
                          int64_t c0, float* out, int64_t ldo) {
  __mmask16 m[V];
  for (int u = 0; u < V; ++u) m[u] = vec512::tail(std::max<int64_t>(cols - c0 - 16 * u, 0));
  for (int64_t j = 0; j < n; ++j) {
    float* o = out + j * ldo + c0;
    __m512 acc[V];
    const __m512 w0 = _mm512_set1_ps(W[j]);
    for (int u = 0; u < V; ++u) acc[u] = _mm512_mul_ps(w0, _mm512_maskz_loadu_ps(m[u], X + c0 + 16 * u));
    for (int64_t r = 1; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(W[r * ldW + j]);
      const float* x = X + r * cols + c0;
      for (int u = 0; u < V; ++u) acc[u] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m[u], x + 16 * u), acc[u]);
    }
    for (int u = 0; u < V; ++u) _mm512_mask_storeu_ps(o + 16 * u, m[u], acc[u]);
  }
}

// outer_rows_loop in 16 lanes: up to 64 columns a pass over the block's keys, the rows' weights broadcast once per key
// and pass.
FA_AVX512 void outer_rows_avx512(const float* W, int64_t ldW, const float* X, int64_t R, int64_t n, int64_t cols,
                                 float* out, int64_t ldo) {
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    switch (std::min<int64_t>(4, (cols - c0 + 15) / 16)) {
      case 1: outer_cols<1>(W, ldW, X, R, n, cols, c0, out, ldo); break;
      case 2: outer_cols<2>(W, ldW, X, R, n, cols, c0, out, ldo); break;
      case 3: outer_cols<3>(W, ldW, X, R, n, cols, c0, out, ldo); break;
      default: outer_cols<4>(W, ldW, X, R, n, cols, c0, out, ldo);
    }
  }
}
#endif

void outer_rows(const float* W, int64_t ldW, const float* X, int64_t R, int64_t n, int64_t cols, float* out,
                int64_t ldo) {
#ifdef FASTATTN_VEC512
  if (vec512::available()) return outer_rows_avx512(W, ldW, X, R, n, cols, out, ldo);
#endif
#ifdef FASTATTN_X86
  if (vec::use_avx2()) return outer_rows_avx2(W, ldW, X, R, n, cols, out, ldo);
#endif
  outer_rows_loop(W, ldW, X, R, n, cols, out, ldo);
}

// One task's fp32 rows: Qs (R, D) = scale Q, dO (R, Dv), lse and delta (R), the dQ accumulator (R, D); per block S,
// dP and tanh (R, kBlockN), dK and dV (kBlockN, D / Dv) where they are not written in place; key and value row tables.
struct RowsBuffers {
  float *qs, *dO, *lse, *delta, *acc, *S, *dP, *tanh, *dk, *dv;
  std::vector<const void*> krows, vrows;
  std::vector<int64_t> off;  // every row reads its KV head at the tables' rows: offset 0
  std::vector<uint8_t> live;
  RowsBuffers(Scratch& b, const CpuParams& p, int64_t R)
      : krows(kBlockN), vrows(kBlockN), off(R, 0), live(R, 1) {
    qs = b.take(R * p.D);
    dO = b.take(R * p.Dv);
    lse = b.take(R);
    delta = b.take(R);
    acc = b.take(R * p.D);
    S = b.take(R * kBlockN);
    dP = b.take(R * kBlockN);
    tanh = b.take(R * kBlockN);
    dk = b.take(kBlockN * p.D);
    dv = b.take(kBlockN * p.Dv);
  }
  static int64_t size(const CpuParams& p, int64_t R) {
    return Scratch::round(R * p.D) * 2 + Scratch::round(R * p.Dv) + Scratch::round(R) * 2 +
           Scratch::round(R * kBlockN) * 3 + Scratch::round(kBlockN * p.D) + Scratch::round(kBlockN * p.Dv);
  }
};

// How the block helpers read K and V, rows a fixed stride apart. on_k: S = Qs K^T and dQ += dS K (K in both the keys'
// and the values' place); on_v: dP = dO V^T. Calls whose K and V take kStreamBytes or more read them as the decode
// kernel reads a dense cache on this CPU (decode_fetch.h: rows fetched ahead, a lone row streamed), smaller ones with
// the plain loops (no fetches, the chunk kernels); FASTATTN_CPU_PREFETCH or FASTATTN_CPU_LONE_ROW, when set, rule at
// any size (read per call; tests compare). None changes a result's bits. AMD EPYC Zen 5 (32 MB L3 shared with other
// guests), the bwd op on its inputs call after call, glibc keeping its heap, plain time over fetched-and-streamed
// time. 2026-12-07, results/cpu-20261207-zen5-bwdrows/bwd_rows_reads.py (MHA B2 H1, B1 H12, B8 H2, GQA 8/2 B4, 1-2
// rows, 256-4096 keys, D = 64 / 128), one thread: K and V of 16.8-67 MB 1.06-1.65x, 12.6 MB 1.11x (fp32) and 1.30x
// (bf16), 8.4 MB 0.90-1.09x, 0.5-6.3 MB 0.80-1.02x. Re-measured the next session
// (results/cpu-20261207-zen5-rowsreads/bwd_rows_stream.py: B1, MHA 8 heads at 1 and 4 rows and GQA 32/8 at 1 row,
// D = 64 / 128, fp32 and bf16, 4 rounds each way), where the plain loops had turned erratic from 8 MB (the same call
// 51-111 ns a key from one process to the next; fetched, 39-50): one thread 12 MB 1.13-2.83x, 8 MB 0.90-2.14x (the
// lowest a lone fp32 row, MHA one token), 1-4 MB 0.83-1.12x (lone fp32 rows 0.83-0.86x, others 0.92-1.12x); two
// threads 12 MB 0.99-1.53x, 8 MB 0.90-1.21x, 4-6 MB 0.82-1.08x. So 8 MB: the lone fp32 rows' 10% at 8 MB against
// 1.2-2.1x for the others.
constexpr int64_t kStreamBytes = 8 << 20;

struct RowsStreams {
  decode::Stream on_k, on_v;
  explicit RowsStreams(const CpuParams& p, int64_t elem) {
    const int64_t ks = p.k_st.s, vs = p.v_st.s;
    on_k = {false, {}, {}, ks, ks};
    on_v = {false, {}, {}, vs, 0};
    const bool asked =
        std::getenv("FASTATTN_CPU_PREFETCH") != nullptr || std::getenv("FASTATTN_CPU_LONE_ROW") != nullptr;
    if (!asked && p.B * p.Hkv * p.Sk * (p.D + p.Dv) * elem < kStreamBytes) return;
    on_k.lone = on_v.lone = decode::lone_row_stream();
    if (decode::fetch_mode() == decode::Fetch::stream) {
      const int64_t keys = decode::ahead_keys();
      const bool l1 = keys * (p.D + p.Dv) * elem <= decode::kL1AheadBytes;
      on_k.k_ahead = on_k.v_ahead = {keys * ks * elem, l1};
      on_v.k_ahead = {keys * vs * elem, l1};
    }
  }
};

// Keys [c0, c1) of kv head hk of sequence s: dK, dV of those keys, and their share of dQ in B.acc (unscaled).
template <typename T>
void rows_chunk(const CpuParams& p, const SeqInfo& s, int64_t hk, int64_t c0, int64_t c1, const float* delta_all,
                const RowsStreams& st, RowsBuffers& B) {
  const int64_t G = p.group(), sq = s.sq, R = G * sq, D = p.D, Dv = p.Dv;
  const Visibility vis(p, s);
  for (int64_t g = 0; g < G; ++g) {  // row r = g * sq + i: token i of query head hk * G + g
    const int64_t h = hk * G + g, lrow = s.b * p.lse_sb + h * p.lse_sh + s.q0;
    for (int64_t i = 0; i < sq; ++i) {
      const int64_t r = g * sq + i;
      const T* q = static_cast<const T*>(p.q) + s.b * p.q_st.b + h * p.q_st.h + (s.q0 + i) * p.q_st.s;
      const T* dO = static_cast<const T*>(p.dout) + s.b * p.do_st.b + h * p.do_st.h + (s.q0 + i) * p.do_st.s;
      vec::load_row<T>(q, p.q_st.d, B.qs + r * D, D, p.scale);
      vec::load_row<T>(dO, p.do_st.d, B.dO + r * Dv, Dv, 1.f);
      B.lse[r] = p.lse[lrow + i];
      B.delta[r] = delta_all[lrow + i];
    }
  }
  std::fill(B.acc, B.acc + R * D, 0.f);
  const bool capped = p.softcap > 0.f;
  // fp32 gradients with unit last stride take the block's rows in place
  const bool in_place = std::is_same_v<T, float> && !p.accumulate && p.dk_st.d == 1 && p.dv_st.d == 1;
  const T* kbase = static_cast<const T*>(p.k) + s.b * p.k_st.b + hk * p.k_st.h + s.k0 * p.k_st.s;
  const T* vbase = static_cast<const T*>(p.v) + s.b * p.v_st.b + hk * p.v_st.h + s.k0 * p.v_st.s;
  const int64_t dk0 = s.b * p.dk_st.b + hk * p.dk_st.h + s.k0 * p.dk_st.s;
  const int64_t dv0 = s.b * p.dv_st.b + hk * p.dv_st.h + s.k0 * p.dv_st.s;
  const int64_t kend = std::min(c1, s.kend);
  const bool plant_dk = planted("rows_dk");  // (tests only: the last row's share of dK halved, a bug the checks catch)
  for (int64_t j0 = c0; j0 < kend; j0 += kBlockN) {
    const int64_t n = std::min(kBlockN, kend - j0);
    for (int64_t j = 0; j < n; ++j) {
      B.krows[j] = kbase + (j0 + j) * p.k_st.s;
      B.vrows[j] = vbase + (j0 + j) * p.v_st.s;
    }
    const T* const* krows = reinterpret_cast<const T* const*>(B.krows.data());
    const T* const* vrows = reinterpret_cast<const T* const*>(B.vrows.data());
    decode::scores<T>(B.qs, R, D, krows, B.off.data(), n, B.S, kBlockN, st.on_k);     // S = Qs K^T  (R, n)
    decode::scores<T>(B.dO, R, Dv, vrows, B.off.data(), n, B.dP, kBlockN, st.on_v);   // dP = dO V^T  (R, n)
    for (int64_t g = 0; g < G; ++g) {
      const ScoreCtx<T> ctx(p, s, vis, hk * G + g);
      const int64_t at = g * sq * kBlockN;
      ctx.finish(0, sq, j0, n, B.S + at, kBlockN, capped ? B.tanh + at : nullptr);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t at = r * kBlockN;
      grad_scores_row(B.S + at, B.dP + at, n, B.lse[r], B.delta[r], capped ? B.tanh + at : nullptr);
    }
    decode::pv<T>(B.dP, kBlockN, B.live.data(), R, krows, B.off.data(), n, D, B.acc, st.on_k);  // dQ += dS K
    if (plant_dk) {
      for (int64_t j = 0; j < n; ++j) B.dP[(R - 1) * kBlockN + j] *= 0.5f;
    }
    float* dv = in_place ? static_cast<float*>(p.dv) + dv0 + j0 * p.dv_st.s : B.dv;
    float* dk = in_place ? static_cast<float*>(p.dk) + dk0 + j0 * p.dk_st.s : B.dk;
    outer_rows(B.S, kBlockN, B.dO, R, n, Dv, dv, in_place ? p.dv_st.s : Dv);   // dV = P^T dO  (n, Dv)
    outer_rows(B.dP, kBlockN, B.qs, R, n, D, dk, in_place ? p.dk_st.s : D);    // dK = dS^T Qs  (n, D)
    if (in_place) continue;
    for (int64_t j = 0; j < n; ++j) {
      grad_row<T>(p, p.dk, dk0 + (j0 + j) * p.dk_st.s, p.dk_st.d, B.dk + j * D, D, 1.f);
      grad_row<T>(p, p.dv, dv0 + (j0 + j) * p.dv_st.s, p.dv_st.d, B.dv + j * Dv, Dv, 1.f);
    }
  }
  // keys past the sequence's key end (skipped padding) get zero gradients
  std::fill(B.dk, B.dk + D, 0.f);
  std::fill(B.dv, B.dv + Dv, 0.f);
  for (int64_t j = std::max(c0, kend); j < c1; ++j) {
    grad_row<T>(p, p.dk, dk0 + j * p.dk_st.s, p.dk_st.d, B.dk, D, 1.f);
    grad_row<T>(p, p.dv, dv0 + j * p.dv_st.s, p.dv_st.d, B.dv, Dv, 1.f);
  }
}

}  // namespace

template <typename T>
void bwd_rows_kernel(const CpuParams& p) {
  TORCH_CHECK(p.cu_q == nullptr && p.q_start == nullptr && p.dropout_p == 0.f,
              "bwd_rows_kernel: no varlen, block coordinates or dropout");
  at::Tensor delta_t = at::empty({p.B * p.Hq * p.Sq}, at::kFloat);
  float* delta = delta_t.data_ptr<float>();
  compute_delta<T>(p, delta);
  const int64_t R = p.group() * p.Sq, pairs = p.B * p.Hkv;
  const int64_t nkb = (p.Sk + BLOCK_K - 1) / BLOCK_K;  // the tile backward's key blocks, and its chunks of them
  // dQ partials (pair, chunk, R, D) of cut pairs, summed in chunk order by a second pass; one chunk writes dQ itself
  const DqPartials dq_parts(pairs, nkb, R * p.D);
  const int64_t chunks = dq_parts.cut.chunks, per_chunk = dq_parts.cut.per_chunk * BLOCK_K;  // keys per chunk
  float* parts = dq_parts.base();
  const std::vector<int64_t> dealt = dealt_units(pairs);
  const RowsStreams streams(p, static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    WorkspaceScope workspace;
    Scratch buf(RowsBuffers::size(p, R));
    RowsBuffers B(buf, p, R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % chunks, pair = dealt[t / chunks];
      const SeqInfo s = seq_info(p, pair / p.Hkv);
      const int64_t c0 = c * per_chunk, c1 = std::min(s.sk, c0 + per_chunk);
      rows_chunk<T>(p, s, pair % p.Hkv, c0, c1, delta, streams, B);
      if (chunks == 1) write_dq<T>(p, s, pair % p.Hkv, &B.acc, 1, p.scale, 0, p.group());
      else std::copy(B.acc, B.acc + R * p.D, parts + (pair * chunks + c) * R * p.D);
    }
  });
  if (chunks > 1) write_dq_chunks<T>(p, parts, R * p.D, chunks, p.scale);
}

template void bwd_rows_kernel<float>(const CpuParams&);
template void bwd_rows_kernel<c10::BFloat16>(const CpuParams&);
template void bwd_rows_kernel<c10::Half>(const CpuParams&);

}  // namespace fastattn::cpu
