// FlashAttention-2 backward on CPU, deterministic (no atomics; every output element is reduced by one task in
// a fixed order, so results are bitwise identical for any thread count).
//
//   delta_i = rowsum(dO_i * O_i)                                         (preprocess)
//   per tile: P = exp(S - lse), Pd = dropout(P), dV += Pd^T dO, dP = dO V^T,
//             dS = P * (dropout(dP) - delta) [* (1 - tanh^2) with softcap], dK += dS^T Qs, dQ += scale dS K
//
// One schedule: a task per (sequence, kv head, chunk of key blocks) computes dK/dV of its keys and accumulates dQ of
// its query heads in an fp32 buffer (5 gemms per tile, like FA2's atomics-free single-pass form). A head is cut into
// chunks only when there are fewer than bwd_min_tasks() (sequence, kv head) pairs, so that a long single head still
// keeps every core busy; the chunks' dQ partials are then summed in chunk order. The chunking depends on the shape
// and the machine alone, never on the thread count, so the bits never do either. Calls of a few query rows per KV
// head take bwd_rows.cpp's one pass over the keys instead (register.cpp, BwdCall::rows).
//
// On the brgemm fp32 engine (blas.cpp), which multiplies row-major operands without transposes or an alpha, every
// key block is packed (K^T, V^T). On CPUs with AVX-512 it then takes bwd_lowp.cpp's transposed form: dV^T += dO^T Pd
// and dK^T += Q^T dS', with the tile's Q and dO transposed (64 x D each, fewer elements than P and dS' at 64 x 256)
// and dS' = scale dS, so that dK and dQ need no alpha (V packed times the scale gives dP' = scale dP; delta' = scale
// delta). AMD EPYC (Zen 4), one thread: fp32 forward+backward at S = 2048 6-13% faster than with dV, dK, dQ on sgemm.
// Without AVX-512 the plain form is faster: S and dP on the packed tiles (brgemm, the forward's scores), dV, dK, dQ
// on sgemm (AMD EPYC Zen 3, AVX2, one thread, B1 H4-8 S512-1024: forward+backward 2-6% faster at D = 64-256;
// benchmarks/bench_bwd_form.py). On sgemm the plain form stays.
#include <ATen/Parallel.h>

#include <atomic>

#include "kernels.h"
#include "rng.h"
#include "tile.h"

