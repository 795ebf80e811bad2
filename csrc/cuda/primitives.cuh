// Warp-level building blocks shared by the forward and backward kernels: cp.async staging of global tiles
// into shared memory, ldmatrix fragment loads, mma.sync m16n8k16 on tensor cores, and two warp GEMMs.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with f16/bf16 inputs, f32 accumulators), lane = 4 * g + t:
//   accumulator C (16x8): c[0], c[1] = row g, cols 2t, 2t+1;  c[2], c[3] = row g + 8, same cols.
//   A (16x16, row-major) 4 regs: (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..).
//   B (16x8, "col")      2 regs: (k 2t.., n g), (k 2t+8.., n g).
// So a 16 x 16k block of accumulators is already an A operand after packing to 16 bits: the softmax
// probabilities P never leave registers on their way into P @ V (FlashAttention-2).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

// FASTATTN_CUDA_EMULATE: the kernels compile as host C++ against tests/cuda_emu/emu.h (included first), which
// runs them on the CPU; only the PTX below and the dynamic shared memory declaration differ.
#ifdef FASTATTN_CUDA_EMULATE
#ifndef FASTATTN_CUDA_EMU_H
#error "FASTATTN_CUDA_EMULATE: include tests/cuda_emu/emu.h before the kernels"
#endif
#define FA_DYN_SMEM(name) unsigned char* const name = ::emu::g_dyn_smem
#else
#define FA_DYN_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace fastattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A shared-memory tile of kRows rows x kCols 16-bit elements, addressed in 16-byte chunks of 8 elements.
// ldmatrix reads one chunk from each of 8 consecutive rows per phase; to keep those 8 reads in 8 different
// bank groups the chunk index is XOR-swizzled with (row % 8) when a row holds a multiple of 8 chunks
// (128-byte rows), and otherwise each row is padded by one chunk (rows of 5 or 13 chunks: odd strides).
template <int kRows, int kCols>
struct SmemTile {
  static_assert(kCols % 16 == 0, "tile width must be a multiple of 16");
  static constexpr int kChunks = kCols / 8;
  static constexpr bool kSwizzle = kChunks % 8 == 0;
  static constexpr int kRowElems = kSwizzle ? kCols : kCols + 8;
  static constexpr int kElems = kRows * kRowElems;
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * kRowElems + (kSwizzle ? (chunk ^ (row & 7)) : chunk) * 8;
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; with valid == false nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::cp_async16(dst, src, valid);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::ldsm_x4(r, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::ldsm_x4(r, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::mma16816(c, a, b0, b1, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#ifdef FASTATTN_CUDA_EMULATE
  ::emu::mma16816(c, a, b0, b1, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats -> one register of two 16-bit values (lo in the low half, as mma expects).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <int N>
__device__ __forceinline__ void zero(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.f;
}

// Issues cp.async for a (kRows x kCols) tile at g (rows row_stride elements apart). Rows >= rows_valid and
// columns >= cols_valid (a multiple of 8) are zero-filled, so padded head dims and ragged sequence ends
// contribute exact zeros to every product. g must point at a readable element (row 0 of the tile).
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row_stride, int rows_valid, int cols_valid,
                                          int tid) {
  using Tile = SmemTile<kRows, kCols>;
  constexpr int kTotal = kRows * Tile::kChunks;
#pragma unroll 1  // issue-only loop: rolled, so its addresses are not kept live across the main loop
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int idx = it * kThreads + tid;
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const int r = idx / Tile::kChunks, c = idx % Tile::kChunks;
      const bool ok = r < rows_valid && c * 8 < cols_valid;
      const T* src = ok ? g + r * row_stride + c * 8 : g;
      cp_async16(smem_u32(smem + Tile::offset(r, c)), src, ok);
    }
  }
}

// Copies the valid part of a (kRows x kCols) smem tile to global memory with 16-byte stores.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T* g, int64_t row_stride, const T* smem, int rows_valid, int cols_valid,
                                           int tid) {
  using Tile = SmemTile<kRows, kCols>;
  constexpr int kTotal = kRows * Tile::kChunks;
#pragma unroll 1  // epilogue only: a rolled loop keeps the prologue's load offsets from staying live
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int idx = it * kThreads + tid;
    if (kTotal % kThreads == 0 || idx < kTotal) {
      const int r = idx / Tile::kChunks, c = idx % Tile::kChunks;
      if (r < rows_valid && c * 8 < cols_valid) {
        *reinterpret_cast<uint4*>(g + r * row_stride + c * 8) =
            *reinterpret_cast<const uint4*>(smem + Tile::offset(r, c));
      }
    }
  }
}

