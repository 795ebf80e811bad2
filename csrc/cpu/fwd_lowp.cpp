// FlashAttention-2 forward on the CPU's matrix units for bf16/fp16: the same tasks and online softmax as fwd.cpp,
// but both products take the input dtype (S = Q K^T from Q and packed K^T; O += P V with P rounded to the input
// dtype, as FlashAttention does on GPUs), accumulating in fp32. The softmax between them is one fused AVX-512
// pass per row (scale, max, exp, row sum, rounding). fp16 where only bf16 has matrix units (AMX-BF16 without
// AMX-FP16): Q, K, V and the rounded P as exact bf16 pairs, three products for each (lowp.h KVBlocks).
#include <ATen/Parallel.h>

#include <memory>

#include "kernels.h"
#include "lowp.h"
#include "rng.h"

namespace fastattn::cpu {

namespace {

// P = exp(eff * S_r + bias_r - m) rounded into P_r, with m the row's running max (bias_r: nullptr for none);
// returns the row sum, and in arg_max how far above m the block reached (log2 units).
template <typename T>
float exp_block(float* S_r, int64_t bk, int64_t bk_pad, float eff, float m, T* P_r, float* arg_max, const T* bias_r) {
  if (std::is_same_v<T, c10::BFloat16> && vec512::native_bf16()) {
    return vec512::exp_row_native(S_r, bk, bk_pad, eff, m, reinterpret_cast<c10::BFloat16*>(P_r), arg_max,
                                  reinterpret_cast<const c10::BFloat16*>(bias_r));
  }
  return vec512::exp_row<T>(S_r, bk, bk_pad, eff, m, P_r, false, arg_max, bias_r);
}

// Online-softmax step of one row: S_r (raw scores times `eff`, plus bias_r when given: a bias the score pass left
// to this one) becomes P rounded into P_r; returns the factor for the accumulator row. A row that has seen no
// visible key keeps m = -inf; a NaN score then poisons l.
template <typename T>
float softmax_row(float* S_r, int64_t bk, int64_t bk_pad, float eff, float& m_i, float& l_i, T* P_r,
                  const Dropout* drop, int64_t n, int64_t h, int64_t q_pos, int64_t k_pos0, const T* bias_r) {
  if (!drop && m_i > kNegInf && m_i < kInf) {  // lazy: P against the running max, no max pass
    float arg_max;
    const float row_sum = exp_block<T>(S_r, bk, bk_pad, eff, m_i, P_r, &arg_max, bias_r);
    if (arg_max <= kLazyRescaleLog2) {  // (NaN scores: arg_max may drop them, row_sum keeps them)
      l_i += row_sum;
      return 1.f;
    }
  }
  if (bias_r) {  // the full path needs the biased scores in S_r
    vec512::fma_row<T>(S_r, bias_r, bk, eff);
    eff = 1.f;
  }
  const float m_new = std::max(m_i, eff * vec512::max_row(S_r, bk));
  if (m_new == kNegInf) {
    if (has_nan(S_r, bk)) l_i = std::numeric_limits<float>::quiet_NaN();
    std::fill(P_r, P_r + bk_pad, T(0.f));
    return 1.f;
  }
  const float alpha = m_i == m_new ? 1.f : std::exp(m_i - m_new);
  float row_sum;
  if (drop) {  // l sums the undropped P; the dropped P multiplies V
    row_sum = vec512::exp_row<T>(S_r, bk, bk_pad, eff, m_new, P_r, true);
    drop->apply_row(S_r, n, h, q_pos, k_pos0, bk);
    vec512::round_row<T>(S_r, bk, bk_pad, P_r);
  } else {
    row_sum = exp_block<T>(S_r, bk, bk_pad, eff, m_new, P_r, nullptr, nullptr);
  }
  l_i = l_i * alpha + row_sum;
  m_i = m_new;
  return alpha;
}

// T: the input dtype; U: the products' (T, or bf16 for fp16 as pairs: KVBlocks, mm::fp16_pairs).
template <typename T, typename U>
void fwd_task(const CpuParams& p, int64_t n, int64_t h, int64_t qb, Scratch& buf, KVBlocks<U>& kv) {
  constexpr bool kPairs = !std::is_same_v<T, U>;
  const SeqInfo s = seq_info(p, n);
  const int64_t i0 = qb * QBLOCK;
  if (i0 >= s.sq) return;
  const int64_t bq = std::min(QBLOCK, s.sq - i0), Dv = p.Dv, hk = h / p.group();
  const Visibility vis(p, s);
  const ScoreCtx<T> ctx(p, s, vis, h);
  buf.used = 0;
  float* S = buf.take(QBLOCK * KBLOCK);
  float* acc = buf.take(QBLOCK * Dv);
  float* m = buf.take(QBLOCK);
  float* l = buf.take(QBLOCK);
  // T / U tiles carved from the fp32 scratch (2 per float).
  U* qa = reinterpret_cast<U*>(buf.take((QBLOCK * kv.Dk + 1) / 2));
  T* P = reinterpret_cast<T*>(buf.take((QBLOCK * KBLOCK + 1) / 2));
  U* Ph = kPairs ? reinterpret_cast<U*>(buf.take((QBLOCK * KBLOCK + 1) / 2)) : nullptr;  // P's pairs
  U* Pl = kPairs ? reinterpret_cast<U*>(buf.take((QBLOCK * KBLOCK + 1) / 2)) : nullptr;

  const T* q = static_cast<const T*>(p.q) + s.b * p.q_st.b + h * p.q_st.h + (s.q0 + i0) * p.q_st.s;
  const T* k = static_cast<const T*>(p.k) + s.b * p.k_st.b + hk * p.k_st.h + s.k0 * p.k_st.s;
  const T* v = static_cast<const T*>(p.v) + s.b * p.v_st.b + hk * p.v_st.h + s.k0 * p.v_st.s;
  const U* qs = qa;
  int64_t ldq = kv.Dk;
  if constexpr (kPairs) {  // query rows [Qh | Qh0 | Ql] against the kt block's [Kh; Kl; Kh0]
    kv.split_rows(q, p.q_st.s, p.q_st.d, bq, p.D, kv.Dp, kv.Dk, qa, qa + 2 * kv.Dp, qa + kv.Dp);
  } else if (p.q_st.d == 1 && p.D == kv.Dp && p.q_st.s >= p.D) {
    // Q rows with unit stride, an even head dim and rows apart (no expanded or overlapping rows, which a GEMM's
    // leading dimension may not take) are the product's operand as they are (the copy was ~3% of a short forward);
    // otherwise a copy padded to even.
    qs = q;
    ldq = p.q_st.s;
  } else {
    mm::copy_rows<T>(q, p.q_st.s, p.q_st.d, bq, p.D, kv.Dp, kv.Dp, qa);
  }
  std::fill(m, m + bq, kNegInf);
  std::fill(l, l + bq, 0.f);
  const Dropout dropout(p.seed, p.offset, p.dropout_p, p.head_start);
  const Dropout* drop = p.dropout_p > 0.f ? &dropout : nullptr;
  // A bias alone (a float or key-padding mask) on fully visible tiles is added in the softmax's exp pass instead of
  // a pass of its own over S (that pass was ~15% of a masked bf16 forward).
  const bool fuse_bias = !drop && ctx.bias_only() && p.bias_st.d == 1;

  // Key blocks on the global grid that any row of this query block sees (invisible blocks, skipped padding and keys
  // a bias's -inf edges hide from every row are left out).
  const auto [j_lo, j_hi] = block_keys(p, s, vis, h, i0, i0 + bq);
  bool first = true;  // the first P V product writes acc (no fill, no rescale of it before)
  if (j_lo < j_hi) {
    const int64_t kb0 = j_lo / KBLOCK, kb1 = (j_hi + KBLOCK - 1) / KBLOCK;
    kv.ensure(p, s, n * p.Hkv + hk, k, v, kb0, kb1);
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      // Keys before j_lo are invisible to every row: the first tile starts there, on a multiple of 64 keys in its
      // block (few tile widths for the brgemm kernels; even, as V's VNNI pairs run over keys). Keys past j_hi are
      // invisible too: the tile stops there (kept even unless at the end).
      const int64_t c0 = kb == kb0 ? (j_lo - kb * KBLOCK) / 64 * 64 : 0;
      const int64_t j0 = kb * KBLOCK + c0, bk = std::min({KBLOCK - c0, s.sk - j0, mm::even(j_hi - j0)});
      const int64_t bk_pad = mm::even(bk);
      const bool fused = fuse_bias && vis.full(i0, i0 + bq, j0, j0 + bk);
      const float eff = lowp_scores<T, U>(ctx, kv, qs, ldq, i0, bq, kb, c0, bk, S, nullptr, fused);
      for (int64_t r = 0; r < bq; ++r) {
        const float alpha = softmax_row<T>(S + r * KBLOCK, bk, bk_pad, eff, m[r], l[r], P + r * KBLOCK, drop,
                                           s.n, h, s.qpos0 + i0 + r, s.kpos0 + j0,
                                           fused ? ctx.bias_row(i0 + r) + j0 : nullptr);
        if (alpha != 1.f && !first) vec512::scale_row(acc + r * Dv, Dv, alpha);
        if constexpr (kPairs) {  // P rounded to fp16 (as on the fp32 tiles), then split exactly
          vec512::split_bf16_row(P + r * KBLOCK, bk_pad, bk_pad, Ph + r * KBLOCK, Pl + r * KBLOCK, nullptr,
                                 mm::plant_pairs_lo(false));
        }
      }
      // acc (+)= P V, V's rows from key c0 of the block (VNNI pairs of rows: + c0 Dv)
      if constexpr (kPairs) {  // Ph Vh + Ph Vl + Pl Vh0 (P has no infs: Ph serves as its own Ph0)
        mm::mm_vnni<U>(bq, Dv, bk_pad, Ph, KBLOCK, kv.v_block(kb, Dv) + c0 * Dv, Dv, acc, Dv, !first);
        mm::mm_vnni<U>(bq, Dv, bk_pad, Ph, KBLOCK, kv.vl_block(kb, Dv) + c0 * Dv, Dv, acc, Dv, true);
        mm::mm_vnni<U>(bq, Dv, bk_pad, Pl, KBLOCK, kv.vh0_block(kb, Dv) + c0 * Dv, Dv, acc, Dv, true);
      } else {
        mm::mm_vnni<T>(bq, Dv, bk_pad, P, KBLOCK, kv.v_block(kb, Dv) + c0 * Dv, Dv, acc, Dv, !first);
      }
      first = false;
    }
  }
  if (first) std::fill(acc, acc + bq * Dv, 0.f);  // no key: empty rows