namespace fastattn::cpu {

namespace {

constexpr int64_t kMinPackedBlocks = 4;  // query blocks a key block must meet before MKL packs its K and V
std::atomic<int> g_form_force{0};  // tests: 0 as this CPU takes it, 1 the plain form, 2 the transposed form

// K and V of a key block packed for MKL (pack_kt), as the forward packs K: S = Qs K^T and dP = dO V^T have the
// same form, and every query block of the key block reuses the packs. Null: the plain products (as buffers: no
// packing on this machine).
struct PackedKV {
  const float *k = nullptr, *v = nullptr;
};
struct PackBuffers {
  float *k = nullptr, *v = nullptr;
};

// Per-tile backward: fills P (in S), returns Pd (dropped P; S itself without dropout) and leaves dS' = ds_mul dS in
// dP (packed V carries ds_mul already; ds_mul != 1 only in the transposed form, whose blocks are always packed).
template <typename T>
const float* grad_tile(const ScoreCtx<T>& ctx, const Dropout* drop, Operand qs, Operand dO, const float* lse,
                       const float* delta, Operand kt, Operand vt, PackedKV packed, int64_t i0, int64_t bq, int64_t j0,
                       int64_t bk, float ds_mul, float* S, float* dP, float* Pd_buf, float* tanh_buf) {
  const CpuParams& p = ctx.p;
  const bool capped = p.softcap > 0.f;
  if (packed.k) {
    ctx.scores_packed(qs.ptr, qs.ld, packed.k, i0, bq, j0, bk, S, BLOCK_K, capped ? tanh_buf : nullptr);
  } else {
    ctx.scores(qs.ptr, qs.ld, kt, i0, bq, j0, bk, S, BLOCK_K, capped ? tanh_buf : nullptr);
  }
  if (packed.v) {
    gemm_packed_kt(packed.v, bk, p.Dv, dO.ptr, dO.ld, bq, dP, BLOCK_K);  // dP' = dO (ds_mul V)^T  (bq, bk)
  } else {
    gemm_rm(false, true, bq, bk, p.Dv, ds_mul, dO.ptr, dO.ld, vt.ptr, vt.ld, 0.f, dP, BLOCK_K);  // dP' = ds_mul dO V^T
  }
  for (int64_t r = 0; r < bq; ++r) {
    float* P_r = S + r * BLOCK_K;
    float* dS_r = dP + r * BLOCK_K;
    const float d = ds_mul * delta[r];
    const float* t = capped ? tanh_buf + r * BLOCK_K : nullptr;
    if (!drop) {
      grad_scores_row(P_r, dS_r, bk, lse[r], d, t);
      continue;
    }
    vec::exp_sum_row(P_r, bk, lse[r]);  // lse = +inf (no visible key) gives P = 0
    // Pd = P * keep / (1 - p); dS = P * (dP * keep / (1 - p) - delta) = Pd * dP - P * delta
    float* Pd_r = Pd_buf + r * BLOCK_K;
    std::copy(P_r, P_r + bk, Pd_r);
    drop->apply_row(Pd_r, ctx.s.n, ctx.h, ctx.s.qpos0 + i0 + r, ctx.s.kpos0 + j0, bk);
    for (int64_t j = 0; j < bk; ++j) dS_r[j] = Pd_r[j] * dS_r[j] - P_r[j] * d;
    if (t) {
      for (int64_t j = 0; j < bk; ++j) dS_r[j] *= 1.f - t[j] * t[j];
    }
  }
  return drop ? Pd_buf : S;
}

struct BwdBuffers {
  float *qs, *dO, *k, *v, *S, *dP, *Pd, *tanh, *dk, *dv;
  float *qt, *dOt, *dkt, *dvt;  // the transposed form: Q^T, dO^T (D x BLOCK_Q), dK^T, dV^T (D x BLOCK_K)
  static int64_t size(const CpuParams& p) {
    return (Scratch::round(BLOCK_Q * p.D) + Scratch::round(BLOCK_Q * p.Dv)) * 2 +
           (Scratch::round(BLOCK_K * p.D) + Scratch::round(BLOCK_K * p.Dv)) * 3 + Scratch::round(BLOCK_Q * BLOCK_K) * 4;
  }
  explicit BwdBuffers(Scratch& b, const CpuParams& p) {
    b.used = 0;
    qs = b.take(BLOCK_Q * p.D);
    dO = b.take(BLOCK_Q * p.Dv);
    k = b.take(BLOCK_K * p.D);
    v = b.take(BLOCK_K * p.Dv);
    S = b.take(BLOCK_Q * BLOCK_K);
    dP = b.take(BLOCK_Q * BLOCK_K);
    Pd = b.take(BLOCK_Q * BLOCK_K);
    tanh = b.take(BLOCK_Q * BLOCK_K);
    dk = b.take(BLOCK_K * p.D);
    dv = b.take(BLOCK_K * p.Dv);
    qt = b.take(BLOCK_Q * p.D);
    dOt = b.take(BLOCK_Q * p.Dv);
    dkt = b.take(BLOCK_K * p.D);
    dvt = b.take(BLOCK_K * p.Dv);
  }
};

// Where dQ of one (sequence, kv head)'s query heads accumulates: row i of group member g at
// base + g * head + i * ld. Either an fp32 buffer (group, sq, D), or, for fp32 outputs with unit last stride and one
// chunk, dQ itself (no buffer, no copy; the same products in the same order, so the same bits).
struct DqRows {
  float* base;
  int64_t head, ld;
  float* row(int64_t g, int64_t i) const { return base + g * head + i * ld; }
};

// Pointers of one (sequence, query head): q, dout, lse, delta at the sequence's first row.
template <typename T>
struct HeadRows {
  const T *q, *dO;
  int64_t q_ss, q_sd, do_ss, do_sd;  // element strides from row to row and within a row
  const float *lse, *delta;
  HeadRows(const CpuParams& p, const SeqInfo& s, int64_t h, const float* delta_all)
      : q_ss(p.q_st.s), q_sd(p.q_st.d), do_ss(p.do_st.s), do_sd(p.do_st.d) {
    q = static_cast<const T*>(p.q) + s.b * p.q_st.b + h * p.q_st.h + s.q0 * p.q_st.s;
    dO = static_cast<const T*>(p.dout) + s.b * p.do_st.b + h * p.do_st.h + s.q0 * p.do_st.s;
    const int64_t lrow = s.b * p.lse_sb + h * p.lse_sh + s.q0;
    lse = p.lse + lrow;
    delta = delta_all + lrow;
  }
  // Read Q and dO from back-to-back copies of their rows (DenseRows) instead.
  void use_copies(const T* q_rows, const T* do_rows, int64_t D, int64_t Dv) {
    q = q_rows, dO = do_rows;
    q_ss = D, do_ss = Dv, q_sd = do_sd = 1;
  }
};

// fp32 Q and dO rows that lie badly in the L1 (rows_in_place), copied back to back once per task for the group's
// heads: (G, sq, D) then (G, sq, Dv). operand would copy them a tile at a time, once per key block, each time from the
// far-apart rows (perf, AMD EPYC Zen 3, B1 H8 S1024 D128 in transformers' (B, S, H, D) layout: 6.9% of a
// forward+backward's samples); in-process A/B there, one thread: forward+backward 1.5-6.7% faster at B1 S1024 and
// B4 S512, D64-128, on 4 KB rows.
struct DenseRows {
  float* base = nullptr;  // nullptr: read the inputs' rows
  int64_t sq = 0, G = 0, D = 0, Dv = 0;
  float* q(int64_t g) const { return base + g * sq * D; }  // (sq, D) rows of group member g
  float* dO(int64_t g) const { return base + (G * D + g * Dv) * sq; }  // (sq, Dv)
};

template <typename T>
DenseRows copy_dense_rows(const CpuParams& p, const SeqInfo& s, int64_t hk, const float* delta_all, float* buf) {
  if constexpr (!std::is_same_v<T, float>) {
    return {};
  } else {
    const DenseRows dense{buf, s.sq, p.group(), p.D, p.Dv};
    for (int64_t g = 0; g < dense.G; ++g) {
      const HeadRows<T> r(p, s, hk * dense.G + g, delta_all);
      float *q = dense.q(g), *dO = dense.dO(g);
      copy_rows<float>(r.q, r.q_ss, 1, s.sq, p.D, q, p.D, 1.f);
      copy_rows<float>(r.dO, r.do_ss, 1, s.sq, p.Dv, dO, p.Dv, 1.f);
    }
    return dense;
  }
}

// dK, dV of key block [j0, j0+bk) of kv head hk, summed over its query heads and visible query blocks (in the
// fp32 outputs themselves with `in_place`, else in B.dk/B.dv, then written); also accumulates dQ into dq.
template <typename T>
void dkdv_block(const CpuParams& p, const SeqInfo& s, const Visibility& vis, int64_t hk, int64_t j0,
                const float* delta_all, BwdBuffers& B, DqRows dq, PackBuffers pack_buf, bool in_place,
                DenseRows dense) {
  // Rows [0, bk_out) of dK/dV are written; keys [bk, bk_out) are skipped padding (zero gradients) and left out of
  // the products, since without a bias (skip_key_padding) nothing else masks them.
  const int64_t D = p.D, Dv = p.Dv, bk_out = std::min(BLOCK_K, s.sk - j0);
  const int64_t bk = std::clamp<int64_t>(s.kend - j0, 0, bk_out);
  const T* k = static_cast<const T*>(p.k) + s.b * p.k_st.b + hk * p.k_st.h + (s.k0 + j0) * p.k_st.s;
  const T* v = static_cast<const T*>(p.v) + s.b * p.v_st.b + hk * p.v_st.h + (s.k0 + j0) * p.v_st.s;
  const Operand kt = operand<T>(k, p.k_st.s, p.k_st.d, bk, D, B.k);
  const Operand vt = operand<T>(v, p.v_st.s, p.v_st.d, bk, Dv, B.v);
  const int64_t dk0 = s.b * p.dk_st.b + hk * p.dk_st.h + (s.k0 + j0) * p.dk_st.s;
  const int64_t dv0 = s.b * p.dv_st.b + hk * p.dv_st.h + (s.k0 + j0) * p.dv_st.s;
  float* dk_acc = in_place ? static_cast<float*>(p.dk) + dk0 : B.dk;
  float* dv_acc = in_place ? static_cast<float*>(p.dv) + dv0 : B.dv;
  const int64_t ldk = in_place ? p.dk_st.s : D, ldv = in_place ? p.dv_st.s : Dv;
  const Dropout drop(p.seed, p.offset, p.dropout_p, p.head_start);
  // Queries that see a key of the block before the skipped padding (none when the block is all padding).
  const int64_t i_lo = bk > 0 ? vis.query_lo(j0) : 0;
  const int64_t i_hi = bk > 0 ? vis.query_hi(j0 + bk - 1) : 0;
  // MKL's packing pays from a few query blocks on (the count depends on the shape only, so do the bits); brgemm's
  // (a transposed copy) and the transposed form it allows pay from one: B8 H4 S128 fp32 forward+backward 1-11% faster.
  const int64_t min_blocks = fp32_gemm_brgemm() ? 1 : kMinPackedBlocks;
  const bool pack = pack_buf.k && p.group() * ((i_hi - i_lo + BLOCK_Q - 1) / BLOCK_Q) >= min_blocks;
  const bool tr = pack && fp32_gemm_brgemm() && bwd_transposed_form();
  const float ds_mul = tr ? p.scale : 1.f;
  PackedKV packed;
  if (pack) {  // (K unpacked where the forward's scores were: ScoreCtx::on_rows)
    const bool k_rows = std::is_same_v<T, float> && scores_on_rows(s.sq, s.sk, D);
    if (!k_rows) pack_kt(kt.ptr, kt.ld, bk, D, pack_buf.k, qk_alpha<T>(p.scale));
    pack_kt(vt.ptr, vt.ld, bk, Dv, pack_buf.v, ds_mul);
    packed = {k_rows ? nullptr : pack_buf.k, pack_buf.v};
  }
  if (tr) {  // the columns of keys [0, bk_out) only: a whole (D, BLOCK_K) fill was 9% of a 16-key backward
    for (int64_t d = 0; d < D; ++d) std::fill(B.dkt + d * BLOCK_K, B.dkt + d * BLOCK_K + bk_out, 0.f);
    for (int64_t d = 0; d < Dv; ++d) std::fill(B.dvt + d * BLOCK_K, B.dvt + d * BLOCK_K + bk_out, 0.f);
  } else {
    for (int64_t r = 0; r < bk_out; ++r) {
      std::fill(dk_acc + r * ldk, dk_acc + r * ldk + D, 0.f);
      std::fill(dv_acc + r * ldv, dv_acc + r * ldv + Dv, 0.f);
    }
  }
  for (int64_t g = 0; g < p.group(); ++g) {
    const int64_t h = hk * p.group() + g;
    const ScoreCtx<T> ctx(p, s, vis, h);
    HeadRows<T> rows(p, s, h, delta_all);
    if constexpr (std::is_same_v<T, float>) {
      if (dense.base) rows.use_copies(dense.q(g), dense.dO(g), D, Dv);  // (copy_dense_rows)
    }
    for (int64_t i0 = i_lo; i0 < i_hi; i0 += BLOCK_Q) {
      const int64_t bq = std::min(BLOCK_Q, i_hi - i0);
      const auto [m_lo, m_hi] = mask_key_range(p, s, h, i0, i0 + bq);
      if (m_hi <= j0 || m_lo >= j0 + bk) continue;  // the bias's -inf edges hide the tile from every row
      const Operand qs = operand<T>(rows.q + i0 * rows.q_ss, rows.q_ss, rows.q_sd, bq, D, B.qs, q_mul<T>(p.scale));
      const Operand dO = operand<T>(rows.dO + i0 * rows.do_ss, rows.do_ss, rows.do_sd, bq, Dv, B.dO);
      const float* Pd = grad_tile<T>(ctx, p.dropout_p > 0.f ? &drop : nullptr, qs, dO, rows.lse + i0,
                                     rows.delta + i0, kt, vt, packed, i0, bq, j0, bk, ds_mul, B.S, B.dP, B.Pd, B.tanh);
      if (tr) {
        // Q^T from the input itself (qs of other dtypes carries the scale, which dS' has already)
        vec::transpose<T>(rows.q + i0 * rows.q_ss, rows.q_ss, rows.q_sd, bq, D, B.qt, BLOCK_Q);  // (D, bq)
        vec::transpose<float>(dO.ptr, dO.ld, 1, bq, Dv, B.dOt, BLOCK_Q);                       // (Dv, bq)
        gemm_rm(false, false, Dv, bk, bq, 1.f, B.dOt, BLOCK_Q, Pd, BLOCK_K, 1.f, B.dvt, BLOCK_K);  // dV^T += dO^T Pd
        gemm_rm(false, false, D, bk, bq, 1.f, B.qt, BLOCK_Q, B.dP, BLOCK_K, 1.f, B.dkt, BLOCK_K);  // dK^T += Q^T dS'
        gemm_rm(false, false, bq, D, bk, 1.f, B.dP, BLOCK_K, kt.ptr, kt.ld, 1.f, dq.row(g, i0), dq.ld);  // dQ += dS' K
        continue;
      }
      gemm_rm(true, false, bk, Dv, bq, 1.f, Pd, BLOCK_K, dO.ptr, dO.ld, 1.f, dv_acc, ldv);    // dV += Pd^T dO
      // dK += scale dS^T Q  (qs = q_mul Q)
      gemm_rm(true, false, bk, D, bq, qk_alpha<T>(p.scale), B.dP, BLOCK_K, qs.ptr, qs.ld, 1.f, dk_acc, ldk);
      // dQ += scale * dS K
      gemm_rm(false, false, bq, D, bk, p.scale, B.dP, BLOCK_K, kt.ptr, kt.ld, 1.f, dq.row(g, i0), dq.ld);
    }
  }
  if (tr) {  // dK, dV rows [0, bk_out) from the transposed sums (keys past bk stayed 0)
    vec::transpose<float>(B.dkt, BLOCK_K, 1, D, bk_out, dk_acc, ldk);
    vec::transpose<float>(B.dvt, BLOCK_K, 1, Dv, bk_out, dv_acc, ldv);
  }
  if (in_place) return;
  for (int64_t r = 0; r < bk_out; ++r) {
    grad_row<T>(p, p.dk, dk0 + r * p.dk_st.s, p.dk_st.d, B.dk + r * D, D, 1.f);
    grad_row<T>(p, p.dv, dv0 + r * p.dv_st.s, p.dv_st.d, B.dv + r * Dv, Dv, 1.f);
  }
}

}  // namespace

// delta (B, Hq, Sq) fp32 laid out like lse: rowsum(dO * O) over Dv (kernels.h; both backward paths use it).
template <typename T>
void compute_delta(const CpuParams& p, float* delta) {
  // Rows of O and dO that are not back to back are fetched kRowsAhead rows ahead (copy_rows).
  const bool apart = p.o_st.s != p.Dv || p.do_st.s != p.Dv;
  at::parallel_for(0, p.B * p.Hq * p.Sq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % p.Sq, bh = t / p.Sq, h = bh % p.Hq, b = bh / p.Hq;
      const T* o = static_cast<const T*>(p.out) + b * p.o_st.b + h * p.o_st.h + i * p.o_st.s;
      const T* d = static_cast<const T*>(p.dout) + b * p.do_st.b + h * p.do_st.h + i * p.do_st.s;
      if (apart && i + kRowsAhead < p.Sq) {
        vec::prefetch_row(o + kRowsAhead * p.o_st.s, p.Dv);
        vec::prefetch_row(d + kRowsAhead * p.do_st.s, p.Dv);
      }
      delta[b * p.lse_sb + h * p.lse_sh + i] = vec::dot_row<T>(o, p.o_st.d, d, p.do_st.d, p.Dv);
    }
  });
}

