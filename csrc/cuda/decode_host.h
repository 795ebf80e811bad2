// Host side of fastattn::decode_fwd on CUDA, free of CUDA runtime calls: argument checks, the split heuristic and
// the parameter struct. decode_cuda.cpp launches the kernels with it; tests/cuda_emu runs the same kernels on the
// CPU from the same plan (device_type = CPU), so both see identical parameters.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common.h"
#include "cuda/decode_launch.h"
#include "decode_checks.h"

namespace fastattn {
namespace cuda {

constexpr int64_t kMinSplitKeys = 256;  // the heuristic never makes splits shorter than this

// Enough blocks for about two waves over the SMs, splits of at least kMinSplitKeys keys, at most 64 splits.
inline int64_t split_heuristic(int64_t blocks, int64_t max_keys, int64_t sms) {
  const int64_t target = 2 * sms;
  if (blocks >= target) return 1;
  const int64_t by_len = std::max<int64_t>(1, max_keys / kMinSplitKeys);
  return std::clamp<int64_t>(std::min((target + blocks - 1) / blocks, by_len), 1, kDecodeMaxSplitsHost);
}

// The kernels read cache rows with 16-byte loads: base and every stride that moves between rows (page/row, slot,
// kv head) must be multiples of 16 bytes.
inline void check_cache_aligned(const at::Tensor& t, const char* name, int64_t vec) {
  FA_CHECK(t.stride(3) == 1 || t.size(3) == 1, "decode_fwd: ", name, " needs stride 1 along the head dim, got "
           "strides ", t.strides());
  FA_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "decode_fwd (cuda): ", name,
           " must start on a 16-byte boundary");
  for (int i = 0; i < 3; ++i) {
    FA_CHECK(t.size(i) <= 1 || t.stride(i) % vec == 0, "decode_fwd (cuda): ", name, " strides ", t.strides(),
             " must be multiples of ", vec, " elements (16 bytes)");
  }
  FA_CHECK(t.size(3) % vec == 0, "decode_fwd (cuda): ", name, " head dim ", t.size(3), " must be a multiple of ", vec,
           " for ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dim, int64_t size0) {
  FA_CHECK(t.scalar_type() == at::kInt && t.dim() == dim && t.size(0) == size0 && t.device() == q.device(),
           "decode_fwd: ", name, " must be int32 with ", dim, " dims and ", size0, " rows on ", q.device(),
           ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// What a decode_fwd call launches: parameters, the outputs, and the tensors whose pointers the parameters hold.
struct DecodePlan {
  DecodeParams p{};
  at::Tensor out, lse;
  at::Tensor lens, bt, bidx, alibi, out_part, lse_part;
  bool launch = false;               // false: out and lse are already final (empty shapes or an empty cache)
  int64_t head_dim = 0, rows = 0;    // max(D, Dv) and query rows per kv head, for the template switches
};

// Checks the arguments (every tensor on a device of device_type), then calls checked() -> number of SMs (the
// caller sets up its device guard there), allocates the outputs and fills the plan.
template <typename Checked>
DecodePlan plan_decode(const at::Tensor& q, const at::Tensor& k_given, const at::Tensor& v_given,
                       const std::optional<at::Tensor>& seqlens_k, const std::optional<at::Tensor>& block_table,
                       const std::optional<at::Tensor>& cache_batch_idx, double scale, int64_t window_left,
                       int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                       int64_t num_splits, bool kv_bhsd, at::DeviceType device_type, Checked&& checked) {
  const at::Tensor k_cache = decode_checks::cache_view(k_given, kv_bhsd);  // (rows, slots, Hkv, D) in either case
  const at::Tensor v_cache = decode_checks::cache_view(v_given, kv_bhsd);
  decode_checks::check_ranks_dtypes(q, k_cache, v_cache, "cuda");
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, seqlens_k.has_value() ? &*seqlens_k : &q}) {
    FA_CHECK(t->device().type() == device_type && t->device() == q.device(),
             "decode_fwd (cuda): every tensor must be on ", q.device(), ", got one on ", t->device());
  }
  FA_CHECK(q.stride(3) == 1 || q.size(3) == 1, "decode_fwd: q needs stride 1 along the head dim, got strides ",
           q.strides());
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), Dv = v_cache.size(3);
  decode_checks::check_shapes(q, k_cache, v_cache);
  FA_CHECK(D >= 1 && D <= 256 && Dv >= 1 && Dv <= 256, "decode_fwd (cuda): head dims must be in [1, 256], got D=", D,
           " Dv=", Dv);
  FA_CHECK((Hq / Hkv) * Sq <= kDecodeMaxRows, "decode_fwd (cuda): at most ", kDecodeMaxRows,
           " query rows per kv head (Hq / Hkv * Sq), got ", (Hq / Hkv) * Sq, " (a prefill kernel fits better)");
  FA_CHECK(B <= 65535 && Hkv <= 65535, "decode_fwd (cuda): at most 65535 batch entries and kv heads, got ", B, ", ",
           Hkv);
  const int64_t vec = 16 / q.element_size();
  check_cache_aligned(k_cache, "k_cache", vec);
  check_cache_aligned(v_cache, "v_cache", vec);
  if (seqlens_k.has_value()) check_index(*seqlens_k, "seqlens_k", q, 1, B);
  decode_checks::check_scalars(softcap, num_splits);
  const bool paged = block_table.has_value();
  at::Tensor bt, bidx, alibi;  // copied into the plan below, which keeps them alive
  int64_t capacity = k_cache.size(1);
  if (paged) {
    FA_CHECK(!cache_batch_idx.has_value(), "decode_fwd: cache_batch_idx cannot be combined with block_table");
    bt = block_table->contiguous();
    check_index(bt, "block_table", q, 2, B);
    FA_CHECK(k_cache.size(1) > 0, "decode_fwd: paged cache with page size 0");
    capacity = bt.size(1) * k_cache.size(1);
  } else if (cache_batch_idx.has_value()) {
    bidx = cache_batch_idx->contiguous();
    check_index(bidx, "cache_batch_idx", q, 1, B);
  } else {
    FA_CHECK(k_cache.size(0) == B, "decode_fwd: k_cache batch ", k_cache.size(0), " != q batch ", B,
             " (pass cache_batch_idx)");
  }
  // int32 positions in the kernel: i + off + window stays in range below 2^30 keys per row.
  FA_CHECK(capacity < (int64_t(1) << 30), "decode_fwd (cuda): cache capacity ", capacity, " keys per row is too large "
           "(at most 2^30)");
  decode_checks::check_whole_cache(seqlens_k, capacity);
  if (alibi_slopes.has_value()) {
    alibi = alibi_slopes->contiguous();
    FA_CHECK(alibi.scalar_type() == at::kFloat && alibi.device() == q.device() &&
                 ((alibi.dim() == 1 && alibi.size(0) == Hq) ||
                  (alibi.dim() == 2 && alibi.size(0) == B && alibi.size(1) == Hq)),
             "decode_fwd: alibi_slopes must be float32 (", Hq, ") or (", B, ", ", Hq, ") on ", q.device(), ", got ",
             alibi.scalar_type(), " ", alibi.sizes());
  }

