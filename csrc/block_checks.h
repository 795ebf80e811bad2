// Argument checks of the block contract (fwd/bwd/bwd_acc's q_start, k_start, head_start and bwd_acc's float32
// accumulators)
// that the CPU op (cpu/register.cpp) and the CUDA op (cuda/attn_host.h) share word for word. The start values are
// each backend's business: the CPU op reads them (no sync there), the CUDA op never uses them as addresses.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace fastattn {
namespace block_checks {

// q_start/k_start: both or neither, int32 (n_seq,) contiguous on `device`, bottom_right false (their offset places
// the diagonal). n_seq is the batch size, or the number of sequences of a varlen call.
inline void check_coords(const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start,
                         int64_t n_seq, bool varlen, const at::Device& device, bool bottom_right) {
  FA_CHECK(q_start.has_value() == k_start.has_value(), "q_start and k_start must be given together (got only ",
           q_start ? "q_start" : "k_start", ")");
  if (!q_start) return;
  FA_CHECK(!bottom_right, "bottom_right must be False with q_start/k_start: the offsets q_start - k_start place ",
           "the diagonal");
  for (const auto& [t, name] : {std::pair{&*q_start, "q_start"}, std::pair{&*k_start, "k_start"}}) {
    FA_CHECK(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
    FA_CHECK(t->dim() == 1 && t->size(0) == n_seq, name, " must have shape (N,) with N = ", n_seq,
             varlen ? " (number of varlen sequences)" : " (batch size)", ", got ", t->sizes());
    FA_CHECK(t->device() == device, name, " must be on ", device, ", got ", t->device());
    FA_CHECK(t->is_contiguous(), name, " must be contiguous, got strides ", t->strides());
  }
}

// head_start (fwd/bwd/bwd_acc): the first query head of this call in the unsplit call; the dropout counter takes
// the global head head_start + h as a uint32, so every global head must lie in [0, 2^31).
inline void check_head_start(int64_t head_start, int64_t heads_q) {
  FA_CHECK(head_start >= 0 && head_start + heads_q <= (int64_t(1) << 31), "head_start must be >= 0 with head_start + ",
           "Hq (", heads_q, ") <= 2^31, got head_start=", head_start);
}

// Index differences between two views with the same strides: per dim (stride, lowest, highest) e_d = i_d - j_d.
using Diffs = std::vector<std::tuple<int64_t, int64_t, int64_t>>;

// Whether delta = sum of e_d * stride_d over dims[0, n) with each e_d in its range. dims by stride, each stride
// above what the smaller ones reach (decided_by_strides), so of e_d only floor(delta / stride_d) and the next can
// leave a remainder the smaller dims reach.
inline bool reaches(const Diffs& dims, size_t n, int64_t delta) {
  if (n == 0) return delta == 0;
  const auto [stride, lo, hi] = dims[n - 1];
  int64_t e = delta / stride;
  if (delta % stride != 0 && delta < 0) --e;  // floor
  for (const int64_t c : {e, e + 1}) {
    if (c >= lo && c <= hi && reaches(dims, n - 1, delta - c * stride)) return true;
  }
  return false;
}

// a's and b's index differences (same strides, any sizes), or nothing where the strides do not decide them.
inline std::optional<Diffs> decided_by_strides(const at::Tensor& a, const at::Tensor& b) {
  Diffs dims;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 || b.size(d) > 1) dims.emplace_back(a.stride(d), 1 - b.size(d), a.size(d) - 1);
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, lo, hi] : dims) {
    if (stride <= reach) return std::nullopt;
    reach += stride * std::max(-lo, hi);
  }
  return dims;
}

// Whether t's elements have memory of their own, judged from its strides alone: its dims of size > 1 ordered by
// stride, each stride beyond what the dims before it reach (t against itself, above). Sufficient, not necessary:
// ATen's own test answers only for dense tensors ("too hard" otherwise), and a layout this cannot clear is refused.
inline bool strides_disjoint(const at::Tensor& t) { return decided_by_strides(t, t).has_value(); }

// [first, end) bytes t's elements lie in (its strides are non-negative); empty for an empty tensor.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += t.stride(i) * (t.size(i) - 1);
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// Whether a and b may share memory: ATen's answer where it has one; for non-dense views of one storage with the
// same strides and dtype (dK/dV column ranges of one packed buffer, any head dims), exactly where the strides
// decide it; else whether their byte spans meet (which refuses some interleaved views that would not collide).
inline bool may_share(const at::Tensor& a, const at::Tensor& b) {
  const auto st = at::get_overlap_status(a, b);
  if (st == at::MemOverlapStatus::Full || st == at::MemOverlapStatus::Partial) return true;
  if (st != at::MemOverlapStatus::TooHard || !a.storage().is_alias_of(b.storage())) return false;
  if (a.numel() == 0 || b.numel() == 0) return false;
  const int64_t elt = a.element_size();
  const int64_t delta = reinterpret_cast<intptr_t>(b.data_ptr()) - reinterpret_cast<intptr_t>(a.data_ptr());
  if (a.dim() == b.dim() && a.strides() == b.strides() && b.element_size() == elt && delta % elt == 0) {
    if (const auto dims = decided_by_strides(a, b)) return reaches(*dims, dims->size(), delta / elt);
  }
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
}

// bwd_acc's accumulators dq_acc/dk_acc/dv_acc: float32, the shape of q/k/v, on q's device, stride 1 on the last dim,
// and every element their own memory: the kernels add into each element from exactly one task, so an expanded
// accumulator, or one aliasing another argument, would race or read back what the kernels wrote.
inline void check_accumulators(const at::Tensor& dq_acc, const at::Tensor& dk_acc, const at::Tensor& dv_acc,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                               const at::Tensor& out, const at::Tensor& lse) {
  for (const auto& [acc, like, name, like_name] :
       {std::tuple{&dq_acc, &q, "dq_acc", "q"}, std::tuple{&dk_acc, &k, "dk_acc", "k"},
        std::tuple{&dv_acc, &v, "dv_acc", "v"}}) {
    FA_CHECK(acc->scalar_type() == at::kFloat, name, " must be float32, got ", acc->scalar_type());
    FA_CHECK(acc->sizes() == like->sizes(), name, " must have ", like_name, "'s shape ", like->sizes(), ", got ",
             acc->sizes());
    FA_CHECK(acc->device() == q.device(), name, " must be on ", q.device(), ", got ", acc->device());
    FA_CHECK(acc->stride(3) == 1 || acc->size(3) <= 1, name, " must have stride 1 on the last dim, got strides ",
             acc->strides());
    const auto overlap = at::has_internal_overlap(*acc);
    FA_CHECK(overlap == at::MemOverlap::No || (overlap == at::MemOverlap::TooHard && strides_disjoint(*acc)), name,
             " must not have elements sharing memory (e.g. an expanded tensor), got strides ", acc->strides());
    for (const auto& [other, other_name] :
         {std::pair{&dq_acc, "dq_acc"}, std::pair{&dk_acc, "dk_acc"}, std::pair{&dv_acc, "dv_acc"},
          std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&dout, "dout"},
          std::pair{&out, "out"}, std::pair{&lse, "lse"}}) {
      if (other == acc) continue;
      FA_CHECK(!may_share(*acc, *other), name, " must not share memory with ", other_name, " (strides ",
               acc->strides(), " and ", other->strides(), ")");
    }
  }
}

}  // namespace block_checks
}  // namespace fastattn
