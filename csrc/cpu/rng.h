// Counter-based dropout RNG: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
// The keep decision of element (n, h, i, j) is a pure function of (seed, offset, n, h, i, j), so the backward
// regenerates the forward's mask exactly, and neither thread count nor tile sizes change it.
#pragma once
#include <algorithm>
#include <cstdint>

namespace fastattn::cpu {

struct Philox {
  uint32_t k0, k1;

  // (seed, offset) are folded into the 64-bit key with splitmix64 so that nearby offsets give unrelated streams.
  Philox(uint64_t seed, uint64_t offset) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (offset + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    k0 = static_cast<uint32_t>(z);
    k1 = static_cast<uint32_t>(z >> 32);
  }

  // Four 32-bit draws for counter (c0, c1, c2, c3).
  inline void draw(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t out[4]) const {
    uint32_t a = k0, b = k1;
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

// Dropout for one tile row: multiplies p[0..len) (keys j0..j0+len of query row i) by keep/(1-p) in place.
// Draws are grouped by 4 aligned global key indices (one Philox call each).
struct Dropout {
  Philox rng;
  uint32_t threshold;  // drop iff draw < threshold
  float rescale;       // 1 / (1 - p)

  Dropout(uint64_t seed, uint64_t offset, float p)
      : rng(seed, offset),
        threshold(static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0)),
        rescale(1.f / (1.f - p)) {}

  inline void apply_row(float* x, int64_t n, int64_t h, int64_t i, int64_t j0, int64_t len) const {
    int64_t j = j0;
    const int64_t end = j0 + len;
    while (j < end) {
      uint32_t r[4];
      const int64_t g = j >> 2;
      rng.draw(uint32_t(g), uint32_t(i), uint32_t(h), uint32_t(n), r);
      const int64_t gend = std::min<int64_t>((g + 1) << 2, end);
      for (; j < gend; ++j) {
        x[j - j0] = r[j & 3] >= threshold ? x[j - j0] * rescale : 0.f;
      }
    }
  }
};

}  // namespace fastattn::cpu
