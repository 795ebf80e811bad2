// CPU split-KV decode: fastattn::decode_fwd (schema and conventions in csrc/ops.cpp).
//
// Work item = (sequence b, range of KV heads, key split s). An item stacks every query row of its heads (head h
// reads KV head h / G, G = Hq / Hkv; times the Sq tokens) as its M rows and walks one contiguous slice of the
// sequence's visible keys in blocks of kBlockN with the online softmax (m_i, l_i, acc in fp32). For each key it
// visits all its heads before the next key: the cache layout (.., S, Hkv, D) puts a key's heads side by side, so
// the item streams through memory instead of striding by Hkv * D per head (2-3x faster than one head per item),
// and each key/value row is read once per group. Items run under at::parallel_for; the heuristic splits keys and
// heads until every thread has a few items, so batch 1 fills every core. With one split the item writes the
// result; otherwise it writes a normalised partial (out_s, lse_s) to fp32 scratch and the last split of its group
// to finish merges the group by log-sum-exp (one parallel region, no barrier). Split boundaries depend only on
// (seqlens, num_splits) and the merge order is fixed, so results are reproducible run to run (num_splits = 0
// picks the count from the thread count, which can change rounding between machines).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "common.h"
#include "decode_checks.h"

#include "decode_fetch.h"  // how the cache is fetched ahead: fetch_mode, lone_row_stream
#include "kernels.h"       // fetch_describe
#include "decode_bf16.h"   // the block helpers: scores, pv (decode_tiles.h), scores_dp (bf16 dot products)
#include "vec.h"           // exp_sum_row: the same vector helpers as the prefill kernels

namespace fastattn::cpu::decode {
namespace {

constexpr int64_t kBlockN = 64;     // keys per online-softmax step
constexpr int64_t kMinSplitKeys = 256;  // the heuristic never makes splits shorter than this
constexpr float kInf = std::numeric_limits<float>::infinity();

struct DecodeParams {
  const void *q, *k, *v;
  void* out;
  float* lse;
  const int32_t* seqlens;
  const int32_t* block_table;  // nullptr: dense cache
  const int32_t* batch_idx;    // nullptr: row b of a dense cache
  const float* alibi;          // nullptr: no alibi
  const void* bias;            // nullptr: no bias; else (B, Hq, Sq, Smax) over a dense cache's slots, q's dtype
  int64_t B, Hq, Hkv, Sq, D, Dv, group, page, splits, head_chunks;
  int64_t q_sb, q_sh, q_sm, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, bt_sb, o_sb, o_sh, o_sm, alibi_sb;
  int64_t bias_sb, bias_sh, bias_sm, bias_sk;
  float scale, softcap;
  int64_t window_left, window_right;
  float *out_part, *lse_part;  // (splits, B, Hq, Sq, Dv), (splits, B, Hq, Sq) when splits > 1
  Stream stream;  // how the block helpers read the cache (lone_row_stream, fetch_mode)
  bool fetch_blocks;  // prefetch_block each next block (fetch_mode)
};

#ifdef FASTATTN_VEC512
// row_max in 16 lanes: vmaxps returns its second operand where either is NaN, so with the running maxima second a
// NaN score is skipped as in the serial loop.
FA_AVX512 inline float row_max_avx512(const float* s, int64_t a, int64_t e) {
  const __m512 ninf = _mm512_set1_ps(-kInf);
  __m512 m0 = ninf, m1 = ninf;
  int64_t j = a;
  for (; j + 32 <= e; j += 32) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(s + j), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(s + j + 16), m1);
  }
  for (; j < e; j += 16) m0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, vec512::tail(e - j), s + j), m0);
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}
#endif

