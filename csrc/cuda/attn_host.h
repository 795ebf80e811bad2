// Host side of fastattn::fwd / bwd / bwd_acc on CUDA, free of CUDA runtime calls: argument checks, the kernels'
// layout requirements (padding and copy-back), dropout constants and the parameter structs. attention_cuda.cpp adds
// the device parts (compute capability, guard, stream, launch); tests/cuda_emu runs the same kernels on the CPU from
// the same plan (device_type = CPU), so both see identical parameters.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "block_checks.h"
#include "common.h"
#include "cuda/params.h"

namespace fastattn {
namespace cuda {
namespace host {

// The kernels read rows with 16-byte cp.async: last dim contiguous, head dim a multiple of 8, 16-byte
// aligned base and row/head/batch strides a multiple of 8 elements (strides of size-1 dims never matter).
inline bool kernel_ready(const at::Tensor& t) {
  if (t.size(3) % 8 != 0 || t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}

// t itself when the kernels can read it, else a copy with the head dim zero-padded to a multiple of 8.
inline at::Tensor kernel_input(const at::Tensor& t) {
  if (kernel_ready(t)) return t;
  const int64_t d = t.size(3);
  if (d % 8 != 0) return at::constant_pad_nd(t, {0, 8 - d % 8}).contiguous();  // (B, H, S, D8)
  return t.clone(at::MemoryFormat::Contiguous);
}

inline int64_t round8(int64_t d) { return (d + 7) / 8 * 8; }

// Kernel-writable stand-in for an output: out itself when ready, else a contiguous (B, H, S, round8(D)) buffer
// that finish_output copies back.
inline at::Tensor kernel_output(const at::Tensor& out) {
  if (kernel_ready(out)) return out;
  return at::empty({out.size(0), out.size(1), out.size(2), round8(out.size(3))}, out.options());
}
inline void finish_output(at::Tensor& out, const at::Tensor& buf) {
  if (!buf.is_same(out)) out.copy_(buf.narrow(3, 0, out.size(3)));
}

// fwd's out (B, H, S, Dv) in dtype (q's, or float32 for out_fp32), laid out like alloc_out_like_q (csrc/common.h).
inline at::Tensor alloc_out(const at::Tensor& q, int64_t dv, at::ScalarType dtype) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2);
  const at::TensorOptions opts = q.options().dtype(dtype);
  if (q.stride(1) < q.stride(2)) return alloc_output({B, S, H, dv}, opts).transpose(1, 2);  // BSHD -> (B, H, S, Dv)
  return alloc_output({B, H, S, dv}, opts);
}

// bwd_acc's float32 accumulators, added into by the kernels.
struct AccTensors {
  at::Tensor dq, dk, dv;
};

// Kernel-side accumulator: acc itself when the kernels can add into it in place (the layout kernel_ready asks), else
// a zeroed contiguous (B, H, S, round8(D)) buffer that finish_acc adds back.
inline at::Tensor acc_output(const at::Tensor& acc) {
  if (kernel_ready(acc)) return acc;
  return at::zeros({acc.size(0), acc.size(1), acc.size(2), round8(acc.size(3))}, acc.options());
}
inline void finish_acc(at::Tensor& acc, const at::Tensor& buf) {
  if (!buf.is_same(acc)) acc.add_(buf.narrow(3, 0, acc.size(3)));
}

inline TensorRef ref(const at::Tensor& t) { return TensorRef{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

inline at::Tensor empty_like_poisoned(const at::Tensor& t) {
  at::Tensor r = at::empty_like(t);
  if (poison_outputs()) r.fill_(std::numeric_limits<float>::quiet_NaN());
  return r;
}

inline void check_unsupported(const std::optional<at::Tensor>& attn_bias, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes) {
  FA_CHECK(!attn_bias.has_value(), "the CUDA kernels do not support attn_bias (use the triton, cpu or sdpa backend)");
  FA_CHECK(softcap == 0.0, "the CUDA kernels do not support softcap (got ", softcap, ")");
  FA_CHECK(!alibi_slopes.has_value(), "the CUDA kernels do not support alibi_slopes");
}

// Dropout constants as the CPU kernels derive them (csrc/cpu/rng.h): p rounded to float, the Philox key from
// (seed, offset), the head offset of the counters (head_start, checked against the heads_q query heads). Returns
// whether the dropout kernels must run (the CPU's test: float p > 0).
inline bool fill_dropout(DropoutParams& d, double dropout_p, int64_t seed, int64_t offset, int64_t head_start,
                         int64_t heads_q) {
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  const float pf = static_cast<float>(dropout_p);
  FA_CHECK(pf < 1.f, "dropout_p=", dropout_p, " rounds to 1 in float32; use a value below 1 - 2^-25");
  d.rng = Philox::from_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  d.threshold = dropout_threshold(pf);
  d.rescale = 1.f / (1.f - pf);
  block_checks::check_head_start(head_start, heads_q);
  d.head_start = static_cast<uint32_t>(head_start);
  return pf > 0.f;
}

// Checks q, k, v (on devices of device_type) and the varlen arguments, and fills the shape part of the params.
// device_checked() runs once q, k, v are known to be 4-D fp16/bf16 tensors on one device: the CUDA op checks the
// compute capability and sets up its device guard there.
template <typename DeviceChecked>
void fill_shape(AttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_sq,
                int64_t max_sk, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
                const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start,
                at::DeviceType device_type, DeviceChecked&& device_checked) {
  FA_CHECK(q.device().type() == device_type && k.device().type() == device_type && v.device().type() == device_type,
           "q, k, v must be ", c10::DeviceTypeName(device_type), " tensors");
  FA_CHECK(q.device() == k.device() && q.device() == v.device(), "q, k, v must be on one device, got ", q.device(),
           ", ", k.device(), ", ", v.device());
  FA_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
           "the CUDA kernels take float16 or bfloat16, got ", q.scalar_type());
  FA_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ: ",
           q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  FA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, S, D), got q ", q.sizes(),
           " k ", k.sizes(), " v ", v.sizes());
  device_checked();
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), D = q.size(3), Dv = v.size(3);
  FA_CHECK(k.size(0) == B && v.size(0) == B, "batch sizes differ: q ", q.sizes(), " k ", k.sizes(), " v ",
           v.sizes());
  FA_CHECK(v.size(1) == Hkv && v.size(2) == k.size(2), "k and v shapes disagree: k ", k.sizes(), " v ", v.sizes());
  FA_CHECK(k.size(3) == D, "q and k head dims differ: q ", q.sizes(), " k ", k.sizes());
  FA_CHECK(Hkv > 0 && H % Hkv == 0, "query heads (", H, ") must be a multiple of key/value heads (", Hkv, ")");
  FA_CHECK(H > 0, "q must have at least one head (a grid of no blocks cannot launch), got q ", q.sizes());
  FA_CHECK(D >= 1 && D <= 256 && Dv >= 1 && Dv <= 256, "head dims must be in [1, 256], got D=", D, " Dv=", Dv);
  FA_CHECK(H <= 65535, "at most 65535 heads, got ", H);
  const bool varlen = cu_q.has_value();
  FA_CHECK(varlen == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  int64_t n_seq = B, sq = q.size(2), sk = k.size(2);
  // Varlen values (cu[0] == 0, non-decreasing, cu[N] == total rows, max_seqlen >= the longest sequence) are not
  // read here: that would synchronise with the device on every call. The Python layer checks them in eager mode,
  // and the kernels clamp every sequence's rows into the tensors (SeqInfo in mask.cuh), so bad values give wrong
  // results, never accesses outside the tensors.
  if (varlen) {
    for (const auto& [cu, name] : {std::pair{&*cu_q, "cu_seqlens_q"}, std::pair{&*cu_k, "cu_seqlens_k"}}) {
      FA_CHECK(cu->scalar_type() == at::kInt, name, " must be int32, got ", cu->scalar_type());
      FA_CHECK(cu->dim() == 1 && cu->numel() >= 2, name, " must be 1-D of length batch + 1 >= 2, got shape ",
               cu->sizes());
      FA_CHECK(cu->device() == q.device(), name, " must be on ", q.device(), ", got ", cu->device());
      FA_CHECK(cu->is_contiguous(), name, " must be contiguous, got strides ", cu->strides());
    }
    FA_CHECK(cu_q->numel() == cu_k->numel(), "cu_seqlens_q ", cu_q->sizes(), " and cu_seqlens_k ", cu_k->sizes(),
             " must both have length batch + 1");
    FA_CHECK(B == 1, "varlen q must be (1, H, total_q, D), got ", q.sizes());
    FA_CHECK(max_sq >= 0 && max_sk >= 0, "max_seqlen_q/k must be >= 0, got ", max_sq, ", ", max_sk);
    n_seq = cu_q->numel() - 1;
    // No sequence is longer than its tensor: a larger max_seqlen only sizes the grid, so clamp it (keeps it an int).
    sq = std::min(max_sq, q.size(2));
    sk = std::min(max_sk, k.size(2));
  }
  FA_CHECK(n_seq <= 65535, "at most 65535 sequences per call, got ", n_seq);
  FA_CHECK(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31), "sequence lengths must be < 2^31");
  FA_CHECK(window_left >= -1 && window_right >= -1, "window_left/window_right must be >= -1 (-1 = unlimited), got ",
           window_left, ", ", window_right);
  // Start values are not read (no host sync): the kernels use them only to shift the mask and key the dropout
  // counters, never as addresses, so any values are memory-safe.
  block_checks::check_coords(q_start, k_start, n_seq, varlen, q.device(), bottom_right);
  s.batch = static_cast<int>(n_seq);
  s.h = static_cast<int>(H);
  s.h_kv = static_cast<int>(Hkv);
  s.seqlen_q = static_cast<int>(sq);
  s.seqlen_k = static_cast<int>(sk);
  s.d = static_cast<int>(round8(D));
  s.dv = static_cast<int>(round8(Dv));
  s.cu_seqlens_q = varlen ? cu_q->data_ptr<int>() : nullptr;
  s.cu_seqlens_k = varlen ? cu_k->data_ptr<int>() : nullptr;
  s.total_q = static_cast<int>(q.size(2));
  s.total_k = static_cast<int>(k.size(2));
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  // A window wider than both tensors is no window; clamping keeps the kernels' int arithmetic in range. With block
  // coordinates the offset can exceed the lengths, so only a window >= 2^31 (wider than any two positions) is none.
  const int64_t wide = q_start ? int64_t(1) << 31 : q.size(2) + k.size(2) + 1;
  s.window_left = static_cast<int>(window_left < 0 || window_left >= wide ? -1 : window_left);
  s.window_right = static_cast<int>(window_right < 0 || window_right >= wide ? -1 : window_right);
  s.bottom_right = bottom_right;
  s.q_start = q_start ? q_start->data_ptr<int>() : nullptr;
  s.k_start = k_start ? k_start->data_ptr<int>() : nullptr;
}

