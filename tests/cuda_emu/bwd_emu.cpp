// fastattn::bwd's and bwd_acc's CUDA kernels (csrc/cuda/bwd_kernel.cuh: delta, dK/dV, dQ) run on the CPU by the
// emulator (emu.h), with the parameters planned by the same host code as the CUDA op (csrc/cuda/attn_host.h) and
// launched with its geometry (launch_bwd).
#include <ATen/ATen.h>

#include <limits>

#include "cuda/attn_host.h"
#include "cuda/launch.h"
#include "emu.h"  // after the ATen headers (emu.h redefines __shared__ and adds CUDA's integer min/max)
#include "harness.h"
#include "cuda/bwd_kernel.cuh"

namespace fastattn {
namespace emu_harness {

namespace {

cuda::host::BwdPlan run(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                        const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                        double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                        int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
                        const std::optional<at::Tensor>& k_start, const cuda::host::AccTensors* acc,
                        int64_t head_start) {
  cuda::host::BwdPlan plan = cuda::host::plan_bwd(
      dout, q, k, v, out, lse, std::nullopt, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, bottom_right, 0.0, std::nullopt, dropout_p, seed, offset, q_start, k_start, acc,
      head_start, at::kCPU, [] {});
  if (plan.launch) {
    // the delta kernel must write every row the dK/dV and dQ kernels read
    if (poison_outputs()) plan.delta.fill_(std::numeric_limits<float>::quiet_NaN());
    emu::clear_globals();
    for (const at::Tensor& t : {plan.q, plan.k, plan.v, plan.o, plan.dout}) add_tensor(t);
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(plan.head_dim, kD, [&] {
        FA_BOOL_SWITCH(plan.dropout, kDrop, [&] {
          cuda::launch_bwd<T, kD, kDrop>(plan.p, [&](auto kernel, dim3 grid, int threads, int smem) {
            emu::launch(grid, dim3(threads), smem, kernel, plan.p);
            return cudaSuccess;
          });
        });
      });
    });
  }
  cuda::host::finish(plan);
  return plan;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_emu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
    const std::optional<at::Tensor>& k_start, int64_t head_start) {
  cuda::host::BwdPlan plan = run(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, window_left, window_right, bottom_right, dropout_p, seed, offset, q_start,
                                 k_start, nullptr, head_start);
  return {plan.dq, plan.dk, plan.dv};
}

void bwd_acc_emu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                 double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                 int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
                 const std::optional<at::Tensor>& k_start, const at::Tensor& dq_acc, const at::Tensor& dk_acc,
                 const at::Tensor& dv_acc, int64_t head_start) {
  const cuda::host::AccTensors acc{dq_acc, dk_acc, dv_acc};
  run(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, bottom_right, dropout_p, seed, offset, q_start, k_start, &acc, head_start);
}

}  // namespace emu_harness
}  // namespace fastattn