// max of s[a, e) with the serial loop's semantics (m = std::max(m, s[j]): a NaN score is skipped) in eight
// independent chains: the serial loop waits on each max's latency (4 cycles a key; ~10% of a decode step). The
// result is the same value in any order (max is exact; a +-0 tie only flips a zero's sign, which changes no output).
// AVX-512 CPUs take 16 lanes (row_max_avx512; bf16 MHA one-token steps ~1% faster, Intel Xeon AMX).
inline float row_max(const float* s, int64_t a, int64_t e) {
#ifdef FASTATTN_VEC512
  if (vec512::available()) return row_max_avx512(s, a, e);
#endif
  float m[8];
  std::fill(m, m + 8, -kInf);
  int64_t j = a;
  for (; j + 8 <= e; j += 8) {
    for (int u = 0; u < 8; ++u) m[u] = std::max(m[u], s[j + u]);
  }
  for (; j < e; ++j) m[0] = std::max(m[0], s[j]);
  float r = m[0];
  for (int u = 1; u < 8; ++u) r = std::max(r, m[u]);
  return r;
}


// ---------------------------------------------------------------- one work item
struct Scratch {
  std::vector<float> Qf, S, acc, m_i, l_i, slope, bias;  // bias: one row's block of the bias in fp32
  std::vector<c10::BFloat16> Qb;  // bf16 queries for scores_bf16_dp
  std::vector<int64_t> koff, voff;  // per row: element offset of its KV head within a key's row
  std::vector<uint8_t> live;
  std::vector<const void*> krows, vrows;
  // widened blocks (widen_blocks): the block's keys and values of the item's KV heads in fp32, (n, heads, D)
  std::vector<float> Kf, Vf;
  std::vector<const float*> kfrows, vfrows;
  std::vector<int64_t> kfoff, vfoff;
  Scratch(int64_t M, int64_t D, int64_t Dv)
      : Qf(M * D), S(M * kBlockN), Qb(M * D), acc(M * Dv), m_i(M), l_i(M), slope(M), bias(kBlockN), koff(M),
        voff(M), live(M),
        krows(kBlockN), vrows(kBlockN), kfrows(kBlockN), vfrows(kBlockN), kfoff(M), vfoff(M) {}
};

// Whether a bf16 / fp16 cache's blocks are widened to fp32 once per block for a work item whose rows share KV
// heads (rows per KV head G * Sq > 1): on AVX2 each 8-value conversion costs as much as its FMA (256-bit ops split
// in two on AMD Zen 1), and the block helpers would repeat it for every row reading the head (bf16 MHA steps of 4
// tokens 0.75-0.78x PyTorch's SDPA, AMD EPYC Zen 1, one thread, 2026-12-02). The fp32 copies are exact, so the
// scores and outputs are the same bits either way. AVX-512 CPUs convert 16 values an instruction and are left as
// measured.
template <typename T>
bool widen_blocks(const DecodeParams& p) {
  return !std::is_same_v<T, float> && p.group * p.Sq > 1 && !vec512::available();
}

// Rows [0, n) of the block, KV heads [hk0, hk0 + nkv), widened to fp32 as (n, nkv, d) in `dst`.
// Rows kAheadKeys (kAheadKeysAmd) on are fetched as these are read (ahead: Stream's k_ahead / v_ahead).
template <typename T>
void widen_block(const void* const* rows, int64_t n, int64_t hk0, int64_t nkv, int64_t sh, int64_t d, float* dst,
                 const float** frows, Ahead ahead) {
  for (int64_t j = 0; j < n; ++j) {
    frows[j] = dst + j * nkv * d;
    for (int64_t hk = 0; hk < nkv; ++hk) {
      const T* src = static_cast<const T*>(rows[j]) + (hk0 + hk) * sh;
      fetch_ahead(&src, 1, ahead, d * static_cast<int64_t>(sizeof(T)));
      vec::load_row(src, 1, dst + (j * nkv + hk) * d, d, 1.f);
    }
  }
}

// s[a, e) += the bias of keys j0 + [a, e) of the row at `row` (fp32 copy in `f`, converted once for rows that
// share it: a key-padding mask is broadcast over heads and tokens, so `last` skips the conversion for the rest).
template <typename T>
void add_bias(const DecodeParams& p, const T* row, int64_t j0, int64_t a, int64_t e, float* s, float* f,
              const T*& last) {
  if (row != last) {
    for (int64_t j = a; j < e; ++j) f[j] = static_cast<float>(row[(j0 + j) * p.bias_sk]);
    last = row;
  }
  for (int64_t j = a; j < e; ++j) s[j] += f[j];
}

