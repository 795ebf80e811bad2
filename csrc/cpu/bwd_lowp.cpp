// FlashAttention-2 backward on the CPU's matrix units for bf16/fp16: the five products of a tile take the input
// dtype and accumulate in fp32; P and dS are rounded to the input dtype for their products, as on GPUs.
//
//   per tile (bq query rows x bk keys):  S  = Q K^T                 (Q rows,    K^T VNNI)
//                                        dP = dO V^T               (dO rows,   V^T VNNI)
//                                        P = exp(S - lse), dS = P (dP - delta)   (fused AVX-512 row pass)
//                                        dV^T += dO^T P            (dO^T rows, P as VNNI row pairs)
//                                        dK^T += Q^T dS            (Q^T rows,  dS as VNNI row pairs)
//                                        dQ   += dS K              (dS rows,   K VNNI)
// Accumulating dV^T and dK^T (instead of dV, dK) lets P and dS be written once, row-major in pairs, rather
// than transposed per tile; the head's Q^T and dO^T are transposed once per head instead.
//
// bwd.cpp's schedule: a task per (sequence, kv head, chunk of key blocks); a head is cut into chunks only when there
// are fewer than bwd_min_tasks() (sequence, kv head) pairs (params.h bwd_key_chunks), and the chunks' dQ partials are
// summed in chunk order afterwards. Every output element is reduced in a fixed order that the shape (and the
// machine's CPU count) alone decides, so the results are bitwise identical for any thread count. A task packs its
// keys once, K^T, V^T, K blocks (KVBlocks), and per query head of the group the Q, Q^T, dO, dO^T blocks that see them
// (QBlocks).
//
// fp16 where only bf16 has matrix units (mm::fp16_pairs): every operand as exact bf16 pairs (lowp.h KVBlocks), P
// and dS rounded to fp16 first, then split; each product is three (hi hi + hi0 lo + lo hi0), run as one product of
// a three times longer inner dimension where both operands are packed here (S, dP, dV^T, dK^T) and as three where
// the right one is a key block read from column c0 (dQ).
#include <ATen/Parallel.h>

#include "kernels.h"
#include "lowp.h"
#include "rng.h"

namespace fastattn::cpu {

namespace {

// Query-side operands of one (sequence, query head), on the global grid of QBLOCK rows; row counts padded to
// even with zeros where they are a product's inner dimension. T: the input dtype; U: the products' (T, or bf16
// pairs of fp16: Q rows [Qh | Qh0 | Ql], dO rows [dOh | dOh0 | dOl], Q^T and dO^T with the three parts side by
// side at columns 0, bq_pad and 2 bq_pad, against P and dS stacked [hi; lo; hi0]).
template <typename T, typename U = T>
struct QBlocks {
  static constexpr int64_t kParts = std::is_same_v<T, U> ? 1 : 3;
  int64_t Dp, Dvp, nqb, ldq, ldo, ldt;  // ldq, ldo: Q's and dO's rows; ldt: Q^T's and dO^T's
  U *qa, *qt, *da, *dt;  // Q (bq x ldq), Q^T (D x ldt), dO (bq x ldo), dO^T (Dv x ldt) per block; workspace

  QBlocks(const CpuParams& p, int64_t max_sq)
      : Dp(mm::even(p.D)), Dvp(mm::even(p.Dv)), nqb((max_sq + QBLOCK - 1) / QBLOCK), ldq(kParts * Dp),
        ldo(kParts * Dvp), ldt(kParts * QBLOCK) {
    const int64_t per = QBLOCK * kParts * (Dp + p.D + Dvp + p.Dv);
    qa = workspace_take<U>(nqb * per);
    qt = qa + nqb * QBLOCK * ldq;
    da = qt + nqb * p.D * ldt;
    dt = da + nqb * QBLOCK * ldo;
  }
  U* qa_block(int64_t qb) const { return qa + qb * QBLOCK * ldq; }
  U* qt_block(int64_t qb, int64_t D) const { return qt + qb * D * ldt; }
  U* da_block(int64_t qb) const { return da + qb * QBLOCK * ldo; }
  U* dt_block(int64_t qb, int64_t Dv) const { return dt + qb * Dv * ldt; }

