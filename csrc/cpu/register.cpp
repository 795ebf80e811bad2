// CPU implementations of fastattn::fwd / fastattn::bwd / fastattn::bwd_acc (schemas and conventions in
// csrc/ops.cpp): argument checks, CpuParams filling, dtype dispatch, and TORCH_LIBRARY_IMPL registration.
//
// Every invariant the kernels rely on is checked here, values included (cu_seqlens are read on the host): direct
// torch.ops callers and torch.compile'd graphs reach the kernels without the Python layer's checks, and no
// argument may make a kernel touch memory outside its tensors.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "block_checks.h"
#include "common.h"
#include "kernels.h"
#include "mm.h"
#include "vec512.h"  // vec512::available: the fp32 rows of the one-pass rule
#include "workspace.h"  // advise_huge_pages: fresh outputs

namespace fastattn::cpu {

namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_q,
                  const std::optional<at::Tensor>& cu_k, const std::optional<at::Tensor>& alibi) {
  FA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, S, D), got q", q.sizes(),
           " k", k.sizes(), " v", v.sizes());
  for (const auto* t : {&q, &k, &v}) {
    FA_CHECK(t->device().is_cpu(), "cpu kernels got a tensor on ", t->device());
  }
  const auto dt = q.scalar_type();
  FA_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
           "cpu kernels take float32, bfloat16 or float16, got ", dt);
  FA_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "q, k, v dtypes differ: ", dt, ", ", k.scalar_type(),
           ", ", v.scalar_type());
  FA_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: q", q.sizes(), " k", k.sizes(),
           " v", v.sizes());
  FA_CHECK(k.size(3) == q.size(3), "q and k head dims differ: q", q.sizes(), " k", k.sizes());
  FA_CHECK(q.size(3) > 0, "head dim must be positive (q and k), got q", q.sizes(), " k", k.sizes());
  FA_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), "k and v must share heads and length: k", k.sizes(),
           " v", v.sizes());
  FA_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads ", q.size(1),
           " must be a multiple of kv heads ", k.size(1));
  if (attn_bias) {
    const auto& b = *attn_bias;
    FA_CHECK(b.dim() == 4 && b.size(0) == q.size(0) && b.size(1) == q.size(1) && b.size(2) == q.size(2) &&
                 b.size(3) == k.size(2),
             "attn_bias must be expanded to (B, Hq, Sq, Sk) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ",
             k.size(2), "), got ", b.sizes());
    FA_CHECK(b.scalar_type() == dt, "attn_bias dtype ", b.scalar_type(), " must match q dtype ", dt);
    FA_CHECK(b.device().is_cpu(), "attn_bias must be on cpu, got ", b.device());
  }
  FA_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_q) {
    for (const auto& [c, name] : {std::pair{&*cu_q, "cu_seqlens_q"}, std::pair{&*cu_k, "cu_seqlens_k"}}) {
      FA_CHECK(c->scalar_type() == at::kInt, name, " must be int32, got ", c->scalar_type());
      FA_CHECK(c->dim() == 1 && c->numel() >= 2, name, " must be 1-D of length N+1 >= 2, got shape ", c->sizes());
      FA_CHECK(c->device().is_cpu(), name, " must be on cpu, got ", c->device());
      FA_CHECK(c->is_contiguous(), name, " must be contiguous, got strides ", c->strides());
    }
    FA_CHECK(cu_q->numel() == cu_k->numel(), "cu_seqlens_q ", cu_q->sizes(), " and cu_seqlens_k ", cu_k->sizes(),
             " must have the same length N+1");
    FA_CHECK(q.size(0) == 1, "varlen needs batch 1 (packed rows), got q", q.sizes());
  }
  if (alibi) {
    const auto& a = *alibi;
    FA_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    FA_CHECK(a.device().is_cpu(), "alibi_slopes must be on cpu, got ", a.device());
    FA_CHECK((a.dim() == 1 || a.dim() == 2) && a.size(-1) == q.size(1), "alibi_slopes must have shape (Hq,) or ",
             "(B, Hq) with Hq = ", q.size(1), ", got ", a.sizes());
    FA_CHECK(a.is_contiguous(), "alibi_slopes must be contiguous, got strides ", a.strides());
  }
}

