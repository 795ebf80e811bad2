// Argument checks of fastattn::decode_fwd that the CPU op (cpu/decode.cpp) and the CUDA op (cuda/decode_host.h) share
// word for word; each backend runs its own device, layout and index checks between them.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include "common.h"

namespace fastattn {
namespace decode_checks {

// kv_bhsd: the caches come in SDPA's (B, Hkv, S, D|Dv) layout (a dense call passed straight through, no copy). The op
// reads them through the cache layout's view (B, S, Hkv, D|Dv); every check and the kernels see that view.
inline at::Tensor cache_view(const at::Tensor& t, bool kv_bhsd) {
  if (!kv_bhsd || t.dim() != 4) return t;
  // The alias built directly: at::Tensor::transpose goes through the dispatcher and attaches autograd view metadata
  // (~0.5 us a call, on every decode step); the op only reads this view and never returns it.
  auto impl = t.unsafeGetTensorImpl()->shallow_copy_and_detach(/*version_counter=*/0,
                                                                /*allow_tensor_metadata_change=*/true);
  const auto sz = t.sizes();
  const auto st = t.strides();
  const int64_t sizes[4] = {sz[0], sz[2], sz[1], sz[3]}, strides[4] = {st[0], st[2], st[1], st[3]};  // 1 <-> 2
  impl->set_sizes_and_strides(at::IntArrayRef(sizes), at::IntArrayRef(strides));
  return at::Tensor(std::move(impl));
}

// seqlens_k absent: every row attends all `capacity` keys it can hold, a length the kernels keep in int32.
inline void check_whole_cache(const std::optional<at::Tensor>& seqlens_k, int64_t capacity) {
  FA_CHECK(seqlens_k.has_value() || capacity <= std::numeric_limits<int32_t>::max(), "decode_fwd: without seqlens_k ",
           "every row attends the whole cache, but its capacity ", capacity, " exceeds int32; pass seqlens_k");
}

// Ranks and dtypes; backend names the op's device in the dtype message ("cpu", "cuda").
inline void check_ranks_dtypes(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const char* backend) {
  FA_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_fwd: q must be (B, Hq, Sq, D) and the ",
           "caches (Bc|num_blocks, Smax|page, Hkv, D), got q", q.sizes(), " k_cache", k_cache.sizes(), " v_cache",
           v_cache.sizes());
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "decode_fwd (", backend,
           ") takes float32, bfloat16 or float16, got ", dt);
  FA_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, "decode_fwd: q, k_cache, v_cache dtypes ",
           "differ: ", dt, ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type());
}

// Head dims, k/v cache agreement and the GQA head ratio (after check_ranks_dtypes).
inline void check_shapes(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const int64_t Hq = q.size(1), D = q.size(3), Hkv = k_cache.size(2);
  FA_CHECK(k_cache.size(3) == D, "decode_fwd: q head dim ", D, " != k_cache head dim ", k_cache.size(3));
  FA_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) && v_cache.size(2) == Hkv,
           "decode_fwd: k_cache", k_cache.sizes(), " and v_cache", v_cache.sizes(),
           " must agree except in the last dim");
  FA_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_fwd: query heads ", Hq, " must be a multiple of kv heads ", Hkv);
}

inline void check_scalars(double softcap, int64_t num_splits) {
  FA_CHECK(std::isfinite(softcap) && softcap >= 0, "decode_fwd: softcap must be finite and >= 0 (0 = off), got ",
           softcap);
  FA_CHECK(num_splits >= 0, "decode_fwd: num_splits must be >= 0 (0 = heuristic), got ", num_splits);
}

// Window entries are >= -1 (-1 = unlimited). Returns them with a window wider than `wide` keys (the cache capacity
// plus the query rows) made unlimited: nothing visible changes, and i + off + window stays far from overflow.
inline std::pair<int64_t, int64_t> check_window(int64_t window_left, int64_t window_right, int64_t wide) {
  FA_CHECK(window_left >= -1 && window_right >= -1, "decode_fwd: window_left/window_right must be >= -1 ",
           "(-1 = unlimited), got ", window_left, ", ", window_right);
  return {window_left > wide ? -1 : window_left, window_right > wide ? -1 : window_right};
}

}  // namespace decode_checks
}  // namespace fastattn