// Writes a warp's 16 x (8 * kNT) accumulator block, times a per-row factor, into a smem tile at (row0, col0).
template <typename Tile, typename T, int kNT>
__device__ __forceinline__ void store_frag(T* smem, const float (&acc)[kNT][4], const float (&mul)[2], int row0,
                                           int col0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = col0 + nt * 8 + 2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(smem + Tile::offset(row, col >> 3) + (col & 7)) =
          pack2<T>(acc[nt][2 * r] * mul[r], acc[nt][2 * r + 1] * mul[r]);
    }
  }
}

// Writes (kAdd: adds to) a warp's 16 x (8 * kNT) accumulator block, times a per-row factor, unrounded into fp32
// global memory: rows row0 + (0..15) and columns col0 + (0..8 kNT) of g, skipping rows >= rows_valid and columns >=
// cols_valid (a multiple of 8). Column pairs as 8-byte accesses (g 8-byte aligned, row_stride even); every element
// belongs to one thread, so the read-modify-write of kAdd needs no atomics. The fp32 outputs (out_fp32, bwd_acc).
template <bool kAdd, int kNT>
__device__ __forceinline__ void store_frag_f32(float* g, int64_t row_stride, const float (&acc)[kNT][4],
                                               const float (&mul)[2], int row0, int col0, int rows_valid,
                                               int cols_valid, int lane) {
  const int gr = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = col0 + nt * 8 + 2 * t;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + gr + 8 * r;
      if (row < rows_valid && col < cols_valid) {
        float2* dst = reinterpret_cast<float2*>(g + row * row_stride + col);
        float2 v = make_float2(acc[nt][2 * r] * mul[r], acc[nt][2 * r + 1] * mul[r]);
        if constexpr (kAdd) {
          const float2 old = *dst;
          v.x += old.x;
          v.y += old.y;
        }
        *dst = v;
      }
    }
  }
}

// acc (16 x kN) += A[a_row0 : a_row0+16, 0:kK] @ B[b_row0 : b_row0+kN, 0:kK]^T, both operands in smem with
// the contraction dim contiguous (Q K^T, K Q^T, dO V^T, V dO^T).
template <typename T, int kN, int kK, typename TileA, typename TileB>
__device__ __forceinline__ void gemm_abt(float (&acc)[kN / 8][4], const T* sA, int a_row0, const T* sB, int b_row0,
                                         int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "warp gemm sizes");
  const uint32_t a_base = smem_u32(sA), b_base = smem_u32(sB);
  const int a_row = a_row0 + (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
  const int b_row = b_row0 + (lane & 7) + (lane >> 4) * 8, b_chunk = (lane >> 3) & 1;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, a_base + 2 * TileA::offset(a_row, 2 * kk + a_chunk));
#pragma unroll
    for (int nt = 0; nt < kN / 16; ++nt) {
      uint32_t b[4];
      ldsm_x4(b, b_base + 2 * TileB::offset(b_row + 16 * nt, 2 * kk + b_chunk));
      mma16816<T>(acc[2 * nt], a, b[0], b[1]);
      mma16816<T>(acc[2 * nt + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x kN) += P (16 x kK, fp32 accumulator fragments in registers) @ B[b_row0 : b_row0+kK, n_col0 : n_col0+kN],
// B in smem with the output dim contiguous, read transposed by ldmatrix (P V, P^T dO, dS^T Q, dS K).
template <typename T, int kN, int kK, typename TileB>
__device__ __forceinline__ void gemm_pb(float (&acc)[kN / 8][4], const float (&p)[kK / 8][4], const T* sB, int b_row0,
                                        int n_col0, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "warp gemm sizes");
  const uint32_t b_base = smem_u32(sB);
  const int b_row = b_row0 + (lane & 7) + ((lane >> 3) & 1) * 8, b_chunk = (n_col0 >> 3) + (lane >> 4);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nt = 0; nt < kN / 16; ++nt) {
      uint32_t b[4];
      ldsm_x4_trans(b, b_base + 2 * TileB::offset(b_row + 16 * kk, b_chunk + 2 * nt));
      mma16816<T>(acc[2 * nt], a, b[0], b[1]);
      mma16816<T>(acc[2 * nt + 1], a, b[2], b[3]);
    }
  }
}

}  // namespace cuda
}  // namespace fastattn
