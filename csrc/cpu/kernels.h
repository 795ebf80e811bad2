// Entry points of the CPU kernels (fwd.cpp, bwd.cpp), called from register.cpp with a filled CpuParams.
#pragma once
#include <string>
#include <vector>

#include "params.h"
#include "workspace.h"  // SharedBuffer: DqPartials' buffer

namespace fastattn::cpu {

// max_sq, max_sk: the longest query / key sequence (Sq, Sk, or the max over varlen sequences).
template <typename T>
void fwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

// Query heads per forward task (FwdOrder in params.h; fwd.cpp): more than 1 only where heads share a bias read by row.
// nqb: query blocks per head; kv_bytes: one kv head's K/V as the tiles read them; bias_bytes: one head's bias.
int64_t fwd_chunk_heads(const CpuParams& p, int64_t nqb, int64_t kv_bytes, int64_t bias_bytes);

// The matrix-unit path (fwd_lowp.cpp, bwd_lowp.cpp): T is BFloat16 or Half; call only where mm::path(T) is kBrgemm,
// or (Half) where fp16_on_pairs.
template <typename T>
void fwd_lowp_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);
// Whether an fp16 forward (backward) runs on bf16 pairs (fwd_lowp.cpp): where mm::fp16_pairs() and they pay (or are
// forced); rows_per_kv_head query rows read each kv head's keys (Sq, times the group where its heads share the
// packed K/V), max_sk the longest key sequence.
bool fp16_on_pairs(int64_t rows_per_kv_head, int64_t max_sk, bool backward);
template <typename T>
void bwd_lowp_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

// The backward of calls of few query rows per KV head (register.cpp, few_rows_in_one_pass), in one pass over each KV
// head's keys (bwd_rows.cpp): no varlen, block coordinates, dropout or accumulators. Deterministic, as bwd_kernel.
template <typename T>
void bwd_rows_kernel(const CpuParams& p);
// Those rules (forward and backward), for `info` and the benchmarks' CPU line (register.cpp; FASTATTN_CPU_FEW_ROWS
// as now set).
std::string few_rows_describe();

// dQ of kv head hk's query heads [g0, g1) of the group (sequence s): the sum of the key chunks' (group, sq, D) fp32
// partials parts[c], added in chunk order, times mul, written as T (or added into bwd_acc's accumulators; bwd.cpp).
template <typename T>
void write_dq(const CpuParams& p, const SeqInfo& s, int64_t hk, const float* const* parts, int64_t chunks, float mul,
              int64_t g0, int64_t g1);
// A backward's cut into key chunks (params.h bwd_key_chunks) for `pairs` (sequence, kv head) pairs of key_blocks
// blocks, and where it cuts, the chunks' dQ partials: fp32, `part` floats a pair and chunk, at base() + (pair *
// chunks + c) * part, from the buffer the process keeps (workspace.h SharedBuffer).
struct DqPartials {
  KeyChunks cut;
  SharedBuffer buf;
  DqPartials(int64_t pairs, int64_t key_blocks, int64_t part)
      : cut(bwd_key_chunks(pairs, key_blocks, part * 4)),
        buf(cut.chunks > 1 ? sizeof(float) * pairs * cut.chunks * part : 0, cut.max_bytes) {}
  float* base() const { return buf.as<float>(); }
};
// write_dq for every (sequence, kv head) pair cut into key chunks, one task per query head: the partial of pair and
// chunk c at parts + (pair * chunks + c) * part.
template <typename T>
void write_dq_chunks(const CpuParams& p, const float* parts, int64_t part, int64_t chunks, float mul);

// Whether FASTATTN_CPU_PLANT (tests only; read once) names `name`, a planted bug the correctness checks must catch
// (mask_band.cpp).
bool planted(const char* name);

// delta (B, Hq, Sq) fp32, laid out like lse: rowsum(dO * O) over Dv, the backward's preprocess.
template <typename T>
void compute_delta(const CpuParams& p, float* delta);

// Per batch, where the keys a key-padding bias leaves visible end, or Sk where skipping the rest would not be exact
// (key_end.cpp); empty when too few keys are padding, or p has no key-padding bias. backward: p.dout and p.out are
// set and bounded too.
std::vector<int64_t> key_padding_ends(const CpuParams& p, at::ScalarType dtype, bool backward);

// Every term touching keys [k0, k1) of batch b is finite and far from overflow (bounds on Q, those K/V rows, and
// with `backward` dO and O), so -inf scores there give P = 0 and dS = 0 exactly and the kernels may skip them. The
// pass reads those K/V rows: bound only the keys skipped (a decode step's whole cost is one read of K and V).
bool terms_bounded(const CpuParams& p, at::ScalarType dtype, int64_t b, int64_t k0, int64_t k1, bool backward);

// Everything the kernels read from a call's bias before they run, in this order: a causal band (read_mask_band),
// the rows' -inf edges (mask_key_ranges), trailing key padding (skip_key_padding). p points into `store`, which must
// outlive it. backward: p.dout and p.out are set (their bounds count too).
struct MaskStore {
  std::vector<int32_t> keys;  // p.mask_keys
  std::vector<int64_t> ends;  // p.key_end
};
void read_mask(CpuParams& p, at::ScalarType dtype, bool backward, MaskStore& store);

// Sets p.key_end from key_padding_ends (into `ends`, which must outlive p), then drops p.bias when it is 0 on every
// key the kernels still compute (a plain key-padding mask whose padding is skipped, or an all-visible one): the tiles
// then run as without a mask instead of adding a row of zeros per tile.
void skip_key_padding(CpuParams& p, at::ScalarType dtype, bool backward, std::vector<int64_t>& ends);

// Needs p.out, p.lse, p.dout and writes p.dq, p.dk, p.dv. Deterministic: bitwise identical for any thread count.
template <typename T>
void bwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

namespace decode {
// How the decode kernel fetches the cache ahead of its reads on this CPU and with FASTATTN_CPU_PREFETCH as now set
// (decode_fetch.h, fetch_mode): for `info` and the benchmarks' CPU line.
std::string fetch_describe();

// The fwd op's call (q (B, Hq, Sq, D), k / v (B, Hkv, Sk, .), bias (B, Hq, Sq, Sk) in q's dtype or none; windows
// bottom-right) on the split-KV decode kernel, for calls of few query rows per KV head (register.cpp,
// few_rows_on_decode: up to 2 at head dims from 48, or 4 against 512 keys or more from 64). One key split: the same
// bits for any thread count, as the prefill kernel's.
std::tuple<at::Tensor, at::Tensor> dense_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& bias, double scale,
                                             int64_t window_left, int64_t window_right, double softcap,
                                             const std::optional<at::Tensor>& alibi_slopes);
}  // namespace decode

}  // namespace fastattn::cpu