// Varlen values: cu[0] == 0, non-decreasing, cu[N] == the packed length, max_seqlen >= the longest sequence.
// Returns the longest sequence (what the kernels size their work by).
int64_t check_cu_values(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                        const char* max_name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel() - 1;
  FA_CHECK(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    FA_CHECK(c[i + 1] >= c[i], name, " must be non-decreasing, got ", name, "[", i, "] = ", c[i], " > ", name, "[",
             i + 1, "] = ", c[i + 1]);
    longest = std::max<int64_t>(longest, c[i + 1] - c[i]);
  }
  FA_CHECK(c[n] == total, name, "[-1] = ", c[n], " must equal the packed length ", total);
  FA_CHECK(max_seqlen >= longest, max_name, " = ", max_seqlen, " is smaller than the longest sequence (", longest,
           ")");
  return longest;
}

// Window entries are >= -1 (-1 = unlimited). One at least `wide` is no window: clamping it to -1 changes nothing
// visible and keeps the kernels' i + off + window arithmetic far from overflow. Without block coordinates
// wide = Sq + Sk + 1 (|off| <= the lengths); with them the offset can be far larger than the lengths, so a finite
// window can hide a whole block and only windows >= 2^31 (wider than any distance of positions in [0, 2^31))
// may be clamped.
int64_t check_window(int64_t w, int64_t wide, const char* name) {
  FA_CHECK(w >= -1, name, " must be >= -1 (-1 = unlimited), got ", w);
  return w >= wide ? -1 : w;
}

constexpr int64_t kPosLimit = int64_t(1) << 31;  // global positions lie in [0, 2^31)

// start[n] >= 0 and start[n] + length of sequence n < 2^31, for q_start against the query lengths and k_start
// against the key lengths.
void check_start_values(const at::Tensor& start, const char* name, const int32_t* cu, int64_t len) {
  const int32_t* s = start.data_ptr<int32_t>();
  for (int64_t n = 0; n < start.numel(); ++n) {
    const int64_t l = cu ? cu[n + 1] - cu[n] : len;
    FA_CHECK(s[n] >= 0 && s[n] + l < kPosLimit, name, "[", n, "] = ", s[n], " must be >= 0 with ", name, " + length (",
             l, ") < 2^31");
  }
}

CpuParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_q,
                      const std::optional<at::Tensor>& cu_k, double scale, int64_t window_left, int64_t window_right,
                      bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi, double dropout_p,
                      int64_t seed, int64_t offset, const std::optional<at::Tensor>& q_start,
                      const std::optional<at::Tensor>& k_start, int64_t head_start) {
  CpuParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Sq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Sk = k.size(2);
  p.Dv = v.size(3);
  p.lse_sb = p.Hq * p.Sq;
  p.lse_sh = p.Sq;
  if (attn_bias) {
    p.bias = attn_bias->data_ptr();
    p.bias_st = strides_of(*attn_bias);
    p.bias_key_padding = p.bias_st.h == 0 && p.bias_st.s == 0;
  }
  if (cu_q) {
    p.cu_q = cu_q->data_ptr<int32_t>();
    p.cu_k = cu_k->data_ptr<int32_t>();
    p.nseq = cu_q->numel() - 1;
  } else {
    p.nseq = p.B;
  }
  if (alibi) {
    FA_CHECK(alibi->dim() == 1 || alibi->size(0) == p.nseq, "alibi_slopes (B, Hq) must have B = ", p.nseq,
             ", got ", alibi->sizes());
    p.alibi = alibi->data_ptr<float>();
    p.alibi_sb = alibi->dim() == 2 ? p.Hq : 0;
  }
  block_checks::check_coords(q_start, k_start, p.nseq, cu_q.has_value(), q.device(), bottom_right);
  if (q_start) {
    p.q_start = q_start->data_ptr<int32_t>();
    p.k_start = k_start->data_ptr<int32_t>();
  }
  p.scale = static_cast<float>(scale);
  // every sequence is at most Sq + Sk + 1 long; with block coordinates positions span [0, 2^31)
  const int64_t wide = q_start ? kPosLimit : p.Sq + p.Sk + 1;
  p.window_left = check_window(window_left, wide, "window_left");
  p.window_right = check_window(window_right, wide, "window_right");
  p.bottom_right = bottom_right;
  FA_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0 = off), got ", softcap);
  p.softcap = static_cast<float>(softcap);
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  FA_CHECK(static_cast<float>(dropout_p) < 1.f, "dropout_p=", dropout_p,
           " rounds to 1 in float32; use a value below 1 - 2^-25");
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  block_checks::check_head_start(head_start, p.Hq);
  p.head_start = head_start;
  return p;
}

