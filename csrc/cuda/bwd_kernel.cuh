// FlashAttention-2 backward in three deterministic passes (no atomics anywhere, so the `deterministic`
// option costs nothing):
//   1. delta = rowsum(dO * O)                                     (one warp per query row)
//   2. dK, dV: a block owns kBlockN keys of one kv head and walks every query tile (of every query head in its
//      GQA group) that sees them; P^T = exp2(K Q^T * scale*log2e - lse*log2e) is recomputed from lse, and
//      dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q all stay in registers.
//   3. dQ: a block owns kBlockM queries and walks the key tiles they see: dQ += dS K, again in registers.
// With dropout (kDropout instantiations; Z = keep / (1 - p), the forward's mask regenerated from its counters):
// dV += (Z * P)^T dO and dS = P * (Z * dP - delta), where delta = rowsum(dO * O) already includes the dropout.
// 1 / (1 - p) is applied to dP and, for dV, once at the end.
#pragma once
#include "dropout.cuh"
#include "mask.cuh"
#include "params.h"
#include "traits.cuh"

namespace fastattn {
namespace cuda {

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const BwdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= p.batch_total * p.h * p.rows_q_total) return;
  const int64_t i = row % p.rows_q_total, bh = row / p.rows_q_total;
  const int hh = static_cast<int>(bh % p.h), b = static_cast<int>(bh / p.h);
  const T* o = row_ptr<const T>(p.o, b, hh, i);
  const T* dout = row_ptr<const T>(p.dout, b, hh, i);
  float acc = 0.f;
  for (int c = lane * 8; c < p.dv; c += 32 * 8) {  // 16-byte chunks; dv is a multiple of 8
    // A union, not a T* into the uint4: reading a uint4 through T* breaks strict aliasing, and g++ -O2 (the CPU
    // emulation in tests/cuda_emu) then really reads zeros.
    union Chunk {
      uint4 u;
      T e[8];
    } oc, dc;
    oc.u = *reinterpret_cast<const uint4*>(o + c);
    dc.u = *reinterpret_cast<const uint4*>(dout + c);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(oc.e[e]) * to_float(dc.e[e]);
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) p.delta[(int64_t(b) * p.h + hh) * p.rows_q_total + i] = acc;
}