// Software prefetch (to L2) of keys [a, e) of a dense cache's KV heads [hk0, hk1), K and V rows: Fetch::block.
// (Its first measurement, 7-17% on an AMD EPYC Zen 4, 2026-12-04, was of a build in which these prefetches compiled to
// nothing: it measured something else, the host's load or that commit's other changes.)
template <typename T>
void prefetch_block(const DecodeParams& p, const T* kbase, const T* vbase, int64_t row, int64_t hk0, int64_t hk1,
                    int64_t a, int64_t e) {
  constexpr int64_t kLine = 64;
  const int64_t kbytes = p.D * static_cast<int64_t>(sizeof(T)), vbytes = p.Dv * static_cast<int64_t>(sizeof(T));
  for (int64_t hk = hk0; hk < hk1; ++hk) {
    for (int64_t pos = a; pos < e; ++pos) {
      const char* k = reinterpret_cast<const char*>(kbase + row * p.k_sb + pos * p.k_ss + hk * p.k_sh);
      const char* v = reinterpret_cast<const char*>(vbase + row * p.v_sb + pos * p.v_ss + hk * p.v_sh);
      for (int64_t c = 0; c < kbytes; c += kLine) vec::prefetch(k + c, false);
      for (int64_t c = 0; c < vbytes; c += kLine) vec::prefetch(v + c, false);
    }
  }
}

