// Host-side view of the kernels: the launchers (explicitly instantiated once per dtype x head dim x dropout in
// instantiations/*.cu, written by generate_instantiations.py) and the switch macros that turn the runtime
// dtype, head dim and dropout flag into those template arguments. Causal/window/varlen are runtime: one
// kernel each. Dropout is compile-time so the plain kernels carry no RNG code or registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "params.h"

namespace fastattn {
namespace cuda {

template <typename T, int kHeadDim, bool kDropout>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream);
template <typename T, int kHeadDim, bool kDropout>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream);

// Kernel head dims; any D <= 256 runs the smallest one that fits, with masked loads and stores.
constexpr int kHeadDims[] = {32, 64, 96, 128, 256};

}  // namespace cuda
}  // namespace fastattn

#define FA_DTYPE_SWITCH(DTYPE, T, ...)              \
  [&] {                                             \
    if ((DTYPE) == at::kHalf) {                     \
      using T = __half;                             \
      return __VA_ARGS__();                         \
    } else {                                        \
      using T = __nv_bfloat16;                      \
      return __VA_ARGS__();                         \
    }                                               \
  }()

#define FA_HEADDIM_SWITCH(D, K_HEAD_DIM, ...) \
  [&] {                                       \
    if ((D) <= 32) {                          \
      constexpr int K_HEAD_DIM = 32;          \
      return __VA_ARGS__();                   \
    } else if ((D) <= 64) {                   \
      constexpr int K_HEAD_DIM = 64;          \
      return __VA_ARGS__();                   \
    } else if ((D) <= 96) {                   \
      constexpr int K_HEAD_DIM = 96;          \
      return __VA_ARGS__();                   \
    } else if ((D) <= 128) {                  \
      constexpr int K_HEAD_DIM = 128;         \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr int K_HEAD_DIM = 256;         \
      return __VA_ARGS__();                   \
    }                                         \
  }()

#define FA_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                 \
    if (COND) {                         \
      constexpr bool NAME = true;       \
      return __VA_ARGS__();             \
    } else {                            \
      constexpr bool NAME = false;      \
      return __VA_ARGS__();             \
    }                                   \
  }()
