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

// Sets p.key_end from key_padding_ends (into `ends`, which must outlive p), then drops p.bias when it is 0 on every
// key the kernels still compute (a plain key-padding mask whose padding is skipped, or an all-visible one): the tiles
// then run as without a mask instead of adding a row of zeros per tile.
void skip_key_padding(CpuParams& p, at::ScalarType dtype, bool backward, std::vector<int64_t>& ends);

// Needs p.out, p.lse, p.dout and writes p.dq, p.dk, p.dv. Deterministic: bitwise identical for any thread count.
template <typename T>
void bwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk);

}  // namespace fastattn::cpu
