// Counter-based dropout RNG shared by the CPU and CUDA kernels: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011). The keep decision of element (n, h, i, j) (n = sequence index, h =
// query head, i = query row and j = key within the sequence) is a pure function of (seed, offset, n, hg, q_pos, k_pos)
// with q_pos = q_start[n] + i, k_pos = k_start[n] + j (block coordinates, csrc/ops.cpp; q_pos = i, k_pos = j
// without them) and the global head hg = head_start + h (head_start: the op argument, 0 unless the call holds a
// slice of a larger call's heads):
//   draw(c0 = k_pos >> 2, c1 = q_pos, c2 = hg, c3 = n) -> keep iff r[k_pos & 3] >= dropout_threshold(p),
// so the backward regenerates the forward's mask, neither thread counts nor tile sizes change it, a call split into
// blocks (over positions or over heads) drops exactly the elements of the unsplit call, and CPU and CUDA drop
// exactly the same elements for the same (seed, offset, p).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define FA_HOST_DEVICE __host__ __device__
#else
#define FA_HOST_DEVICE
#endif

namespace fastattn {

struct Philox {
  uint32_t k0, k1;

  // (seed, offset) are folded into the 64-bit key with splitmix64 so that nearby offsets give unrelated streams.
  static FA_HOST_DEVICE inline Philox from_seed(uint64_t seed, uint64_t offset) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (offset + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return Philox{static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32)};
  }

  // Four 32-bit draws for counter (c0, c1, c2, c3): ten rounds of two 32x32->64 multiplies and a Weyl key bump.
  FA_HOST_DEVICE inline void draw(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t out[4]) const {
    uint32_t a = k0, b = k1;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
      const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ a;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ b;
      c1 = uint32_t(p1);
      c3 = uint32_t(p0);
      c0 = n0;
      c2 = n2;
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
  }
};

// Drop iff draw < threshold: P(drop) = p up to 2^-32. p is the float the kernels use (0 <= p < 1).
FA_HOST_DEVICE inline uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0);
}

}  // namespace fastattn
