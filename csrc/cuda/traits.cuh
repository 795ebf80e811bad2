// Tiling constants for every kernel, in one place. Each warp owns 16 rows of the tile it iterates for
// (queries in the forward and dQ kernels, keys in the dK/dV kernel); head dims above 128 split a key row
// block's dK/dV columns over two warps so the fp32 accumulators stay within 255 registers.
// Shared memory stays <= 96 KiB so every tile fits the 99 KiB opt-in limit of sm_86/sm_89.
#pragma once
#include "primitives.cuh"

namespace fastattn {
namespace cuda {

constexpr int kMaxSmemBytes = 99 * 1024;

template <int kHeadDim_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kHeadDim <= 128 ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;                // queries per block
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 16;  // keys per pipeline stage
  static constexpr int kStages = 2;                          // K/V double buffering
  using TileQ = SmemTile<kBlockM, kHeadDim>;
  using TileKV = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = 2 * (TileQ::kElems + 2 * kStages * TileKV::kElems);
  static_assert(kSmemBytes <= kMaxSmemBytes, "forward tile too large for sm_86/89 shared memory");
};

// dK/dV kernel: a block owns kBlockN keys of one kv head and loops over query tiles (and GQA heads).
template <int kHeadDim_>
struct BwdKVTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kSplitD = kHeadDim > 128 ? 2 : 1;   // warps sharing one 16-key row block
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps / kSplitD;    // keys per block
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : kHeadDim <= 96 ? 32 : 16;  // queries per stage
  static constexpr int kColsPerWarp = kHeadDim / kSplitD;   // dK/dV columns each warp accumulates
  static constexpr int kStages = 2;                         // Q/dO double buffering
  using TileKV = SmemTile<kBlockN, kHeadDim>;
  using TileQ = SmemTile<kBlockM, kHeadDim>;
  static constexpr int kSmemBytes = 2 * (2 * TileKV::kElems + 2 * kStages * TileQ::kElems) +
                                    4 * 2 * kStages * kBlockM;  // + lse and delta per stage
  static_assert(kSmemBytes <= kMaxSmemBytes, "dK/dV tile too large for sm_86/89 shared memory");
};

// dQ kernel: a block owns kBlockM queries of one head and loops over key tiles (no atomics: deterministic).
template <int kHeadDim_>
struct BwdQTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 16;
  static constexpr int kStages = 2;  // K/V double buffering
  using TileQ = SmemTile<kBlockM, kHeadDim>;
  using TileKV = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = 2 * (2 * TileQ::kElems + 2 * kStages * TileKV::kElems);
  static_assert(kSmemBytes <= kMaxSmemBytes, "dQ tile too large for sm_86/89 shared memory");
};

}  // namespace cuda
}  // namespace fastattn