template <typename T, int kHeadDim, bool kDropout>
__global__ void __launch_bounds__(BwdKVTraits<kHeadDim>::kThreads, 1) bwd_dkdv_kernel(const BwdParams p) {
  using Tr = BwdKVTraits<kHeadDim>;
  using TileKV = typename Tr::TileKV;
  using TileQ = typename Tr::TileQ;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads, kCols = Tr::kColsPerWarp;
  FA_DYN_SMEM(smem_raw);  // extern __shared__ (a buffer under FASTATTN_CUDA_EMULATE)
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + TileKV::kElems;
  T* sQ = sV + TileKV::kElems;                  // kStages Q tiles
  T* sdO = sQ + Tr::kStages * TileQ::kElems;    // kStages dO tiles
  float* sLse = reinterpret_cast<float*>(sdO + Tr::kStages * TileQ::kElems);  // kStages x kBlockM, log2 units
  float* sDelta = sLse + Tr::kStages * kBlockM;                                // kStages x kBlockM

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int h_kv = blockIdx.y, group = p.h / p.h_kv;
  const SeqInfo seq(p, blockIdx.z);
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= seq.sk) return;
  const Mask mask = seq.mask(p);
  int q_lo, q_hi, mb_lo, mb_hi;
  mask.query_range(n0, min(n0 + kBlockN, seq.sk), q_lo, q_hi);
  tile_range<kBlockM>(q_lo, q_hi, mb_lo, mb_hi);
  const int n_m = mb_hi - mb_lo, n_iters = n_m * group;  // (query head in group, query tile) pairs

  load_tile<kBlockN, kHeadDim, kThreads>(sK, row_ptr<const T>(p.k, seq.bb, h_kv, seq.row_k0 + n0), p.k.row_stride,
                                         seq.sk - n0, p.d, tid);
  load_tile<kBlockN, kHeadDim, kThreads>(sV, row_ptr<const T>(p.v, seq.bb, h_kv, seq.row_k0 + n0), p.v.row_stride,
                                         seq.sk - n0, p.dv, tid);
  auto load_q = [&](int it, int stage) {
    const int hq = h_kv * group + it / n_m, m0 = (mb_lo + it % n_m) * kBlockM;
    load_tile<kBlockM, kHeadDim, kThreads>(sQ + stage * TileQ::kElems,
                                           row_ptr<const T>(p.q, seq.bb, hq, seq.row_q0 + m0), p.q.row_stride,
                                           seq.sq - m0, p.d, tid);
    load_tile<kBlockM, kHeadDim, kThreads>(sdO + stage * TileQ::kElems,
                                           row_ptr<const T>(p.dout, seq.bb, hq, seq.row_q0 + m0), p.dout.row_stride,
                                           seq.sq - m0, p.dv, tid);
  };
  if (n_iters > 0) load_q(0, 0);
  cp_async_commit();

  const int key_row0 = (warp / Tr::kSplitD) * 16;   // this warp's 16 keys within the block
  const int col0 = (warp % Tr::kSplitD) * kCols;    // and its dK/dV columns
  float dk[kCols / 8][4], dv[kCols / 8][4];
  zero(dk);
  zero(dv);
  for (int it = 0; it < n_iters; ++it) {
    const int stage = it & 1;
    const int hq = h_kv * group + it / n_m, m0 = (mb_lo + it % n_m) * kBlockM;
    if (it + 1 < n_iters) load_q(it + 1, stage ^ 1);
    cp_async_commit();
    // Stage this tile's lse (log2 units) and delta in smem (registers are the scarce resource here); rows
    // past the end get lse = +inf so their P is 0. The buffer was last read two iterations ago.
    if (tid < kBlockM) {
      const int64_t lse_off = seq.bb * p.lse_batch_stride + hq * p.lse_head_stride + seq.row_q0;
      const int i = m0 + tid;
      sLse[stage * kBlockM + tid] = i < seq.sq ? p.lse[lse_off + i] * kLog2e : INFINITY;
      sDelta[stage * kBlockM + tid] = i < seq.sq ? p.delta[lse_off + i] : 0.f;
    }
    cp_async_wait<1>();
    __syncthreads();
    const T* sQs = sQ + stage * TileQ::kElems;
    const T* sdOs = sdO + stage * TileQ::kElems;
    const float* lse2 = sLse + stage * kBlockM;  // indexed by query column within the tile
    const float* dlt = sDelta + stage * kBlockM;

    float pt[kBlockM / 8][4];  // S^T -> P^T: rows = keys key_row0 + g (+8), cols = queries
    zero(pt);
    gemm_abt<T, kBlockM, kHeadDim, TileKV, TileQ>(pt, sK, key_row0, sQs, 0, lane);
    const bool partial = mask.partial(m0, kBlockM, n0, kBlockN);
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f(pt[nt][e] * p.scale_log2 - lse2[8 * nt + 2 * t + (e & 1)]);
        const bool vis = !partial || mask.visible(m0 + 8 * nt + 2 * t + (e & 1), n0 + key_row0 + g + 8 * (e >> 1));
        pt[nt][e] = vis ? pv : 0.f;
      }
    }
    float dst[kBlockM / 8][4];  // dP^T = V dO^T -> dS^T
    zero(dst);
    gemm_abt<T, kBlockM, kHeadDim, TileKV, TileQ>(dst, sV, key_row0, sdOs, 0, lane);
    if constexpr (kDropout) {  // dS needs the undropped P, so dV waits until dS is formed
      const uint32_t keep = keep_bits_k_rows<kBlockM / 8>(p.drop, hq, blockIdx.z, n0 + key_row0, m0, lane,
                                                          block_start(p.q_start, seq.n), block_start(p.k_start, seq.n));
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float zdp = (keep >> (4 * nt + e)) & 1u ? dst[nt][e] * p.drop.rescale : 0.f;
          dst[nt][e] = pt[nt][e] * (zdp - dlt[8 * nt + 2 * t + (e & 1)]);
        }
      }
      apply_keep(pt, keep);  // keep * P^T; dV gets the 1 / (1 - p) at the end
      gemm_pb<T, kCols, kBlockM, TileQ>(dv, pt, sdOs, 0, col0, lane);
    } else {
      gemm_pb<T, kCols, kBlockM, TileQ>(dv, pt, sdOs, 0, col0, lane);
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[nt][e] = pt[nt][e] * (dst[nt][e] - dlt[8 * nt + 2 * t + (e & 1)]);
      }
    }
    gemm_pb<T, kCols, kBlockM, TileQ>(dk, dst, sQs, 0, col0, lane);
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();  // sK / sV now stage dK / dV

  const float dv_mul = kDropout ? p.drop.rescale : 1.f;
  const float scale2[2] = {p.scale, p.scale}, dv_mul2[2] = {dv_mul, dv_mul};
  if (p.accumulate) {  // bwd_acc, block-uniform: add the fp32 gradients straight from registers
    store_frag_f32<true>(row_ptr<float>(p.grad_k, seq.bb, h_kv, seq.row_k0 + n0), p.grad_k.row_stride, dk, scale2,
                         key_row0, col0, seq.sk - n0, p.d, lane);
    store_frag_f32<true>(row_ptr<float>(p.grad_v, seq.bb, h_kv, seq.row_k0 + n0), p.grad_v.row_stride, dv, dv_mul2,
                         key_row0, col0, seq.sk - n0, p.dv, lane);
    return;
  }
  store_frag<TileKV>(sK, dk, scale2, key_row0, col0, lane);
  store_frag<TileKV>(sV, dv, dv_mul2, key_row0, col0, lane);
  __syncthreads();
  store_tile<kBlockN, kHeadDim, kThreads>(row_ptr<T>(p.grad_k, seq.bb, h_kv, seq.row_k0 + n0), p.grad_k.row_stride, sK,
                                          seq.sk - n0, p.d, tid);
  store_tile<kBlockN, kHeadDim, kThreads>(row_ptr<T>(p.grad_v, seq.bb, h_kv, seq.row_k0 + n0), p.grad_v.row_stride, sV,
                                          seq.sk - n0, p.dv, tid);
}