// What a fwd call launches: parameters, the outputs, and the kernel-side tensors whose pointers the params hold.
struct FwdPlan {
  FwdParams p{};
  at::Tensor out, lse;
  at::Tensor q, k, v, o;  // kernel_input / kernel_output views; o is undefined when out is empty
  bool dropout = false;   // run the kDropout variant
  bool launch = false;    // false: nothing to compute (out is empty, or no query rows / sequences)
  int head_dim = 0;       // max(d, dv) rounded to 8, for the head-dim switch
};

// Checks the arguments (q, k, v on devices of device_type; device_checked() as in fill_shape), allocates the outputs
// and fills the plan. Once the kernels ran, finish(plan) copies padded outputs back.
template <typename DeviceChecked>
FwdPlan plan_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                 double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                 const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
                 const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start, bool out_fp32,
                 int64_t head_start, at::DeviceType device_type, DeviceChecked&& device_checked) {
  check_unsupported(attn_bias, softcap, alibi_slopes);
  FwdPlan plan;
  FwdParams& p = plan.p;
  fill_shape(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             bottom_right, q_start, k_start, device_type, device_checked);
  plan.dropout = fill_dropout(p.drop, dropout_p, seed, offset, head_start, q.size(1));
  plan.out = alloc_out(q, v.size(3), out_fp32 ? at::kFloat : q.scalar_type());
  p.out_fp32 = out_fp32;
  plan.lse = alloc_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (plan.out.numel() == 0) return plan;
  plan.q = kernel_input(q), plan.k = kernel_input(k), plan.v = kernel_input(v);
  plan.o = kernel_output(plan.out);
  p.q = ref(plan.q);
  p.k = ref(plan.k);
  p.v = ref(plan.v);
  p.o = ref(plan.o);
  p.lse = plan.lse.data_ptr<float>();
  p.lse_batch_stride = plan.lse.stride(0);
  p.lse_head_stride = plan.lse.stride(1);
  plan.launch = p.seqlen_q > 0 && p.batch > 0;
  plan.head_dim = std::max(p.d, p.dv);
  return plan;
}

