// Split-KV decode (flash-decoding) for fastattn::decode_fwd on CUDA: a few query rows against a long KV cache.
//
// Decode reads every cached key and value once and does little arithmetic per byte, so this kernel is built for
// memory bandwidth on CUDA cores rather than for tensor cores: a block owns one (sequence, KV head, key split);
// kLanes lanes share one key, each lane loading 16-byte chunks of its row of K and V, and kUnroll keys per lane
// group are loaded before any is used, so every lane keeps 2 * kUnroll 16-byte loads in flight. All kRows query
// rows of the KV head's group (G heads x Sq tokens, stacked) are scored against each loaded key, so K/V are read
// once per group (GQA). Each lane group runs its own online softmax (m_i, l_i, acc) over the keys it sees; at the
// end the block merges its groups by log-sum-exp through shared memory, in a fixed order (deterministic).
// With one split the block writes the output; otherwise it writes a normalised fp32 partial and its lse, and
// decode_combine_kernel merges the splits of each row (one warp per row, fixed order).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "decode_params.h"

namespace fastattn {
namespace cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeSplitUnit = 64;  // split boundaries fall on multiples of this many keys
constexpr int kDecodeMaxSplits = 64;
constexpr float kDecodeLog2e = 1.4426950408889634f;
constexpr float kDecodeLn2 = 0.6931471805599453f;

template <typename T, int kHeadDim, int kRows>
struct DecodeTraits {
  static constexpr int kVec = 16 / sizeof(T);                  // elements per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kVec;              // chunks per (padded) head row
  static constexpr int kLanes = kChunks < 32 ? kChunks : 32;   // lanes sharing one key (a power of 2)
  static constexpr int kChunksPerLane = kChunks / kLanes;
  static constexpr int kCols = kChunksPerLane * kVec;          // head-dim columns each lane owns
  static constexpr int kGroups = kDecodeThreads / kLanes;      // lane groups: keys processed side by side
  // Keys per group per step (loads in flight); fewer where q and acc already take most registers.
  static constexpr int kUnroll = (kChunksPerLane > 1 || kRows >= 8) ? 2 : 4;
  static constexpr int kStep = kGroups * kUnroll;              // keys per block per step
  static_assert(kChunks % kLanes == 0 && 32 % kLanes == 0, "lane groups must tile a warp");
};

// ---------------------------------------------------------------- conversions
__device__ __forceinline__ float to_float32(float x) { return x; }
__device__ __forceinline__ float to_float32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float32(float x);
template <>
__device__ __forceinline__ float from_float32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One 16-byte chunk of T as 16 / sizeof(T) floats.
__device__ __forceinline__ void unpack(const uint4& u, float* f, float) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(const uint4& u, float* f, __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void unpack(const uint4& u, float* f, __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// ---------------------------------------------------------------- the cache
// Where key j of batch entry b lives: element offset of its (row|page, slot) for the given strides. Indices are
// clamped into the cache: the Python layer validates them, the clamp only keeps a bad call from reading outside.
struct CacheRow {
  const DecodeParams& p;
  int b;
  int64_t dense_row;
  __device__ __forceinline__ CacheRow(const DecodeParams& p_, int b_) : p(p_), b(b_) {
    dense_row = p.batch_idx != nullptr ? min(max(p.batch_idx[b], 0), p.cache_rows - 1) : b;
  }
  __device__ __forceinline__ void locate(int j, int64_t& row, int64_t& slot) const {
    if (p.block_table != nullptr) {
      const int page = p.block_table[int64_t(b) * p.max_blocks + j / p.page];
      row = min(max(page, 0), p.cache_rows - 1);
      slot = j % p.page;
    } else {
      row = dense_row;
      slot = j;
    }
  }
};

__device__ __forceinline__ uint4 load16(const void* ptr, bool valid) {
  return valid ? __ldg(reinterpret_cast<const uint4*>(ptr)) : make_uint4(0u, 0u, 0u, 0u);
}

// ---------------------------------------------------------------- split kernel
// Registers (sm_90, nvcc 13.0): ~64-100 for 1-2 rows, ~130-170 for 4, up to ~240 for 8 rows of fp16; asking
// ptxas for more blocks per SM made the 4- and 8-row kernels spill, so the bound is the thread count only.
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const DecodeParams p) {
  using Tr = DecodeTraits<T, kHeadDim, kRows>;
  constexpr int kVec = Tr::kVec, kLanes = Tr::kLanes, kCPL = Tr::kChunksPerLane, kCols = Tr::kCols;
  constexpr int kGroups = Tr::kGroups, kUnroll = Tr::kUnroll;
  __shared__ float s_acc[kGroups][kRows][kHeadDim];  // each group's unnormalised output
  __shared__ float s_m[kGroups][kRows], s_l[kGroups][kRows];
  __shared__ float s_w[kGroups][kRows];  // merge weight of each group's acc, 1/l folded in
  __shared__ float s_lse[kRows];

  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, li = tid % kLanes, grp = tid / kLanes;
  const int M = p.group * p.seqlen_q;  // live query rows (<= kRows)
  const int len = p.seqlens ? min(max(p.seqlens[b], 0), p.capacity) : p.capacity;
  const int off = len - p.seqlen_q;  // bottom-right alignment
  // Keys any row of the group sees: [lo, hi); this split takes a run of whole kDecodeSplitUnit units of it.
  const int lo = p.window_left >= 0 ? max(off - p.window_left, 0) : 0;
  const int hi = max(len, lo);
  const int64_t units = (hi - lo + kDecodeSplitUnit - 1) / kDecodeSplitUnit;
  const int64_t per = (units + p.splits - 1) / p.splits;
  const int start = static_cast<int>(min(int64_t(hi), lo + split * per * kDecodeSplitUnit));
  const int end = static_cast<int>(min(int64_t(hi), start + per * kDecodeSplitUnit));

  // Query rows in registers, pre-multiplied so that q . k is the score in log2 units (or tanh's argument).
  // Lane li owns chunks li, li + kLanes, ... of every row, so a group's lanes read one key row contiguously.
  float q[kRows][kCols];
  float slope2[kRows];  // alibi slope * log2(e)
  int qi[kRows];        // query token of each row
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const bool live = r < M;
    const int h = hk * p.group + (live ? r / p.seqlen_q : 0);
    qi[r] = live ? r % p.seqlen_q : 0;
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + qi[r] * p.q_sm;
#pragma unroll
    for (int c = 0; c < kCPL; ++c) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int col = (c * kLanes + li) * kVec + e;
        q[r][c * kVec + e] = live && col < p.d ? to_float32(qrow[col]) * p.q_mul : 0.f;
      }
    }
    slope2[r] = live && p.alibi != nullptr ? p.alibi[b * p.alibi_sb + h] * kDecodeLog2e : 0.f;
  }

  float m_i[kRows], l_i[kRows], acc[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m_i[r] = -INFINITY;
    l_i[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }

  const CacheRow cache(p, b);
  const T* kbase = static_cast<const T*>(p.k) + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + hk * p.v_sh;
  // Every thread runs the same steps (the shuffles below need whole warps); keys past `end` load as zeros and
  // are masked.
  for (int j0 = start; j0 < end; j0 += Tr::kStep) {
    uint4 kc[kUnroll][kCPL], vc[kUnroll][kCPL];
    int jj[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kGroups + grp;
      const bool in = j < end;
      jj[u] = j;
      int64_t row = 0, slot = 0;
      if (in) cache.locate(j, row, slot);
      const T* kp = kbase + row * p.k_sr + slot * p.k_ss;
      const T* vp = vbase + row * p.v_sr + slot * p.v_ss;
#pragma unroll
      for (int c = 0; c < kCPL; ++c) {
        const int col = (c * kLanes + li) * kVec;
        kc[u][c] = load16(kp + col, in && col < p.d);
        vc[u][c] = load16(vp + col, in && col < p.dv);
      }
    }

    float s[kUnroll][kRows];  // scores, log2 units; -inf where invisible
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[kCols];
#pragma unroll
      for (int c = 0; c < kCPL; ++c) unpack(kc[u][c], kf + c * kVec, T());
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < kCols; ++c) dot = fmaf(q[r][c], kf[c], dot);
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[u][r] = dot;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int j = jj[u], qpos = qi[r] + off;  // the key aligned with this row's token
        const bool vis = r < M && j < end && (p.window_left < 0 || j >= qpos - p.window_left) &&
                         (p.window_right < 0 || j <= qpos + p.window_right);
        float x = s[u][r];
        if (p.cap_out2 > 0.f) x = p.cap_out2 * tanhf(x);
        x -= slope2[r] * fabsf(static_cast<float>(qpos - j));
        s[u][r] = vis ? x : -INFINITY;
      }
    }

    // Online softmax over this step's kUnroll keys: one rescale of acc per step.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float m_new = m_i[r];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, s[u][r]);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: avoid (-inf) - (-inf)
      const float alpha = exp2f(m_i[r] - base);
      m_i[r] = m_new;
      l_i[r] *= alpha;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        s[u][r] = exp2f(s[u][r] - base);  // P
        l_i[r] += s[u][r];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[kCols];