// Longest (query, key) sequence: the tensor lengths, or the longest varlen sequences (values checked); also checks
// the block coordinates' values against each sequence's lengths.
std::pair<int64_t, int64_t> max_lengths(const CpuParams& p, const std::optional<at::Tensor>& cu_q,
                                        const std::optional<at::Tensor>& cu_k, int64_t max_seqlen_q,
                                        int64_t max_seqlen_k, const std::optional<at::Tensor>& q_start,
                                        const std::optional<at::Tensor>& k_start) {
  std::pair<int64_t, int64_t> r{p.Sq, p.Sk};
  if (cu_q) {
    r = {check_cu_values(*cu_q, "cu_seqlens_q", p.Sq, max_seqlen_q, "max_seqlen_q"),
         check_cu_values(*cu_k, "cu_seqlens_k", p.Sk, max_seqlen_k, "max_seqlen_k")};
  }
  if (q_start) {
    check_start_values(*q_start, "q_start", p.cu_q, p.Sq);
    check_start_values(*k_start, "k_start", p.cu_k, p.Sk);
  }
  return r;
}

// A just-allocated output: advised to huge pages before anything touches it (workspace.h), then poisoned as
// alloc_output (csrc/common.h) poisons.
at::Tensor fresh_output(at::Tensor t) {
  advise_huge_pages(t.data_ptr(), t.nbytes());
  if (poison_outputs()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// out (B, Hq, Sq, Dv) in q's memory order (as alloc_out_like_q, csrc/common.h), in float32 when out_fp32.
at::Tensor alloc_out(const at::Tensor& q, int64_t dv, bool out_fp32) {
  const auto opts = out_fp32 ? q.options().dtype(at::kFloat) : q.options();
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2);
  if (q.stride(1) < q.stride(2)) {
    return fresh_output(at::empty({B, S, H, dv}, opts)).transpose(1, 2);  // (B, S, H, Dv) -> (B, H, S, Dv)
  }
  return fresh_output(at::empty({B, H, S, dv}, opts));
}

// Packed grouped-query heads (FlashAttention-3's PackGQA): a call of fewer than 64 query tokens (one query tile)
// runs the G = Hq / Hkv query heads of each KV head as one head of G * Sq rows (row g * Sq + i: query head hk * G + g,
// token i; CpuParams::q_period), so the query tiles fill and each K/V tile is read once per group instead of G times.
// A row's band is its token's (params.h Visibility) and its bias row its own head's and token's (row_offset), so
// causal steps, windows and any mask pack; not alibi or dropout (their terms follow the head), varlen or block
// coordinates, and only where each thread still gets a KV head. Measured (Intel Xeon AMX, B1, GQA 16/4 and 32/8 at
// D=128, 12/4 at D=64, 512 / 2048 keys, steps of 2-16 tokens, one thread, README): bf16 1.32-2.31x torch's SDPA
// before, 1.76-3.62x after, with transformers' causal mask 1.10-2.01x before, 1.46-2.66x after; fp32 0.72-1.23x
// before, 0.90-1.41x after, causal 0.55-1.11x, 1.01-1.61x. From 17 to 63 tokens (the bound had been 16; 2026-12-05,
// GQA 16/4 and 8/2 at D=128, 12/4 at D=64, 512 / 2048 keys, packed against not, median of 7): one thread fp16
// 0.91-1.44x, bf16 0.94-1.26x, fp32 0.99-1.20x; two threads fp16 1.08-1.71x, bf16 0.89-1.50x (fp16 16/4 at 24 tokens
// and 2048 keys had read 0.80x torch's on two threads, four 24-row tiles a KV head where one of 96 rows now runs).
// Each row's products and sums are those of its own head's rows, so the output is the same bits either way (but
// where a mask's -inf edges differ by head: a tile starts at the first key any of its rows sees; and in fp16 where
// only the packed call reaches bf16 pairs, kernels.h fp16_on_pairs).
constexpr int64_t kPackGqaTokens = 63;

bool packs_gqa(const CpuParams& p) {
  return p.group() > 1 && p.Sq <= kPackGqaTokens && p.cu_q == nullptr && p.q_start == nullptr &&
         p.alibi == nullptr && p.dropout_p == 0.f &&
         p.nseq * p.Hkv >= at::get_num_threads();  // fewer heads than threads would leave threads idle
}

// The stride between packed rows of a (B, H, S, X) tensor whose heads are S rows apart (any head stride when
// S == 1); -1 when they are not (a (B, S, H, X) layout).
int64_t packed_row_stride(const at::Tensor& t) {
  if (t.size(2) == 1) return t.stride(1);
  return t.stride(1) == t.size(2) * t.stride(2) ? t.stride(2) : -1;
}

// Points p at q and out as (B, Hkv, G * Sq, .): in place where their heads are Sq rows apart, else through
// contiguous copies (q_rows: q's; out_rows: the kernel's output, copied into out after).
void pack_gqa(CpuParams& p, const at::Tensor& q, const at::Tensor& out, at::Tensor& q_rows, at::Tensor& out_rows) {
  const int64_t G = p.group();
  int64_t qs = packed_row_stride(q);
  if (qs < 0) {
    q_rows = q.contiguous();  // (B, Hq, Sq, D)
    p.q = q_rows.data_ptr();
    p.q_st = strides_of(q_rows);
    qs = p.q_st.s;
  }
  int64_t os = packed_row_stride(out);
  if (os < 0) {
    out_rows = alloc_output(out.sizes(), out.options());  // (B, Hq, Sq, Dv), contiguous; poisoned as out is
    p.out = out_rows.data_ptr();
    p.o_st = strides_of(out_rows);
    os = p.o_st.s;
  }
  p.q_st = {p.q_st.b, G * p.q_st.h, qs, p.q_st.d};  // (B, Hq, Sq, D) -> (B, Hkv, G * Sq, D)
  p.o_st = {p.o_st.b, G * p.o_st.h, os, p.o_st.d};  // (B, Hq, Sq, Dv) -> (B, Hkv, G * Sq, Dv)
  p.bias_sg = p.bias_st.h;  // a bias's and mask_keys' heads: (B, Hq, ...) -> (B, Hkv, G, ...)
  p.bias_st.h *= G;
  p.mask_keys_sg = p.mask_keys_sh;
  p.mask_keys_sh *= G;
  p.Hq = p.Hkv;
  p.q_period = p.Sq;
  p.Sq *= G;
  p.lse_sh = p.Sq;  // lse (B, Hq, Sq) contiguous -> (B, Hkv, G * Sq); lse_sb unchanged
}

// Calls of at most 2 query rows per KV head (Hq / Hkv x Sq: a training step on 1-2 tokens, a pooling query, one
// token of 2 grouped-query heads) at head dims of 48 and more, and of 3-4 rows against at least 512 keys at head dims
// of 64 and more, run on the split-KV decode kernel (decode.cpp), which reads K's and V's rows where they lie, instead
// of the prefill kernel, which packs and transposes every key tile for those few rows first. Inference calls reach
// that kernel through the dispatcher's route (dense_call; its own rule); a call that records a gradient did not. AMD
// EPYC Zen 5 (AVX-512, AVX512-BF16), one thread, 2026-12-07, the op on either kernel in one process (prefill time
// over decode time; MHA, groups of 2 and 4, one and two tokens, 64-2048 keys; benchmarks/bench_few_rows.py): at head
// dims 64-256, 1-2 rows 0.90-5.43x (fp32 0.97-2.77x), 3-4 rows below 512 keys 0.68-0.94x in fp32 and fp16 (bf16
// 0.94-1.55x), from 512 keys 0.98-2.70x; at 48 1-2 rows 0.95-2.44x, 4 rows 0.90-1.07x; at 16-32 0.46-1.77x (fp32 rows
// 2 at 32: 0.90-1.01x, rows 4 from 512 keys 0.46-0.85x); 8 rows and more 0.40-1.46x.
constexpr int64_t kDecodeRows = 2, kDecodeMinDim = 48;  // and against kDecodeLongKeys or more:
constexpr int64_t kDecodeRowsLong = 4, kDecodeLongKeys = 512, kDecodeMinDimLong = 64;
// ... and 5-8 rows there at head dims 128-160 (Q's and V's both), re-measured after the decode kernel's four-row
// scores (decode_tiles.h, scores_avx512_rows4; the same CPU, results/cpu-20261207-zen5-rowsreads, MHA 8 heads at 6
// and 8 tokens, groups of 2 and 4, B1-2): one thread fp32 1.26-1.79x, bf16 1.16-1.79x, fp16 1.43-2.22x; two threads
// 1.14-2.43x; held to AVX2 1.04-1.59x. Below 512 keys fp32 and fp16 0.65-0.89x (bf16 1.08-1.31x); at head dim 96 bf16
// 0.90-0.98x below 4096 keys, at 256 fp32 and fp16 0.88-0.99x below 4096; 12-16 rows 0.58-1.08x.
constexpr int64_t kDecodeRowsMid = 8, kDecodeMidDimLo = 128, kDecodeMidDimHi = 160;

// The backward of few rows runs in one pass over the keys (bwd_rows.cpp; BwdCall::rows) instead of on the tile
// backward, which packs and transposes every key block for those rows (and does so per query head of a group), by a
// rule of its own, wider than the forward's: the calls whose forward runs on the decode kernel and more (a forward on
// the tile kernels leaves the out and lse it reads, as any forward). AMD EPYC Zen 5, one thread, 2026-12-07, the bwd
// op on either kernel in one process, tile time over one-pass time, 64-2048 keys, no mask (bench_few_rows.py --bwd;
// benchmarks/results/cpu-20261207-zen5-bwdrule). MHA B1 H8: 1-2 rows from head dim 32 1.04-3.81x (at 16
// 0.81-1.06x in fp32); 3 from 48 1.01-2.72x (at 32 0.89-1.13x); 4 from 64 0.99-2.53x (at 48 0.90-1.17x); 6 in fp32
// from 64 0.97-2.43x (bf16 and fp16 0.65-1.45x at 64-256); 8 in fp32 from 128 0.95-2.19x (at 64 0.92-1.54x; other
// dtypes 0.42-1.26x); 12-16 rows 0.41-1.70x. Groups of 2, 4 and 8 one token per query head: 1.15-3.44x from head
// dim 32 (48 in groups of 4), the tile backward's per-head rows being single; two tokens: groups of 2 and 4 at 4-8
// rows 0.68-2.92x, group 8 (16 rows) 0.71-2.19x; three: 0.53-1.94x. The same CPU held to AVX2
// (FASTATTN_CPU_ISA=avx2, which holds the one-pass loops there but not oneDNN's brgemm under the tile backward: a
// bound from below for an AVX2 CPU): 1-4 rows inside the table 0.96-4.45x, fp32 6 rows 0.76-1.32x; so the fp32 rows
// past the table are taken on AVX-512 only. fp32 in groups of 2 and 4 query heads, 8 rows from head dim 64 and 12
// from 128: one thread 0.99-1.94x, two 1.04-1.73x (MHA 8 rows at 64 0.92-1.54x, 12 at 128 0.92-1.70x). Two tokens per
// query head in groups of up to 8 (16 rows) from head dim 64, any dtype, re-measured the next session after the
// one-pass side's four-row scores and its reads from 8 MB (bwd_rows.cpp, kStreamBytes;
// results/cpu-20261207-zen5-rowsreads, groups of 2-8, B1-2, head dims 64-256, 64-4096 keys): one thread 1.18-3.02x,
// two 1.20-2.84x; held to AVX2 groups of 4 1.03-1.46x, of 8 0.90-1.18x, so groups of 8 on AVX-512 only (at head dim
// 32-48 0.89-1.43x: left out).
struct RowsFromDim { int64_t dim, rows; };
constexpr RowsFromDim kOnePassRows[] = {{32, 2}, {48, 3}, {64, 4}};  // rows per KV head from a head dim, any dtype
constexpr RowsFromDim kOnePassRowsFp32[] = {{64, 6}, {128, 8}};      // fp32 on AVX-512
constexpr RowsFromDim kOnePassGroupsFp32[] = {{64, 8}, {128, 12}};   // and with groups of query heads
constexpr RowsFromDim kOnePassGroup = {32, 8};  // one token per query head: a group of up to 8 from head dim 32
constexpr RowsFromDim kOnePassPairs = {64, 8};  // two tokens per query head: a group of up to 4 from head dim 64,
constexpr int64_t kOnePassPairsWide = 16;       // of up to 8 on AVX-512

// FASTATTN_CPU_FEW_ROWS as now set: prefill (both rules off), decode (both on for every call the kernels take,
// whatever its rows: for measuring the rules) or the rules. Read per call; tests and benchmarks compare.
enum class FewRows { rule, prefill, decode };
FewRows few_rows_switch() {
  const char* env = std::getenv("FASTATTN_CPU_FEW_ROWS");
  if (env == nullptr) return FewRows::rule;
  if (std::strcmp(env, "prefill") == 0) return FewRows::prefill;
  return std::strcmp(env, "decode") == 0 ? FewRows::decode : FewRows::rule;
}

// What the decode kernel does not take, and the one-pass backward keeps to (what it was tested and measured on):
// varlen, dropout, block coordinates, an fp32 output, a head offset (the dropout counter's), top-left windows of
// Sq != Sk (the decode kernel aligns bottom-right, as ALiBi always is), a head dim apart.
bool few_rows_takes(const CpuParams& p, bool out_fp32) {
  if (p.Sq == 0 || p.Sk == 0 || p.B == 0 || p.cu_q || p.dropout_p > 0 || p.q_start || out_fp32 || p.head_start != 0) {
    return false;
  }
  if ((p.window_left >= 0 || p.window_right >= 0) && !p.bottom_right && p.Sq != p.Sk) return false;
  return (p.q_st.d == 1 || p.D == 1) && (p.k_st.d == 1 || p.D == 1) && (p.v_st.d == 1 || p.Dv == 1);
}

bool few_rows_on_decode(const CpuParams& p, bool out_fp32) {
  const FewRows sw = few_rows_switch();
  if (sw == FewRows::prefill || !few_rows_takes(p, out_fp32)) return false;
  const int64_t rows = p.group() * p.Sq, dim = std::min(p.D, p.Dv);
  const bool long_keys = p.Sk >= kDecodeLongKeys && dim >= kDecodeMinDimLong;
  const bool mid_dims = long_keys && dim >= kDecodeMidDimLo && std::max(p.D, p.Dv) <= kDecodeMidDimHi;
  const int64_t bound = mid_dims ? kDecodeRowsMid : long_keys ? kDecodeRowsLong : kDecodeRows;
  return sw == FewRows::decode || (rows <= bound && dim >= kDecodeMinDim);
}

bool wide_vectors() {
#ifdef FASTATTN_VEC512
  return vec512::available();
#else
  return false;
#endif
}

bool few_rows_in_one_pass(const CpuParams& p, bool fp32) {
  const FewRows sw = few_rows_switch();
  if (sw == FewRows::prefill || !few_rows_takes(p, false)) return false;
  const int64_t rows = p.group() * p.Sq, dim = std::min(p.D, p.Dv);
  if (sw == FewRows::decode || (p.Sq == 1 && dim >= kOnePassGroup.dim && rows <= kOnePassGroup.rows)) return true;
  const auto within = [&](const auto& rules) {
    for (const RowsFromDim& r : rules) {
      if (dim >= r.dim && rows <= r.rows) return true;
    }
    return false;
  };
  if (p.Sq == 2 && dim >= kOnePassPairs.dim && rows <= (wide_vectors() ? kOnePassPairsWide : kOnePassPairs.rows)) {
    return true;
  }
  const bool wide_fp32 = fp32 && wide_vectors();
  return within(kOnePassRows) || (wide_fp32 && within(kOnePassRowsFp32)) ||
         (wide_fp32 && p.group() > 1 && within(kOnePassGroupsFp32));
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& attn_bias,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t window_left,
                                           int64_t window_right, bool bottom_right, double softcap,
                                           const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                                           int64_t seed, int64_t offset, bool deterministic,
                                           const std::optional<at::Tensor>& q_start,
                                           const std::optional<at::Tensor>& k_start, bool out_fp32,
                                           int64_t head_start) {
  check_inputs(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, alibi_slopes);
  if (q.size(1) == 0) {  // no query heads: empty outputs (the task order divides by Hq / Hkv)
    return {alloc_out(q, v.size(3), out_fp32), at::empty({q.size(0), 0, q.size(2)}, q.options().dtype(at::kFloat))};
  }
  CpuParams p = make_params(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
                            bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, q_start, k_start,
                            head_start);
  const auto [mq, mk] = max_lengths(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_start, k_start);
  if (few_rows_on_decode(p, out_fp32)) {  // (after the checks above: the same errors either way)
    return decode::dense_fwd(q, k, v, attn_bias, scale, window_left, window_right, softcap, alibi_slopes);
  }
  at::Tensor out = alloc_out(q, p.Dv, out_fp32);
  p.out_fp32 = out_fp32;
  at::Tensor lse = alloc_output({p.B, p.Hq, p.Sq}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.o_st = strides_of(out);
  p.lse = lse.data_ptr<float>();
  MaskStore mask;  // p.mask_keys and p.key_end point here
  read_mask(p, q.scalar_type(), false, mask);  // first: a causal mask read as a band may then be packed
  at::Tensor q_rows, out_rows;  // packed GQA's copies, where q's or out's heads are not Sq rows apart
  const bool packed = packs_gqa(p);
  if (packed) pack_gqa(p, q, out, q_rows, out_rows);
  const int64_t sq = packed ? p.Sq : mq;
  // bf16/fp16 tiles go to the matrix units where mm::path found them usable (fp16 also as bf16 pairs, where they
  // pay), else through fp32 tiles.
  const bool lowp = mm::path(q.scalar_type()) == mm::Path::kBrgemm ||
                    (q.scalar_type() == at::kHalf && fp16_on_pairs(sq * p.group(), mk, false));
  switch (q.scalar_type()) {
    case at::kFloat: fwd_kernel<float>(p, sq, mk); break;
    case at::kBFloat16: lowp ? fwd_lowp_kernel<c10::BFloat16>(p, sq, mk) : fwd_kernel<c10::BFloat16>(p, sq, mk); break;
    default: lowp ? fwd_lowp_kernel<c10::Half>(p, sq, mk) : fwd_kernel<c10::Half>(p, sq, mk); break;
  }
  if (out_rows.defined()) out.copy_(out_rows);
  return {out, lse};
}

// bwd and bwd_acc: everything but the gradient outputs, checked and filled.
struct BwdCall {
  CpuParams p;
  int64_t mq = 0, mk = 0;
  bool rows = false;  // few_rows_in_one_pass: the backward in one pass over the keys (bwd_rows.cpp)
  at::Tensor lse_c;  // keeps a contiguous copy of lse alive
  MaskStore mask;  // p.mask_keys and p.key_end point here
};

BwdCall bwd_prepare(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias,
                    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                    int64_t window_right, bool bottom_right, double softcap,
                    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
                    const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start,
                    int64_t head_start) {
  check_inputs(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, alibi_slopes);
  FA_CHECK(v.size(3) > 0, "value head dim must be positive for a backward (there is no output to differentiate), ",
           "got v", v.sizes());
  BwdCall c;
  CpuParams& p = c.p;
  p = make_params(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right, bottom_right,
                  softcap, alibi_slopes, dropout_p, seed, offset, q_start, k_start, head_start);
  std::tie(c.mq, c.mk) = max_lengths(p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_start, k_start);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}, std::pair{&lse, "lse"}}) {
    FA_CHECK(t->device().is_cpu(), name, " must be on cpu, got ", t->device());
  }
  FA_CHECK(dout.dim() == 4 && dout.size(0) == p.B && dout.size(1) == p.Hq && dout.size(2) == p.Sq &&
               dout.size(3) == p.Dv && dout.scalar_type() == q.scalar_type(),
           "dout must be (B, Hq, Sq, Dv) in q's dtype, got ", dout.scalar_type(), " ", dout.sizes());
  FA_CHECK(out.sizes() == dout.sizes() && out.scalar_type() == q.scalar_type(), "out must match dout, got ",
           out.sizes());
  FA_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq &&
               lse.size(2) == p.Sq,
           "lse must be float32 (B, Hq, Sq), got ", lse.scalar_type(), " ", lse.sizes());
  // lse and delta are read as contiguous (B, Hq, Sq) rows; lse is small, so a copy is cheap when needed.
  c.lse_c = lse.contiguous();
  p.out = const_cast<void*>(out.data_ptr());
  p.o_st = strides_of(out);
  p.lse = const_cast<float*>(c.lse_c.data_ptr<float>());
  p.dout = dout.data_ptr();
  p.do_st = strides_of(dout);
  c.rows = few_rows_in_one_pass(p, q.scalar_type() == at::kFloat);  // (before read_mask changes p)
  read_mask(p, q.scalar_type(), true, c.mask);
  return c;
}

