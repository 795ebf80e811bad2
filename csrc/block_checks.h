// Argument checks of the block contract (fwd/bwd/bwd_acc's q_start, k_start, head_start and bwd_acc's float32
// accumulators)
// that the CPU op (cpu/register.cpp) and the CUDA op (cuda/attn_host.h) share word for word. The start values are
// each backend's business: the CPU op reads them (no sync there), the CUDA op never uses them as addresses.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>
#include <tuple>
#include <utility>

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
    FA_CHECK(at::has_internal_overlap(*acc) != at::MemOverlap::Yes, name,
             " must not have elements sharing memory (e.g. an expanded tensor), got strides ", acc->strides());
    for (const auto& [other, other_name] :
         {std::pair{&dq_acc, "dq_acc"}, std::pair{&dk_acc, "dk_acc"}, std::pair{&dv_acc, "dv_acc"},
          std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&dout, "dout"},
          std::pair{&out, "out"}, std::pair{&lse, "lse"}}) {
      if (other == acc) continue;
      const auto st = at::get_overlap_status(*acc, *other);
      FA_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, name,
               " must not share memory with ", other_name);
    }
  }
}

}  // namespace block_checks
}  // namespace fastattn
