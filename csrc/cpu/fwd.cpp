// FlashAttention-2 forward on CPU: one task per (sequence, query head, block of query rows), or per chunk of query
// heads that share a bias (FwdOrder); each streams the visible key blocks through an online softmax, holding only
// tile buffers (memory O(S)).
#include <ATen/Parallel.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <optional>
#include <tuple>

#include <unistd.h>

#include "kernels.h"
#include "rng.h"
#include "tile.h"

namespace fastattn::cpu {

namespace {

// Tile shape (query rows x keys). Calls without a window take kFullRows-row tiles of up to 512 keys (fwd_full_keys):
// fewer, larger products amortise the per-call packing of K (measured +5-8% at S = 128-2048, one thread, Intel Xeon).
// Windowed calls (causal is window_right = 0 here) keep BLOCK_Q x BLOCK_K: larger tiles compute more masked scores on
// the diagonal. Chosen from the call and the CPU alone (not the thread count), so results do not depend on the number
// of threads.
constexpr int64_t kFullRows = 128;
struct Tiles {
  int64_t q, k;
  bool full;  // the unwindowed kFullRows-row tiles
};

// Whether rows try the lazy softmax (AVX-512 only; it needs P apart from S).
inline bool lazy_softmax() {
#ifdef FASTATTN_VEC512
  return vec512::available();
#else
  return false;
#endif
}

std::atomic<int64_t> g_l2_force{0};  // tests: > 0 the L2 bytes fwd_full_keys fits tiles in (0: this CPU's)

// One core's L2 in bytes (0: unknown).
inline int64_t l2_bytes() {
  if (const int64_t forced = g_l2_force.load(std::memory_order_relaxed); forced > 0) return forced;
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE  // glibc
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return b > 0 ? int64_t(b) : int64_t(0);
#else
    return int64_t(0);
#endif
  }();
  return bytes;
}

// The unwindowed tiles halve their keys (down to 128) while what each key tile streams, its fp32 K and V rows and
// the 128 x k scores, outgrows the core's L2. On an AMD EPYC Zen 3 (512 KB L2, AVX2; one thread, 15 interleaved
// rounds, 2026-12-06, benchmarks/bench_fwd_tiles.py) 128 x 256 ran the fp32 forward 7-12% faster than 128 x 512 at
// D = 128 (B1 H8 S1024-2048, B4 S512), level at D = 96, and 128 x 128 23% faster at D = 256; at D = 64, where
// 128 x 512 just fits, 128 x 256 read 0-3% slower. The Xeon's 2 MB and Zen 4's 1 MB L2 keep 128 x 512 up to D = 256
// and 128.
inline int64_t fwd_full_keys(const CpuParams& p) {
  int64_t k = 512;
  const int64_t l2 = l2_bytes();
  while (k > 128 && l2 > 0 && 4 * k * (p.D + p.Dv + kFullRows) > l2) k /= 2;
  return k;
}

inline Tiles fwd_tiles(const CpuParams& p) {
  // A full mask's -inf edges bound each query block's keys like a window: the smaller tiles waste less past them.
  const bool windowed = p.window_left >= 0 || p.window_right >= 0 ||
                        (p.mask_keys != nullptr && (p.mask_keys_ss != 0 || p.mask_keys_sg != 0));
  return windowed ? Tiles{BLOCK_Q, BLOCK_K, false} : Tiles{kFullRows, fwd_full_keys(p), true};
}

// Online-softmax update of one row with the new score row S_r (bk keys): the probabilities go to P_r (which may
// be S_r itself). Returns the factor the accumulator row must be multiplied by (exp(m_old - m_new); 1 when
// unchanged). With AVX-512 (P_r apart from S_r) the row first tries P against the running max, with no max pass
// (kLazyRescaleLog2); a NaN score then still poisons l through the row sum. bias_r (nullptr: none): a bias row the
// score pass left to this one, added in the lazy exp pass, else in the max pass (one pass over S instead of two:
// with it the AVX2 fp32 forward under a (1, 1, S, S) float mask cost 5-9% more than without one, 13-17% before;
// AMD EPYC Zen 3, B1 H8 S1024 D64-128, one thread).
inline float online_softmax_row(float* S_r, int64_t bk, float& m_i, float& l_i, float* P_r,
                                const float* bias_r = nullptr) {
#ifdef FASTATTN_VEC512
  if (P_r != S_r && m_i > kNegInf && m_i < kInf) {
    float arg_max;
    const float row_sum = vec512::exp_row<float>(S_r, bk, bk, 1.f, m_i, P_r, false, &arg_max, bias_r);
    if (arg_max <= kLazyRescaleLog2) {
      l_i += row_sum;
      return 1.f;
    }
  }
#endif
  const float m_new = std::max(m_i, bias_r ? vec::add_max_row<float>(S_r, bias_r, bk) : vec::max_row(S_r, bk));
  if (m_new == kNegInf) {  // every key so far masked: P = 0, state unchanged (unless a NaN score poisons l)
    if (has_nan(S_r, bk)) l_i = std::numeric_limits<float>::quiet_NaN();
    std::fill(P_r, P_r + bk, 0.f);
    return 1.f;
  }
  const float alpha = m_i == m_new ? 1.f : std::exp(m_i - m_new);
#ifdef FASTATTN_VEC512
  const float row_sum = P_r != S_r ? vec512::exp_row<float>(S_r, bk, bk, 1.f, m_new, P_r, false)
                                   : vec::exp_sum_row(S_r, bk, m_new);
#else
  const float row_sum = vec::exp_sum_row(S_r, bk, m_new);
#endif
  l_i = l_i * alpha + row_sum;
  m_i = m_new;
  return alpha;
}

// fp32 copies of one (sequence, kv head)'s K and V rows, kept across the tasks of a thread (consecutive tasks
// are query blocks of the same head), so low-precision K/V are converted once per thread instead of once per
// query block. Holds the contiguous row range [lo, hi). Memory: max_sk * (D + Dv) floats per thread.
struct KVPack {
  float *k = nullptr, *v = nullptr;  // from the thread's workspace
  int64_t head = -1, lo = 0, hi = 0;