// Keys [start, end) of sequence b for the M = (hk1 - hk0) * G * Sq query rows of KV heads [hk0, hk1).
template <typename T>
void split_item(const DecodeParams& p, int64_t b, int64_t hk0, int64_t hk1, int64_t split, Scratch& w) {
  const int64_t M = (hk1 - hk0) * p.group * p.Sq, D = p.D, Dv = p.Dv;
  const int64_t len = p.seqlens[b], off = len - p.Sq;  // bottom-right alignment
  const int64_t lo = p.window_left >= 0 ? std::max<int64_t>(off - p.window_left, 0) : 0;
  const int64_t hi = std::max(len, lo);
  const int64_t blocks = (hi - lo + kBlockN - 1) / kBlockN, per = (blocks + p.splits - 1) / p.splits;
  const int64_t start = std::min(hi, lo + split * per * kBlockN), end = std::min(hi, start + per * kBlockN);

  const T* q = static_cast<const T*>(p.q);
  const bool dp = bf16_dot_products<T>();
  const bool widen = !dp && widen_blocks<T>(p);
  const int64_t nkv = hk1 - hk0;
  const Stream widened{p.stream.lone, {}, {}};  // widened copies: widen_block fetched the cache ahead
  if (widen) {
    w.Kf.resize(kBlockN * nkv * D);
    w.Vf.resize(kBlockN * nkv * Dv);
  }
  for (int64_t r = 0; r < M; ++r) {  // row r: query head hk0 * G + r / Sq (KV head h / G), token r % Sq
    const int64_t h = hk0 * p.group + r / p.Sq, i = r % p.Sq;
    const T* src = q + b * p.q_sb + h * p.q_sh + i * p.q_sm;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (dp) std::copy(src, src + D, w.Qb.begin() + r * D);
    }
    for (int64_t d = 0; d < D; ++d) w.Qf[r * D + d] = static_cast<float>(src[d]) * p.scale;
    w.slope[r] = p.alibi ? p.alibi[b * p.alibi_sb + h] : 0.f;
    w.koff[r] = (h / p.group) * p.k_sh;
    w.voff[r] = (h / p.group) * p.v_sh;
    w.kfoff[r] = (h / p.group - hk0) * D;  // within a widened key's (nkv, D)
    w.vfoff[r] = (h / p.group - hk0) * Dv;
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.m_i.begin(), w.m_i.end(), -kInf);
  std::fill(w.l_i.begin(), w.l_i.end(), 0.f);
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const int64_t row = p.batch_idx ? p.batch_idx[b] : b;

  for (int64_t j0 = start; j0 < end; j0 += kBlockN) {
    const int64_t n = std::min(kBlockN, end - j0);
    const void** krows = w.krows.data();  // where each key of the block lives (page table or cache row)
    const void** vrows = w.vrows.data();
    if (p.block_table) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = j0 + j;
        const int64_t phys = p.block_table[b * p.bt_sb + pos / p.page], in = pos % p.page;
        krows[j] = kbase + phys * p.k_sb + in * p.k_ss;
        vrows[j] = vbase + phys * p.v_sb + in * p.v_ss;
      }
    } else {  // rows a fixed stride apart (the loop held in registers: it had reloaded every field per key)
      const T* k0 = kbase + row * p.k_sb + j0 * p.k_ss;
      const T* v0 = vbase + row * p.v_sb + j0 * p.v_ss;
      const int64_t ks = p.k_ss, vs = p.v_ss;
      for (int64_t j = 0; j < n; ++j) {
        krows[j] = k0 + j * ks;
        vrows[j] = v0 + j * vs;
      }
    }
    if (p.fetch_blocks) prefetch_block<T>(p, kbase, vbase, row, hk0, hk1, j0 + n, std::min(end, j0 + n + kBlockN));
    float* S = w.S.data();
    if (widen) {
      widen_block<T>(w.krows.data(), n, hk0, nkv, p.k_sh, D, w.Kf.data(), w.kfrows.data(), p.stream.k_ahead);
      widen_block<T>(w.vrows.data(), n, hk0, nkv, p.v_sh, Dv, w.Vf.data(), w.vfrows.data(), p.stream.v_ahead);
    }
    if (dp) {
      scores_dp(w.Qb.data(), M, D, w.krows.data(), w.koff.data(), n, p.scale, S, kBlockN, p.stream);
    } else if (widen) {
      scores<float>(w.Qf.data(), M, D, w.kfrows.data(), w.kfoff.data(), n, S, kBlockN, widened);
    } else {
      scores<T>(w.Qf.data(), M, D, reinterpret_cast<const T* const*>(w.krows.data()), w.koff.data(), n, S, kBlockN,
                p.stream);
    }
    bool any = false;
    const T* last_bias = nullptr;  // the bias row whose block w.bias holds (its [a, e) of the previous row)
    int64_t last_a = 0, last_e = 0;
    for (int64_t r = 0; r < M; ++r) {
      float* s = S + r * kBlockN;
      const int64_t i = r % p.Sq;
      // this row's visible keys inside the block: [a, e)
      int64_t a = 0, e = n;
      if (p.window_left >= 0) a = std::clamp<int64_t>(i + off - p.window_left - j0, 0, n);
      if (p.window_right >= 0) e = std::clamp<int64_t>(i + off + p.window_right + 1 - j0, 0, n);
      w.live[r] = a < e;
      if (a >= e) continue;
      if (p.softcap > 0.f) {
        for (int64_t j = a; j < e; ++j) s[j] = p.softcap * std::tanh(s[j] / p.softcap);
      }
      if (p.alibi) {
        for (int64_t j = a; j < e; ++j) s[j] -= w.slope[r] * static_cast<float>(std::llabs(i + off - j0 - j));
      }
      if (p.bias) {
        const int64_t h = hk0 * p.group + r / p.Sq;
        const T* row = static_cast<const T*>(p.bias) + b * p.bias_sb + h * p.bias_sh + i * p.bias_sm;
        if (a != last_a || e != last_e) last_bias = nullptr;  // the copy holds [last_a, last_e) only
        last_a = a, last_e = e;
        add_bias<T>(p, row, j0, a, e, s, w.bias.data(), last_bias);
      }
      std::fill(s, s + a, -kInf);
      std::fill(s + e, s + n, -kInf);
      const float m_new = std::max(w.m_i[r], row_max(s, a, e));
      if (m_new == -kInf) {  // no finite score yet (-inf by value, e.g. a -inf in q): P = 0, as PyTorch's softmax
        for (int64_t j = a; j < e; ++j) {
          if (std::isnan(s[j])) w.l_i[r] = std::numeric_limits<float>::quiet_NaN();  // a NaN score still reaches out
        }
        w.live[r] = false;
        continue;
      }
      const float alpha = std::exp(w.m_i[r] - m_new);  // 0 on the first visible block (m_i = -inf)
      w.l_i[r] = w.l_i[r] * alpha + vec::exp_sum_row(s, n, m_new);
      if (alpha != 1.f) {
        for (int64_t d = 0; d < Dv; ++d) w.acc[r * Dv + d] *= alpha;
      }
      w.m_i[r] = m_new;
      any = true;
    }
    if (any && widen) {
      pv<float>(S, kBlockN, w.live.data(), M, w.vfrows.data(), w.vfoff.data(), n, Dv, w.acc.data(), widened);
    } else if (any) {
      pv<T>(S, kBlockN, w.live.data(), M, reinterpret_cast<const T* const*>(w.vrows.data()), w.voff.data(), n, Dv,
            w.acc.data(), p.stream);
    }
  }

  for (int64_t r = 0; r < M; ++r) {
    const int64_t h = hk0 * p.group + r / p.Sq, i = r % p.Sq;
    const bool seen = w.l_i[r] != 0.f;  // NaN (a NaN score) counts as seen so that it reaches the output
    const float inv = seen ? 1.f / w.l_i[r] : 0.f;
    const float lse = seen ? w.m_i[r] + std::log(w.l_i[r]) : (p.splits > 1 ? -kInf : kInf);
    const float* a = w.acc.data() + r * Dv;
    if (p.splits > 1) {
      const int64_t prow = ((split * p.B + b) * p.Hq + h) * p.Sq + i;
      p.lse_part[prow] = lse;
      for (int64_t d = 0; d < Dv; ++d) p.out_part[prow * Dv + d] = a[d] * inv;
    } else {
      p.lse[(b * p.Hq + h) * p.Sq + i] = lse;
      T* o = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sm;
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(a[d] * inv);
    }
  }
}