  store_rows<T>(p, s, h, i0, bq, acc, m, l);
}

template <typename T, typename U>
void fwd_lowp_run(const CpuParams& p, int64_t max_sq, int64_t max_sk) {
  constexpr bool kPairs = !std::is_same_v<T, U>;
  const int64_t nqb = (max_sq + QBLOCK - 1) / QBLOCK, Dk = (kPairs ? 3 : 1) * mm::even(p.D);
  const int64_t p_tile = Scratch::round((QBLOCK * KBLOCK + 1) / 2);
  const int64_t scratch = Scratch::round(QBLOCK * KBLOCK) + Scratch::round(QBLOCK * p.Dv) +
                          2 * Scratch::round(QBLOCK) + Scratch::round((QBLOCK * Dk + 1) / 2) +
                          (kPairs ? 3 : 1) * p_tile;
  const int64_t kv_bytes = int64_t(sizeof(U)) * max_sk * (Dk + (kPairs ? 3 : 1) * p.Dv);
  const FwdOrder order(p, nqb, fwd_chunk_heads(p, nqb, kv_bytes, int64_t(sizeof(T)) * max_sq * max_sk));
  at::parallel_for(0, order.count(), 1, [&](int64_t begin, int64_t end) {
    WorkspaceScope workspace;  // everything below takes its buffers from it
    Scratch buf(scratch);
    std::vector<std::unique_ptr<KVBlocks<U>>> kv(order.slots);
    for (auto& slot : kv) slot = std::make_unique<KVBlocks<U>>(p, max_sk, false, kPairs);
    for (int64_t i = begin; i < end; ++i) {
      const FwdOrder::Task task = order.at(i);
      for (int64_t h = task.h0; h < task.h0 + order.heads; ++h) {  // a chunk's heads: the bias rows stay in cache
        fwd_task<T, U>(p, task.n, h, task.qb, buf, *kv[order.slot(h)]);
      }
    }
    mm::release();
  });
}

}  // namespace