template <typename T, int kHeadDim, bool kDropout>
__global__ void __launch_bounds__(BwdQTraits<kHeadDim>::kThreads, 1) bwd_dq_kernel(const BwdParams p) {
  using Tr = BwdQTraits<kHeadDim>;
  using TileQ = typename Tr::TileQ;
  using TileKV = typename Tr::TileKV;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  FA_DYN_SMEM(smem_raw);  // extern __shared__ (a buffer under FASTATTN_CUDA_EMULATE)
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + TileQ::kElems;
  T* sK = sdO + TileQ::kElems;                 // kStages K tiles
  T* sV = sK + Tr::kStages * TileKV::kElems;   // kStages V tiles

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, h_kv = h / (p.h / p.h_kv);
  const SeqInfo seq(p, blockIdx.z);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.sq) return;
  const Mask mask = seq.mask(p);
  int n_lo, n_hi, nb_lo, nb_hi;
  mask.key_range(m0, min(m0 + kBlockM, seq.sq), n_lo, n_hi);
  tile_range<kBlockN>(n_lo, n_hi, nb_lo, nb_hi);

  const T* k = row_ptr<const T>(p.k, seq.bb, h_kv, seq.row_k0);
  const T* v = row_ptr<const T>(p.v, seq.bb, h_kv, seq.row_k0);
  auto load_kv = [&](int nb, int stage) {
    const int n0 = nb * kBlockN;
    load_tile<kBlockN, kHeadDim, kThreads>(sK + stage * TileKV::kElems, k + n0 * p.k.row_stride, p.k.row_stride,
                                           seq.sk - n0, p.d, tid);
    load_tile<kBlockN, kHeadDim, kThreads>(sV + stage * TileKV::kElems, v + n0 * p.v.row_stride, p.v.row_stride,
                                           seq.sk - n0, p.dv, tid);
  };
  load_tile<kBlockM, kHeadDim, kThreads>(sQ, row_ptr<const T>(p.q, seq.bb, h, seq.row_q0 + m0), p.q.row_stride,
                                         seq.sq - m0, p.d, tid);
  load_tile<kBlockM, kHeadDim, kThreads>(sdO, row_ptr<const T>(p.dout, seq.bb, h, seq.row_q0 + m0),
                                         p.dout.row_stride, seq.sq - m0, p.dv, tid);
  if (nb_hi > nb_lo) load_kv(nb_lo, 0);
  cp_async_commit();

  const int row0 = m0 + 16 * warp;
  const int64_t lse_off = seq.bb * p.lse_batch_stride + h * p.lse_head_stride + seq.row_q0;
  float lse2[2], dlt[2];  // rows g and g + 8
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + g + 8 * r;
    lse2[r] = i < seq.sq ? p.lse[lse_off + i] * kLog2e : INFINITY;
    dlt[r] = i < seq.sq ? p.delta[lse_off + i] : 0.f;
  }
  float dq[kHeadDim / 8][4];
  zero(dq);
  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int stage = (nb - nb_lo) & 1;
    if (nb + 1 < nb_hi) load_kv(nb + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* sKs = sK + stage * TileKV::kElems;
    const T* sVs = sV + stage * TileKV::kElems;
    const int n0 = nb * kBlockN;

    float ps[kBlockN / 8][4];  // S -> P
    zero(ps);
    gemm_abt<T, kBlockN, kHeadDim, TileQ, TileKV>(ps, sQ, 16 * warp, sKs, 0, lane);
    const bool partial = mask.partial(m0, kBlockM, n0, kBlockN);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f(ps[nt][e] * p.scale_log2 - lse2[e >> 1]);
        const bool vis = !partial || mask.visible(row0 + g + 8 * (e >> 1), n0 + 8 * nt + 2 * t + (e & 1));
        ps[nt][e] = vis ? pv : 0.f;
      }
    }
    float ds[kBlockN / 8][4];  // dP = dO V^T -> dS
    zero(ds);
    gemm_abt<T, kBlockN, kHeadDim, TileQ, TileKV>(ds, sdO, 16 * warp, sVs, 0, lane);
    uint32_t keep = 0;  // drawn after the GEMMs: drawn before them, the dQ kernel spilled at D = 128/256
    if constexpr (kDropout) {
      keep = keep_bits_q_rows<kBlockN / 8>(p.drop, h, blockIdx.z, row0, n0, lane, block_start(p.q_start, seq.n),
                                           block_start(p.k_start, seq.n));
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if constexpr (kDropout) {
          const float zdp = (keep >> (4 * nt + e)) & 1u ? ds[nt][e] * p.drop.rescale : 0.f;
          ds[nt][e] = ps[nt][e] * (zdp - dlt[e >> 1]);
        } else {
          ds[nt][e] = ps[nt][e] * (ds[nt][e] - dlt[e >> 1]);
        }
      }
    }
    gemm_pb<T, kHeadDim, kBlockN, TileKV>(dq, ds, sKs, 0, 0, lane);
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();  // sQ now stages dQ

  const float scale2[2] = {p.scale, p.scale};
  if (p.accumulate) {  // bwd_acc, block-uniform
    store_frag_f32<true>(row_ptr<float>(p.grad_q, seq.bb, h, seq.row_q0), p.grad_q.row_stride, dq, scale2, row0, 0,
                         seq.sq, p.d, lane);
    return;
  }
  store_frag<TileQ>(sQ, dq, scale2, 16 * warp, 0, lane);
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(row_ptr<T>(p.grad_q, seq.bb, h, seq.row_q0 + m0), p.grad_q.row_stride, sQ,
                                          seq.sq - m0, p.d, tid);
}