// Merge the splits of query rows [begin, end) of (B, Hq, Sq):
// lse = logsumexp_s lse_s, out = sum_s e^(lse_s - lse) out_s.
template <typename T>
void combine_rows(const DecodeParams& p, int64_t begin, int64_t end) {
  const int64_t rows = p.B * p.Hq * p.Sq;
  std::vector<float> o(p.Dv);
  for (int64_t rr = begin; rr < end; ++rr) {
    float m = -kInf;
    bool nan = false;
    for (int64_t s = 0; s < p.splits; ++s) {
      m = std::max(m, p.lse_part[s * rows + rr]);
      nan |= std::isnan(p.lse_part[s * rows + rr]);
    }
    const int64_t b = rr / (p.Hq * p.Sq), h = (rr / p.Sq) % p.Hq, i = rr % p.Sq;
    T* out = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sm;
    if (nan) {  // a NaN score in some split poisons the row, as in PyTorch
      p.lse[rr] = std::numeric_limits<float>::quiet_NaN();
      for (int64_t d = 0; d < p.Dv; ++d) out[d] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    if (m == -kInf) {  // no split saw a visible key
      p.lse[rr] = kInf;
      for (int64_t d = 0; d < p.Dv; ++d) out[d] = static_cast<T>(0.f);
      continue;
    }
    std::fill(o.begin(), o.end(), 0.f);
    float tot = 0.f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const float wgt = std::exp(p.lse_part[s * rows + rr] - m);
      if (wgt == 0.f) continue;
      tot += wgt;
      const float* src = p.out_part + (s * rows + rr) * p.Dv;
      for (int64_t d = 0; d < p.Dv; ++d) o[d] += wgt * src[d];
    }
    p.lse[rr] = m + std::log(tot);
    for (int64_t d = 0; d < p.Dv; ++d) out[d] = static_cast<T>(o[d] / tot);
  }
}

// One parallel region: the item that finishes last among the splits of a (sequence, head chunk) merges them (a
// counter per group), so no second pass and no barrier. The merge reads the partials in split order whoever runs
// it, so the result does not depend on scheduling.
template <typename T>
void run(const DecodeParams& p) {
  const int64_t chunk = (p.Hkv + p.head_chunks - 1) / p.head_chunks;  // KV heads per item
  const int64_t groups = p.B * p.head_chunks, items = groups * p.splits;
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[groups]);
  for (int64_t g = 0; g < groups; ++g) done[g].store(0, std::memory_order_relaxed);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch w(chunk * p.group * p.Sq, p.D, p.Dv);
    for (int64_t t = begin; t < end; ++t) {  // t = (b, head chunk c, split s), s fastest
      const int64_t g = t / p.splits, b = g / p.head_chunks, c = g % p.head_chunks;
      const int64_t hk0 = std::min(p.Hkv, c * chunk), hk1 = std::min(p.Hkv, hk0 + chunk);
      split_item<T>(p, b, hk0, hk1, t % p.splits, w);
      if (p.splits > 1 && done[g].fetch_add(1, std::memory_order_acq_rel) == p.splits - 1) {
        combine_rows<T>(p, (b * p.Hq + hk0 * p.group) * p.Sq, (b * p.Hq + hk1 * p.group) * p.Sq);
      }
    }
  });
}

