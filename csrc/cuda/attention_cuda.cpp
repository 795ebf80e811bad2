// CUDA implementations of fastattn::fwd / fastattn::bwd (schemas and conventions in csrc/ops.cpp):
// argument checks, layout preparation, the parameter structs, and dispatch to the kernel instantiations.
// Supported: fp16/bf16, D and Dv <= 256, causal/sliding window in both alignments, GQA/MQA, varlen, lse,
// dropout (Philox counters of csrc/philox.h: the same mask as the CPU kernels for the same seed/offset/p).
// Not supported (refused here and declared absent in fastattn/backends/cuda.py): attn_bias, softcap,
// alibi. The backward is always deterministic (no atomics).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "cuda/launch.h"

namespace fastattn {
namespace {

using cuda::BwdParams;
using cuda::FwdParams;
using cuda::TensorRef;

// The kernels read rows with 16-byte cp.async: last dim contiguous, head dim a multiple of 8, 16-byte
// aligned base and row/head/batch strides a multiple of 8 elements (strides of size-1 dims never matter).
bool kernel_ready(const at::Tensor& t) {
  if (t.size(3) % 8 != 0 || t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}

// t itself when the kernels can read it, else a copy with the head dim zero-padded to a multiple of 8.
at::Tensor kernel_input(const at::Tensor& t) {
  if (kernel_ready(t)) return t;
  const int64_t d = t.size(3);
  if (d % 8 != 0) return at::constant_pad_nd(t, {0, 8 - d % 8}).contiguous();  // (B, H, S, D8)
  return t.clone(at::MemoryFormat::Contiguous);
}

int64_t round8(int64_t d) { return (d + 7) / 8 * 8; }

// Kernel-writable stand-in for an output: out itself when ready, else a contiguous (B, H, S, round8(D)) buffer
// that finish_output copies back.
at::Tensor kernel_output(const at::Tensor& out) {
  if (kernel_ready(out)) return out;
  return at::empty({out.size(0), out.size(1), out.size(2), round8(out.size(3))}, out.options());
}
void finish_output(at::Tensor& out, const at::Tensor& buf) {
  if (!buf.is_same(out)) out.copy_(buf.narrow(3, 0, out.size(3)));
}

TensorRef ref(const at::Tensor& t) {
  return TensorRef{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

at::Tensor empty_like_poisoned(const at::Tensor& t) {
  at::Tensor r = at::empty_like(t);
  if (poison_outputs()) r.fill_(std::numeric_limits<float>::quiet_NaN());
  return r;
}

void check_unsupported(const std::optional<at::Tensor>& attn_bias, double softcap,
                       const std::optional<at::Tensor>& alibi_slopes) {
  FA_CHECK(!attn_bias.has_value(), "the CUDA kernels do not support attn_bias (use the triton, cpu or sdpa backend)");
  FA_CHECK(softcap == 0.0, "the CUDA kernels do not support softcap (got ", softcap, ")");
  FA_CHECK(!alibi_slopes.has_value(), "the CUDA kernels do not support alibi_slopes");
}

// Dropout constants as the CPU kernels derive them (csrc/cpu/rng.h): p rounded to float, the Philox key from
// (seed, offset). Returns whether the dropout kernels must run (the CPU's test: float p > 0).
bool fill_dropout(cuda::DropoutParams& d, double dropout_p, int64_t seed, int64_t offset) {
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  const float pf = static_cast<float>(dropout_p);
  FA_CHECK(pf < 1.f, "dropout_p=", dropout_p, " rounds to 1 in float32; use a value below 1 - 2^-25");
  d.rng = Philox::from_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  d.threshold = dropout_threshold(pf);
  d.rescale = 1.f / (1.f - pf);
  return pf > 0.f;
}

// Checks q, k, v and the varlen arguments, and fills the shape part of the params.
void fill_shape(cuda::AttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_sq,
                int64_t max_sk, double scale, int64_t window_left, int64_t window_right, bool bottom_right) {
  FA_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  FA_CHECK(q.device() == k.device() && q.device() == v.device(), "q, k, v must be on one device, got ", q.device(),
           ", ", k.device(), ", ", v.device());
  FA_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
           "the CUDA kernels take float16 or bfloat16, got ", q.scalar_type());
  FA_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ: ",
           q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  FA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, S, D), got q ", q.sizes(),
           " k ", k.sizes(), " v ", v.sizes());
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  FA_CHECK(major >= 8, "the CUDA kernels need compute capability >= 8.0, got ", major, ".", minor);
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), D = q.size(3), Dv = v.size(3);
  FA_CHECK(k.size(0) == B && v.size(0) == B, "batch sizes differ: q ", q.sizes(), " k ", k.sizes(), " v ",
           v.sizes());
  FA_CHECK(v.size(1) == Hkv && v.size(2) == k.size(2), "k and v shapes disagree: k ", k.sizes(), " v ", v.sizes());
  FA_CHECK(k.size(3) == D, "q and k head dims differ: q ", q.sizes(), " k ", k.sizes());
  FA_CHECK(Hkv > 0 && H % Hkv == 0, "query heads (", H, ") must be a multiple of key/value heads (", Hkv, ")");
  FA_CHECK(D >= 1 && D <= 256 && Dv >= 1 && Dv <= 256, "head dims must be in [1, 256], got D=", D, " Dv=", Dv);
  FA_CHECK(H <= 65535, "at most 65535 heads, got ", H);
  const bool varlen = cu_q.has_value();
  FA_CHECK(varlen == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  int64_t n_seq = B, sq = q.size(2), sk = k.size(2);
  if (varlen) {
    for (const at::Tensor* cu : {&*cu_q, &*cu_k}) {
      FA_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->device() == q.device(),
               "cu_seqlens must be contiguous 1-D int32 tensors on ", q.device(), ", got ", cu->scalar_type(), " ",
               cu->sizes(), " on ", cu->device());
    }
    FA_CHECK(cu_q->numel() == cu_k->numel() && cu_q->numel() >= 2, "cu_seqlens_q ", cu_q->sizes(),
             " and cu_seqlens_k ", cu_k->sizes(), " must both have length batch + 1");
    FA_CHECK(B == 1, "varlen q must be (1, H, total_q, D), got ", q.sizes());
    FA_CHECK(max_sq >= 0 && max_sk >= 0, "max_seqlen_q/k must be >= 0, got ", max_sq, ", ", max_sk);
    n_seq = cu_q->numel() - 1;
    sq = max_sq;
    sk = max_sk;
  }
  FA_CHECK(n_seq <= 65535, "at most 65535 sequences per call, got ", n_seq);
  FA_CHECK(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31), "sequence lengths must be < 2^31");
  s.batch = static_cast<int>(n_seq);
  s.h = static_cast<int>(H);
  s.h_kv = static_cast<int>(Hkv);
  s.seqlen_q = static_cast<int>(sq);
  s.seqlen_k = static_cast<int>(sk);
  s.d = static_cast<int>(round8(D));
  s.dv = static_cast<int>(round8(Dv));
  s.cu_seqlens_q = varlen ? cu_q->data_ptr<int>() : nullptr;
  s.cu_seqlens_k = varlen ? cu_k->data_ptr<int>() : nullptr;
  s.scale = static_cast<float>(scale);
  s.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  // A window wider than both sequences is no window; clamping keeps the kernels' int arithmetic in range.
  const int64_t wide = sq + sk + 1;
  s.window_left = static_cast<int>(window_left < 0 || window_left >= wide ? -1 : window_left);
  s.window_right = static_cast<int>(window_right < 0 || window_right >= wide ? -1 : window_right);
  s.bottom_right = bottom_right;
}

