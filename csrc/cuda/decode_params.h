// Plain parameter struct for the CUDA split-KV decode kernels (decode_kernel.cuh), filled by decode_cuda.cpp.
// Strides are in elements, int64. Caches are (rows, slots, Hkv, D): a dense cache has rows = batch entries and
// slots = positions; a paged cache has rows = pages and slots = positions within a page.
#pragma once
#include <cstdint>

namespace fastattn {
namespace cuda {

struct DecodeParams {
  const void* q;  // (B, Hq, Sq, D), any strides (read element by element)
  const void* k;  // cache, rows 16-byte aligned (checked by the entry point)
  const void* v;
  void* out;      // (B, Hq, Sq, Dv)
  float* lse;     // (B, Hq, Sq) contiguous
  float* out_part;  // (splits, B, Hq, Sq, Dv) fp32 partial outputs, when splits > 1
  float* lse_part;  // (splits, B, Hq, Sq) fp32 partial lse (-inf: the split saw no key)
  const int* seqlens;      // (B,) valid keys per row, or nullptr (every row: capacity)
  const int* block_table;  // (B, max_blocks) page ids, or nullptr for a dense cache
  const int* batch_idx;    // (B,) dense cache row of each batch entry, or nullptr (row b)
  const float* alibi;      // (Hq,) or (B, Hq) slopes, or nullptr
  int batch, h, h_kv, seqlen_q, d, dv;
  int group;        // h / h_kv
  int page;         // paged: slots per page
  int max_blocks;   // paged: block_table.size(1)
  int cache_rows;   // k_cache.size(0): dense rows or pages
  int capacity;     // keys a batch row can hold: slots, or max_blocks * page
  int splits;       // key splits per (sequence, kv head)
  int64_t q_sb, q_sh, q_sm;
  int64_t k_sr, k_ss, k_sh;  // cache strides: row (or page), slot, kv head
  int64_t v_sr, v_ss, v_sh;
  int64_t o_sb, o_sh, o_sm;
  int64_t alibi_sb;  // 0 for (Hq,) slopes
  float q_mul;       // scores = (q * q_mul) . k: scale * log2(e), or scale / softcap with softcap
  float cap_out2;    // softcap > 0: s = cap_out2 * tanh(s), cap_out2 = softcap * log2(e); 0: no softcap
  int window_left, window_right;  // -1 = unlimited; causal is window_right == 0
};

}  // namespace cuda
}  // namespace fastattn
