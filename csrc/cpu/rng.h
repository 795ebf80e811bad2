// CPU dropout on top of the Philox4x32-10 generator shared with the CUDA kernels (csrc/philox.h, which
// defines the keep decision of element (n, h, i, j)); CPU and CUDA drop the same elements.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../philox.h"

namespace fastattn::cpu {

// Dropout for one tile row: multiplies x[0..len) (keys at positions k_pos0..k_pos0+len of the query at position
// q_pos, query head head_start + h) by keep/(1-p) in place. Positions are global (SeqInfo::qpos0 + i, kpos0 + j;
// the local i, j without block coordinates) and so is the head, so a call split into blocks (over positions or
// heads) drops what the unsplit call drops. Draws are grouped by 4 aligned key
// positions (one Philox call each).
struct Dropout {
  Philox rng;
  uint32_t threshold;   // drop iff draw < threshold
  float rescale;        // 1 / (1 - p)
  int64_t head_start;   // the counter's head is head_start + h (the op's head_start: global query heads)

  Dropout(uint64_t seed, uint64_t offset, float p, int64_t head_start)
      : rng(Philox::from_seed(seed, offset)),
        threshold(dropout_threshold(p)),
        rescale(1.f / (1.f - p)),
        head_start(head_start) {}

  // h: the call's (local) query head.
  inline void apply_row(float* x, int64_t n, int64_t h, int64_t q_pos, int64_t k_pos0, int64_t len) const {
    int64_t j = k_pos0;
    const int64_t end = k_pos0 + len;
    const uint32_t hg = uint32_t(head_start + h);
    while (j < end) {
      uint32_t r[4];
      const int64_t g = j >> 2;
      rng.draw(uint32_t(g), uint32_t(q_pos), hg, uint32_t(n), r);
      const int64_t gend = std::min<int64_t>((g + 1) << 2, end);
      for (; j < gend; ++j) {
        x[j - k_pos0] = r[j & 3] >= threshold ? x[j - k_pos0] * rescale : 0.f;
      }
    }
  }
};

}  // namespace fastattn::cpu
