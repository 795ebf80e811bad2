// Host planning for the emulated FlashAttention-2 kernels: the parameter filling of csrc/cuda/attention_cuda.cpp
// (which is CUDA-only: device checks, guards, streams) restated for CPU tensors. Keep in step with that file:
// kernel_ready / kernel_input / kernel_output / fill_dropout / fill_shape below mirror it line for line, minus the
// device checks.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common.h"
#include "cuda/params.h"

namespace fastattn {
namespace emu_harness {

inline bool kernel_ready(const at::Tensor& t) {
  if (t.size(3) % 8 != 0 || t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}
inline at::Tensor kernel_input(const at::Tensor& t) {
  if (kernel_ready(t)) return t;
  const int64_t d = t.size(3);
  if (d % 8 != 0) return at::constant_pad_nd(t, {0, 8 - d % 8}).contiguous();  // (B, H, S, D8)
  return t.clone(at::MemoryFormat::Contiguous);
}
inline int64_t round8(int64_t d) { return (d + 7) / 8 * 8; }
inline at::Tensor kernel_output(const at::Tensor& out) {
  if (kernel_ready(out)) return out;
  return at::empty({out.size(0), out.size(1), out.size(2), round8(out.size(3))}, out.options());
}
inline void finish_output(at::Tensor& out, const at::Tensor& buf) {
  if (!buf.is_same(out)) out.copy_(buf.narrow(3, 0, out.size(3)));
}
inline cuda::TensorRef ref(const at::Tensor& t) {
  return cuda::TensorRef{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}
inline at::Tensor empty_like_poisoned(const at::Tensor& t) {
  at::Tensor r = at::empty_like(t);
  if (poison_outputs()) r.fill_(std::numeric_limits<float>::quiet_NaN());
  return r;
}
inline bool fill_dropout(cuda::DropoutParams& d, double dropout_p, int64_t seed, int64_t offset) {
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  const float pf = static_cast<float>(dropout_p);
  d.rng = Philox::from_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  d.threshold = dropout_threshold(pf);
  d.rescale = 1.f / (1.f - pf);
  return pf > 0.f;
}
inline void fill_shape(cuda::AttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_sq,
                       int64_t max_sk, double scale, int64_t window_left, int64_t window_right, bool bottom_right) {
  FA_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "float16 or bfloat16 only");
  FA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1);
  FA_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of key/value heads");
  const bool varlen = cu_q.has_value();
  int64_t n_seq = B, sq = q.size(2), sk = k.size(2);
  if (varlen) {
    FA_CHECK(B == 1, "varlen q must be (1, H, total_q, D)");
    n_seq = cu_q->numel() - 1;
    sq = max_sq;
    sk = max_sk;
  }
  s.batch = static_cast<int>(n_seq);
  s.h = static_cast<int>(H);
  s.h_kv = static_cast<int>(Hkv);
  s.seqlen_q = static_cast<int>(sq);
  s.seqlen_k = static_cast<int>(sk);
  s.d = static_cast<int>(round8(q.size(3)));
  s.dv = static_cast<int>(round8(v.size(3)));
  s.cu_seqlens_q = varlen ? cu_q->data_ptr<int>() : nullptr;
  s.cu_seqlens_k = varlen ? cu_k->data_ptr<int>() : nullptr;
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const int64_t wide = sq + sk + 1;
  s.window_left = static_cast<int>(window_left < 0 || window_left >= wide ? -1 : window_left);
  s.window_right = static_cast<int>(window_right < 0 || window_right >= wide ? -1 : window_right);
  s.bottom_right = bottom_right;
}
inline int kernel_head_dim(const cuda::AttnShape& s) { return std::max(s.d, s.dv); }

inline void add_tensor(const at::Tensor& t) {
  if (t.defined() && t.numel() > 0) emu::add_global(t.storage().data(), t.storage().nbytes());
}

}  // namespace emu_harness
}  // namespace fastattn
