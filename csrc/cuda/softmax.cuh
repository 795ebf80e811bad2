// Online softmax state for the two rows (g and g + 8) a thread holds in a warp's 16-row tile.
// Scores arrive already multiplied by scale * log2(e), so every exponential is a single exp2 (ex2.approx).
#pragma once
#include <cmath>

#include "primitives.cuh"

namespace fastattn {
namespace cuda {

struct OnlineSoftmax {
  float m_i[2];  // running row max (log2 units); -inf until a visible key is seen
  float l_i[2];  // running row sum of exp2(s - m_i), partial over this thread's columns

  __device__ __forceinline__ void init() {
    m_i[0] = m_i[1] = -INFINITY;
    l_i[0] = l_i[1] = 0.f;
  }

  // Turns the scores s (masked entries -inf) into P = exp2(s - m_new) and rescales acc by exp2(m_old - m_new).
  template <int kNT, int kNO>
  __device__ __forceinline__ void update(float (&s)[kNT][4], float (&acc)[kNO][4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m_new = m_i[r];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) m_new = fmaxf(m_new, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 1));  // the 4 threads of a quad share a row
      m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 2));
      const float base = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: avoid (-inf) - (-inf)
      const float alpha = exp2f(m_i[r] - base);
      m_i[r] = m_new;
      float row_sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        row_sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_i[r] = l_i[r] * alpha + row_sum;
#pragma unroll
      for (int nt = 0; nt < kNO; ++nt) {
        acc[nt][2 * r] *= alpha;
        acc[nt][2 * r + 1] *= alpha;
      }
    }
  }

  // 1 / l (0 for rows with no visible key, so out = 0) and the natural-log lse (+inf for those rows).
  __device__ __forceinline__ void finalize(float (&inv_l)[2], float (&lse)[2]) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_i[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool empty = l == 0.f || m_i[r] == -INFINITY;
      inv_l[r] = empty ? 0.f : 1.f / l;
      lse[r] = empty ? INFINITY : (m_i[r] + log2f(l)) * kLn2;
    }
  }
};

}  // namespace cuda
}  // namespace fastattn
