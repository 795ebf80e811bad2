// What the emulation harnesses (decode_emu.cpp, fwd_emu.cpp, bwd_emu.cpp) share beyond the op's own host code, and
// their entry points (declared once here, defined in those files, bound to Python in bind.cpp).
#pragma once
#include <ATen/ATen.h>

#include "emu.h"

namespace fastattn {
namespace emu_harness {

// Registers t's whole storage as global memory (kernels may legally read any element of a strided view's storage);
// the emulated cp.async refuses sources outside the registered ranges.
inline void add_tensor(const at::Tensor& t) {
  if (t.defined() && t.numel() > 0) emu::add_global(t.storage().data(), t.storage().nbytes());
}

// Same arguments and results as the CUDA ops (csrc/ops.cpp), on CPU tensors; sms: the SM count the split heuristic
// plans for (decode: before the op's last argument, kv_bhsd).
std::tuple<at::Tensor, at::Tensor> decode_fwd_emu(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache,
                                                  const std::optional<at::Tensor>& seqlens_k,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
                                                  int64_t sms, bool kv_bhsd);
std::tuple<at::Tensor, at::Tensor> fwd_emu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t window_left,
                                           int64_t window_right, bool bottom_right, double dropout_p, int64_t seed,
                                           int64_t offset, const std::optional<at::Tensor>& q_start,
                                           const std::optional<at::Tensor>& k_start, bool out_fp32,
                                           int64_t head_start);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_emu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
    const std::optional<at::Tensor>& k_start, int64_t head_start);
// bwd_acc: bwd's kernels adding their fp32 gradients into dq_acc/dk_acc/dv_acc.
void bwd_acc_emu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                 double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                 int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
                 const std::optional<at::Tensor>& k_start, const at::Tensor& dq_acc, const at::Tensor& dk_acc,
                 const at::Tensor& dv_acc, int64_t head_start);

}  // namespace emu_harness
}  // namespace fastattn
