// Tile products on the CPU's matrix units: bf16/fp16 operands, fp32 accumulation, through the batch-reduce GEMM
// of oneDNN that libtorch exports (at::native::cpublas::brgemm). oneDNN generates the kernel for the CPU it runs
// on: AMX tiles on Intel Sapphire Rapids and newer, AVX512-BF16 dot products (vdpbf16ps) on AMD Zen 4/5 and Intel
// without AMX; fp16 on AMX-FP16 (Granite Rapids). Whether a dtype can take this path is probed once at run time (a
// small product checked against an fp32 one) and, where oneDNN has no AMX, timed against sgemm on the forward's score
// tile (brgemm must be 1.2x faster); otherwise, or with FASTATTN_CPU_MATMUL=fp32, the kernels convert tiles to fp32
// and use sgemm (tile.h). FASTATTN_CPU_MATMUL=brgemm takes brgemm wherever it is exact.
//
// The right operand B (k x n) is given in VNNI layout, the one the hardware's dot products read: pairs of
// consecutive k rows interleaved, B_vnni[((kk / 2) * ldb + j) * 2 + kk % 2] = B[kk][j], with k padded to even.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>

namespace fastattn::cpu::mm {

// How a dtype's tiles are multiplied on this machine (decided once per process).
enum class Path { kFp32 = 0, kBrgemm = 1 };

Path path(at::ScalarType dt);
// fp16's forward and backward on bf16 matrix units as exact pairs (lowp.h KVBlocks: each fp16 value the sum of two
// bf16, three products a tile): where fp16 itself has no matrix-unit path here but bf16 has AMX (Intel Sapphire /
// Emerald Rapids), whose bf16 rate is ~7x the fp32 FMAs'. Without AMX (AVX512-BF16 dot products at ~2x fp32) three
// products cost more than the fp32 tiles' one. FASTATTN_CPU_FP16_PAIRS=0 never takes them, =1 wherever bf16 takes
// brgemm exactly, for every fp16 call (tests: fp16_pairs_forced); FASTATTN_CPU_MATMUL=fp32 and force_fp32 turn them
// off. Where they pay: kernels.h fp16_on_pairs.
bool fp16_pairs();
bool fp16_pairs_forced();  // FASTATTN_CPU_FP16_PAIRS=1: whatever the call's size
// FASTATTN_CPU_PLANT=pairs_lo (tests only): every pair's lo is zero, a bug the fp16 checks must catch;
// =pairs_lo_bwd: in the backward's pairs only (its gradients' checks must catch it alone).
bool plant_pairs_lo(bool backward);
// Tests: force the fp32 tiles for every dtype in this process (FASTATTN_CPU_MATMUL=fp32 does it at start-up).
void force_fp32(bool on);
// One line for `python -m fastattn.info`: CPU model, ISA found, and the path of each dtype with its reason.
std::string describe();
// The same as data: {"cpu" (model), "vendor" (cpuid: "GenuineIntel", "AuthenticAMD", ...), "fp32": "sgemm"|"brgemm"
// (the fp32 engine), "bf16"/"fp16": "brgemm"|"fp32", "fp16_forward", "fp16_backward": "brgemm"|"bf16_pairs"|"fp32"
// (fp16_pairs), ISA flags "amx_bf16", ... : "1"|"0" (cpuid), "amx_bf16_usable"/"amx_fp16_usable": "1"|"0"
// (oneDNN's view), "bf16_brgemm_gflops", "bf16_fp32_gflops", ...: the timed tile rates ("0" where not timed)}.
std::map<std::string, std::string> report();

// GFLOP/s of the kernels' own tile product for dtype ('float32', 'bfloat16', 'float16'): the forward's score tile
// (64 x 512 x 128) on the path the dtype takes (brgemm in it, fp16's bf16 pairs (a third of bf16's rate: three
// products each), or fp32 tiles on the fp32 engine), measured now on all at::get_num_threads() threads at once (the
// best round's wall time). The benchmark's matmul ceiling where torch's square matmul trails it (MKL's sgemm on AMD).
double tile_gflops(const std::string& dtype);

// C (m x n, ldc) = [C +] A (m x k, lda, row-major) B (k x n, VNNI, ldb >= n); k even. T: BFloat16 or Half.
template <typename T>
void mm_vnni(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
             int64_t ldc, bool accumulate);

// Frees the thread's matrix-unit state (AMX tile configuration); call once at the end of a parallel task range.
void release();

// VNNI of B = src (rows x cols; row stride ss, column stride sd): k = rows padded to even with a zero row,
// n = cols, ldb = ld (>= cols).
template <typename T>
void pack_rows(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t ld, T* dst);

// VNNI of B = src^T for src (rows x cols): k = cols padded to even with zeros, n = rows, ldb = ld (>= rows).
// Pairs of a source row are 32-bit words, so this is a transpose of words.
template <typename T>
void pack_transposed(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t ld, T* dst);

// Row-major copy dst (rows x cols_pad, ld) of src with columns cols..cols_pad zeroed (a left operand).
template <typename T>
void copy_rows(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t cols_pad, int64_t ld,
               T* dst);

// dst (cols x ld) = src^T for src (rows x cols; row stride ss, column stride sd): dst[c * ld + r] = src[r][c], with
// column `rows` zeroed where rows is odd (a left operand whose inner dimension is padded to even).
template <typename T>
void transpose(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t ld, T* dst);

inline int64_t even(int64_t x) { return (x + 1) & ~int64_t(1); }

}  // namespace fastattn::cpu::mm
