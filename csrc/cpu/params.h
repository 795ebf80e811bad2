// Plain parameter struct for the CPU kernels, filled once from the op arguments (register.cpp), and the
// per-sequence geometry (visibility bounds, key/query block ranges) shared by the forward and the backward.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace fastattn::cpu {

// Strides in elements of a logical (B, H, S, D) tensor.
struct Strides4 {
  int64_t b = 0, h = 0, s = 0, d = 0;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct CpuParams {
  // q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); out/dout (B, Hq, Sq, Dv); lse (B, Hq, Sq) fp32.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  Strides4 q_st, k_st, v_st, o_st;
  int64_t lse_sb = 0, lse_sh = 0;  // lse is contiguous (B, Hq, Sq): stride over s is 1

  // Backward only.
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides4 do_st, dq_st, dk_st, dv_st;

  // attn_bias (B, Hq, Sq, Sk), q.dtype, stride 0 on broadcast dims; nullptr when absent.
  const void* bias = nullptr;
  Strides4 bias_st;  // d is the stride over keys
  bool bias_key_padding = false;  // stride 0 over H and Sq: one bias row per batch
  // Per batch, keys from key_end[b] on are padding the kernels skip (key_end.cpp: -inf bias, finite terms);
  // nullptr when none are skipped.
  const int64_t* key_end = nullptr;
  // A bias's -inf edges (mask_band.cpp: mask_key_ranges): row i of batch b, head h sees keys only within
  // [mask_keys[at], mask_keys[at + 1]), at = 2 * (b * mask_keys_sb + h * mask_keys_sh + i * mask_keys_ss)
  // (mask_keys_ss = 0: one row for all, a key-padding bias); nullptr without.
  const int32_t* mask_keys = nullptr;
  int64_t mask_keys_sb = 0, mask_keys_sh = 0, mask_keys_ss = 0;

  // alibi slopes fp32 (Hq,) or (N, Hq); nullptr when absent.
  const float* alibi = nullptr;
  int64_t alibi_sb = 0;

  // Varlen: cu_seqlens int32 (N+1,), B == 1.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;

  // Block coordinates int32 (N,): global position of each sequence's first query / key; nullptr when absent.
  const int32_t* q_start = nullptr;
  const int32_t* k_start = nullptr;
  // fwd: out is float32 (the unrounded accumulator). bwd_acc: dq/dk/dv are float32 and the kernels add into them.
  bool out_fp32 = false;
  bool accumulate = false;

  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  int64_t nseq = 0;  // B, or N for varlen
  float scale = 1.f;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  float softcap = 0.f;
  float dropout_p = 0.f;
  uint64_t seed = 0, offset = 0;
  int64_t head_start = 0;  // dropout counters use the global query head head_start + h (csrc/ops.cpp)
  // Packed grouped-query heads (register.cpp pack_gqa; forward only): query row i of a packed head is token
  // i % q_period of query head (i / q_period) of its group. 0: not packed, row i is token i. bias_sg and
  // mask_keys_sg: the strides between a group's query heads in the bias and in mask_keys (their h strides then step
  // from group to group).
  int64_t q_period = 0, bias_sg = 0, mask_keys_sg = 0;

  int64_t group() const { return Hq / Hkv; }
  // Query row i's offset from its head's row 0 in a tensor whose rows are `row` and query heads `head` apart: i *
  // row, or packed (q_period) the row of token i % q_period in the group's query head i / q_period.
  int64_t row_offset(int64_t i, int64_t row, int64_t head) const {
    return q_period > 0 ? i / q_period * head + i % q_period * row : i * row;
  }
};

// One sequence: which tensor batch it lives in, where its rows start, its lengths, and the global positions of
// its first query and key (block coordinates; 0 without them, so positions are the local i, j).
struct SeqInfo {
  int64_t b;                     // tensor batch index (0 for varlen)
  int64_t n;                     // sequence index (== b unless varlen); alibi (N, Hq) row and dropout counter
  int64_t q0, k0;                // first row of the sequence in q / k
  int64_t sq, sk;                // lengths
  int64_t qpos0 = 0, kpos0 = 0;  // q_pos = qpos0 + i, k_pos = kpos0 + j (the dropout counters)
  int64_t off = 0;               // visibility diagonal: key j is on query i's diagonal when j == i + off
  int64_t alibi_off = 0;         // alibi distance |i + alibi_off - j| (= |q_pos - k_pos|; sk - sq without blocks)
  int64_t kend = 0;              // keys [kend, sk) are skipped padding (CpuParams::key_end); sk otherwise
};

// Offsets are resolved here, once per sequence: the tiles only ever see off / alibi_off / qpos0 / kpos0.
inline SeqInfo seq_info(const CpuParams& p, int64_t n) {
  SeqInfo s = p.cu_q != nullptr
                  ? SeqInfo{0, n, p.cu_q[n], p.cu_k[n], p.cu_q[n + 1] - p.cu_q[n], p.cu_k[n + 1] - p.cu_k[n]}
                  : SeqInfo{n, n, 0, 0, p.Sq, p.Sk};
  if (p.q_start != nullptr) {
    s.qpos0 = p.q_start[n];
    s.kpos0 = p.k_start[n];
    s.off = s.alibi_off = s.qpos0 - s.kpos0;
  } else {
    const int64_t tokens = p.q_period > 0 ? p.q_period : s.sq;  // packed rows: the step's own query count
    s.off = p.bottom_right ? s.sk - tokens : 0;
    s.alibi_off = s.sk - tokens;
  }
  s.kend = p.key_end != nullptr ? std::min(s.sk, p.key_end[s.b]) : s.sk;
  return s;
}

// The keys any row of [i0, i1) of (batch b, head h) may see under the bias's -inf edges: [lo, hi), {0, sk} without
// p.mask_keys; empty (lo >= hi) when every row is all -inf.
inline std::pair<int64_t, int64_t> mask_key_range(const CpuParams& p, const SeqInfo& s, int64_t h, int64_t i0,
                                                  int64_t i1) {
  if (p.mask_keys == nullptr) return {0, s.sk};
  const int32_t* r = p.mask_keys + 2 * (s.b * p.mask_keys_sb + h * p.mask_keys_sh);
  if (p.mask_keys_ss == 0 && p.mask_keys_sg == 0) return {r[0], r[1]};
  int32_t lo = INT32_MAX, hi = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t at = 2 * p.row_offset(i, p.mask_keys_ss, p.mask_keys_sg);
    lo = std::min(lo, r[at]);
    hi = std::max(hi, r[at + 1]);
  }
  return {lo, hi};
}