  KVPack(int64_t rows, const CpuParams& p)
      : k(workspace_take<float>(rows * p.D)), v(workspace_take<float>(rows * p.Dv)) {}

  template <typename T>
  void ensure(const CpuParams& p, int64_t head_id, const T* k_src, const T* v_src, int64_t a, int64_t b) {
    auto convert = [&](int64_t r0, int64_t r1) {
      copy_rows<T>(k_src + r0 * p.k_st.s, p.k_st.s, p.k_st.d, r1 - r0, p.D, k + r0 * p.D, p.D, 1.f);
      copy_rows<T>(v_src + r0 * p.v_st.s, p.v_st.s, p.v_st.d, r1 - r0, p.Dv, v + r0 * p.Dv, p.Dv, 1.f);
    };
    if (head_id != head || b < lo || a > hi) {  // other head, or disjoint: start over
      head = head_id;
      convert(a, b);
      lo = a;
      hi = b;
      return;
    }
    if (a < lo) convert(a, lo), lo = a;
    if (b > hi) convert(hi, b), hi = b;
  }
};

// Key tiles of one (sequence, kv head) packed (pack_kt), kept across a thread's tasks: its consecutive tasks are the
// query blocks of one head, and each packs K^T once instead of once per query block. A tile on the t.k grid is
// packed as far as the head's keys go (width = min(t.k, key_end - j0)). MKL's packed format serves only products of
// the whole width (other tiles take the plain product); brgemm reads any first bk <= width keys of it (ldp = width),
// so a causal diagonal tile packed once serves every query block that sees part of it. Slots are allocated once and
// reused across heads (a packed buffer must not move); on MKL each reserves MKL's size (~8 MB of address space, of
// which only the tile's bk * D floats are written), so calls with more than kMaxTiles key tiles do not pack.
struct KtCache {
  static constexpr int64_t kMaxTiles = 64;
  std::vector<float*> slot;  // from the thread's workspace
  std::vector<int64_t> rows;  // width packed in each slot; -1: empty
  int64_t head = -1, floats = 0;

