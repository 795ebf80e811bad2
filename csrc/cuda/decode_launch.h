// Host-side view of the CUDA decode kernels (decode_kernel.cuh): the launcher, explicitly instantiated per dtype in
// instantiations/decode_*.cu (written by generate_instantiations.py), and the switch that turns the runtime head
// dim and query-row count into its template arguments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "decode_params.h"

namespace fastattn {
namespace cuda {

template <typename T, int kHeadDim, int kRows>
cudaError_t run_decode(const DecodeParams& p, cudaStream_t stream);

constexpr int kDecodeMaxRows = 8;   // (Hq / Hkv) * Sq query rows per block; more go to a prefill kernel
constexpr int kDecodeMaxSplitsHost = 64;

}  // namespace cuda
}  // namespace fastattn

// max(D, Dv) -> kernel head dim 32/64/128/256; rows (G * Sq) -> 1/2/4/8 (padded rows are masked).
#define FA_DECODE_HEADDIM_SWITCH(D, K_HEAD_DIM, ...) \
  [&] {                                              \
    if ((D) <= 32) {                                 \
      constexpr int K_HEAD_DIM = 32;                 \
      return __VA_ARGS__();                          \
    } else if ((D) <= 64) {                          \
      constexpr int K_HEAD_DIM = 64;                 \
      return __VA_ARGS__();                          \
    } else if ((D) <= 128) {                         \
      constexpr int K_HEAD_DIM = 128;                \
      return __VA_ARGS__();                          \
    } else {                                         \
      constexpr int K_HEAD_DIM = 256;                \
      return __VA_ARGS__();                          \
    }                                                \
  }()

#define FA_DECODE_ROWS_SWITCH(M, K_ROWS, ...) \
  [&] {                                       \
    if ((M) <= 1) {                           \
      constexpr int K_ROWS = 1;               \
      return __VA_ARGS__();                   \
    } else if ((M) <= 2) {                    \
      constexpr int K_ROWS = 2;               \
      return __VA_ARGS__();                   \
    } else if ((M) <= 4) {                    \
      constexpr int K_ROWS = 4;               \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr int K_ROWS = 8;               \
      return __VA_ARGS__();                   \
    }                                         \
  }()