// A kernel's units of work (the forward's (sequence, query head), the backward's (sequence, kv head)) in the order
// that deals them round-robin to at::parallel_for's contiguous chunks, one per thread: thread t runs units t, t + T,
// ... (exactly when T divides the count), so work that differs by sequence (padding, masks, varlen lengths) is shared
// evenly, and each unit's tasks stay together (one packing of its keys). In order on one thread.
inline std::vector<int64_t> dealt_units(int64_t units) {
  const int64_t T = std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(units, 1));
  std::vector<int64_t> order;
  order.reserve(units);
  for (int64_t r = 0; r < T; ++r) {
    for (int64_t u = r; u < units; u += T) order.push_back(u);
  }
  return order;
}

// The CPUs this process may run on (its affinity mask, which OpenMP also counts for its default thread count;
// hardware_concurrency where there is none), asked once (blas.cpp): a constant of the machine and the process, not
// torch.set_num_threads, so that work cut by it keeps the same bits for any thread count.
int64_t process_cpus();

// How many tasks the backward kernels (bwd.cpp, bwd_lowp.cpp, bwd_rows.cpp) cut their (sequence, kv head) pairs
// into, at least: kMinBwdTasks, or one per CPU of the process where there are more, so that a batch-1 grouped-query
// call (8 KV heads under 32 query heads) keeps a 32-core server busy as torch's backward, a task per query head,
// does. FASTATTN_CPU_BWD_TASKS=N (read per call, N >= 1) sets it on any machine; 1 never cuts a pair.
constexpr int64_t kMinBwdTasks = 8;
inline int64_t bwd_min_tasks() {
  if (const char* env = std::getenv("FASTATTN_CPU_BWD_TASKS"); env != nullptr) {
    int64_t n = 0;  // digits only (as cpu.py checks), capped far past any machine
    const char* c = env;
    for (; *c >= '0' && *c <= '9'; ++c) n = std::min<int64_t>(n * 10 + (*c - '0'), int64_t{1} << 20);
    if (c != env && *c == '\0' && n >= 1) return n;
  }
  return std::max<int64_t>(kMinBwdTasks, process_cpus());
}

