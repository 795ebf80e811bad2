// Dropout keep bits for a warp's accumulator tiles, with the keep rule of csrc/philox.h (bitwise the CPU mask).
// One Philox draw yields the decisions of 4 consecutive keys (j & ~3 .. j | 3) of one query row, and in the
// mma accumulator layout those 4 elements sit in 2 or 4 different lanes. So each lane draws ONE counter per
// 8-column block and the lanes swap 4-bit results with shuffles: a quarter of the draws of a per-element scheme.
// The draws run in a rolled loop (one Philox in flight) and return packed bits (bit 4 nt + e for element
// (nt, e)). The kernels draw after a tile's GEMMs; measured with ptxas, drawing before them (bits live across
// the GEMMs) made the dQ kernel spill at D = 128 and 256.
// With block coordinates the counters use global positions q_pos = q_start + i, k_pos = k_start + j. The shuffle
// scheme needs k_start % 4 == 0 (groups of 4 keys then start on 8-key fragment boundaries, as without offsets);
// any other k_start takes a per-element path (4 draws per 8-column block instead of 1: correct, slower).
#pragma once
#include "params.h"
#include "primitives.cuh"

namespace fastattn {
namespace cuda {

// 4 bits: bit c = (draw c of counter (c0, c1, head_start + h, n)) >= threshold. h is the call's (local) head.
__device__ __forceinline__ uint32_t keep_nibble(const DropoutParams& d, uint32_t c0, uint32_t c1, uint32_t h,
                                                uint32_t n) {
  uint32_t r[4];
  d.rng.draw(c0, c1, d.head_start + h, n, r);
  return uint32_t(r[0] >= d.threshold) | uint32_t(r[1] >= d.threshold) << 1 | uint32_t(r[2] >= d.threshold) << 2 |
         uint32_t(r[3] >= d.threshold) << 3;
}

// Keep bit of the element at global positions (k_pos, q_pos) of local head h: one draw, its result k_pos & 3
// (selects, not an indexed array: that would put r in local memory).
__device__ __forceinline__ uint32_t keep_bit(const DropoutParams& d, uint32_t k_pos, uint32_t q_pos, uint32_t h,
                                             uint32_t n) {
  uint32_t r[4];
  d.rng.draw(k_pos >> 2, q_pos, d.head_start + h, n, r);
  const uint32_t c = k_pos & 3u;
  return uint32_t((c == 0 ? r[0] : c == 1 ? r[1] : c == 2 ? r[2] : r[3]) >= d.threshold);
}

// Tile whose rows are queries and columns keys (forward, dQ): element (nt, e) of lane 4g + t is query
// q_row0 + g + 8 (e >> 1), key k_col0 + 8 nt + 2t + (e & 1), with k_col0 a multiple of 8. Its counter is
// (key >> 2 = k_col0/4 + 2 nt + t/2, query) and its draw index 2 (t & 1) + (e & 1): lanes t and t^1 share both
// counters of their two rows, so lane t draws the one of row half t & 1 and takes the other from lane t ^ 1.
// q_start/k_start: the sequence's block coordinates (0 without them).
template <int kNT>
__device__ __forceinline__ uint32_t keep_bits_q_rows(const DropoutParams& d, int h, int n, int q_row0, int k_col0,
                                                     int lane, uint32_t q_start, uint32_t k_start) {
  static_assert(kNT <= 8, "keep bits must fit 32 bits");
  const int g = lane >> 2, t = lane & 3, half = t & 1;
  uint32_t bits = 0;
  if (k_start & 3u) {  // block-uniform: element by element
#pragma unroll 1
    for (int x = 0; x < 4 * kNT; ++x) {  // element (nt, e) = (x / 4, x % 4)
      bits |= keep_bit(d, k_start + k_col0 + 8 * (x >> 2) + 2 * t + (x & 1), q_start + q_row0 + g + 8 * ((x >> 1) & 1),
                       h, n) << x;
    }
    return bits;
  }
  const uint32_t c1 = q_start + q_row0 + g + 8 * half, c0 = (k_start >> 2) + (k_col0 >> 2) + (t >> 1);
#pragma unroll 1  // one Philox at a time: keeps the register peak low
  for (int nt = 0; nt < kNT; ++nt) {
    const uint32_t own = keep_nibble(d, c0 + 2 * nt, c1, h, n);
    const uint32_t other = __shfl_xor_sync(0xffffffffu, own, 1);  // lane t^1: the other row half, same keys
    // This lane's keys are draws 2 half, 2 half + 1 of either nibble; row half 0 -> e = 0, 1; half 1 -> e = 2, 3.
    const uint32_t mine = (own >> (2 * half)) & 3u, theirs = (other >> (2 * half)) & 3u;
    bits |= (half ? theirs | mine << 2 : mine | theirs << 2) << (4 * nt);
  }
  return bits;
}

// Transposed tile (dK/dV): rows are keys, columns queries. Element (nt, e) of lane 4g + t is key
// k_row0 + g + 8 (e >> 1) (k_row0 a multiple of 8), query q_col0 + 8 nt + 2t + (e & 1): counter
// (k_row0/4 + g/4 + 2 (e >> 1), query), draw index g & 3. With g = 4a + b, lane (a, b, t) draws the counter of
// element e = b, which lanes (a, *, t) all need: element e of lane (a, b, t) comes from lane ^ 4 (b ^ e), bit b.
template <int kNT>
__device__ __forceinline__ uint32_t keep_bits_k_rows(const DropoutParams& d, int h, int n, int k_row0, int q_col0,
                                                     int lane, uint32_t q_start, uint32_t k_start) {
  static_assert(kNT <= 8, "keep bits must fit 32 bits");
  const int g = lane >> 2, t = lane & 3, a = g >> 2, b = g & 3;
  uint32_t bits = 0;
  if (k_start & 3u) {  // block-uniform: element by element
#pragma unroll 1
    for (int x = 0; x < 4 * kNT; ++x) {  // element (nt, e) = (x / 4, x % 4)
      bits |= keep_bit(d, k_start + k_row0 + g + 8 * ((x >> 1) & 1), q_start + q_col0 + 8 * (x >> 2) + 2 * t + (x & 1),
                       h, n) << x;
    }
    return bits;
  }
  const uint32_t c0 = (k_start >> 2) + (k_row0 >> 2) + a + 2 * (b >> 1), q = q_start + q_col0 + 2 * t + (b & 1);
#pragma unroll 1
  for (int nt = 0; nt < kNT; ++nt) {
    const uint32_t own = keep_nibble(d, c0, q + 8 * nt, h, n);
    uint32_t four = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // from lane ^ 4k: the nibble of element e = b ^ k
      const uint32_t nib = k == 0 ? own : __shfl_xor_sync(0xffffffffu, own, 4 * k);
      four |= ((nib >> b) & 1u) << (b ^ k);
    }
    bits |= four << (4 * nt);
  }
  return bits;
}

// x *= keep (element (nt, e) kept iff bit 4 nt + e of bits).
template <int kNT>
__device__ __forceinline__ void apply_keep(float (&x)[kNT][4], uint32_t bits) {
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[nt][e] = (bits >> (4 * nt + e)) & 1u ? x[nt][e] : 0.f;
  }
}

}  // namespace cuda
}  // namespace fastattn