// The launch geometry, shared by the CUDA launcher below and the CPU emulation (tests/cuda_emu): launch(kernel,
// grid, block threads, dynamic shared bytes) -> cudaError_t for the delta, dK/dV and dQ kernels, in that order.
template <typename T, int kHeadDim, bool kDropout, typename Launch>
cudaError_t launch_bwd(const BwdParams& p, Launch&& launch) {
  const int64_t rows = p.batch_total * p.h * p.rows_q_total;
  cudaError_t err = cudaSuccess;
  if (rows > 0) err = launch(bwd_delta_kernel<T>, dim3(static_cast<unsigned>((rows + 7) / 8)), 256, 0);
  if (err == cudaSuccess && p.seqlen_k > 0) {
    using Tr = BwdKVTraits<kHeadDim>;
    const dim3 grid((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, p.h_kv, p.batch);
    err = launch(bwd_dkdv_kernel<T, kHeadDim, kDropout>, grid, Tr::kThreads, Tr::kSmemBytes);
  }
  // p.h > 0: Hq == 0 with Hkv > 0 passes the GQA check, and a zero grid dim is a launch error
  if (err == cudaSuccess && p.seqlen_q > 0 && p.h > 0) {
    using Tr = BwdQTraits<kHeadDim>;
    const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.h, p.batch);
    err = launch(bwd_dq_kernel<T, kHeadDim, kDropout>, grid, Tr::kThreads, Tr::kSmemBytes);
  }
  return err;
}

#ifndef FASTATTN_CUDA_EMULATE  // the CPU emulation (tests/cuda_emu) launches the kernels itself
// Kernel TUs stay free of ATen headers (faster builds); errors go back to the caller to check.
template <typename T, int kHeadDim, bool kDropout>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_bwd<T, kHeadDim, kDropout>(p, [&](auto kernel, dim3 grid, int threads, int smem) {
    // the delta kernel uses no dynamic shared memory and needs no opt-in
    const cudaError_t e =
        smem > 0 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) : cudaSuccess;
    if (e == cudaSuccess) kernel<<<grid, threads, smem, stream>>>(p);
    return e;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

#endif

}  // namespace cuda
}  // namespace fastattn