  struct Tile {
    const float* ptr;  // nullptr: take the plain product
    int64_t ld;        // the packed tile's row length (its width)
  };
  // The packed tile holding keys [j0, j0 + bk) of head `head_id`, packed where it is not yet by pack(width, dst)
  // (pack_kt of the tile's first `width` K rows).
  template <typename Pack>
  Tile get(const CpuParams& p, Tiles t, int64_t head_id, int64_t j0, int64_t bk, int64_t key_end, Pack&& pack) {
    const int64_t idx = j0 / t.k, width = std::min(t.k, key_end - j0);
    if (j0 % t.k != 0 || idx >= kMaxTiles || bk > width || (bk != width && !fp32_gemm_brgemm())) return {nullptr, 0};
    if (head_id != head) {
      std::fill(rows.begin(), rows.end(), -1);
      head = head_id;
    }
    if (idx >= static_cast<int64_t>(slot.size())) {
      if (floats == 0) floats = packed_kt_floats(t.k, p.D);
      while (static_cast<int64_t>(slot.size()) <= idx) {
        slot.push_back(workspace_take<float>(floats));
        rows.push_back(-1);
      }
    }
    float* dst = slot[idx];
    if (rows[idx] != width) {
      pack(width, dst);
      rows[idx] = width;
    }
    return {dst, width};
  }
};

// Tile buffers that the query blocks of one task share (each block keeps its own Q rows and softmax state).
struct TileBufs {
  float *k, *v, *S, *P;
};

// The forward of one (sequence, query head, query block): its scaled Q rows and online-softmax state (m, l, acc),
// fed one key tile at a time (step), then stored (store). A task of one head runs it alone; a task of a chunk of
// heads that share a bias (FwdOrder) steps each head through the same key tile in turn, so the tile's bias rows
// come from cache for all but the first.
template <typename T>
struct QueryBlock {
  const CpuParams& p;
  const Tiles t;
  const int64_t n, h, hk, i0;
  const SeqInfo s;
  const Visibility vis;
  const ScoreCtx<T> ctx;  // refers to s and vis: a QueryBlock is built in place and never moved
  const TileBufs bufs;
  KVPack* pack;
  KtCache* kt_cache;
  int64_t bq = 0, j_lo = 0, j_hi = 0, key_end = 0;
  const T *k = nullptr, *v = nullptr;
  Operand qs{nullptr, 0};
  float *acc = nullptr, *m = nullptr, *l = nullptr;
  bool first = true;  // the first P V product writes acc (no fill, no rescale of it before)
  bool fuse_bias = false;
  const Dropout drop;

  QueryBlock(const CpuParams& p_, Tiles t_, int64_t n_, int64_t h_, int64_t qb, Scratch& buf, TileBufs bufs_,
             KVPack* pack_, KtCache* kt_cache_)
      : p(p_), t(t_), n(n_), h(h_), hk(h_ / p_.group()), i0(qb * t_.q), s(seq_info(p_, n_)), vis(p_, s),
        ctx(p_, s, vis, h_), bufs(bufs_), pack(pack_), kt_cache(kt_cache_),
        drop(p_.seed, p_.offset, p_.dropout_p, p_.head_start) {
    if (empty()) return;
    bq = std::min(t.q, s.sq - i0);
    float* qs_buf = buf.take(t.q * p.D);
    acc = buf.take(t.q * p.Dv);
    m = buf.take(t.q);
    l = buf.take(t.q);
    const T* q = static_cast<const T*>(p.q) + s.b * p.q_st.b + h * p.q_st.h + (s.q0 + i0) * p.q_st.s;
    k = static_cast<const T*>(p.k) + s.b * p.k_st.b + hk * p.k_st.h + s.k0 * p.k_st.s;
    v = static_cast<const T*>(p.v) + s.b * p.v_st.b + hk * p.v_st.h + s.k0 * p.v_st.s;
    // Qs = q_mul * Q (the rest of the scale is the score product's alpha): never a pass over a score tile.
    qs = operand<T>(q, p.q_st.s, p.q_st.d, bq, p.D, qs_buf, q_mul<T>(p.scale));
    std::fill(m, m + bq, kNegInf);
    std::fill(l, l + bq, 0.f);
    // A bias alone (a float mask) on fully visible tiles is added in the softmax's exp pass (AVX-512, as
    // fwd_lowp.cpp does) or its max pass instead of a pass of its own over S.
    fuse_bias = std::is_same_v<T, float> && ctx.bias_only() && p.bias_st.d == 1;
    // Key blocks that any row of this query block sees (fully masked blocks, skipped padding and the keys a bias's
    // -inf edges hide from every row are left out; tiles off the t.k grid take the plain product, not packed tiles).
    std::tie(j_lo, j_hi) = block_keys(p, s, vis, h, i0, i0 + bq);
    key_end = std::min(vis.key_hi(s.sq - 1), s.kend);  // where the last query block's keys end
  }

  bool empty() const { return i0 >= s.sq; }