// The most the chunks' dQ partials may take at a target of `tasks`, and the buffer the process keeps for them between
// calls (workspace.h SharedBuffer): 8 MB a task, 64-512 MB (64 MB on a machine of 8 CPUs or fewer; 256 MB on 32).
// Partials past the kept buffer fault in fresh pages on every call: 256 MB of them (B1 GQA 32/8, 4096 keys, D=128,
// causal, 4 chunks) cost a bf16 backward 1.2-1.7x its time uncut, in a kept buffer 0.97x (one thread, AMD EPYC Zen 5,
// 2026-12-07; benchmarks/results/cpu-20261207-zen5-bwdtasks).
inline int64_t max_partial_bytes(int64_t tasks) {
  constexpr int64_t kMB = int64_t(1) << 20;
  return std::clamp<int64_t>(tasks * 8 * kMB, 64 * kMB, 512 * kMB);
}

// Key chunks per (sequence, kv head) of the backward kernels, of key_blocks blocks: more than one only when there are
// fewer than bwd_min_tasks() pairs, so that a long single head still keeps every core busy, and only as many as keep
// the chunks' dQ partials (part_bytes a pair and chunk) within max_bytes = max_partial_bytes(); per_chunk blocks
// each, none empty. The shape and the machine alone decide, never the thread count, so the bits never depend on it.
struct KeyChunks {
  int64_t chunks, per_chunk, max_bytes;
};
inline KeyChunks bwd_key_chunks(int64_t pairs, int64_t key_blocks, int64_t part_bytes) {
  key_blocks = std::max<int64_t>(key_blocks, 1);
  pairs = std::max<int64_t>(pairs, 1);
  const int64_t tasks = bwd_min_tasks(), max_bytes = max_partial_bytes(tasks);
  const int64_t want = std::clamp<int64_t>((tasks + pairs - 1) / pairs, 1, key_blocks);
  const int64_t cut = std::clamp<int64_t>(max_bytes / std::max<int64_t>(pairs * part_bytes, 1), 1, want);
  const int64_t per_chunk = (key_blocks + cut - 1) / cut;
  return {(key_blocks + per_chunk - 1) / per_chunk, per_chunk, max_bytes};
}

// The r-th of n blocks (query blocks of a forward unit, key chunks of a backward pair) in the order 0, n - 1, 1, n - 2,
// ...: a causal band's light and heavy blocks alternate, so that a unit which at::parallel_for's contiguous ranges
// split between threads (one long head) is split into even shares of work, not a quarter and three quarters.
inline int64_t zigzag(int64_t r, int64_t n) { return r % 2 == 0 ? r / 2 : n - 1 - r / 2; }

// The most query heads a forward task takes (FwdOrder).
constexpr int64_t kMaxChunkHeads = 8;

// The forward's tasks in order: (sequence, chunk of `heads` query heads, query block), a unit of work being a
// (sequence, chunk), dealt as dealt_units deals them, its query blocks in a row (each thread packs a head's K/V
// once). heads = 1 unless the heads share a bias that is read by row (fwd_chunk_heads): a task then takes the
// chunk's heads through each key tile in turn, so the tile's bias rows come from cache for all but the first head
// (the bias had been read from memory once per head), and a thread keeps the chunk's packed K/V, one per slot.
struct FwdOrder {
  struct Task {
    int64_t n, h0, qb;
  };
  int64_t nqb, heads, chunks, group, slots;
  std::vector<int64_t> units;

  FwdOrder(const CpuParams& p, int64_t nqb_, int64_t heads_)
      : nqb(nqb_), heads(heads_), chunks(p.Hq / heads_), group(p.group()),
        slots(std::max<int64_t>(1, heads_ / p.group())), units(dealt_units(p.nseq * chunks)) {}

