// CUDA implementations of fastattn::fwd / fastattn::bwd (schemas and conventions in csrc/ops.cpp): the device parts
// (compute capability, device guard, stream) and dispatch to the kernel instantiations. Argument checks, layout
// preparation and the parameter structs are in attn_host.h (shared with the CPU emulation in tests/cuda_emu).
// Supported: fp16/bf16, D and Dv <= 256, causal/sliding window in both alignments, GQA/MQA, varlen, lse,
// dropout (Philox counters of csrc/philox.h: the same mask as the CPU kernels for the same seed/offset/p), block
// coordinates (q_start/k_start), fp32 out (out_fp32) and the accumulating backward (bwd_acc).
// Not supported (refused here and declared absent in fastattn/backends/cuda.py): attn_bias, softcap,
// alibi. The backward is always deterministic (no atomics).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "common.h"
#include "cuda/attn_host.h"
#include "cuda/launch.h"

namespace fastattn {
namespace {

// Called by the host checks once q, k, v are 4-D fp16/bf16 tensors on one CUDA device: the kernels need sm_80+
// (mma.sync bf16, cp.async), and everything after runs under the guard.
void check_device(const at::Tensor& q, std::optional<c10::cuda::CUDAGuard>& guard) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  FA_CHECK(major >= 8, "the CUDA kernels need compute capability >= 8.0, got ", major, ".", minor);
  guard.emplace(q.device());
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& attn_bias,
                                            const std::optional<at::Tensor>& cu_seqlens_q,
                                            const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, double scale, int64_t window_left,
                                            int64_t window_right, bool bottom_right, double softcap,
                                            const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                            int64_t seed, int64_t offset, bool deterministic,
                                            const std::optional<at::Tensor>& q_start,
                                            const std::optional<at::Tensor>& k_start, bool out_fp32,
                                            int64_t head_start) {
  std::optional<c10::cuda::CUDAGuard> guard;
  cuda::host::FwdPlan plan = cuda::host::plan_fwd(
      q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
      bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, q_start, k_start, out_fp32, head_start,
      at::kCUDA, [&] { check_device(q, guard); });
  if (plan.launch) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(plan.head_dim, kD, [&] {
        FA_BOOL_SWITCH(plan.dropout, kDrop, [&] { C10_CUDA_CHECK((cuda::run_fwd<T, kD, kDrop>(plan.p, stream))); });
      });
    });
  }
  cuda::host::finish(plan);
  return {plan.out, plan.lse};
}

// bwd and bwd_acc (acc != nullptr: the kernels add their fp32 gradients into acc's tensors).
cuda::host::BwdPlan run_bwd_plan(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start,
    const cuda::host::AccTensors* acc, int64_t head_start) {
  std::optional<c10::cuda::CUDAGuard> guard;
  cuda::host::BwdPlan plan = cuda::host::plan_bwd(
      dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, q_start, k_start, acc, head_start,
      at::kCUDA, [&] { check_device(q, guard); });
  if (plan.launch) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(plan.head_dim, kD, [&] {
        FA_BOOL_SWITCH(plan.dropout, kDrop, [&] { C10_CUDA_CHECK((cuda::run_bwd<T, kD, kDrop>(plan.p, stream))); });
      });
    });
  }
  cuda::host::finish(plan);
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
    bool deterministic, const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start,
    int64_t head_start) {
  cuda::host::BwdPlan plan = run_bwd_plan(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right,
                                          softcap, alibi_slopes, dropout_p, seed, offset, q_start, k_start, nullptr,
                                          head_start);
  return {plan.dq, plan.dk, plan.dv};
}

void bwd_acc_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias,
                  const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                  int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                  int64_t window_right, bool bottom_right, double softcap,
                  const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
                  bool deterministic, const std::optional<at::Tensor>& q_start,
                  const std::optional<at::Tensor>& k_start, const at::Tensor& dq_acc, const at::Tensor& dk_acc,
                  const at::Tensor& dv_acc, int64_t head_start) {
  const cuda::host::AccTensors acc{dq_acc, dk_acc, dv_acc};
  run_bwd_plan(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
               window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, q_start,
               k_start, &acc, head_start);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
  m.impl("bwd_acc", &bwd_acc_cuda);
}

}  // namespace fastattn