  // Keys [j0, min(j0 + t.k, j_hi)).
  void step(int64_t j0) {
    const int64_t bk = std::min(t.k, j_hi - j0), D = p.D, Dv = p.Dv, head = n * p.Hkv + hk;
    const float alpha = qk_alpha<T>(p.scale);
    const T* k_tile = k + j0 * p.k_st.s;
    // fp16 / bf16 K on brgemm packs from its own rows, converted and transposed in one pass: the fp32 copy first
    // and its transposition had been ~18% of an fp16 8-token step (Intel Xeon, one thread).
    const bool from_rows = !pack && kt_cache && !std::is_same_v<T, float> && p.k_st.d == 1 && fp32_gemm_brgemm();
    Operand kt{nullptr, 0}, vt;
    if (pack) {  // converted as far as a packed tile reads (later query blocks need those keys too)
      const int64_t kv_end = kt_cache ? std::max(j0 + bk, std::min(j0 + t.k, key_end)) : j0 + bk;
      pack->ensure<T>(p, head, k, v, j0, kv_end);
      kt = {pack->k + j0 * D, D};
      vt = {pack->v + j0 * Dv, Dv};
    } else {
      vt = operand<T>(v + j0 * p.v_st.s, p.v_st.s, p.v_st.d, bk, Dv, bufs.v);
      if (!from_rows) {  // (K as far as a packed tile reads: kt_cache packs it from here)
        const int64_t k_rows = kt_cache ? std::max(bk, std::min(t.k, key_end - j0)) : bk;
        kt = operand<T>(k_tile, p.k_st.s, p.k_st.d, k_rows, D, bufs.k);
      }
    }
    KtCache::Tile kt_packed{nullptr, 0};
    if (kt_cache && !ctx.on_rows) {
      kt_packed = kt_cache->get(p, t, head, j0, bk, key_end, [&](int64_t width, float* dst) {
        if constexpr (!std::is_same_v<T, float>) {  // (fp32 K never packs from its rows: pack_kt reads them)
          if (from_rows) return pack_kt_rows<T>(k_tile, p.k_st.s, width, D, dst, alpha);
        }
        pack_kt(kt.ptr, kt.ld, width, D, dst, alpha);
      });
    }
    if (from_rows && !kt_packed.ptr) kt = operand<T>(k_tile, p.k_st.s, p.k_st.d, bk, D, bufs.k);  // not packable
    float *S = bufs.S, *P = bufs.P;
    const bool fused = fuse_bias && vis.full(i0, i0 + bq, j0, j0 + bk);
    if (kt_packed.ptr) {
      ctx.scores_packed(qs.ptr, qs.ld, kt_packed.ptr, i0, bq, j0, bk, S, t.k, nullptr, kt_packed.ld, fused);
    } else {
      ctx.scores(qs.ptr, qs.ld, kt, i0, bq, j0, bk, S, t.k, nullptr, fused);
    }
    for (int64_t r = 0; r < bq; ++r) {
      float* P_r = P + r * t.k;
      const float* bias_r = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        if (fused) ctx.prefetch_bias(i0, r, bq, j0, bk);
        bias_r = fused ? ctx.bias_row(i0 + r) + j0 : nullptr;
      }
      const float alpha = online_softmax_row(S + r * t.k, bk, m[r], l[r], P_r, bias_r);
      if (alpha != 1.f && !first) vec::scale_row(acc + r * Dv, Dv, alpha);
      // l_i sums the undropped probabilities; dropout applies to what multiplies V.
      if (p.dropout_p > 0.f) drop.apply_row(P_r, s.n, h, s.qpos0 + i0 + r, s.kpos0 + j0, bk);
    }
    gemm_rm(false, false, bq, Dv, bk, 1.f, P, t.k, vt.ptr, vt.ld, first ? 0.f : 1.f, acc, Dv);  // acc (+)= P V
    first = false;
  }

  void store() {
    if (first) std::fill(acc, acc + bq * p.Dv, 0.f);  // no key: empty rows
    store_rows<T>(p, s, h, i0, bq, acc, m, l);
  }
};

