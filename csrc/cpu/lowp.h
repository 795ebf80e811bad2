// Shared pieces of the matrix-unit path (bf16/fp16 tiles multiplied in their own dtype, fp32 accumulation;
// fwd_lowp.cpp, bwd_lowp.cpp): per-thread VNNI packs of a head's K and V, and the score tile
// S = Q K^T (raw products; the scale is folded into the softmax unless softcap/alibi/bias need scaled scores).
#pragma once
#include <memory>

#include "mm.h"
#include "tile.h"
#include "vec512.h"

namespace fastattn::cpu {

// Tiles of the matrix-unit path: QBLOCK query rows per task, KBLOCK keys per step. Longer key steps than the
// fp32 path's halve the per-step costs (two brgemm kernel switches, the row rescales) and suit AMX's 16x32 tiles.
constexpr int64_t QBLOCK = 64;
constexpr int64_t KBLOCK = 512;

// VNNI blocks of one (sequence, kv head)'s keys on the global grid of KBLOCK keys, kept across the tasks of a
// thread (consecutive tasks share the head) and packed on first use:
//   kt block kb: K^T of keys [kb*KBLOCK, +bk) as a (Dk x bk) right operand, ldb KBLOCK  (S = Q K^T)
//   v  block kb: V of those keys as a (bk x Dv) right operand, ldb Dv                    (O += P V)
//   vt block kb (backward only): V^T as a (Dv x bk) right operand, ldb KBLOCK            (dP = dO V^T)
//   k  block kb (backward only): K as a (bk x D) right operand, ldb D                      (dQ += dS K)
// Pairs (fp16 on bf16 matrix units, mm::fp16_pairs; T = bf16, fp16 sources): each fp16 value is the exact sum
// hi + lo of two bf16 (vec512::split_bf16_row), and a product of two is hi hi + hi0 lo + lo hi0 (lo lo, under 2^-18
// of it, dropped; hi0: hi with its infs as 0, so that only hi hi meets an inf): the kt block is [Kh; Kl; Kh0]^T
// (Dk = 3 Dp, against query rows [Qh | Qh0 | Ql]), the vt block [Vh; Vl; Vh0]^T (Dvk = 3 Dvp, against dO rows
// [dOh | dOh0 | dOl]), and each v block (Vh) and k block (Kh) is followed by its lo and hi0 blocks (three products).
template <typename T>
struct KVBlocks {
  int64_t Dp, Dvp, parts, Dk, Dvk, nkb;  // parts: 3 for pairs (hi, lo, hi0), else 1
  bool bwd, pairs;
  T *kt, *v = nullptr, *vt = nullptr, *k = nullptr;  // from the thread's workspace
  std::vector<char> done;
  std::unique_ptr<T[]> split;           // pairs: one block's split rows, hi, lo and hi0 (each bk x max(D, Dv))
  std::unique_ptr<c10::Half[]> row;     // pairs: a strided source row gathered
  int64_t split_n = 0;
  int64_t head = -1;

  // bwd = false: kt and v blocks (forward); bwd = true: kt, vt and k blocks (backward); pairs: T = bf16 of fp16.
  KVBlocks(const CpuParams& p, int64_t max_sk, bool bwd_, bool pairs_ = false)
      : Dp(mm::even(p.D)), Dvp(mm::even(p.Dv)), parts(pairs_ ? 3 : 1), Dk(parts * Dp), Dvk(parts * Dvp),
        nkb((max_sk + KBLOCK - 1) / KBLOCK), bwd(bwd_), pairs(pairs_) {
    const int64_t per = KBLOCK * (Dk + parts * (bwd ? Dvp + p.D : p.Dv));
    kt = workspace_take<T>(nkb * per);
    if (bwd) {
      vt = kt + nkb * KBLOCK * Dk;
      k = vt + nkb * KBLOCK * Dvk;
    } else {
      v = kt + nkb * KBLOCK * Dk;
    }
    if (pairs) {
      split_n = std::min(KBLOCK, mm::even(max_sk)) * std::max(p.D, p.Dv);
      split.reset(new T[3 * split_n]);  // uninitialised: every row read is written first
      row.reset(new c10::Half[std::max(p.D, p.Dv)]);
    }
    done.assign(nkb, 0);
  }

