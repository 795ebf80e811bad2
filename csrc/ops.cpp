// Op schemas for fastattn, declared once. Devices register implementations with
// TORCH_LIBRARY_IMPL(fastattn, CPU|CUDA, m) in their own files; fake (meta) functions and
// autograd are registered from Python in fastattn/ops.py.
//
// Conventions shared by every implementation (see csrc/common.h for helpers):
//   q: (B, Hq, Sq, D)   k: (B, Hkv, Sk, D)   v: (B, Hkv, Sk, Dv)   any strides; the Python layer guarantees the
//   last dim has stride 1 (it copies the rare input that does not).
//   Hq % Hkv == 0 (GQA/MQA: query head h reads kv head h / (Hq / Hkv)).
//   Varlen: cu_seqlens_q/k are contiguous int32 (N+1,); then B == 1, q is (1, Hq, total_q, D) and sequence n owns
//     rows [cu_q[n], cu_q[n+1]) of q and [cu_k[n], cu_k[n+1]) of k/v: cu[0] == 0, non-decreasing, cu[N] == total.
//     max_seqlen_* bound every sequence's length. The CPU op checks these values; the CUDA op cannot without a
//     host sync, so its kernels clamp each sequence's rows into the tensors (bad values: wrong results, never
//     accesses outside the tensors) and the Python layer checks the values in eager mode.
//   window_left/right >= -1 (-1 = unlimited); softcap finite and >= 0; dropout_p in [0, 1) also in float32;
//   alibi_slopes contiguous. Every op checks its arguments itself: no argument reaches a kernel unchecked.
//   attn_bias: optional additive bias, same dtype as q, already expanded to (B, Hq, Sq, Sk) with stride 0 on
//     broadcast dims (a key-padding mask has strides (sB, 0, 0, 1)). -inf marks masked positions.
//   Visibility of key j to query i (per sequence, lengths Sq/Sk of that sequence):
//     off = bottom_right ? Sk - Sq : 0
//     visible iff (window_left < 0 || j >= i + off - window_left) && (window_right < 0 || j <= i + off + window_right)
//     Causal is window_right == 0.
//   softcap > 0: s = softcap * tanh(s / softcap) applied to the scaled scores, before alibi and bias.
//   alibi_slopes: optional fp32 (Hq,) or (B, Hq); adds -slope * |i + Sk - Sq - j| to the scores (flash-attn).
//   Dropout: keep with probability 1 - dropout_p, scale kept values by 1/(1-dropout_p); the keep decision is a
//     pure function of (seed, offset, b, head_start + h, i, j) so the backward regenerates it.
//   head_start (fwd, bwd, bwd_acc; last argument, default 0): the query heads of this call are heads
//     head_start .. head_start + Hq - 1 of a larger (unsplit) call, and dropout is keyed by the global head
//     head_start + h, so a call split over heads (Ulysses context parallelism) drops exactly the elements of the
//     unsplit call. head_start >= 0 and head_start + Hq <= 2^31; nothing but the dropout counter reads it.
//   Returns out: (B, Hq, Sq, Dv) in q.dtype, laid out in memory in the same order as q (BSHD memory if
//     q.stride(1) < q.stride(2), else BHSD); lse: (B, Hq, Sq) float32, natural-log log-sum-exp of the scaled,
//     biased scores. Rows with no visible key: out = 0 and lse = +inf (so the backward's exp(s - lse) is 0).
//   bwd returns dq, dk, dv allocated like at::empty_like(q|k|v) (fake functions mirror this). `deterministic`
//   on fwd is unused by kernels; it is there so autograd can hand it to bwd.
//
// Block coordinates (attention over sequence shards, fastattn/blocks.py; context parallelism computes one call as
// block pairs and merges them):
//   q_start, k_start: optional int32 (N,) on q's device, contiguous, given together; N = B, or the number of varlen
//     sequences. Query row i of sequence n sits at global position q_pos = q_start[n] + i, key j at
//     k_pos = k_start[n] + j; values >= 0 and start + length < 2^31. With them every position rule is global:
//       visibility: off = q_start[n] - k_start[n] in the rule above (bottom_right must be false):
//         visible iff (wl < 0 || k_pos >= q_pos - wl) && (wr < 0 || k_pos <= q_pos + wr);
//       alibi: -slope * |q_pos - k_pos|;
//       dropout: the keep decision of (n, h, i, j) is keyed on (q_pos, k_pos) instead of (i, j) (csrc/philox.h).
//     So any split of a call into blocks computes exactly the elements, masks and dropped elements of the unsplit
//     call. Without them nothing changes (dropout keyed on (i, j); alibi aligned with Sk - Sq).
//   out_fp32 (fwd): out is float32 (unrounded accumulator, same memory order), so a caller merging blocks rounds once.
//   bwd_acc: bwd's computation, added in fp32 into dq_acc/dk_acc/dv_acc (float32, q's/k's/v's shapes, stride 1 on
//     the last dim) instead of returned: a block's gradient is never rounded to q.dtype. `out` is q.dtype for bwd
//     and bwd_acc (the caller passes the merged output, rounded once); lse the merged lse.
//   The CUDA op cannot read q_start/k_start values without a host sync: the Python layer checks them in eager
//   mode; bad values shift masks but never cause accesses outside the tensors.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <map>
#include <string>

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, "
      "float softcap, Tensor? alibi_slopes, float dropout_p, SymInt seed, SymInt offset, bool deterministic=False, "
      "Tensor? q_start=None, Tensor? k_start=None, bool out_fp32=False, int head_start=0) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_bias, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap, Tensor? alibi_slopes, "
      "float dropout_p, SymInt seed, SymInt offset, bool deterministic, Tensor? q_start=None, Tensor? k_start=None, "
      "int head_start=0) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "bwd_acc(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_bias, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap, Tensor? alibi_slopes, "
      "float dropout_p, SymInt seed, SymInt offset, bool deterministic, Tensor? q_start, Tensor? k_start, "
      "Tensor(a!) dq_acc, Tensor(b!) dk_acc, Tensor(c!) dv_acc, int head_start=0) -> ()");
  // Decode (inference, no autograd): few query tokens against a KV cache, split over the keys.
  //   q (B, Hq, Sq, D) any strides; k_cache/v_cache in cache layout (Bc, Smax, Hkv, D|Dv), or paged
  //   (num_blocks, page_size, Hkv, D|Dv) with block_table int32 (B, max_blocks); cache_batch_idx int32 (B,)
  //   picks dense cache rows. seqlens_k int32 (B,): valid keys per row (after any append, done by the caller);
  //   None: every row attends the whole cache (Smax, or max_blocks * page keys). kv_bhsd: the caches are given as
  //   (Bc|num_blocks, Hkv, Smax|page, D|Dv) (SDPA's layout: a dense call's k/v pass straight through, no copy);
  //   the op reads them as the view transpose(1, 2), any strides either way.
  //   Visibility per row as above with Sk = seqlens_k[b] and bottom-right alignment. num_splits 0 = heuristic.
  //   attn_bias (last, default None): an additive bias as fwd's, (B, Hq, Sq, Smax) over a dense cache's slots (no
  //   block_table or cache_batch_idx), added after softcap and alibi (a dense call's attn_mask); the CPU kernel
  //   takes it, the CUDA kernel refuses it.
  //   Returns out (B, Hq, Sq, Dv) like fwd, lse (B, Hq, Sq) fp32.
  m.def(
      "decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seqlens_k, Tensor? block_table, "
      "Tensor? cache_batch_idx, float scale, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes, int num_splits, bool kv_bhsd=False, Tensor? attn_bias=None) "
      "-> (Tensor out, Tensor lse)");
}

