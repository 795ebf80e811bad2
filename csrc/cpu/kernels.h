// Entry points of the CPU kernels (fwd.cpp, bwd.cpp), called from register.cpp with a filled CpuParams.
#pragma once
#include <vector>

#include "params.h"

namespace fastattn::cpu {

// max_sq, max_sk: the longest query / key sequence (Sq, Sk, or the max over varlen sequences).
template <typename T>
void fwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

// The matrix-unit path (fwd_lowp.cpp, bwd_lowp.cpp): T is BFloat16 or Half; call only where mm::path(T) is kBrgemm.
template <typename T>
void fwd_lowp_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);
template <typename T>
void bwd_lowp_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

// delta (B, Hq, Sq) fp32, laid out like lse: rowsum(dO * O) over Dv, the backward's preprocess.
template <typename T>
void compute_delta(const CpuParams& p, float* delta);

// Per batch, where the keys a key-padding bias leaves visible end, or Sk where skipping the rest would not be exact
// (key_end.cpp); empty when too few keys are padding, or p has no key-padding bias. backward: p.dout and p.out are
// set and bounded too.
std::vector<int64_t> key_padding_ends(const CpuParams& p, at::ScalarType dtype, bool backward);

// Every term touching keys [k0, Sk) of batch b is finite and far from overflow (bounds on Q, those K/V rows, and
// with `backward` dO and O), so -inf scores there give P = 0 and dS = 0 exactly and the kernels may skip them.
bool terms_bounded(const CpuParams& p, at::ScalarType dtype, int64_t b, int64_t k0, bool backward);

// A full mask (bias) that is a causal mask (top-left or bottom-right) or none, times one key-padding row per batch,
// of 0 and -inf only: p then runs as that causal call with its key-padding row (mask_band.cpp), so the kernels
// skip the blocks the mask hides. Left as it is when any term there could be NaN or Inf (terms_bounded).
void read_mask_band(CpuParams& p, at::ScalarType dtype, bool backward);

// For a bias (after read_mask_band: a full mask that is no band, or a key-padding row), each row's keys between its
// leading and trailing -inf runs (into `store`, which must outlive p; p.mask_keys), where those runs hold at least
// 1/16 of the scores and the terms are bounded: the kernels then skip the tiles outside every row's range (a
// key-padding row's leading padding; key_end.cpp its trailing padding, a row no longer added where it ends in 0s).
void mask_key_ranges(CpuParams& p, at::ScalarType dtype, bool backward, std::vector<int32_t>& store);

// Sets p.key_end from key_padding_ends (into `ends`, which must outlive p), then drops p.bias when it is 0 on every
// key the kernels still compute (a plain key-padding mask whose padding is skipped, or an all-visible one): the tiles
// then run as without a mask instead of adding a row of zeros per tile.
void skip_key_padding(CpuParams& p, at::ScalarType dtype, bool backward, std::vector<int64_t>& ends);

// Needs p.out, p.lse, p.dout and writes p.dq, p.dk, p.dv. Deterministic: bitwise identical for any thread count.
template <typename T>
void bwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

}  // namespace fastattn::cpu