  T* kt_block(int64_t kb) const { return kt + kb * KBLOCK * Dk; }
  T* v_block(int64_t kb, int64_t Dv) const { return v + kb * KBLOCK * Dv * parts; }
  T* vl_block(int64_t kb, int64_t Dv) const { return v_block(kb, Dv) + KBLOCK * Dv; }       // pairs: Vl
  T* vh0_block(int64_t kb, int64_t Dv) const { return v_block(kb, Dv) + 2 * KBLOCK * Dv; }  // pairs: Vh0
  T* vt_block(int64_t kb) const { return vt + kb * KBLOCK * Dvk; }
  T* k_block(int64_t kb, int64_t D) const { return k + kb * KBLOCK * D * parts; }
  T* kl_block(int64_t kb, int64_t D) const { return k_block(kb, D) + KBLOCK * D; }       // pairs: Kl
  T* kh0_block(int64_t kb, int64_t D) const { return k_block(kb, D) + 2 * KBLOCK * D; }  // pairs: Kh0

  // Packs blocks [kb0, kb1) of head `head_id` (k_src, v_src at the sequence's first key; S: T, or fp16 for
  // pairs) when not yet packed.
  template <typename S>
  void ensure(const CpuParams& p, const SeqInfo& s, int64_t head_id, const S* k_src, const S* v_src, int64_t kb0,
              int64_t kb1) {
    if (head_id != head) {
      std::fill(done.begin(), done.end(), 0);
      head = head_id;
    }
    // Tiles read keys up to s.kend, kept even (lowp_scores' rule): skipped padding past that is not packed.
    const int64_t end = std::min(s.sk, mm::even(s.kend));
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      if (done[kb]) continue;
      const int64_t j0 = kb * KBLOCK, bk = std::min(KBLOCK, end - j0);
      done[kb] = 1;
      if (bk <= 0) continue;  // all skipped padding (the backward asks for every block)
      const S* kr = k_src + j0 * p.k_st.s;
      const S* vr = v_src + j0 * p.v_st.s;
      if constexpr (std::is_same_v<S, T>) {
        mm::pack_transposed<T>(kr, p.k_st.s, p.k_st.d, bk, p.D, KBLOCK, kt_block(kb));
        if (bwd) {
          mm::pack_transposed<T>(vr, p.v_st.s, p.v_st.d, bk, p.Dv, KBLOCK, vt_block(kb));
          mm::pack_rows<T>(kr, p.k_st.s, p.k_st.d, bk, p.D, p.D, k_block(kb, p.D));
        } else {
          mm::pack_rows<T>(vr, p.v_st.s, p.v_st.d, bk, p.Dv, p.Dv, v_block(kb, p.Dv));
        }
      } else {
        pack_pairs(p, kr, vr, kb, bk);
      }
    }
  }

  // Rows [0, rows) of fp16 src (row stride ss, column stride sd) split into h, l and h0 (rows x cols_pad, ld ldd).
  void split_rows(const c10::Half* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t cols_pad,
                  int64_t ldd, T* h, T* l, T* h0) {
    static_assert(std::is_same_v<T, c10::BFloat16>, "pairs are bf16");
    const bool zero_lo = mm::plant_pairs_lo(bwd);
    for (int64_t r = 0; r < rows; ++r) {
      const c10::Half* x = src + r * ss;
      if (sd != 1) {
        mm::copy_rows<c10::Half>(x, ss, sd, 1, cols, cols, cols, row.get());
        x = row.get();
      }
      vec512::split_bf16_row(x, cols, cols_pad, h + r * ldd, l + r * ldd, h0 + r * ldd, zero_lo);
    }
  }