  int64_t count() const { return static_cast<int64_t>(units.size()) * nqb; }
  // task t = u * nqb + r, unit units[u] = n * chunks + chunk, query block zigzag(r, nqb)
  Task at(int64_t t) const {
    const int64_t u = units[t / nqb];
    return {u / chunks, u % chunks * heads, zigzag(t % nqb, nqb)};
  }
  // Which of a thread's K/V packs serves query head h.
  int64_t slot(int64_t h) const { return h / group % slots; }
};

// Visibility of key j to query i within a sequence (see csrc/ops.cpp):
//   off = q_start - k_start with block coordinates, else bottom_right ? sk - sq : 0;
//   j >= i + off - window_left (if >= 0);  j <= i + off + window_right (if >= 0).
// int64 throughout: |off| < 2^31 and windows < 2^31 (register.cpp), so i + off +- w cannot overflow, and the
// clamps make any shift (negative, zero, past sk) a plain band move. Packed grouped-query rows (p.q_period > 0,
// forward only) are token i % q_period: the key_* functions take a row, the rows_* ones a run of rows.
struct Visibility {
  int64_t off, wl, wr, sq, sk, period;

  Visibility(const CpuParams& p, const SeqInfo& s)
      : off(s.off), wl(p.window_left), wr(p.window_right), sq(s.sq), sk(s.sk), period(p.q_period) {}

  // The token of row i.
  int64_t token(int64_t i) const { return period > 0 ? i % period : i; }
  // Visible keys of row i are [key_lo(i), key_hi(i)) (may be empty).
  int64_t key_lo(int64_t i) const { return wl < 0 ? 0 : std::clamp<int64_t>(token(i) + off - wl, 0, sk); }
  int64_t key_hi(int64_t i) const { return wr < 0 ? sk : std::clamp<int64_t>(token(i) + off + wr + 1, 0, sk); }
  // Queries that see key j are [query_lo(j), query_hi(j)) (the backward's, never packed: rows are tokens there).
  int64_t query_lo(int64_t j) const { return wr < 0 ? 0 : std::clamp<int64_t>(j - off - wr, 0, sq); }
  int64_t query_hi(int64_t j) const { return wl < 0 ? sq : std::clamp<int64_t>(j - off + wl + 1, 0, sq); }
  bool limited() const { return wl >= 0 || wr >= 0; }
  // The first and last token among rows [i0, i1) (i0 < i1): key_lo and key_hi increase with the token, so the
  // rows' tightest and widest bounds are these tokens'. Packed rows wrap from the last token to token 0.
  std::pair<int64_t, int64_t> tokens(int64_t i0, int64_t i1) const {
    if (period == 0) return {i0, i1 - 1};
    const int64_t t0 = i0 % period, t1 = (i1 - 1) % period;
    return i1 - i0 < period && t0 <= t1 ? std::pair{t0, t1} : std::pair<int64_t, int64_t>{0, period - 1};
  }
  // True when every (i, j) in [i0, i1) x [j0, j1) is visible, so the tile needs no element mask.
  bool full(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (!limited()) return true;
    const auto [t0, t1] = tokens(i0, i1);  // the tightest rows: the last token for lo, the first for hi
    return key_lo(t1) <= j0 && key_hi(t0) >= j1;
  }
};

// Keys [lo, hi) that any of query rows [i0, i1) (i0 < i1) of head h may see: the rows' band (their first token's
// lower bound, their last's upper one), a mask's -inf edges (mask_key_range) and the sequence's key end. The forward
// kernels walk only these keys.
inline std::pair<int64_t, int64_t> block_keys(const CpuParams& p, const SeqInfo& s, const Visibility& vis, int64_t h,
                                              int64_t i0, int64_t i1) {
  const auto [t0, t1] = vis.tokens(i0, i1);
  const auto [m_lo, m_hi] = mask_key_range(p, s, h, i0, i1);
  return {std::max(vis.key_lo(t0), m_lo), std::min({vis.key_hi(t1), s.kend, m_hi})};
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

}  // namespace fastattn::cpu
