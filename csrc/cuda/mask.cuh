// Visibility of key j to query i within one sequence (the rule in csrc/ops.cpp), plus the block-level
// questions the kernels ask to skip whole tiles: which key range a query tile can see, which query range a
// key tile is seen by, and whether a tile needs element-wise masking at all.
#pragma once
#include "params.h"

namespace fastattn {
namespace cuda {

// The rule is evaluated on d = j - i as lo <= d <= hi with lo = off - wl, hi = off + wr (a side without window:
// always true), both clamped per block into [-(sq + kMaskSlack), sk]: inside that range the answer for every query
// row a tile can hold (i < sq + kMaskSlack) and every key (j < sk) is unchanged, and no int arithmetic overflows
// whatever the block offset (|off| < 2^31) and window (< 2^31). The tile ranges are computed in 64 bits (once per
// block).
constexpr int kMaskSlack = 256;  // >= every kernel's query tile height: rows past sq within a tile stay consistent

struct Mask {
  int sq, sk;  // this sequence's lengths
  int lo, hi;  // key j visible to query i iff lo <= j - i <= hi (and j < sk)

  __device__ __forceinline__ bool visible(int i, int j) const { return j < sk && j - i >= lo && j - i <= hi; }
  // Some (i, j) in [m0, m0+bm) x [n0, n0+bn) may be invisible, so the tile needs element masking.
  __device__ __forceinline__ bool partial(int m0, int bm, int n0, int bn) const {
    return n0 + bn > sk || n0 + bn - 1 - m0 > hi || n0 - (m0 + bm - 1) < lo;
  }
  // Keys [k_lo, k_hi) that some query in [m0, m_end) sees (k_hi <= k_lo: none).
  __device__ __forceinline__ void key_range(int m0, int m_end, int& k_lo, int& k_hi) const {
    k_lo = static_cast<int>(min(int64_t(sk), max(int64_t(0), int64_t(m0) + lo)));
    k_hi = static_cast<int>(max(int64_t(0), min(int64_t(sk), int64_t(m_end) + hi)));
  }
  // Queries [q_lo, q_hi) that see some key in [n0, n_end).
  __device__ __forceinline__ void query_range(int n0, int n_end, int& q_lo, int& q_hi) const {
    q_lo = static_cast<int>(min(int64_t(sq), max(int64_t(0), int64_t(n0) - hi)));
    q_hi = static_cast<int>(max(int64_t(0), min(int64_t(sq), int64_t(n_end) - lo)));
  }
};

// Where sequence b lives: its lengths, its first row in the (packed) tensors and the batch index to use.
struct SeqInfo {
  int sq, sk;
  int64_t row_q0, row_k0;
  int bb;
  int n;  // the sequence (batch entry in dense mode): indexes q_start/k_start and keys the dropout counters
  __device__ __forceinline__ SeqInfo(const AttnShape& p, int b) : n(b) {
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

// off = q_start[b] - k_start[b] with block coordinates, else Sk - Sq (bottom-right) or 0. Computed in 64 bits once
// per block and clamped (see Mask); q_start/k_start values are never used as addresses, only to shift the band.
__device__ __forceinline__ Mask SeqInfo::mask(const AttnShape& p) const {
  const int64_t off = p.q_start != nullptr ? int64_t(p.q_start[n]) - p.k_start[n] : p.bottom_right ? sk - sq : 0;
  const int64_t lowest = max(-int64_t(sq) - kMaskSlack, -int64_t(INT32_MAX));
  const auto clamp = [&](int64_t x) { return static_cast<int>(x < lowest ? lowest : x > sk ? sk : x); };
  return Mask{sq, sk, p.window_left < 0 ? static_cast<int>(lowest) : clamp(off - p.window_left),
              p.window_right < 0 ? sk : clamp(off + p.window_right)};
}

// A sequence's block coordinate (q_start or k_start) as the dropout counters take it; 0 without block coordinates.
__device__ __forceinline__ uint32_t block_start(const int* start, int n) {
  return start != nullptr ? static_cast<uint32_t>(start[n]) : 0u;
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