template void compute_delta<float>(const CpuParams&, float*);
template void compute_delta<c10::BFloat16>(const CpuParams&, float*);
template void compute_delta<c10::Half>(const CpuParams&, float*);

// (kernels.h)
template <typename T>
void write_dq(const CpuParams& p, const SeqInfo& s, int64_t hk, const float* const* parts, int64_t chunks, float mul,
              int64_t g0, int64_t g1) {
  std::vector<float> row(chunks > 1 ? p.D : 0);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t h = hk * p.group() + g;
    const int64_t dq0 = s.b * p.dq_st.b + h * p.dq_st.h + s.q0 * p.dq_st.s;
    for (int64_t i = 0; i < s.sq; ++i) {
      const int64_t at = (g * s.sq + i) * p.D;
      const float* src = parts[0] + at;
      if (chunks > 1) {
        std::copy(src, src + p.D, row.begin());
        for (int64_t c = 1; c < chunks; ++c) {
          for (int64_t d = 0; d < p.D; ++d) row[d] += parts[c][at + d];
        }
        src = row.data();
      }
      grad_row<T>(p, p.dq, dq0 + i * p.dq_st.s, p.dq_st.d, src, p.D, mul);
    }
  }
}

// (kernels.h)
template <typename T>
void write_dq_chunks(const CpuParams& p, const float* parts, int64_t part, int64_t chunks, float mul) {
  const int64_t G = p.group();
  static const bool plant = planted("chunk_sum");  // (tests only: the last chunk left out, a bug the checks catch)
  const int64_t summed = plant ? chunks - 1 : chunks;
  at::parallel_for(0, p.nseq * p.Hkv * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> chunk_parts(chunks);
    for (int64_t t = begin; t < end; ++t) {  // t = pair * G + g
      const int64_t pair = t / G, g = t % G;
      for (int64_t c = 0; c < chunks; ++c) chunk_parts[c] = parts + (pair * chunks + c) * part;
      write_dq<T>(p, seq_info(p, pair / p.Hkv), pair % p.Hkv, chunk_parts.data(), summed, mul, g, g + 1);
    }
  });
}