 private:
  // The three parts (hi, lo, hi0: rows x cols each, row-major) as one right operand of their transposes stacked,
  // rows [0, cols_pad) hi^T, then lo^T, then hi0^T (ldb KBLOCK) ...
  static void pack_parts_transposed(const T* const part[3], int64_t rows, int64_t cols, int64_t cols_pad, T* dst) {
    for (int64_t i = 0; i < 3; ++i) {
      mm::pack_transposed<T>(part[i], cols, 1, rows, cols, KBLOCK, dst + i * cols_pad * KBLOCK);
    }
  }
  // ... or as three right operands of rows (ldb cols), KBLOCK x cols apart.
  static void pack_parts_rows(const T* const part[3], int64_t rows, int64_t cols, T* dst) {
    for (int64_t i = 0; i < 3; ++i) mm::pack_rows<T>(part[i], cols, 1, rows, cols, cols, dst + i * KBLOCK * cols);
  }

  void pack_pairs(const CpuParams& p, const c10::Half* kr, const c10::Half* vr, int64_t kb, int64_t bk) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      T *hi = split.get(), *lo = hi + split_n, *hi0 = lo + split_n;
      const T* const split_parts[3] = {hi, lo, hi0};
      split_rows(kr, p.k_st.s, p.k_st.d, bk, p.D, p.D, p.D, hi, lo, hi0);
      pack_parts_transposed(split_parts, bk, p.D, Dp, kt_block(kb));  // [Kh; Kl; Kh0]^T
      if (bwd) pack_parts_rows(split_parts, bk, p.D, k_block(kb, p.D));  // Kh, Kl, Kh0
      split_rows(vr, p.v_st.s, p.v_st.d, bk, p.Dv, p.Dv, p.Dv, hi, lo, hi0);
      if (bwd) {
        pack_parts_transposed(split_parts, bk, p.Dv, Dvp, vt_block(kb));  // [Vh; Vl; Vh0]^T
      } else {
        pack_parts_rows(split_parts, bk, p.Dv, v_block(kb, p.Dv));  // Vh, Vl, Vh0
      }
    }
  }
};

// Score tile of query rows [i0, +bq) (qa: (bq x Dk) U, ld lda; U = bf16 for pairs) against keys
// [kb * KBLOCK + c0, +bk) of key block kb: S (bq x bk, ld KBLOCK) ready for the softmax, which multiplies it by the
// returned factor (the scale when it could be deferred, else 1). defer_bias (a bias-only context on a fully visible
// tile): the raw products alone; the softmax adds the bias. Empty-row NaN detection stays with the caller.
template <typename T, typename U = T>
float lowp_scores(const ScoreCtx<T>& ctx, const KVBlocks<U>& kv, const U* qa, int64_t lda, int64_t i0, int64_t bq,
                  int64_t kb, int64_t c0, int64_t bk, float* S, float* tanh_out, bool defer_bias = false) {
  const int64_t j0 = kb * KBLOCK + c0;
  mm::mm_vnni<U>(bq, bk, kv.Dk, qa, lda, kv.kt_block(kb) + 2 * c0, KBLOCK, S, KBLOCK, false);  // column c0: + 2 c0
  float eff = ctx.p.scale;
  if (defer_bias) return eff;
  if (ctx.bias_only()) {  // the scale rides the bias pass
    ctx.finish(i0, bq, j0, bk, S, KBLOCK, tanh_out, eff);
    return 1.f;
  }
  if (ctx.transforms() || !(eff > 0.f)) {
    for (int64_t r = 0; r < bq; ++r) vec512::scale_row(S + r * KBLOCK, bk, eff);
    eff = 1.f;
  }
  ctx.finish(i0, bq, j0, bk, S, KBLOCK, tanh_out);
  // A tile cut at the skipped padding but kept even ends one key past it; with the bias dropped (skip_key_padding)
  // nothing else masks that key. (A kept bias is -inf there, and deferred tiles always keep theirs.)
  if (j0 + bk > ctx.s.kend && ctx.bias_row0 == nullptr) {
    const int64_t lo = std::max<int64_t>(ctx.s.kend - j0, 0);
    for (int64_t r = 0; r < bq; ++r) std::fill(S + r * KBLOCK + lo, S + r * KBLOCK + bk, kNegInf);
  }
  return eff;
}

}  // namespace fastattn::cpu