// Pairs pack three bf16 blocks of K and of V per kv head (split, then VNNI) and run four brgemm calls a tile
// where fp16's fp32 tiles convert K and V once: they pay from 64 query rows per kv head over 128 keys and more.
// Measured one thread, Intel Xeon (AMX-BF16, no AMX-FP16), fp16 forward, pairs against the fp32 tiles, median of 9
// interleaved rounds: MHA 8 heads at 512 / 2048 keys, D=64 / 128: 8-16 query rows 0.62-0.86x, 32 rows 0.86-1.00x,
// 64 rows 1.03-1.18x, 128 rows 1.20-1.50x; GQA 16/4 (4 query heads a kv head): 32 rows a kv head 0.89-1.00x, 64 rows
// 1.01-1.25x, 128 and more 1.08-1.85x; short calls (B8 H12, S = 16 / 32; B1 H12 S64) 0.48-0.93x (four brgemm calls a
// tile for few products), B4 H8 S128 1.15x; S=2048 (B1 H8) 1.50-1.74x.
// The backward's pairs pack three bf16 blocks of K^T, V^T and K per kv head and split P and dS per tile: they pay
// from 128 query rows per kv head (twice the forward's line). Measured one thread, Intel Xeon (AMX-BF16, no
// AMX-FP16), fp16 backward alone (autograd.grad), pairs against the fp32 tiles, median of 9: MHA 8 heads, D=64 / 128:
// 16-48 rows 0.52-0.84x, 64 rows 0.91-0.93x (at 64 and 2048 keys), 96 rows 0.89-1.00x, 128 rows 0.94-1.37x (1.06x
// and up on a rerun), 160-192 rows 1.09-1.38x, causal 128-256 rows 1.17-1.74x, 512 rows 1.25-1.31x; GQA 16/4 32 rows
// a kv head 0.61-0.85x, 64 rows 0.91-1.02x, 128-192 rows 1.10-1.27x; B8 H12 S32 0.63-0.73x.
bool fp16_on_pairs(int64_t rows_per_kv_head, int64_t max_sk, bool backward) {
  const int64_t min_rows = backward ? 128 : 64;
  return mm::fp16_pairs() && (mm::fp16_pairs_forced() || (rows_per_kv_head >= min_rows && max_sk >= 128));
}

template <typename T>
void fwd_lowp_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (mm::path(at::kHalf) != mm::Path::kBrgemm) return fwd_lowp_run<c10::Half, c10::BFloat16>(p, max_sq, max_sk);
  }
  fwd_lowp_run<T, T>(p, max_sq, max_sk);
}

template void fwd_lowp_kernel<c10::BFloat16>(const CpuParams&, int64_t, int64_t);
template void fwd_lowp_kernel<c10::Half>(const CpuParams&, int64_t, int64_t);

}  // namespace fastattn::cpu