// Query block qb of heads [h0, h0 + heads) of sequence n (packs[g], kt_caches[g]: head h0 + g's). Heads of a chunk
// see the same key blocks (fwd_chunk_heads: a bias shared by every head, no per-head -inf edges).
template <typename T>
void fwd_task(const CpuParams& p, Tiles t, int64_t n, int64_t h0, int64_t heads, int64_t qb, Scratch& buf,
              KVPack* const* packs, KtCache* const* kt_caches) {
  buf.used = 0;
  TileBufs bufs;
  bufs.k = buf.take(t.k * p.D);
  bufs.v = buf.take(t.k * p.Dv);
  bufs.S = buf.take(t.q * t.k);
  bufs.P = lazy_softmax() ? buf.take(t.q * t.k) : bufs.S;  // apart from S: a lazy row that must rescale redoes P
  std::array<std::optional<QueryBlock<T>>, kMaxChunkHeads> blocks;
  for (int64_t g = 0; g < heads; ++g) blocks[g].emplace(p, t, n, h0 + g, qb, buf, bufs, packs[g], kt_caches[g]);
  const QueryBlock<T>& lead = *blocks[0];
  if (lead.empty()) return;
  for (int64_t j0 = lead.j_lo; j0 < lead.j_hi; j0 += t.k) {
    for (int64_t g = 0; g < heads; ++g) blocks[g]->step(j0);
  }
  for (int64_t g = 0; g < heads; ++g) blocks[g]->store();
}

}  // namespace

// More than 1 only for a bias that every query head shares and reads by row, whose -inf edges (if read) are the same
// for every head, and that is at least 16x the K/V a head reads (bias_bytes >= 16 kv_bytes: what a chunk saves
// against the K/V its heads then evict): up to kMaxChunkHeads heads (a divisor of Hq that groups whole kv-head groups
// or lies within one) whose K/V stay within kChunkBytes, leaving at least two tasks per thread. Measured on an AMD
// EPYC (Zen 4, 1 MB L2 a core; B1 H8, a (1, 1, S, S) float mask, the chunks switched on and off in one process): at
// S=2048, D=64 the forward 6-9% faster (fp32 4 heads, bf16 8; one thread) and 5% (fp32, two threads); D=32 S=1024
// 9%; at 8x (S=2048 D=128, S=1024 D=64) no gain or 5-14% slower on two threads. On an Intel Xeon (2 MB L2) an
// earlier trial of the order (the heads' query blocks in turn, fp32 D=64) read 1-3% slower, so chunks are taken on
// AMD only. FASTATTN_CPU_HEAD_CHUNKS=0 never takes them; =1 (tests) takes the largest chunk wherever heads share such
// a bias, on any CPU, whatever the sizes. No result depends on it: each head's tiles and their order are the same in
// any chunk.
int64_t fwd_chunk_heads(const CpuParams& p, int64_t nqb, int64_t kv_bytes, int64_t bias_bytes) {
  // A bias with head stride 0 has its -inf edges read once for all heads too (mask_band.cpp: mask_keys_sh = 0).
  if (p.bias == nullptr || p.bias_st.h != 0 || p.bias_st.s == 0 || p.Hq == 1 || p.q_period > 0) return 1;
  const char* env = std::getenv("FASTATTN_CPU_HEAD_CHUNKS");
  const bool forced = env != nullptr && env[0] == '1';
  if ((env != nullptr ? !forced : !amd_cpu()) || (!forced && bias_bytes < 16 * kv_bytes)) return 1;
  constexpr int64_t kChunkBytes = 4 << 20;
  const int64_t group = p.group(), threads = at::get_num_threads();
  for (int64_t g = std::min<int64_t>(p.Hq, kMaxChunkHeads); g > 1; --g) {
    if (p.Hq % g != 0 || (g % group != 0 && group % g != 0)) continue;
    if (forced) return g;
    if (std::max<int64_t>(1, g / group) * kv_bytes > kChunkBytes) continue;
    if (p.nseq * (p.Hq / g) * nqb >= 2 * threads) return g;
  }
  return 1;
}

void fwd_l2_force(int64_t bytes) { g_l2_force.store(bytes, std::memory_order_relaxed); }

