// Helpers shared by the CPU and CUDA implementations of the fastattn ops.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cstdlib>
#include <limits>

namespace fastattn {

// FASTATTN_POISON_OUTPUTS=1 (the tests set it) fills fresh outputs with NaN so elements a kernel
// forgets to write show up as errors instead of as stale zeros.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* s = std::getenv("FASTATTN_POISON_OUTPUTS");
    return s != nullptr && s[0] == '1';
  }();
  return on;
}

inline at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// Output (B, H, S, Dv) laid out in q's memory order: BSHD memory when q is BSHD (flash-attn surface),
// BHSD otherwise. Returns the logical (B, H, S, Dv) view either way.
inline at::Tensor alloc_out_like_q(const at::Tensor& q, int64_t dv) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2);
  if (q.stride(1) < q.stride(2)) {
    return alloc_output({B, S, H, dv}, q.options()).transpose(1, 2);  // (B, S, H, Dv) -> (B, H, S, Dv)
  }
  return alloc_output({B, H, S, dv}, q.options());
}

#define FA_CHECK(cond, ...) TORCH_CHECK(cond, "fastattn: ", __VA_ARGS__)

}  // namespace fastattn
