// fastattn::fwd's CUDA kernel (csrc/cuda/fwd_kernel.cuh) run on the CPU by the emulator (emu.h).
#include <ATen/ATen.h>

#include "cuda/launch.h"
#include "emu.h"  // after the ATen headers (emu.h redefines __shared__ and adds CUDA's integer min/max)
#include "attn_host.h"
#include "cuda/fwd_kernel.cuh"

namespace fastattn {
namespace emu_harness {

std::tuple<at::Tensor, at::Tensor> fwd_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t window_left,
                                           int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
                                           int64_t offset) {
  cuda::FwdParams p{};
  fill_shape(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             bottom_right);
  const bool dropout = fill_dropout(p.drop, dropout_p, seed, offset);
  at::Tensor out = alloc_out_like_q(q, v.size(3));
  at::Tensor lse = alloc_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor qk = kernel_input(q), kk = kernel_input(k), vk = kernel_input(v);
  at::Tensor ok = kernel_output(out);
  p.q = ref(qk);
  p.k = ref(kk);
  p.v = ref(vk);
  p.o = ref(ok);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  emu::clear_globals();
  for (const at::Tensor& t : {qk, kk, vk}) add_tensor(t);
  if (p.seqlen_q > 0 && p.batch > 0) {
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(kernel_head_dim(p), kD, [&] {
        FA_BOOL_SWITCH(dropout, kDrop, [&] {
          using Tr = cuda::FwdTraits<kD>;  // geometry of run_fwd (fwd_kernel.cuh)
          const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.h, p.batch);
          emu::launch(grid, dim3(Tr::kThreads), Tr::kSmemBytes, cuda::fwd_kernel<T, kD, kDrop>, p);
        });
      });
    });
  }
  finish_output(out, ok);
  return {out, lse};
}

}  // namespace emu_harness
}  // namespace fastattn
