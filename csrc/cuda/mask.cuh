// Visibility of key j to query i within one sequence (the rule in csrc/ops.cpp), plus the block-level
// questions the kernels ask to skip whole tiles: which key range a query tile can see, which query range a
// key tile is seen by, and whether a tile needs element-wise masking at all.
#pragma once
#include "params.h"

namespace fastattn {
namespace cuda {

struct Mask {
  int sq, sk;  // this sequence's lengths
  int off;     // Sk - Sq when aligned bottom-right, else 0
  int wl, wr;  // window (-1 = unlimited); causal is wr == 0

  __device__ __forceinline__ bool visible(int i, int j) const {
    return j < sk && (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr);
  }
  // Some (i, j) in [m0, m0+bm) x [n0, n0+bn) may be invisible, so the tile needs element masking.
  __device__ __forceinline__ bool partial(int m0, int bm, int n0, int bn) const {
    return n0 + bn > sk || (wr >= 0 && n0 + bn - 1 > m0 + off + wr) || (wl >= 0 && n0 < m0 + bm - 1 + off - wl);
  }
  // Keys [lo, hi) that some query in [m0, m_end) sees (hi <= lo: none).
  __device__ __forceinline__ void key_range(int m0, int m_end, int& lo, int& hi) const {
    lo = wl >= 0 ? max(0, m0 + off - wl) : 0;
    hi = wr >= 0 ? min(sk, m_end + off + wr) : sk;
  }
  // Queries [lo, hi) that see some key in [n0, n_end).
  __device__ __forceinline__ void query_range(int n0, int n_end, int& lo, int& hi) const {
    lo = wr >= 0 ? max(0, n0 - off - wr) : 0;
    hi = wl >= 0 ? min(sq, n_end + wl - off) : sq;
  }
};

// Where sequence b lives: its lengths, its first row in the (packed) tensors and the batch index to use.
struct SeqInfo {
  int sq, sk;
  int64_t row_q0, row_k0;
  int bb;
  __device__ __forceinline__ SeqInfo(const AttnShape& p, int b) {
    if (p.cu_seqlens_q != nullptr) {  // varlen: one batch entry, sequences are row ranges
      // The host does not read cu_seqlens (no sync): clamp [cu[b], cu[b+1]) into the tensor's rows so that bad
      // values give wrong results, never out-of-bounds accesses.
      const int q0 = min(max(p.cu_seqlens_q[b], 0), p.total_q), k0 = min(max(p.cu_seqlens_k[b], 0), p.total_k);
      row_q0 = q0;
      row_k0 = k0;
      sq = min(max(p.cu_seqlens_q[b + 1], q0), p.total_q) - q0;
      sk = min(max(p.cu_seqlens_k[b + 1], k0), p.total_k) - k0;
      bb = 0;
    } else {
      row_q0 = row_k0 = 0;
      sq = p.seqlen_q;
      sk = p.seqlen_k;
      bb = b;
    }
  }
  __device__ __forceinline__ Mask mask(const AttnShape& p) const;
};

__device__ __forceinline__ Mask SeqInfo::mask(const AttnShape& p) const {
  return Mask{sq, sk, p.bottom_right ? sk - sq : 0, p.window_left, p.window_right};
}

// Pointer to row `row` of head h in batch entry bb of a (B, H, S, D) tensor.
template <typename T>
__device__ __forceinline__ T* row_ptr(const TensorRef& t, int bb, int h, int64_t row) {
  return static_cast<T*>(t.ptr) + bb * t.batch_stride + h * t.head_stride + row * t.row_stride;
}

// Tile index range [lo, hi) covering the element range [a, b) in tiles of kBlock (empty when b <= a).
template <int kBlock>
__device__ __forceinline__ void tile_range(int a, int b, int& lo, int& hi) {
  lo = a / kBlock;
  hi = b > a ? (b + kBlock - 1) / kBlock : lo;
}

}  // namespace cuda
}  // namespace fastattn