  const int64_t sms = checked();  // the caller's device guard is in place from here on
  DecodePlan plan;
  at::Tensor& out = plan.out = alloc_out_like_q(q, Dv);
  at::Tensor& lse = plan.lse = alloc_output({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0 || Sq == 0) return plan;
  if (seqlens_k.has_value()) plan.lens = seqlens_k->contiguous();  // undefined: every row sees the whole cache

  DecodeParams& p = plan.p;
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.seqlens = plan.lens.defined() ? plan.lens.data_ptr<int>() : nullptr;
  p.block_table = paged ? bt.data_ptr<int>() : nullptr;
  p.batch_idx = bidx.defined() ? bidx.data_ptr<int>() : nullptr;
  p.alibi = alibi.defined() ? alibi.data_ptr<float>() : nullptr;
  p.alibi_sb = alibi.defined() && alibi.dim() == 2 ? Hq : 0;
  p.batch = static_cast<int>(B);
  p.h = static_cast<int>(Hq);
  p.h_kv = static_cast<int>(Hkv);
  p.seqlen_q = static_cast<int>(Sq);
  p.d = static_cast<int>(D);
  p.dv = static_cast<int>(Dv);
  p.group = static_cast<int>(Hq / Hkv);
  p.page = paged ? static_cast<int>(k_cache.size(1)) : 0;
  p.max_blocks = paged ? static_cast<int>(bt.size(1)) : 0;
  p.cache_rows = static_cast<int>(k_cache.size(0));
  p.capacity = static_cast<int>(capacity);
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sm = q.stride(2);
  p.k_sr = k_cache.stride(0), p.k_ss = k_cache.stride(1), p.k_sh = k_cache.stride(2);
  p.v_sr = v_cache.stride(0), p.v_ss = v_cache.stride(1), p.v_sh = v_cache.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sm = out.stride(2);
  constexpr double kLog2e = 1.4426950408889634;
  p.q_mul = static_cast<float>(softcap > 0 ? scale / softcap : scale * kLog2e);
  p.cap_out2 = static_cast<float>(softcap > 0 ? softcap * kLog2e : 0.0);
  // A window wider than the cache is no window; clamping keeps the kernel's int arithmetic in range.
  const auto [wl, wr] = decode_checks::check_window(window_left, window_right, capacity + Sq);
  p.window_left = static_cast<int>(wl);
  p.window_right = static_cast<int>(wr);
  if (p.cache_rows == 0 || capacity == 0) {  // nothing cached anywhere: every row sees no key
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return plan;
  }
  plan.bt = bt, plan.bidx = bidx, plan.alibi = alibi;
  const int64_t splits = num_splits > 0 ? std::min<int64_t>(num_splits, kDecodeMaxSplitsHost)
                                        : split_heuristic(B * Hkv, capacity, sms);
  p.splits = static_cast<int>(splits);
  if (splits > 1) {
    plan.out_part = at::empty({splits, B, Hq, Sq, Dv}, q.options().dtype(at::kFloat));
    plan.lse_part = at::empty({splits, B, Hq, Sq}, q.options().dtype(at::kFloat));
    p.out_part = plan.out_part.data_ptr<float>();
    p.lse_part = plan.lse_part.data_ptr<float>();
  }
  plan.launch = true;
  plan.head_dim = std::max(D, Dv);
  plan.rows = (Hq / Hkv) * Sq;
  return plan;
}

}  // namespace cuda
}  // namespace fastattn
