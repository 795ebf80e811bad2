// fastattn::fwd's CUDA kernel (csrc/cuda/fwd_kernel.cuh) run on the CPU by the emulator (emu.h), with the parameters
// planned by the same host code as the CUDA op (csrc/cuda/attn_host.h) and launched with its geometry (launch_fwd).
#include <ATen/ATen.h>

#include "cuda/attn_host.h"
#include "cuda/launch.h"
#include "emu.h"  // after the ATen headers (emu.h redefines __shared__ and adds CUDA's integer min/max)
#include "harness.h"
#include "cuda/fwd_kernel.cuh"

namespace fastattn {
namespace emu_harness {

std::tuple<at::Tensor, at::Tensor> fwd_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t window_left,
                                           int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
                                           int64_t offset, const std::optional<at::Tensor>& q_start,
                                           const std::optional<at::Tensor>& k_start, bool out_fp32,
                                           int64_t head_start) {
  cuda::host::FwdPlan plan = cuda::host::plan_fwd(
      q, k, v, std::nullopt, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
      bottom_right, 0.0, std::nullopt, dropout_p, seed, offset, q_start, k_start, out_fp32, head_start, at::kCPU,
      [] {});
  if (plan.launch) {
    emu::clear_globals();
    for (const at::Tensor& t : {plan.q, plan.k, plan.v}) add_tensor(t);
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(plan.head_dim, kD, [&] {
        FA_BOOL_SWITCH(plan.dropout, kDrop, [&] {
          cuda::launch_fwd<T, kD, kDrop>(plan.p, [&](auto kernel, dim3 grid, int threads, int smem) {
            emu::launch(grid, dim3(threads), smem, kernel, plan.p);
            return cudaSuccess;
          });
        });
      });
    });
  }
  cuda::host::finish(plan);
  return {plan.out, plan.lse};
}

}  // namespace emu_harness
}  // namespace fastattn
