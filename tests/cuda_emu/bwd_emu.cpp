// fastattn::bwd's CUDA kernels (csrc/cuda/bwd_kernel.cuh: delta, dK/dV, dQ) run on the CPU by the emulator (emu.h).
#include <ATen/ATen.h>

#include "cuda/launch.h"
#include "emu.h"  // after the ATen headers (emu.h redefines __shared__ and adds CUDA's integer min/max)
#include "attn_host.h"
#include "cuda/bwd_kernel.cuh"

namespace fastattn {
namespace emu_harness {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_emu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, int64_t offset) {
  cuda::BwdParams p{};
  fill_shape(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             bottom_right);
  const bool dropout = fill_dropout(p.drop, dropout_p, seed, offset);
  at::Tensor dq = empty_like_poisoned(q), dk = empty_like_poisoned(k), dv = empty_like_poisoned(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  const at::Tensor qk = kernel_input(q), kk = kernel_input(k), vk = kernel_input(v);
  const at::Tensor ok = kernel_input(out), dok = kernel_input(dout), lsec = lse.contiguous();
  at::Tensor dqk = kernel_output(dq), dkk = kernel_output(dk), dvk = kernel_output(dv);
  at::Tensor delta = at::empty(lsec.sizes(), lsec.options());
  if (poison_outputs()) delta.fill_(std::numeric_limits<float>::quiet_NaN());  // the delta kernel must fill it
  p.q = ref(qk);
  p.k = ref(kk);
  p.v = ref(vk);
  p.o = ref(ok);
  p.dout = ref(dok);
  p.grad_q = ref(dqk);
  p.grad_k = ref(dkk);
  p.grad_v = ref(dvk);
  p.lse = lsec.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.lse_batch_stride = lsec.stride(0);
  p.lse_head_stride = lsec.stride(1);
  p.rows_q_total = q.size(2);
  p.batch_total = q.size(0);
  emu::clear_globals();
  for (const at::Tensor& t : {qk, kk, vk, ok, dok}) add_tensor(t);
  if (p.batch > 0) {
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(kernel_head_dim(p), kD, [&] {
        FA_BOOL_SWITCH(dropout, kDrop, [&] {  // geometry of run_bwd (bwd_kernel.cuh)
          const int64_t rows = p.batch_total * p.h * p.rows_q_total;
          if (rows > 0) emu::launch(dim3(static_cast<unsigned>((rows + 7) / 8)), dim3(256), 0,
                                    cuda::bwd_delta_kernel<T>, p);
          if (p.seqlen_k > 0) {
            using Tr = cuda::BwdKVTraits<kD>;
            const dim3 grid((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, p.h_kv, p.batch);
            emu::launch(grid, dim3(Tr::kThreads), Tr::kSmemBytes, cuda::bwd_dkdv_kernel<T, kD, kDrop>, p);
          }
          if (p.seqlen_q > 0) {
            using Tr = cuda::BwdQTraits<kD>;
            const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.h, p.batch);
            emu::launch(grid, dim3(Tr::kThreads), Tr::kSmemBytes, cuda::bwd_dq_kernel<T, kD, kDrop>, p);
          }
        });
      });
    });
  }
  finish_output(dq, dqk);
  finish_output(dk, dkk);
  finish_output(dv, dvk);
  return {dq, dk, dv};
}

}  // namespace emu_harness
}  // namespace fastattn