// decode_fwd is inference-only: without an Autograd kernel torch would only warn and leave the inputs' gradients
// None; this one makes a backward through it raise.
TORCH_LIBRARY_IMPL(fastattn, Autograd, m) { m.impl("decode_fwd", torch::autograd::autogradNotImplementedFallback()); }

namespace fastattn {
bool cuda_built();
namespace cpu::mm {
std::string describe();
std::map<std::string, std::string> report();
void force_fp32(bool on);
double tile_gflops(const std::string& dtype);
}
namespace cpu {
void fp32_gemm_force(int engine);
void fwd_l2_force(int64_t bytes);
void bwd_form_force(int form);
bool scores_on_rows(int64_t sq, int64_t sk, int64_t D);
void scores_on_rows_force(int mode);
std::string mask_band(const at::Tensor& bias);
at::Tensor mask_rows(const at::Tensor& bias);
void mask_band_enable(bool on);
}
namespace lean {
void add_lean(pybind11::module_& m);  // lean.cpp: lean_init, lean_key, cache_key, cache_append
void add_routes(pybind11::module_& m);  // lean_routes.cpp: DecodeRoute, FwdRoute
}
}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn C++ ops; importing this module registers torch.ops.fastattn.*";
  m.def("cuda_built", &fastattn::cuda_built, "True when the CUDA kernels were compiled into this build");
  m.def("cpu_matmul", &fastattn::cpu::mm::describe,
        "CPU model, ISA found, and how the CPU kernels multiply bf16/fp16/fp32 tiles (probed once)");
  m.def("cpu_matmul_report", &fastattn::cpu::mm::report,
        "cpu_matmul as data: CPU model, each low-precision dtype's path (brgemm|fp32), ISA flags");
  m.def("cpu_tile_gflops", &fastattn::cpu::mm::tile_gflops,
        "GFLOP/s of the CPU kernels' own tile product for a dtype ('float32', 'bfloat16', 'float16') on all torch "
        "threads, measured now");
  m.def("cpu_matmul_force_fp32", &fastattn::cpu::mm::force_fp32,
        "Tests: multiply bf16/fp16 tiles in fp32 (the fallback path) in this process while on");
  m.def("cpu_fp32_gemm_force", &fastattn::cpu::fp32_gemm_force,
        "Tests: the fp32 products' engine in this process (0: as timed at start-up, 1: sgemm, 2: oneDNN brgemm)");
  m.def("cpu_fwd_l2_force", &fastattn::cpu::fwd_l2_force,
        "Tests: the L2 bytes the forward's unwindowed tiles are sized to fit in this process (0: this CPU's L2)");
  m.def("cpu_bwd_form_force", &fastattn::cpu::bwd_form_force,
        "Tests: the form of the fp32 backward's packed key blocks on brgemm in this process (0: as this CPU takes it, "
        "1: plain, dV/dK/dQ on sgemm; 2: transposed, all on brgemm)");
  m.def("cpu_scores_on_rows", &fastattn::cpu::scores_on_rows,
        "Whether the fp32 score tiles of a sequence of (sq, sk, head dim) take sgemm on K's rows as given rather than "
        "brgemm's transposed K (csrc/cpu/blas.cpp), in the forward and the backward alike");
  m.def("cpu_scores_on_rows_force", &fastattn::cpu::scores_on_rows_force,
        "Tests: cpu_scores_on_rows in this process (0: its rule, 1: never, 2: always)");
  m.def("cpu_mask_band", &fastattn::cpu::mask_band,
        "Tests: the band the CPU kernels read a (B, H, Sq, Sk) float mask as ('causal', 'causal bottom-right', "
        "'key padding', or '' for none), from its values alone");
  m.def("cpu_mask_rows", &fastattn::cpu::mask_rows,
        "Tests: each row's [lo, hi) between its leading and trailing -inf runs, (B|1, H|1, Sq|1, 2) int32 over the "
        "mask's unbroadcast dims ({Sk, 0} for a row all -inf); empty where the kernels would not read it");
  m.def("cpu_mask_band_enable", &fastattn::cpu::mask_band_enable,
        "Tests: read full masks' structure (causal bands, -inf edges) in this process while on (the default)");
  fastattn::lean::add_lean(m);
  fastattn::lean::add_routes(m);
}