int kernel_head_dim(const cuda::AttnShape& s) { return std::max(s.d, s.dv); }

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& attn_bias,
                                            const std::optional<at::Tensor>& cu_seqlens_q,
                                            const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                            int64_t max_seqlen_k, double scale, int64_t window_left,
                                            int64_t window_right, bool bottom_right, double softcap,
                                            const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                            int64_t seed, int64_t offset, bool deterministic) {
  check_unsupported(attn_bias, softcap, alibi_slopes);
  FwdParams p{};
  fill_shape(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             bottom_right);
  const bool dropout = fill_dropout(p.drop, dropout_p, seed, offset);
  c10::cuda::CUDAGuard guard(q.device());
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
  if (p.seqlen_q > 0 && p.batch > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(kernel_head_dim(p), kD, [&] {
        FA_BOOL_SWITCH(dropout, kDrop, [&] { C10_CUDA_CHECK((cuda::run_fwd<T, kD, kDrop>(p, stream))); });
      });
    });
  }
  finish_output(out, ok);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
    bool deterministic) {
  check_unsupported(attn_bias, softcap, alibi_slopes);
  BwdParams p{};
  fill_shape(p, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             bottom_right);
  const bool dropout = fill_dropout(p.drop, dropout_p, seed, offset);
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
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = empty_like_poisoned(q), dk = empty_like_poisoned(k), dv = empty_like_poisoned(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  const at::Tensor qk = kernel_input(q), kk = kernel_input(k), vk = kernel_input(v);
  const at::Tensor ok = kernel_input(out), dok = kernel_input(dout), lsec = lse.contiguous();
  at::Tensor dqk = kernel_output(dq), dkk = kernel_output(dk), dvk = kernel_output(dv);
  at::Tensor delta = at::empty(lsec.sizes(), lsec.options());  // contiguous like lsec (size-1 dims aside)
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
  p.rows_q_total = q.size(2);  // rows per (batch, head) in the tensors: the delta pass walks all of them
  p.batch_total = q.size(0);
  if (p.batch > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    FA_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      FA_HEADDIM_SWITCH(kernel_head_dim(p), kD, [&] {
        FA_BOOL_SWITCH(dropout, kDrop, [&] { C10_CUDA_CHECK((cuda::run_bwd<T, kD, kDrop>(p, stream))); });
      });
    });
  }
  finish_output(dq, dqk);
  finish_output(dk, dkk);
  finish_output(dv, dvk);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
}

}  // namespace fastattn
