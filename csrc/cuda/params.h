// Plain parameter structs handed from the C++ entry point (attention_cuda.cpp) to the kernels.
// Strides are in elements and int64 so batch/head offsets never overflow. Tensors are viewed as
// (B, H, S, D); in varlen mode B == 1 and cu_seqlens pick each sequence's rows, and blockIdx.z is the
// sequence index instead of the batch index.
#pragma once
#include <cstdint>

#include "../philox.h"

namespace fastattn {
namespace cuda {

struct AttnShape {
  int batch;          // B, or the number of sequences in varlen mode
  int h, h_kv;        // query heads, key/value heads (h % h_kv == 0)
  int seqlen_q;       // Sq (max_seqlen_q in varlen mode)
  int seqlen_k;       // Sk (max_seqlen_k in varlen mode)
  int d, dv;          // real head dims (multiples of 8; the kernel's kHeadDim >= max(d, dv))
  const int* cu_seqlens_q;  // nullptr unless varlen
  const int* cu_seqlens_k;
  int total_q, total_k;     // rows per (batch, head) in the q and k tensors: varlen sequences are clamped into them
  float scale;        // softmax scale
  float scale_log2;   // scale * log2(e): scores go through exp2
  int window_left;    // -1 = unlimited; causal is window_right == 0
  int window_right;
  bool bottom_right;  // align the diagonal to the bottom-right corner (off = Sk - Sq)
  // Block coordinates (csrc/ops.cpp): int32 (batch,) global positions of each sequence's first query / key, or
  // nullptr. They set off = q_start - k_start (Mask) and key the dropout counters on global positions; they are
  // never used as addresses, so any values are memory-safe.
  const int* q_start;
  const int* k_start;
};

// Dropout, read only by the kDropout kernel variants (the keep rule is in csrc/philox.h). Filled on the host from
// (seed, offset, dropout_p, head_start) exactly as the CPU kernels do, so both devices drop the same elements.
struct DropoutParams {
  Philox rng;           // key from splitmix64(seed, offset)
  uint32_t threshold;   // drop iff draw < threshold
  float rescale;        // 1 / (1 - dropout_p)
  uint32_t head_start;  // the counters' head is head_start + h (global query heads; < 2^31, checked on the host)
};

// A (B, H, S, D) tensor with its element strides.
struct TensorRef {
  void* ptr;
  int64_t batch_stride, head_stride, row_stride;
};

struct FwdParams : AttnShape {
  TensorRef q, k, v, o;
  float* lse;  // (B, H, Sq) contiguous fp32
  int64_t lse_batch_stride, lse_head_stride;
  bool out_fp32;       // o is float32: the accumulator is stored unrounded
  DropoutParams drop;  // last, so the other members keep their offsets in the no-dropout kernels
};

struct BwdParams : AttnShape {
  TensorRef q, k, v, o, dout, grad_q, grad_k, grad_v;  // grad_*: T, or float32 accumulators with accumulate
  const float* lse;  // (B, H, Sq) contiguous fp32, from the forward
  float* delta;      // (B, H, Sq) contiguous fp32 workspace: rowsum(dO * O)
  int64_t lse_batch_stride, lse_head_stride;
  int64_t batch_total, rows_q_total;  // q's stored batch size and rows per head (the delta pass walks them all)
  bool accumulate;  // bwd_acc: add the fp32 gradients into grad_* (float32) instead of storing them as T
  DropoutParams drop;
};

}  // namespace cuda
}  // namespace fastattn