#pragma unroll
      for (int c = 0; c < kCPL; ++c) unpack(vc[u][c], vf + c * kVec, T());
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] = fmaf(s[u][r], vf[c], acc[r][c]);
      }
    }
  }

  // Merge the lane groups: weight_g = exp2(m_g - max_g m_g) / l, in group order.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (li == 0) {
      s_m[grp][r] = m_i[r];
      s_l[grp][r] = l_i[r];
    }
#pragma unroll
    for (int c = 0; c < kCPL; ++c) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) s_acc[grp][r][(c * kLanes + li) * kVec + e] = acc[r][c * kVec + e];
    }
  }
  __syncthreads();
  if (tid < kRows) {
    const int r = tid;
    float m = -INFINITY;
    for (int g = 0; g < kGroups; ++g) m = fmaxf(m, s_m[g][r]);
    const float base = m == -INFINITY ? 0.f : m;
    float l = 0.f;
    for (int g = 0; g < kGroups; ++g) {
      s_w[g][r] = exp2f(s_m[g][r] - base);  // 0 for groups that saw no visible key
      l += s_w[g][r] * s_l[g][r];
    }
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    for (int g = 0; g < kGroups; ++g) s_w[g][r] *= inv;
    // Rows with no visible key: out 0 and lse +inf; as a partial, lse -inf so the combine gives it no weight.
    s_lse[r] = empty ? (p.splits > 1 ? -INFINITY : INFINITY) : (base + log2f(l)) * kDecodeLn2;
  }
  __syncthreads();

  for (int idx = tid; idx < M * p.dv; idx += kDecodeThreads) {
    const int r = idx / p.dv, d = idx % p.dv;
    float o = 0.f;
    for (int g = 0; g < kGroups; ++g) o = fmaf(s_w[g][r], s_acc[g][r][d], o);
    const int h = hk * p.group + r / p.seqlen_q, i = r % p.seqlen_q;
    if (p.splits > 1) {
      const int64_t prow = ((int64_t(split) * p.batch + b) * p.h + h) * p.seqlen_q + i;
      p.out_part[prow * p.dv + d] = o;
    } else {
      static_cast<T*>(p.out)[b * p.o_sb + h * p.o_sh + i * p.o_sm + d] = from_float32<T>(o);
    }
  }
  if (tid < M) {
    const int h = hk * p.group + tid / p.seqlen_q, i = tid % p.seqlen_q;
    const int64_t row = (int64_t(b) * p.h + h) * p.seqlen_q + i;
    if (p.splits > 1) {
      p.lse_part[int64_t(split) * p.batch * p.h * p.seqlen_q + row] = s_lse[tid];
    } else {
      p.lse[row] = s_lse[tid];
    }
  }
}