#define FASTATTN_WRITE_DQ(T)                                                                                     \
  template void write_dq<T>(const CpuParams&, const SeqInfo&, int64_t, const float* const*, int64_t, float, int64_t, \
                            int64_t);                                                                            \
  template void write_dq_chunks<T>(const CpuParams&, const float*, int64_t, int64_t, float);
FASTATTN_WRITE_DQ(float)
FASTATTN_WRITE_DQ(c10::BFloat16)
FASTATTN_WRITE_DQ(c10::Half)
#undef FASTATTN_WRITE_DQ

// Whether packed key blocks on brgemm take the transposed form (the header above; tile.h).
bool bwd_transposed_form() {
  const int forced = g_form_force.load(std::memory_order_relaxed);
#ifdef FASTATTN_VEC512
  return forced != 0 ? forced == 2 : vec512::available();
#else
  return forced == 2;
#endif
}

void bwd_form_force(int form) { g_form_force.store(form, std::memory_order_relaxed); }

template <typename T>
void bwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk) {
  at::Tensor delta_t = at::empty({p.B * p.Hq * p.Sq}, at::kFloat);
  float* delta = delta_t.data_ptr<float>();
  compute_delta<T>(p, delta);
  const int64_t scratch = BwdBuffers::size(p);
  const int64_t G = p.group(), pairs = p.nseq * p.Hkv;
  const int64_t nkb = (max_sk + BLOCK_K - 1) / BLOCK_K;
  // dQ partials of every (pair, chunk), (group, max_sq, D) each, summed in chunk order below; one chunk writes dQ
  // from its task instead.
  const int64_t part = G * max_sq * p.D;
  const DqPartials dq_parts(pairs, nkb, part);
  const int64_t chunks = dq_parts.cut.chunks, per_chunk = dq_parts.cut.per_chunk;  // key blocks per chunk
  float* parts = dq_parts.base();

  // fp32 gradients with unit last stride (rows BLAS can address) accumulate in place: no fp32 buffers to zero and
  // copy out per key block and per head.
  auto lda_ok = [](int64_t ld, int64_t cols) { return ld >= cols && ld <= kMaxLd; };
  const bool in_place = std::is_same_v<T, float> && !p.accumulate && p.dk_st.d == 1 && p.dv_st.d == 1 &&
                        p.dq_st.d == 1 && lda_ok(p.dk_st.s, p.D) && lda_ok(p.dv_st.s, p.Dv) && lda_ok(p.dq_st.s, p.D);
  const bool dense_rows = std::is_same_v<T, float> && p.q_st.d == 1 && p.do_st.d == 1 &&
                          (!rows_in_place(p.q_st.s, p.D) || !rows_in_place(p.do_st.s, p.Dv));  // (DenseRows)
  const std::vector<int64_t> dealt = dealt_units(pairs);  // (sequence, kv head) pairs, dealt to the threads
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    BlasSingleThread blas1;
    WorkspaceScope workspace;  // everything below takes its buffers from it
    Scratch buf(scratch);
    BwdBuffers B(buf, p);
    float* own = chunks > 1 || in_place ? nullptr : workspace_take<float>(part);
    float* dense_buf = dense_rows ? workspace_take<float>(G * max_sq * (p.D + p.Dv)) : nullptr;
    // Two MKL-packed tiles (K and V of the current key block); MKL sizes each ~8 MB of address space, of which
    // only BLOCK_K * D floats are written.
    const int64_t pack_floats = packed_kt_available() ? packed_kt_floats(BLOCK_K, std::max(p.D, p.Dv)) : 0;
    float* pack_base = pack_floats ? workspace_take<float>(2 * pack_floats) : nullptr;
    const PackBuffers pack_buf = pack_floats ? PackBuffers{pack_base, pack_base + pack_floats} : PackBuffers{};
    for (int64_t t = begin; t < end; ++t) {
      // t = u * chunks + r, pair dealt[u] = n * Hkv + hk, key chunk c = zigzag(r); dQ partials at (pair * chunks + c)
      const int64_t c = zigzag(t % chunks, chunks), pair = dealt[t / chunks];
      const SeqInfo s = seq_info(p, pair / p.Hkv);
      const int64_t hk = pair % p.Hkv;
      const Visibility vis(p, s);
      DqRows dq;
      if (chunks > 1) {
        dq = {parts + (pair * chunks + c) * part, s.sq * p.D, p.D};
      } else if (in_place) {
        float* dq0 = static_cast<float*>(p.dq) + s.b * p.dq_st.b + hk * G * p.dq_st.h + s.q0 * p.dq_st.s;
        dq = {dq0, p.dq_st.h, p.dq_st.s};
      } else {
        dq = {own, s.sq * p.D, p.D};
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < s.sq; ++i) std::fill(dq.row(g, i), dq.row(g, i) + p.D, 0.f);
      }
      const DenseRows dense = dense_rows ? copy_dense_rows<T>(p, s, hk, delta, dense_buf) : DenseRows{};
      const int64_t j_end = std::min(s.sk, (c + 1) * per_chunk * BLOCK_K);
      for (int64_t j0 = c * per_chunk * BLOCK_K; j0 < j_end; j0 += BLOCK_K) {
        dkdv_block<T>(p, s, vis, hk, j0, delta, B, dq, pack_buf, in_place, dense);
      }
      if (chunks == 1 && !in_place) write_dq<T>(p, s, hk, &dq.base, 1, 1.f, 0, G);
    }
  });
  if (chunks > 1) write_dq_chunks<T>(p, parts, part, chunks, 1.f);
}

template void bwd_kernel<float>(const CpuParams&, int64_t, int64_t);
template void bwd_kernel<c10::BFloat16>(const CpuParams&, int64_t, int64_t);
template void bwd_kernel<c10::Half>(const CpuParams&, int64_t, int64_t);

}  // namespace fastattn::cpu