// Runs the backward into dq/dk/dv: q.dtype outputs, or (accumulate) fp32 accumulators the kernels add into.
void bwd_launch(BwdCall& c, at::ScalarType dt, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                bool accumulate) {
  CpuParams& p = c.p;
  p.accumulate = accumulate;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_st = strides_of(dq);
  p.dk_st = strides_of(dk);
  p.dv_st = strides_of(dv);
  const int64_t mq = c.mq, mk = c.mk;
  if (c.rows && !accumulate) {
    switch (dt) {
      case at::kFloat: return bwd_rows_kernel<float>(p);
      case at::kBFloat16: return bwd_rows_kernel<c10::BFloat16>(p);
      default: return bwd_rows_kernel<c10::Half>(p);
    }
  }
  const bool lowp = mm::path(dt) == mm::Path::kBrgemm ||
                    (dt == at::kHalf && fp16_on_pairs(mq * p.group(), mk, true));
  switch (dt) {
    case at::kFloat: bwd_kernel<float>(p, mq, mk); break;
    case at::kBFloat16: lowp ? bwd_lowp_kernel<c10::BFloat16>(p, mq, mk) : bwd_kernel<c10::BFloat16>(p, mq, mk); break;
    default: lowp ? bwd_lowp_kernel<c10::Half>(p, mq, mk) : bwd_kernel<c10::Half>(p, mq, mk); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
    bool deterministic, const std::optional<at::Tensor>& q_start, const std::optional<at::Tensor>& k_start,
    int64_t head_start) {
  BwdCall c = bwd_prepare(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          scale, window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed,
                          offset, q_start, k_start, head_start);
  at::Tensor dq = fresh_output(at::empty_like(q)), dk = fresh_output(at::empty_like(k));
  at::Tensor dv = fresh_output(at::empty_like(v));
  bwd_launch(c, q.scalar_type(), dq, dk, dv, false);
  return {dq, dk, dv};
}

// bwd's gradients added in fp32 into the caller's accumulators (block calls: no rounding per block).
void bwd_acc_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_bias,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
                 bool bottom_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                 int64_t seed, int64_t offset, bool deterministic, const std::optional<at::Tensor>& q_start,
                 const std::optional<at::Tensor>& k_start, const at::Tensor& dq_acc, const at::Tensor& dk_acc,
                 const at::Tensor& dv_acc, int64_t head_start) {
  BwdCall c = bwd_prepare(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          scale, window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed,
                          offset, q_start, k_start, head_start);
  block_checks::check_accumulators(dq_acc, dk_acc, dv_acc, q, k, v, dout, out, lse);
  bwd_launch(c, q.scalar_type(), dq_acc, dk_acc, dv_acc, true);
}

}  // namespace

