// CPU dropout on top of the Philox4x32-10 generator shared with the CUDA kernels (csrc/philox.h, which
// defines the keep decision of element (n, h, i, j)); CPU and CUDA drop the same elements.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../philox.h"

namespace fastattn::cpu {

// Dropout for one tile row: multiplies p[0..len) (keys j0..j0+len of query row i) by keep/(1-p) in place.
// Draws are grouped by 4 aligned global key indices (one Philox call each).
struct Dropout {
  Philox rng;
  uint32_t threshold;  // drop iff draw < threshold
  float rescale;       // 1 / (1 - p)

  Dropout(uint64_t seed, uint64_t offset, float p)
      : rng(Philox::from_seed(seed, offset)),
        threshold(dropout_threshold(p)),
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
