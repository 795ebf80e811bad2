// fastattn::decode_fwd's CUDA kernels (csrc/cuda/decode_kernel.cuh) run on the CPU by the emulator (emu.h), with the
// parameters planned by the same host code as the CUDA op (csrc/cuda/decode_host.h).
#include <ATen/ATen.h>

#include "cuda/decode_host.h"
// after the ATen headers (emu.h redefines __shared__ and adds CUDA's unqualified integer min/max)
#include "emu.h"
#include "harness.h"
#include "cuda/decode_kernel.cuh"

namespace fastattn {
namespace emu_harness {

std::tuple<at::Tensor, at::Tensor> decode_fwd_emu(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache,
                                                  const std::optional<at::Tensor>& seqlens_k,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
                                                  int64_t sms, bool kv_bhsd) {
  cuda::DecodePlan plan =
      cuda::plan_decode(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left,
                        window_right, softcap, alibi_slopes, num_splits, kv_bhsd, at::kCPU, [&] { return sms; });
  if (!plan.launch) return {plan.out, plan.lse};
  emu::clear_globals();
  for (const at::Tensor& t : {q, k_cache, v_cache, plan.lens, plan.bt, plan.bidx, plan.alibi}) add_tensor(t);
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    FA_DECODE_HEADDIM_SWITCH(plan.head_dim, kD, [&] {
      FA_DECODE_ROWS_SWITCH(plan.rows, kRows, [&] {
        cuda::launch_decode<T, kD, kRows>(plan.p, [&](auto kernel, dim3 grid, int threads) {
          emu::launch(grid, dim3(threads), 0, kernel, plan.p);
        });
      });
    });
  };
  const auto dt = q.scalar_type();
  if (dt == at::kFloat) {
    run(float());
  } else if (dt == at::kHalf) {
    run(__half());
  } else {
    run(__nv_bfloat16());
  }
  return {plan.out, plan.lse};
}

}  // namespace emu_harness
}  // namespace fastattn