  // Blocks [qb0, qb1) of the sq rows.
  void pack(const CpuParams& p, int64_t sq, int64_t qb0, int64_t qb1, const T* q, const T* dO, KVBlocks<U>& kv) {
    for (int64_t qb = qb0; qb < qb1 && qb * QBLOCK < sq; ++qb) {
      const int64_t i0 = qb * QBLOCK, bq = std::min(QBLOCK, sq - i0);
      const T* qr = q + i0 * p.q_st.s;
      const T* dr = dO + i0 * p.do_st.s;
      if constexpr (kParts == 3) {
        U *qa_b = qa_block(qb), *da_b = da_block(qb);
        kv.split_rows(qr, p.q_st.s, p.q_st.d, bq, p.D, Dp, ldq, qa_b, qa_b + 2 * Dp, qa_b + Dp);
        kv.split_rows(dr, p.do_st.s, p.do_st.d, bq, p.Dv, Dvp, ldo, da_b, da_b + 2 * Dvp, da_b + Dvp);
        for (int64_t part = 0; part < 3; ++part) {  // (bq, D) part of the rows -> (D, bq) at column part * bq_pad
          const int64_t col = part * mm::even(bq);
          mm::transpose<U>(qa_b + part * Dp, ldq, 1, bq, p.D, ldt, qt_block(qb, p.D) + col);
          mm::transpose<U>(da_b + part * Dvp, ldo, 1, bq, p.Dv, ldt, dt_block(qb, p.Dv) + col);
        }
      } else {
        mm::copy_rows<T>(qr, p.q_st.s, p.q_st.d, bq, p.D, Dp, Dp, qa_block(qb));
        mm::copy_rows<T>(dr, p.do_st.s, p.do_st.d, bq, p.Dv, Dvp, Dvp, da_block(qb));
        mm::transpose<T>(qr, p.q_st.s, p.q_st.d, bq, p.D, QBLOCK, qt_block(qb, p.D));  // (D, bq)
        mm::transpose<T>(dr, p.do_st.s, p.do_st.d, bq, p.Dv, QBLOCK, dt_block(qb, p.Dv));  // (Dv, bq)
      }
    }
  }
};

struct TileBuffers {
  float *S, *dP, *Pd, *tanh;
  void *Pv, *dSv, *dSa;  // T tiles: P and dS as VNNI row pairs (QBLOCK/2 x KBLOCK x 2), dS rows (ld KBLOCK)
  void *Ps = nullptr, *dSs = nullptr, *dSas = nullptr;  // pairs: the three as bf16 [hi; lo; hi0], three tiles each
  static int64_t size(bool pairs) {
    return 4 * Scratch::round(QBLOCK * KBLOCK) + (pairs ? 12 : 3) * Scratch::round(QBLOCK * KBLOCK / 2);
  }
  TileBuffers(Scratch& b, bool pairs) {
    b.used = 0;
    S = b.take(QBLOCK * KBLOCK);
    dP = b.take(QBLOCK * KBLOCK);
    Pd = b.take(QBLOCK * KBLOCK);
    tanh = b.take(QBLOCK * KBLOCK);
    Pv = b.take(QBLOCK * KBLOCK / 2);
    dSv = b.take(QBLOCK * KBLOCK / 2);
    dSa = b.take(QBLOCK * KBLOCK / 2);
    if (pairs) {
      Ps = b.take(3 * QBLOCK * KBLOCK / 2);
      dSs = b.take(3 * QBLOCK * KBLOCK / 2);
      dSas = b.take(3 * QBLOCK * KBLOCK / 2);
    }
  }
};

// Fills P (into S) and dS (into dP) for rows [0, bq) of a tile; returns the P that multiplies dO (Pd with
// dropout, else S).
template <typename T>
const float* grad_rows(const ScoreCtx<T>& ctx, const Dropout* drop, float eff, const float* lse, const float* delta,
                       int64_t i0, int64_t bq, int64_t j0, int64_t bk, TileBuffers& B) {
  const CpuParams& p = ctx.p;
  for (int64_t r = 0; r < bq; ++r) {
    float* P_r = B.S + r * KBLOCK;
    float* dS_r = B.dP + r * KBLOCK;
    if (!drop) {
      vec512::grad_row<T>(P_r, dS_r, bk, eff, lse[r], delta[r]);
    } else {
      // Pd = P * keep / (1 - p); dS = P * (dP * keep / (1 - p) - delta) = Pd * dP - P * delta
      vec512::exp_lse_row<T>(P_r, bk, eff, lse[r]);
      float* Pd_r = B.Pd + r * KBLOCK;
      std::copy(P_r, P_r + bk, Pd_r);
      drop->apply_row(Pd_r, ctx.s.n, ctx.h, ctx.s.qpos0 + i0 + r, ctx.s.kpos0 + j0, bk);
      const float d = delta[r];
      for (int64_t j = 0; j < bk; ++j) dS_r[j] = Pd_r[j] * dS_r[j] - P_r[j] * d;
    }
    if (p.softcap > 0.f) {
      const float* t = B.tanh + r * KBLOCK;
      for (int64_t j = 0; j < bk; ++j) dS_r[j] *= 1.f - t[j] * t[j];
    }
  }
  return drop ? B.Pd : B.S;
}

// dk rows [j_lo, j_hi) = scale * columns of dK^T, dv = columns of dV^T (both blocked by KBLOCK keys; j_lo on a
// block's start); Add: dk += ... 16 keys at a time go through a small row-major buffer, transposed in registers
// (vec::transpose; scalar, with the query side's transposes, it was 10-20% of a bf16 forward+backward at 128-512
// tokens).
template <typename O, bool Add>
void transpose_out(const CpuParams& p, int64_t j_lo, int64_t j_hi, const float* dkt, const float* dvt, O* dk, O* dv) {
  constexpr int64_t J = 16;
  static_assert(KBLOCK % J == 0, "a group of keys must not straddle two key blocks");
  std::vector<float> rows(J * std::max(p.D, p.Dv));
  auto put = [&](const float* t, int64_t C, int64_t j0, int64_t w, O* out, int64_t ss, int64_t sd, float mul) {
    const float* blk = t + (j0 / KBLOCK) * C * KBLOCK + j0 % KBLOCK;
    vec::transpose<float>(blk, KBLOCK, 1, C, w, rows.data(), C);  // (C, w) -> (w, C)
    for (int64_t u = 0; u < w; ++u) {
      O* o = out + (j0 + u) * ss;
      const float* r = rows.data() + u * C;
      if constexpr (Add) {
        for (int64_t c = 0; c < C; ++c) o[c * sd] += r[c] * mul;
      } else {
        vec::store_row<O>(r, o, sd, C, mul);
      }
    }
  };
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += J) {
    const int64_t w = std::min(J, j_hi - j0);
    put(dkt, p.D, j0, w, dk, p.dk_st.s, p.dk_st.d, p.scale);
    put(dvt, p.Dv, j0, w, dv, p.dv_st.s, p.dv_st.d, 1.f);
  }
}

// Zeroes the columns of keys [j_lo, j_hi) in dK^T or dV^T blocks (C x KBLOCK each; j_lo on a block's start): the
// tiles add to and transpose_out reads no others, and at 128 keys clearing whole blocks had been 8% of a bf16
// forward+backward.
inline void zero_keys(float* t, int64_t C, int64_t j_lo, int64_t j_hi) {
  for (int64_t j0 = j_lo; j0 < j_hi; j0 += KBLOCK) {
    float* blk = t + (j0 / KBLOCK) * C * KBLOCK;
    const int64_t w = std::min(KBLOCK, j_hi - j0);
    for (int64_t c = 0; c < C; ++c) std::fill(blk + c * KBLOCK, blk + c * KBLOCK + w, 0.f);
  }
}

// A (sequence, kv head) pair's key chunks of per_chunk key blocks; where there are several (base not null), chunk
// c's dQ partial (G x sq x D, write_dq's layout) at base + c * part; else dQ is written by the task itself.
struct ChunkParts {
  float* base = nullptr;
  int64_t part = 0, per_chunk = 0, chunks = 1;
};

// Key blocks [kb0, kb1) of a pair's chunk c.
struct ChunkRange {
  int64_t kb0, kb1, c;
};

// The chunks at places [r0, r0 + run) of zigzag's order (params.h: a causal band's heavy and light chunks alternate,
// so a pair split between threads splits evenly), each clipped to the sequence's nkb key blocks (none past them), and
// each chunk's dQ partial zeroed (rows floats: the chunks' sum reads every row).
std::vector<ChunkRange> chunk_ranges(const ChunkParts& parts, int64_t r0, int64_t run, int64_t nkb, int64_t rows) {
  std::vector<ChunkRange> ranges;
  for (int64_t r = r0; r < r0 + run; ++r) {
    const int64_t c = zigzag(r, parts.chunks), kb0 = c * parts.per_chunk;
    if (parts.base != nullptr) std::fill(parts.base + c * parts.part, parts.base + c * parts.part + rows, 0.f);
    if (kb0 < nkb) ranges.push_back({kb0, std::min(kb0 + parts.per_chunk, nkb), c});
  }
  return ranges;
}

// The query blocks [qb0, qb1) that see a key of the ranges, as the tiles find them per key block.
std::pair<int64_t, int64_t> query_blocks_seen(const Visibility& vis, const SeqInfo& s,
                                              const std::vector<ChunkRange>& ranges) {
  int64_t i_min = s.sq, i_max = 0;
  for (const ChunkRange& rg : ranges) {
    for (int64_t j0 = rg.kb0 * KBLOCK; j0 < rg.kb1 * KBLOCK && j0 < s.kend; j0 += KBLOCK) {
      i_min = std::min(i_min, vis.query_lo(j0));
      i_max = std::max(i_max, vis.query_hi(std::min(j0 + std::min(KBLOCK, s.sk - j0), s.kend) - 1));
    }
  }
  return {i_min / QBLOCK, (i_max + QBLOCK - 1) / QBLOCK};
}

// One task: KV head hk of sequence n over the chunks chunk_ranges gives. dK and dV of those keys go to the output;
// dQ of the group's query heads too where the pair is one chunk (dq, max_sq x D, the buffer), else each chunk's into
// its partial. A run of a pair's chunks on one thread is one task: each head's Q and dO are packed once for all of
// them (only the blocks that see its keys), and every partial gets the same products in the same order as from a
// task of its own chunk.
template <typename T, typename U>
void head_task(const CpuParams& p, int64_t n, int64_t hk, int64_t r0, int64_t run, const float* delta_all,
               Scratch& buf, KVBlocks<U>& kv, QBlocks<T, U>& qblk, float* dkt, float* dvt, float* dq,
               const ChunkParts& parts) {
  constexpr bool kPairs = !std::is_same_v<T, U>;
  const SeqInfo s = seq_info(p, n);
  const int64_t D = p.D, Dv = p.Dv, G = p.group();
  const std::vector<ChunkRange> ranges = chunk_ranges(parts, r0, run, (s.sk + KBLOCK - 1) / KBLOCK, G * s.sq * D);
  if ((s.sk == 0 && s.sq == 0) || (parts.base != nullptr && ranges.empty())) return;
  const Visibility vis(p, s);
  const auto [qb0, qb1] = query_blocks_seen(vis, s, ranges);
  TileBuffers B(buf, kPairs);
  const T* k = static_cast<const T*>(p.k) + s.b * p.k_st.b + hk * p.k_st.h + s.k0 * p.k_st.s;
  const T* v = static_cast<const T*>(p.v) + s.b * p.v_st.b + hk * p.v_st.h + s.k0 * p.v_st.s;
  for (const ChunkRange& rg : ranges) {
    kv.ensure(p, s, n * p.Hkv + hk, k, v, rg.kb0, rg.kb1);
    zero_keys(dkt, D, rg.kb0 * KBLOCK, std::min(rg.kb1 * KBLOCK, s.sk));
    zero_keys(dvt, Dv, rg.kb0 * KBLOCK, std::min(rg.kb1 * KBLOCK, s.sk));
  }
  const Dropout dropout(p.seed, p.offset, p.dropout_p, p.head_start);
  const Dropout* drop = p.dropout_p > 0.f ? &dropout : nullptr;

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const ScoreCtx<T> ctx(p, s, vis, h);
    const T* q = static_cast<const T*>(p.q) + s.b * p.q_st.b + h * p.q_st.h + s.q0 * p.q_st.s;
    const T* dO = static_cast<const T*>(p.dout) + s.b * p.do_st.b + h * p.do_st.h + s.q0 * p.do_st.s;
    const int64_t lrow = s.b * p.lse_sb + h * p.lse_sh + s.q0;
    const float* lse = p.lse + lrow;
    const float* delta = delta_all + lrow;
    qblk.pack(p, s.sq, qb0, qb1, q, dO, kv);
    if (parts.base == nullptr) std::fill(dq, dq + s.sq * D, 0.f);
    for (const ChunkRange& rg : ranges) {
      float* dq_h = parts.base == nullptr ? dq : parts.base + rg.c * parts.part + g * s.sq * D;
      for (int64_t kb = rg.kb0; kb < rg.kb1; ++kb) {
        const int64_t j0 = kb * KBLOCK, bk_block = std::min(KBLOCK, s.sk - j0);
        // Queries that see a key of the block before the skipped padding (none when the block is all padding).
        const int64_t i_lo = j0 < s.kend ? vis.query_lo(j0) : 0;
        const int64_t i_hi = j0 < s.kend ? vis.query_hi(std::min(j0 + bk_block, s.kend) - 1) : 0;
        for (int64_t qb = i_lo / QBLOCK; qb * QBLOCK < i_hi; ++qb) {
          const int64_t i0 = qb * QBLOCK, bq = std::min(QBLOCK, s.sq - i0), bq_pad = mm::even(bq);
          // Keys before what the tile's first row sees, or the bias's -inf edges leave to its rows, are invisible to
          // all of them: the tile starts there, on a multiple of 64 keys in the block (as the forward's), and stops
          // past what its last row sees. Its keys are [t0, t0 + bk), columns [c0, c0 + bk) of the block.
          const auto [m_lo, m_hi] = mask_key_range(p, s, h, i0, i0 + bq);
          const int64_t c0 = std::max<int64_t>(std::max(vis.key_lo(i0), m_lo) - j0, 0) / 64 * 64, t0 = j0 + c0;
          const int64_t key_hi = std::min({vis.key_hi(i0 + bq - 1), s.kend, m_hi});
          const int64_t bk = std::min(bk_block - c0, mm::even(key_hi - t0)), bk_pad = mm::even(bk);
          if (bk <= 0) continue;
          const float eff = lowp_scores<T, U>(ctx, kv, qblk.qa_block(qb), qblk.ldq, i0, bq, kb, c0, bk, B.S,
                                              p.softcap > 0.f ? B.tanh : nullptr);
          mm::mm_vnni<U>(bq, bk, kv.Dvk, qblk.da_block(qb), qblk.ldo, kv.vt_block(kb) + 2 * c0, KBLOCK, B.dP, KBLOCK,
                         false);  // dP = dO V^T (V^T from column c0)
          T* Pv = static_cast<T*>(B.Pv);
          T* dSv = static_cast<T*>(B.dSv);
          T* dSa = static_cast<T*>(B.dSa);
          if (!drop && p.softcap == 0.f) {  // P and dS straight from the scores into their rounded layouts
            for (int64_t r = 0; r < bq; r += 2) {
              const bool two = r + 1 < bq;
              const int64_t o = r * KBLOCK, o1 = o + KBLOCK;
              vec512::grad_pair<T>(B.S + o, two ? B.S + o1 : nullptr, B.dP + o, B.dP + o1, bk, bk_pad, eff,
                                   lse + i0 + r, delta + i0 + r, Pv + o, dSv + o, dSa + o, two ? dSa + o1 : nullptr);
            }
          } else {
            const float* Pd = grad_rows<T>(ctx, drop, eff, lse + i0, delta + i0, i0, bq, t0, bk, B);
            for (int64_t r = 0; r < bq; r += 2) {
              const bool two = r + 1 < bq;
              vec512::store_pair<T>(Pv + r * KBLOCK, Pd + r * KBLOCK, two ? Pd + (r + 1) * KBLOCK : nullptr, bk);
              vec512::store_pair<T>(dSv + r * KBLOCK, B.dP + r * KBLOCK, two ? B.dP + (r + 1) * KBLOCK : nullptr, bk);
            }
            for (int64_t r = 0; r < bq; ++r) vec512::round_row<T>(B.dP + r * KBLOCK, bk, bk_pad, dSa + r * KBLOCK);
          }
          float* dvt_b = dvt + kb * Dv * KBLOCK + c0;  // the tile's columns of the block's dV^T, dK^T
          float* dkt_b = dkt + kb * D * KBLOCK + c0;
          // dV^T += dO^T P, dK^T += Q^T dS; dQ += dS K, K's rows from key c0 of the block (VNNI pairs of rows: + c0 D)
          if constexpr (kPairs) {  // P and dS stacked [hi; lo; hi0] against [hi | hi0 | lo] columns: 3 bq_pad deep
            U *Ps = static_cast<U*>(B.Ps), *dSs = static_cast<U*>(B.dSs), *dSas = static_cast<U*>(B.dSas);
            const int64_t vp = bq_pad * KBLOCK, lo = QBLOCK * KBLOCK;  // where a stacked VNNI tile's lo and hi0 start
            // VNNI row pairs (2 bk values each, 2 KBLOCK apart) and dS rows, split into hi, lo, hi0
            kv.split_rows(Pv, 2 * KBLOCK, 1, bq_pad / 2, 2 * bk, 2 * bk, 2 * KBLOCK, Ps, Ps + vp, Ps + 2 * vp);
            kv.split_rows(dSv, 2 * KBLOCK, 1, bq_pad / 2, 2 * bk, 2 * bk, 2 * KBLOCK, dSs, dSs + vp, dSs + 2 * vp);
            kv.split_rows(dSa, KBLOCK, 1, bq, bk_pad, bk_pad, KBLOCK, dSas, dSas + lo, dSas + 2 * lo);
            mm::mm_vnni<U>(Dv, bk, 3 * bq_pad, qblk.dt_block(qb, Dv), qblk.ldt, Ps, KBLOCK, dvt_b, KBLOCK, true);
            mm::mm_vnni<U>(D, bk, 3 * bq_pad, qblk.qt_block(qb, D), qblk.ldt, dSs, KBLOCK, dkt_b, KBLOCK, true);
            const int64_t c = c0 * D;  // dSh Kh + dSh0 Kl + dSl Kh0
            mm::mm_vnni<U>(bq, D, bk_pad, dSas, KBLOCK, kv.k_block(kb, D) + c, D, dq_h + i0 * D, D, true);
            mm::mm_vnni<U>(bq, D, bk_pad, dSas + 2 * lo, KBLOCK, kv.kl_block(kb, D) + c, D, dq_h + i0 * D, D, true);
            mm::mm_vnni<U>(bq, D, bk_pad, dSas + lo, KBLOCK, kv.kh0_block(kb, D) + c, D, dq_h + i0 * D, D, true);
          } else {
            mm::mm_vnni<T>(Dv, bk, bq_pad, qblk.dt_block(qb, Dv), QBLOCK, Pv, KBLOCK, dvt_b, KBLOCK, true);
            mm::mm_vnni<T>(D, bk, bq_pad, qblk.qt_block(qb, D), QBLOCK, dSv, KBLOCK, dkt_b, KBLOCK, true);
            mm::mm_vnni<T>(bq, D, bk_pad, dSa, KBLOCK, kv.k_block(kb, D) + c0 * D, D, dq_h + i0 * D, D, true);
          }
        }
      }
    }
    if (parts.base != nullptr) continue;  // (write_dq_chunks sums the chunks)
    const int64_t dq0 = s.b * p.dq_st.b + h * p.dq_st.h + s.q0 * p.dq_st.s;
    for (int64_t i = 0; i < s.sq; ++i) grad_row<T>(p, p.dq, dq0 + i * p.dq_st.s, p.dq_st.d, dq + i * D, D, p.scale);
  }