template <typename T>
void fwd_kernel(const CpuParams& p, int64_t max_sq, int64_t max_sk) {
  const Tiles t = fwd_tiles(p);
  const int64_t nqb = (max_sq + t.q - 1) / t.q;
  const int64_t per_head = Scratch::round(t.q * p.D) + Scratch::round(t.q * p.Dv) + 2 * Scratch::round(t.q);
  const int64_t scratch = Scratch::round(t.k * p.D) + Scratch::round(t.k * p.Dv) +
                          (lazy_softmax() ? 2 : 1) * Scratch::round(t.q * t.k) + per_head;
  // fp32 K/V whose rows operand would use in place (rows_usable) are; anything else goes through a per-thread KVPack.
  const bool direct = std::is_same_v<T, float> && rows_usable(p.k_st.s, p.k_st.d, p.D) &&
                      rows_usable(p.v_st.s, p.v_st.d, p.Dv);
  // ... but where no other task of the thread reads the same K/V (one query block a head, no grouped heads), each
  // key tile is converted as it is reached into the scratch's tile buffers: a KVPack of the whole head outgrew the L2
  // at 2048 keys (D=128: 2 MB of fp32 K and V a head), where fp16 MHA steps of 5-32 tokens (Intel Xeon AMX, one
  // thread, 2026-12-05) ran 1.16-1.42x faster converted per tile (0.45-0.82x torch before, 0.64-0.95x after).
  const bool per_tile = nqb == 1 && p.group() == 1;
  // Packed key tiles pay for the unwindowed tiles when a head has >= 4 query blocks (measured, one thread, Intel Xeon:
  // +3-7% at S = 512-2048); the window's 64 x 256 tiles and fewer query blocks measured no gain or a loss. brgemm's
  // pack (a transposed copy, which its product needs anyway) pays from one query block without a band: B8 H4 S128
  // fp32 forward 4-10% faster on the AMD EPYC, but 7% slower causal (the whole tile packed for rows seeing half).
  // Banded calls' 64 x 256 tiles pack on brgemm only (MKL's packed format takes no part of a tile): a causal
  // diagonal tile, packed whole once, serves the four query blocks that see part of it, which otherwise each
  // transposed their part (B1 H8 S1024 causal forward on brgemm, Intel Xeon, one thread: 1.28-1.51x torch before,
  // 1.54-1.63x after; B4 S128-512 1.38-1.78x before, 1.55-2.12x after).
  const bool band = p.window_left >= 0 || p.window_right >= 0;
  const int64_t min_qb = fp32_gemm_brgemm() && !band ? 1 : 4;
  // And one query block of fp16 / bf16 rows packs its keys from their own rows whatever the band (QueryBlock::step):
  // the fp32 copy it saves is the work. fp16 MHA steps of 5-16 tokens at 512 / 2048 keys with transformers' causal
  // mask (a band, 64 x 256 tiles) 1.04-1.17x faster on one thread, 1.02-1.38x on two; with a left-padding mask
  // 0.98-1.05x / 0.94-1.06x (Intel Xeon AMX, switched per round in one process, 21 rounds).
  const bool pack_keys = packed_kt_available() && ((t.full ? nqb >= min_qb : fp32_gemm_brgemm() && nqb >= 2) ||
                                                   (per_tile && !std::is_same_v<T, float> && fp32_gemm_brgemm()));
  const int64_t kv_bytes = 4 * max_sk * (p.D + p.Dv);  // fp32 tiles
  const FwdOrder order(p, nqb, fwd_chunk_heads(p, nqb, kv_bytes, int64_t(sizeof(T)) * max_sq * max_sk));
  at::parallel_for(0, order.count(), 1, [&](int64_t begin, int64_t end) {
    BlasSingleThread blas1;
    WorkspaceScope workspace;  // everything below takes its buffers from it
    Scratch buf(scratch + (order.heads - 1) * per_head);
    std::vector<std::unique_ptr<KVPack>> packs(order.slots);
    std::vector<std::unique_ptr<KtCache>> kt_caches(order.slots);
    for (int64_t slot = 0; slot < order.slots; ++slot) {
      if (!direct && !per_tile) packs[slot] = std::make_unique<KVPack>(max_sk, p);
      if (pack_keys) kt_caches[slot] = std::make_unique<KtCache>();
    }
    std::array<KVPack*, kMaxChunkHeads> head_packs{};
    std::array<KtCache*, kMaxChunkHeads> head_caches{};
    for (int64_t i = begin; i < end; ++i) {
      const FwdOrder::Task task = order.at(i);
      for (int64_t g = 0; g < order.heads; ++g) {
        head_packs[g] = packs[order.slot(task.h0 + g)].get();
        head_caches[g] = kt_caches[order.slot(task.h0 + g)].get();
      }
      fwd_task<T>(p, t, task.n, task.h0, order.heads, task.qb, buf, head_packs.data(), head_caches.data());
    }
  });
}

template void fwd_kernel<float>(const CpuParams&, int64_t, int64_t);
template void fwd_kernel<c10::BFloat16>(const CpuParams&, int64_t, int64_t);
template void fwd_kernel<c10::Half>(const CpuParams&, int64_t, int64_t);

}  // namespace fastattn::cpu