std::string few_rows_describe() {
  const FewRows sw = few_rows_switch();
  if (sw == FewRows::prefill) return "the tile kernels (FASTATTN_CPU_FEW_ROWS=prefill)";
  if (sw == FewRows::decode) {
    return "forward on the decode kernel, backward in one pass, at any row count (FASTATTN_CPU_FEW_ROWS=decode)";
  }
  const auto table = [](const auto& rules) {
    std::string t;
    for (const RowsFromDim& r : rules) t += ", " + std::to_string(r.rows) + " from " + std::to_string(r.dim);
    return t.substr(2);
  };
  const std::string fp32 =
      wide_vectors() ? " (fp32: " + table(kOnePassRowsFp32) + "; in groups " + table(kOnePassGroupsFp32) + ")" : "";
  return "forward on the decode kernel up to " + std::to_string(kDecodeRows) +
         " query rows per KV head from head dim " + std::to_string(kDecodeMinDim) + ", " +
         std::to_string(kDecodeRowsLong) + " against " + std::to_string(kDecodeLongKeys) + " keys or more from " +
         std::to_string(kDecodeMinDimLong) + " (" + std::to_string(kDecodeRowsMid) + " at head dims " +
         std::to_string(kDecodeMidDimLo) + "-" + std::to_string(kDecodeMidDimHi) + ")" +
         "; backward in one pass over the keys up to " + table(kOnePassRows) + fp32 +
         ", one token per query head in groups of up to " + std::to_string(kOnePassGroup.rows) + " from " +
         std::to_string(kOnePassGroup.dim) + ", two in groups of up to " +
         std::to_string((wide_vectors() ? kOnePassPairsWide : kOnePassPairs.rows) / 2) + " from " +
         std::to_string(kOnePassPairs.dim);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("bwd_acc", &bwd_acc_cpu);
}

}  // namespace fastattn::cpu