  // dK = scale * (dK^T)^T, dV = (dV^T)^T: written as T, or added to bwd_acc's fp32 accumulators.
  const int64_t dk0 = s.b * p.dk_st.b + hk * p.dk_st.h + s.k0 * p.dk_st.s;
  const int64_t dv0 = s.b * p.dv_st.b + hk * p.dv_st.h + s.k0 * p.dv_st.s;
  for (const ChunkRange& rg : ranges) {
    const int64_t j_lo = rg.kb0 * KBLOCK, j_hi = std::min(rg.kb1 * KBLOCK, s.sk);
    if (p.accumulate) {
      transpose_out<float, true>(p, j_lo, j_hi, dkt, dvt, static_cast<float*>(p.dk) + dk0,
                                 static_cast<float*>(p.dv) + dv0);
    } else {
      transpose_out<T, false>(p, j_lo, j_hi, dkt, dvt, static_cast<T*>(p.dk) + dk0, static_cast<T*>(p.dv) + dv0);
    }
  }
}

template <typename T, typename U>
void bwd_lowp_run(const CpuParams& p, int64_t max_sq, int64_t max_sk) {
  constexpr bool kPairs = !std::is_same_v<T, U>;
  at::Tensor delta_t = at::empty({p.B * p.Hq * p.Sq}, at::kFloat);
  float* delta = delta_t.data_ptr<float>();
  compute_delta<T>(p, delta);
  const int64_t nkb = (max_sk + KBLOCK - 1) / KBLOCK, pairs = p.nseq * p.Hkv;
  const int64_t part = p.group() * max_sq * p.D;  // a chunk's dQ partial, write_dq's layout
  const DqPartials dq_parts(pairs, nkb, part);
  const int64_t chunks = dq_parts.cut.chunks, per_chunk = dq_parts.cut.per_chunk;  // key blocks per chunk
  float* parts = dq_parts.base();
  const std::vector<int64_t> units = dealt_units(pairs);  // (sequence, kv head), dealt to the threads
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    WorkspaceScope workspace;  // everything below takes its buffers from it
    Scratch buf(TileBuffers::size(kPairs));
    KVBlocks<U> kv(p, max_sk, true, kPairs);
    QBlocks<T, U> qblk(p, max_sq);
    // fp32 accumulators: dK^T, dV^T per key block (D|Dv x KBLOCK), dQ of one query head (max_sq x D).
    float* dkt = workspace_take<float>(nkb * KBLOCK * (p.D + p.Dv) + max_sq * p.D);
    float* dvt = dkt + nkb * KBLOCK * p.D;
    float* dq = dvt + nkb * KBLOCK * p.Dv;
    for (int64_t t = begin; t < end;) {  // t = u * chunks + r, pair units[u] = n * Hkv + hk
      const int64_t u = t / chunks, run = std::min(end, (u + 1) * chunks) - t;  // u's chunks on this thread
      const int64_t pair = units[u];
      const ChunkParts cp{parts != nullptr ? parts + pair * chunks * part : nullptr, part, per_chunk, chunks};
      head_task<T, U>(p, pair / p.Hkv, pair % p.Hkv, t % chunks, run, delta, buf, kv, qblk, dkt, dvt, dq, cp);
      t += run;
    }
    mm::release();
  });
  if (parts != nullptr) write_dq_chunks<T>(p, parts, part, chunks, p.scale);
}

}  // namespace

template <typename T>
void bwd_lowp_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (mm::path(at::kHalf) != mm::Path::kBrgemm) return bwd_lowp_run<c10::Half, c10::BFloat16>(p, max_sq, max_sk);
  }
  bwd_lowp_run<T, T>(p, max_sq, max_sk);
}

template void bwd_lowp_kernel<c10::BFloat16>(const CpuParams&, int64_t, int64_t);
template void bwd_lowp_kernel<c10::Half>(const CpuParams&, int64_t, int64_t);

}  // namespace fastattn::cpu