// ---------------------------------------------------------------- combine kernel
// One warp per query row (b, h, i): lse = logsumexp_s lse_s, out = sum_s exp(lse_s - lse) out_s, in split
// order. Rows no split saw: out 0, lse +inf.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_combine_kernel(const DecodeParams p) {
  constexpr int kWarps = kDecodeThreads / 32;
  __shared__ float s_w[kWarps][kDecodeMaxSplits];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rows = int64_t(p.batch) * p.h * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // whole warps only: no block-wide barrier follows
  float m = -INFINITY;
  for (int s = lane; s < p.splits; s += 32) m = fmaxf(m, p.lse_part[s * rows + row]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float base = m == -INFINITY ? 0.f : m;
  float tot = 0.f;
  for (int s = lane; s < p.splits; s += 32) {
    const float w = __expf(p.lse_part[s * rows + row] - base);
    s_w[warp][s] = w;
    tot += w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
  __syncwarp();
  const bool seen = tot > 0.f;
  const float inv = seen ? 1.f / tot : 0.f;
  const int b = static_cast<int>(row / (int64_t(p.h) * p.seqlen_q));
  const int h = static_cast<int>((row / p.seqlen_q) % p.h), i = static_cast<int>(row % p.seqlen_q);
  T* out = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sm;
  for (int d = lane; d < p.dv; d += 32) {
    float o = 0.f;
    for (int s = 0; s < p.splits; ++s) o = fmaf(s_w[warp][s], p.out_part[(s * rows + row) * p.dv + d], o);
    out[d] = from_float32<T>(o * inv);
  }
  if (lane == 0) p.lse[row] = seen ? base + logf(tot) : INFINITY;
}

// The launch geometry, shared by the CUDA launcher below and the CPU emulation harness (tests/cuda_emu):
// launch(kernel, grid, block threads) is called for the split kernel and, with several splits, the combine kernel.
template <typename T, int kHeadDim, int kRows, typename Launch>
void launch_decode(const DecodeParams& p, Launch&& launch) {
  launch(decode_split_kernel<T, kHeadDim, kRows>, dim3(p.splits, p.h_kv, p.batch), kDecodeThreads);
  if (p.splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.h * p.seqlen_q;
    constexpr int kWarps = kDecodeThreads / 32;
    launch(decode_combine_kernel<T>, dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), kDecodeThreads);
  }
}

#ifndef FASTATTN_CUDA_EMULATE
// Kernel TUs stay free of ATen headers; errors go back to the caller to check.
template <typename T, int kHeadDim, int kRows>
cudaError_t run_decode(const DecodeParams& p, cudaStream_t stream) {
  launch_decode<T, kHeadDim, kRows>(p, [&](auto kernel, dim3 grid, int threads) {
    kernel<<<grid, threads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace fastattn
