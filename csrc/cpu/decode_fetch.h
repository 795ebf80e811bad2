// How the CPU decode kernel (decode.cpp) reads a cache: whether the hardware prefetchers alone or software fetches
// bring its rows in ahead, how far ahead and into which cache (and the fetches themselves, fetch_ahead), and how a row
// alone on its KV head streams. A policy
// per CPU, measured (the figures below), switched per call by environment variables so that tests and benchmarks
// compare every choice in one process. No choice here changes a result's bits.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile.h"  // amd_cpu, cpu_family, vec::prefetch

namespace fastattn::cpu::decode {

// How far ahead Fetch::stream fetches rows (~100 ns of memory latency covered): 64 keys on the Intel Xeon (best of
// 32-256 there), 32 on AMD CPUs (measured on the Zen 5, the only one that streams unless FASTATTN_CPU_PREFETCH asks;
// decode_fwd_cpu), where 64 keys' fetches cost fp32 steps on a cache reused within the L3 more
// (one thread, 2026-12-07, B1 H12 D=64 / B1 H8 D=128, 512-2048 keys, one token: 0.93-1.07x torch's SDPA at 64 keys
// ahead, 1.04-1.19x at 32, 1.25-1.36x without fetches) and read no faster from memory (bench_decode_memory.py, 16
// rounds: fp32 1.41-2.64x at 64, 1.57-2.67x at 32, 1.58-2.74x at 16; bf16 / fp16 13.2-33.4x / 12.6-33.4x /
// 12.1-26.1x).
constexpr int64_t kAheadKeys = 64, kAheadKeysAmd = 32;
// Fetch::stream fetches into the L1 where an item's rows fetched ahead (kAheadKeys keys of its KV heads' keys and
// values) take at most this, a third of a 48 KB L1, else into the L2. Intel Xeon (AMX), one thread, 2026-12-05, the
// kernel timed alone in C++ on 12-head caches, L1 against L2: 16 KB ahead (bf16 / fp16 MHA D=64, fp32 D=32, bf16 GQA
// 16/4 D=64) on one cache reused 0-13% faster (bf16 D=64 12% at 512 keys), from memory level (within +-5%, the
// spread run to run); 32 KB ahead (fp32 MHA D=64, bf16 D=128) 3-10% slower, bf16 GQA 16/4 D=128 5-10% slower from
// memory. The same bits either way.
constexpr int64_t kL1AheadBytes = 16 << 10;
// Whether a row alone on its KV head at head dim <= 64 streams each key's row (scores_avx512_row, 8-lane pv_avx2;
// faster on the AMD EPYC Zen 4) or takes the 16-lane chunk kernels (faster on the Intel Xeon; decode_tiles.h,
// pv_avx512, has both measurements). Same bits either way. FASTATTN_CPU_LONE_ROW=stream|chunks picks one on any CPU
// (tests run both); read per call, as the other test switches.
inline bool lone_row_stream() {
  const char* env = std::getenv("FASTATTN_CPU_LONE_ROW");
  if (env != nullptr && std::strcmp(env, "stream") == 0) return true;
  if (env != nullptr && std::strcmp(env, "chunks") == 0) return false;
  return amd_cpu();
}

// How a dense cache's keys and values are fetched ahead of the block helpers (none changes a result):
//   stream  the helpers fetch each row kAheadKeys (kAheadKeysAmd) keys ahead as they read one (fetch_ahead
//           below), into the L1 or the L2 (kL1AheadBytes);
//   block   prefetch_block: the next block's rows, all at the start of each block;
//   none    the hardware prefetchers alone.
// Intel Xeon (AMX), one thread, caches from memory as in generate() (benchmarks/bench_decode_memory.py --switch
// FASTATTN_CPU_PREFETCH=none,block,stream, 2026-12-05), none / block / stream: bf16 MHA D=64 at 4096 keys 0.83x /
// 1.06x / 1.29x PyTorch's SDPA, bf16 GQA 16/4 D=128 1.21x / 1.55x / 1.83x, fp32 MHA D=64 1.16x / 1.23x / 1.33x, fp32
// GQA 2.24x / 2.41x / 2.83x, fp16 1.56x / 1.61x / 1.78x; one cache reused (in the L2) stream reads as none and block
// 10-16% slower (its burst of fetches stalls the block it precedes). 64 keys ahead read best of 32-256.
// AMD EPYC Zen 5 (family 26, AVX-512, 1 MB L2, 32 MB L3; 2026-12-07, the same bench, 24 rounds, stream then 64 keys
// ahead), none / block / stream, one thread: fp32 MHA D=64 at 512 / 4096 keys 1.26x / 1.27x, 1.12x / 1.15x, 1.34x /
// 1.43x; fp32 MHA D=128 1.28x / 1.57x / 1.59x; fp32 GQA 16/4 and 32/8 D=128 1.09-1.25x / 1.44-1.67x / 1.99-2.41x;
// bf16 6.2-8.2x / 7.2-13.7x / 13.1-29.3x; fp16 8.1x / 10.7x / 17.3x. Two threads alike: fp32 1.18-1.79x / 1.11-2.32x /
// 1.22-3.05x, bf16 and fp16 6.7-8.2x / 8.4-13.2x / 14.6-25.4x. fp32 steps of 2-4 tokens on one cache of 17-34 MB
// reused (B1-4, 1024-4096 keys): 0.78-1.78x none, 1.55-2.92x stream (none had left MHA steps at 0.78-0.87x torch).
// One reused cache of 3-13 MB reads faster without fetches (kAheadKeysAmd), a cache generate() does not reuse before
// its other layers have passed through. AMD CPUs before family 26 keep `none`, what their rules were
// measured with (stream not compared there). FASTATTN_CPU_PREFETCH picks one on any CPU (read per call).
enum class Fetch { none, block, stream };
inline Fetch fetch_mode() {
  const char* env = std::getenv("FASTATTN_CPU_PREFETCH");
  if (env != nullptr && std::strcmp(env, "none") == 0) return Fetch::none;
  if (env != nullptr && std::strcmp(env, "block") == 0) return Fetch::block;
  if (env != nullptr && std::strcmp(env, "stream") == 0) return Fetch::stream;
  return amd_cpu() && cpu_family() < 26 ? Fetch::none : Fetch::stream;
}

inline int64_t ahead_keys() { return amd_cpu() ? kAheadKeysAmd : kAheadKeys; }  // Fetch::stream's distance

// How far ahead of the rows they read the block helpers fetch the cache (fetch_ahead): bytes from a key's (value's)
// row to the row kAheadKeys keys later (0: none), and into which cache: the L1 (prefetcht0) where the rows fetched
// ahead of an item fit it beside the block being read, else the L2 (decode.cpp sets both).
struct Ahead {
  int64_t bytes = 0;
  bool l1 = false;
};

// How the block helpers read the cache, set per call (decode.cpp). lone: a row alone on its KV head at head dim
// <= 64 streams each key's row (scores_avx512_row, 8-lane pv_avx2) instead of taking the 16-lane chunk kernels.
// k_ahead / v_ahead: the keys' and the values' fetch ahead. k_stride / v_stride: elements from one key's (value's)
// row to the next where the cache is dense (0: paged, or widened copies), so that helpers which take it address a
// key by its index instead of the block's row table. None changes any result.
struct Stream {
  bool lone = false;
  Ahead k_ahead, v_ahead;
  int64_t k_stride = 0, v_stride = 0;
};

// Prefetch `bytes` of each of rows[0, n) ahead.bytes on. Issued a few rows per step of the helpers' loops, the
// fetches overlap the arithmetic; the hardware prefetchers alone left one-token steps waiting on memory.
template <typename T>
inline void fetch_ahead(const T* const* rows, int64_t n, Ahead ahead, int64_t bytes) {
  if (ahead.bytes == 0) return;
  for (int64_t u = 0; u < n; ++u) {  // each line of [a, a + bytes): the first and last, then any between
    const uintptr_t a = reinterpret_cast<uintptr_t>(rows[u]) + ahead.bytes, last = (a + bytes - 1) & ~uintptr_t{63};
    vec::prefetch(reinterpret_cast<const char*>(a), ahead.l1);
    vec::prefetch(reinterpret_cast<const char*>(last), ahead.l1);
    for (uintptr_t line = (a & ~uintptr_t{63}) + 64; line < last; line += 64) {
      vec::prefetch(reinterpret_cast<const char*>(line), ahead.l1);
    }
  }
}

// fetch_ahead for nk rows a fixed stride apart (bytes): the lines of each row from its address, no table.
inline void fetch_ahead_strided(const char* row0, int64_t nk, int64_t stride, Ahead ahead, int64_t bytes) {
  if (ahead.bytes == 0) return;
  const char* a = row0 + ahead.bytes;
  const bool aligned = ((reinterpret_cast<uintptr_t>(a) | stride | bytes) & 63) == 0;
  if (aligned && stride == bytes) {  // rows back to back: one run of lines
    for (int64_t c = 0; c < nk * bytes; c += 64) vec::prefetch(a + c, ahead.l1);
    return;
  }
  for (int64_t u = 0; u < nk; ++u, a += stride) {
    for (int64_t c = 0; c < bytes; c += 64) vec::prefetch(a + c, ahead.l1);
    if (!aligned) vec::prefetch(a + bytes - 1, ahead.l1);
  }
}

// The fetch ahead for row r (off: each row's KV head offset): `ahead` for the first row of a run reading one KV
// head, which fetches for all of them, none for the others.
inline Ahead row_ahead(const int64_t* off, int64_t r, Ahead ahead) {
  return r == 0 || off[r] != off[r - 1] ? ahead : Ahead{};
}

}  // namespace fastattn::cpu::decode