// Work division: about 4 items per thread. A cache laid out key-major, (B, S, Hkv, D) as flash-attn's, has a key's
// heads side by side: keys are split first (splits of at least kMinSplitKeys keys, at most 64; num_splits > 0 fixes
// the count, up to one split per key block), then KV heads are divided into chunks if items are still short. A
// head-major cache, (B, Hkv, S, D) as SDPA's, gives each KV head its own item, so an item streams one contiguous
// run of keys and one of values: with every head in one item it walked 2 * Hkv streams a head's stride apart, which
// the hardware prefetchers did not keep fed (fp32 MHA D=64 from memory 0.75-0.78x PyTorch's SDPA, one thread, AMD
// EPYC Zen 4); keys are then split only as far as the threads need. Only the key splits change rounding; head
// chunks do not change any result.
std::pair<int64_t, int64_t> work_heuristic(int64_t B, int64_t Hkv, int64_t max_keys, int64_t num_splits,
                                           bool head_major) {
  const int64_t target = 4 * static_cast<int64_t>(at::get_num_threads());
  // A split past the last key block would be empty: num_splits (a hint) stops there, which also bounds the
  // partial buffers (B * splits rows) whatever the caller asks.
  int64_t splits = std::min<int64_t>(num_splits, std::max<int64_t>(1, (max_keys + kBlockN - 1) / kBlockN));
  const int64_t rows = head_major ? B * Hkv : B;  // items before any key split
  if (splits <= 0) {
    const int64_t by_len = std::max<int64_t>(1, max_keys / kMinSplitKeys);
    splits = std::max<int64_t>(1, std::min<int64_t>({(target + rows - 1) / rows, by_len, 64}));
  }
  const int64_t chunks =
      head_major ? Hkv : std::clamp<int64_t>((target + B * splits - 1) / (B * splits), 1, Hkv);
  return {splits, chunks};
}

