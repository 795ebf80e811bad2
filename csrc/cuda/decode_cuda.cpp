// CUDA implementation of fastattn::decode_fwd (schema and conventions in csrc/ops.cpp): the device guard and dispatch
// to the split-KV kernels (decode_kernel.cuh); argument checks, the split heuristic and the parameter struct are in
// decode_host.h (shared with the CPU emulation of the kernels in tests/cuda_emu).
//
// Takes fp16/bf16/fp32, head dims up to 256 that are multiples of 16 bytes (8 elements in 16 bits, 4 in fp32), caches
// whose rows are 16-byte aligned, and at most 8 query rows per KV head (G * Sq). Unlike the CPU kernel it does not
// read seqlens_k / block_table / cache_batch_idx back to the host (that would synchronise every decode step): the
// Python layer (fastattn/kvcache.py) validates their values, and the kernel clamps every index into the cache so
// that a bad call can never read outside it.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "cuda/decode_host.h"

namespace fastattn {
namespace {

std::tuple<at::Tensor, at::Tensor> decode_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache,
                                                   const std::optional<at::Tensor>& seqlens_k,
                                                   const std::optional<at::Tensor>& block_table,
                                                   const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
                                                   bool kv_bhsd, const std::optional<at::Tensor>& attn_bias) {
  FA_CHECK(!attn_bias.has_value(), "decode_fwd (cuda) takes no attn_bias (the CPU kernel does)");
  std::optional<c10::cuda::CUDAGuard> guard;
  cuda::DecodePlan plan = cuda::plan_decode(
      q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left, window_right, softcap,
      alibi_slopes, num_splits, kv_bhsd, at::kCUDA, [&]() -> int64_t {
        guard.emplace(q.device());
        int sms = 0;
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()));
        return sms;
      });
  if (!plan.launch) return {plan.out, plan.lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto dt = q.scalar_type();
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    FA_DECODE_HEADDIM_SWITCH(plan.head_dim, kD, [&] {
      FA_DECODE_ROWS_SWITCH(plan.rows, kRows,
                            [&] { C10_CUDA_CHECK((cuda::run_decode<T, kD, kRows>(plan.p, stream))); });
    });
  };
  if (dt == at::kFloat) {
    launch(float());
  } else if (dt == at::kHalf) {
    launch(__half());
  } else {
    launch(__nv_bfloat16());
  }
  return {plan.out, plan.lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("decode_fwd", &fastattn::decode_fwd_cuda); }
