// FlashAttention-2 forward: a block owns kBlockM queries of one head and walks the key tiles that query tile
// can see (causal/window tiles outside the band are never loaded). K/V tiles are double-buffered with
// cp.async; S = Q K^T and O += P V run on tensor cores with P kept in registers; only tiles that cross the
// band's edge or the sequence end pay for element masking. kDropout (a separate instantiation, so the plain
// kernel carries none of it) zeroes dropped probabilities after the row sums: l_i sums the undropped P, the
// dropout applies to what multiplies V, and 1 / (1 - p) is folded into the final 1 / l.
#pragma once
#include "dropout.cuh"
#include "mask.cuh"
#include "params.h"
#include "softmax.cuh"
#include "traits.cuh"

namespace fastattn {
namespace cuda {

// Scores -> log2 units, masked entries -inf. Thread element (nt, e) is query row0 + g + 8 * (e / 2),
// key n0 + 8 * nt + 2t + e % 2.
template <int kNT>
__device__ __forceinline__ void scale_and_mask(float (&s)[kNT][4], float scale_log2, const Mask& mask, bool partial,
                                               int row0, int n0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] *= scale_log2;
      if (partial && !mask.visible(row0 + g + 8 * (e >> 1), n0 + 8 * nt + 2 * t + (e & 1))) s[nt][e] = -INFINITY;
    }
  }
}

template <typename T, int kHeadDim, bool kDropout>
__global__ void __launch_bounds__(FwdTraits<kHeadDim>::kThreads, 1) fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<kHeadDim>;
  using TileQ = typename Tr::TileQ;
  using TileKV = typename Tr::TileKV;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  FA_DYN_SMEM(smem_raw);  // extern __shared__ (a buffer under FASTATTN_CUDA_EMULATE)
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + TileQ::kElems;                     // kStages K tiles
  T* sV = sK + Tr::kStages * TileKV::kElems;      // kStages V tiles

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h = blockIdx.y, h_kv = h / (p.h / p.h_kv);
  const SeqInfo seq(p, blockIdx.z);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.sq) return;  // this sequence is shorter than max_seqlen_q
  const Mask mask = seq.mask(p);
  int n_lo, n_hi, nb_lo, nb_hi;
  mask.key_range(m0, min(m0 + kBlockM, seq.sq), n_lo, n_hi);
  tile_range<kBlockN>(n_lo, n_hi, nb_lo, nb_hi);

  const T* q = row_ptr<const T>(p.q, seq.bb, h, seq.row_q0 + m0);
  const T* k = row_ptr<const T>(p.k, seq.bb, h_kv, seq.row_k0);
  const T* v = row_ptr<const T>(p.v, seq.bb, h_kv, seq.row_k0);
  auto load_kv = [&](int nb, int stage) {
    const int n0 = nb * kBlockN;
    load_tile<kBlockN, kHeadDim, kThreads>(sK + stage * TileKV::kElems, k + n0 * p.k.row_stride, p.k.row_stride,
                                           seq.sk - n0, p.d, tid);
    load_tile<kBlockN, kHeadDim, kThreads>(sV + stage * TileKV::kElems, v + n0 * p.v.row_stride, p.v.row_stride,
                                           seq.sk - n0, p.dv, tid);
  };

  load_tile<kBlockM, kHeadDim, kThreads>(sQ, q, p.q.row_stride, seq.sq - m0, p.d, tid);
  if (nb_hi > nb_lo) load_kv(nb_lo, 0);
  cp_async_commit();

  float acc[kHeadDim / 8][4];  // O, 16 rows x kHeadDim per warp
  zero(acc);
  OnlineSoftmax softmax;
  softmax.init();
  const int row0 = m0 + 16 * warp;  // first query row of this warp
  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int stage = (nb - nb_lo) & 1;
    if (nb + 1 < nb_hi) load_kv(nb + 1, stage ^ 1);  // prefetch while this tile computes
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    float s[kBlockN / 8][4];
    zero(s);
    gemm_abt<T, kBlockN, kHeadDim, TileQ, TileKV>(s, sQ, 16 * warp, sK + stage * TileKV::kElems, 0, lane);
    const int n0 = nb * kBlockN;
    scale_and_mask(s, p.scale_log2, mask, mask.partial(m0, kBlockM, n0, kBlockN), row0, n0, lane);
    softmax.update(s, acc);
    if constexpr (kDropout) {
      apply_keep(s, keep_bits_q_rows<kBlockN / 8>(p.drop, h, blockIdx.z, row0, n0, lane, block_start(p.q_start, seq.n),
                                                  block_start(p.k_start, seq.n)));
    }
    gemm_pb<T, kHeadDim, kBlockN, TileKV>(acc, s, sV + stage * TileKV::kElems, 0, 0, lane);
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();  // no copy may still land in sQ, which now stages O

  float inv_l[2], lse[2];
  softmax.finalize(inv_l, lse);
  if constexpr (kDropout) inv_l[0] *= p.drop.rescale, inv_l[1] *= p.drop.rescale;
  if ((lane & 3) == 0) {
    float* lse_row = p.lse + seq.bb * p.lse_batch_stride + h * p.lse_head_stride + seq.row_q0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + (lane >> 2) + 8 * r;
      if (i < seq.sq) lse_row[i] = lse[r];
    }
  }
  if (p.out_fp32) {  // block-uniform: the accumulator goes out unrounded, straight from registers
    store_frag_f32<false>(row_ptr<float>(p.o, seq.bb, h, seq.row_q0), p.o.row_stride, acc, inv_l, row0, 0, seq.sq,
                          p.dv, lane);
    return;
  }
  store_frag<TileQ>(sQ, acc, inv_l, 16 * warp, 0, lane);
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(row_ptr<T>(p.o, seq.bb, h, seq.row_q0 + m0), p.o.row_stride, sQ,
                                          seq.sq - m0, p.dv, tid);
}

// The launch geometry, shared by the CUDA launcher below and the CPU emulation (tests/cuda_emu):
// launch(kernel, grid, block threads, dynamic shared bytes) -> cudaError_t.
template <typename T, int kHeadDim, bool kDropout, typename Launch>
cudaError_t launch_fwd(const FwdParams& p, Launch&& launch) {
  using Tr = FwdTraits<kHeadDim>;
  const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.h, p.batch);
  return launch(fwd_kernel<T, kHeadDim, kDropout>, grid, Tr::kThreads, Tr::kSmemBytes);
}

#ifndef FASTATTN_CUDA_EMULATE  // the CPU emulation (tests/cuda_emu) launches the kernels itself
// Kernel TUs stay free of ATen headers (faster builds); errors go back to the caller to check.
template <typename T, int kHeadDim, bool kDropout>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_fwd<T, kHeadDim, kDropout>(p, [&](auto kernel, dim3 grid, int threads, int smem) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e == cudaSuccess) kernel<<<grid, threads, smem, stream>>>(p);
    return e;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

#endif

}  // namespace cuda
}  // namespace fastattn