std::tuple<at::Tensor, at::Tensor> decode_fwd_cpu(const at::Tensor& q, const at::Tensor& k_given,
                                                  const at::Tensor& v_given,
                                                  const std::optional<at::Tensor>& seqlens_k,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
                                                  bool kv_bhsd, const std::optional<at::Tensor>& attn_bias) {
  const at::Tensor k_cache = decode_checks::cache_view(k_given, kv_bhsd);  // (B, S, Hkv, D) in either case
  const at::Tensor v_cache = decode_checks::cache_view(v_given, kv_bhsd);
  decode_checks::check_ranks_dtypes(q, k_cache, v_cache, "cpu");
  const auto dt = q.scalar_type();
  for (const auto* t : {&q, &k_cache, &v_cache}) {
    FA_CHECK(t->device().is_cpu(), "decode_fwd (cpu) got a tensor on ", t->device());
  }
  if (seqlens_k.has_value()) {
    FA_CHECK(seqlens_k->device().is_cpu(), "decode_fwd (cpu) got a tensor on ", seqlens_k->device());
  }
  for (const auto* t : {&q, &k_cache, &v_cache}) {
    FA_CHECK(t->stride(3) == 1 || t->size(3) == 1, "decode_fwd: q and the caches need stride 1 along the head dim, ",
             "got strides ", t->strides());
  }
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), Dv = v_cache.size(3);
  decode_checks::check_shapes(q, k_cache, v_cache);
  if (seqlens_k.has_value()) {
    FA_CHECK(seqlens_k->scalar_type() == at::kInt && seqlens_k->dim() == 1 && seqlens_k->size(0) == B,
             "decode_fwd: seqlens_k must be int32 (", B, "), got ", seqlens_k->scalar_type(), " ",
             seqlens_k->sizes());
  }
  decode_checks::check_scalars(softcap, num_splits);
  const bool paged = block_table.has_value();
  at::Tensor bt, bidx, alibi;
  int64_t capacity = k_cache.size(1);
  if (paged) {
    FA_CHECK(!cache_batch_idx.has_value(), "decode_fwd: cache_batch_idx cannot be combined with block_table");
    bt = block_table->contiguous();
    FA_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == B && bt.device().is_cpu(),
             "decode_fwd: block_table must be int32 (", B, ", max_blocks) on cpu, got ", bt.scalar_type(), " ",
             bt.sizes());
    FA_CHECK(k_cache.size(1) > 0, "decode_fwd: paged cache with page size 0");
    capacity = bt.size(1) * k_cache.size(1);
  } else if (cache_batch_idx.has_value()) {
    bidx = cache_batch_idx->contiguous();
    FA_CHECK(bidx.scalar_type() == at::kInt && bidx.dim() == 1 && bidx.size(0) == B && bidx.device().is_cpu(),
             "decode_fwd: cache_batch_idx must be int32 (", B, ") on cpu, got ", bidx.scalar_type(), " ", bidx.sizes());
  } else {
    FA_CHECK(k_cache.size(0) == B, "decode_fwd: k_cache batch ", k_cache.size(0), " != q batch ", B,
             " (pass cache_batch_idx)");
  }
  decode_checks::check_whole_cache(seqlens_k, capacity);
  at::Tensor lens;
  std::vector<int32_t> whole;  // no seqlens_k: every row's length is the capacity
  if (seqlens_k.has_value()) {
    lens = seqlens_k->contiguous();
  } else {
    whole.assign(B, static_cast<int32_t>(capacity));
  }
  const int32_t* L = lens.defined() ? lens.data_ptr<int32_t>() : whole.data();
  for (int64_t b = 0; b < B; ++b) {  // nothing is read outside the cache: check every index the kernel follows
    FA_CHECK(L[b] >= 0 && L[b] <= capacity, "decode_fwd: seqlens_k[", b, "] = ", L[b], " outside [0, ", capacity,
             "] (cache capacity per row)");
    if (paged) {
      const int64_t pages = (L[b] + k_cache.size(1) - 1) / k_cache.size(1);
      for (int64_t j = 0; j < pages; ++j) {
        const int32_t e = bt.data_ptr<int32_t>()[b * bt.size(1) + j];
        FA_CHECK(e >= 0 && e < k_cache.size(0), "decode_fwd: block_table[", b, ", ", j, "] = ", e, " outside [0, ",
                 k_cache.size(0), ")");
      }
    } else if (bidx.defined()) {
      const int32_t e = bidx.data_ptr<int32_t>()[b];
      FA_CHECK(e >= 0 && e < k_cache.size(0), "decode_fwd: cache_batch_idx[", b, "] = ", e, " outside [0, ",
               k_cache.size(0), ")");
    }
  }
  if (alibi_slopes.has_value()) {
    alibi = alibi_slopes->contiguous();
    FA_CHECK(alibi.scalar_type() == at::kFloat && alibi.device().is_cpu() &&
                 ((alibi.dim() == 1 && alibi.size(0) == Hq) || (alibi.dim() == 2 && alibi.size(0) == B &&
                                                                alibi.size(1) == Hq)),
             "decode_fwd: alibi_slopes must be float32 (", Hq, ") or (", B, ", ", Hq, "), got ", alibi.scalar_type(),
             " ", alibi.sizes());
  }

  if (attn_bias.has_value()) {  // a dense call's mask over the cache's slots: every index below stays inside it
    const at::Tensor& m = *attn_bias;
    FA_CHECK(!paged && !bidx.defined(), "decode_fwd: attn_bias needs a dense cache without cache_batch_idx");
    FA_CHECK(m.scalar_type() == dt && m.device().is_cpu(), "decode_fwd: attn_bias must be ", dt, " on cpu, got ",
             m.scalar_type(), " on ", m.device());
    FA_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == Sq && m.size(3) == capacity,
             "decode_fwd: attn_bias must be expanded to (B, Hq, Sq, Smax) = (", B, ", ", Hq, ", ", Sq, ", ",
             capacity, "), got ", m.sizes());
  }

  at::Tensor out = alloc_out_like_q(q, Dv);
  at::Tensor lse = alloc_output({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Sq == 0) return {out, lse};

  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.seqlens = L;
  p.block_table = paged ? bt.data_ptr<int32_t>() : nullptr;
  p.batch_idx = bidx.defined() ? bidx.data_ptr<int32_t>() : nullptr;
  p.alibi = alibi.defined() ? alibi.data_ptr<float>() : nullptr;
  p.alibi_sb = alibi.defined() && alibi.dim() == 2 ? Hq : 0;
  if (attn_bias.has_value()) {
    p.bias = attn_bias->data_ptr();
    p.bias_sb = attn_bias->stride(0), p.bias_sh = attn_bias->stride(1), p.bias_sm = attn_bias->stride(2);
    p.bias_sk = attn_bias->stride(3);
  }
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.Sq = Sq, p.D = D, p.Dv = Dv, p.group = Hq / Hkv;
  p.page = paged ? k_cache.size(1) : 0;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sm = q.stride(2);
  p.k_sb = k_cache.stride(0), p.k_ss = k_cache.stride(1), p.k_sh = k_cache.stride(2);
  p.v_sb = v_cache.stride(0), p.v_ss = v_cache.stride(1), p.v_sh = v_cache.stride(2);
  p.bt_sb = paged ? bt.size(1) : 0;
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sm = out.stride(2);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  // A window wider than the cache is no window; clamping keeps i + off + window far from overflow.
  std::tie(p.window_left, p.window_right) = decode_checks::check_window(window_left, window_right, capacity + p.Sq);
  const bool head_major = k_cache.stride(2) > k_cache.stride(1);
  std::tie(p.splits, p.head_chunks) = work_heuristic(B, Hkv, capacity, num_splits, head_major);
  p.stream.lone = lone_row_stream();
  if (!paged) p.stream.k_stride = k_cache.stride(1), p.stream.v_stride = v_cache.stride(1);
  const Fetch fetch = paged ? Fetch::none : fetch_mode();  // a paged cache's next rows may sit on another page
  p.fetch_blocks = fetch == Fetch::block;
  if (fetch == Fetch::stream) {
    const int64_t keys = ahead_keys();
    const int64_t item_heads = head_major ? 1 : (Hkv + p.head_chunks - 1) / p.head_chunks;
    const bool l1 = keys * item_heads * (D + Dv) * q.element_size() <= kL1AheadBytes;
    p.stream.k_ahead = {keys * k_cache.stride(1) * k_cache.element_size(), l1};
    p.stream.v_ahead = {keys * v_cache.stride(1) * v_cache.element_size(), l1};
  }
  at::Tensor out_part, lse_part;
  if (p.splits > 1) {
    out_part = at::empty({p.splits, B, Hq, Sq, Dv}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.splits, B, Hq, Sq}, q.options().dtype(at::kFloat));
    p.out_part = out_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  if (dt == at::kFloat) {
    run<float>(p);
  } else if (dt == at::kBFloat16) {
    run<c10::BFloat16>(p);
  } else {
    run<c10::Half>(p);
  }
  return {out, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dense_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& bias, double scale,
                                             int64_t window_left, int64_t window_right, double softcap,
                                             const std::optional<at::Tensor>& alibi_slopes) {
  return decode_fwd_cpu(q, k, v, std::nullopt, std::nullopt, std::nullopt, scale, window_left, window_right, softcap,
                        alibi_slopes, /*num_splits=*/1, /*kv_bhsd=*/true, bias);
}

std::string fetch_describe() {
  switch (fetch_mode()) {
    case Fetch::stream:
      return "a dense cache's rows fetched " + std::to_string(ahead_keys()) + " keys ahead";
    case Fetch::block:
      return "a dense cache's next block fetched at each block's start";
    default:
      return "the hardware prefetchers alone";
  }
}

}  // namespace fastattn::cpu::decode

TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("decode_fwd", &fastattn::cpu::decode::decode_fwd_cpu); }