inline void finish(FwdPlan& plan) {
  if (plan.o.defined()) finish_output(plan.out, plan.o);
}

struct BwdPlan {
  BwdParams p{};
  at::Tensor dq, dk, dv;
  at::Tensor q, k, v, o, dout, lse, delta;  // kernel-side inputs and the delta scratch (undefined when empty)
  at::Tensor grad_q, grad_k, grad_v;        // kernel_output stand-ins for dq, dk, dv
  bool dropout = false;
  bool launch = false;  // false: nothing to compute (empty q and k, or no sequences)
  int head_dim = 0;
};

// As plan_fwd, for the backward: also checks dout, out and lse against q.
template <typename DeviceChecked>
BwdPlan plan_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
                 bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                 int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
                 const std::optional<at::Tensor>& k_start, const AccTensors* acc, int64_t head_start,
                 at::DeviceType device_type, DeviceChecked&& device_checked) {
  check_unsupported(attn_bias, softcap, alibi_slopes);
  BwdPlan plan;
  BwdParams& p = plan.p;
  fill_shape(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             bottom_right, q_start, k_start, device_type, device_checked);
  plan.dropout = fill_dropout(p.drop, dropout_p, seed, offset, head_start, q.size(1));
  const auto expect_o = std::vector<int64_t>{q.size(0), q.size(1), q.size(2), v.size(3)};
  FA_CHECK(dout.sizes() == at::IntArrayRef(expect_o) && out.sizes() == at::IntArrayRef(expect_o),
           "dout ", dout.sizes(), " and out ", out.sizes(), " must be (B, H, Sq, Dv) = ", at::IntArrayRef(expect_o));
  FA_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
           "dout and out must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), ", ",
           out.scalar_type());
  FA_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
               lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
           "lse must be float32 (B, H, Sq) = ", q.sizes().slice(0, 3), ", got ", lse.scalar_type(), " ", lse.sizes());
  FA_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
           "dout, out, lse must be on ", q.device());
  if (acc != nullptr) {
    block_checks::check_accumulators(acc->dq, acc->dk, acc->dv, q, k, v, dout, out, lse);
    plan.dq = acc->dq, plan.dk = acc->dk, plan.dv = acc->dv;
    p.accumulate = true;
  } else {
    plan.dq = empty_like_poisoned(q), plan.dk = empty_like_poisoned(k), plan.dv = empty_like_poisoned(v);
  }
  if (q.numel() == 0 && k.numel() == 0) return plan;
  plan.q = kernel_input(q), plan.k = kernel_input(k), plan.v = kernel_input(v);
  plan.o = kernel_input(out), plan.dout = kernel_input(dout), plan.lse = lse.contiguous();
  if (acc != nullptr) {
    plan.grad_q = acc_output(plan.dq), plan.grad_k = acc_output(plan.dk), plan.grad_v = acc_output(plan.dv);
  } else {
    plan.grad_q = kernel_output(plan.dq), plan.grad_k = kernel_output(plan.dk), plan.grad_v = kernel_output(plan.dv);
  }
  plan.delta = at::empty(plan.lse.sizes(), plan.lse.options());  // contiguous like lse (size-1 dims aside)
  p.q = ref(plan.q);
  p.k = ref(plan.k);
  p.v = ref(plan.v);
  p.o = ref(plan.o);
  p.dout = ref(plan.dout);
  p.grad_q = ref(plan.grad_q);
  p.grad_k = ref(plan.grad_k);
  p.grad_v = ref(plan.grad_v);
  p.lse = plan.lse.data_ptr<float>();
  p.delta = plan.delta.data_ptr<float>();
  p.lse_batch_stride = plan.lse.stride(0);
  p.lse_head_stride = plan.lse.stride(1);
  p.rows_q_total = q.size(2);  // rows per (batch, head) in the tensors: the delta pass walks all of them
  p.batch_total = q.size(0);
  plan.launch = p.batch > 0;
  plan.head_dim = std::max(p.d, p.dv);
  return plan;
}

inline void finish(BwdPlan& plan) {
  if (!plan.grad_q.defined()) return;
  const auto back = plan.p.accumulate ? finish_acc : finish_output;
  back(plan.dq, plan.grad_q);
  back(plan.dk, plan.grad_k);
  back(plan.dv, plan.grad_v);
}

}  // namespace host
}  // namespace cuda
}  // namespace fastattn
