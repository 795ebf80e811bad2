// Reading a full mask's structure (kernels.h: read_mask). Models hand SDPA (B, 1, Sq, Sk) masks that are a causal
// mask and a key-padding row (transformers' sdpa masks, nn.Transformer's square subsequent mask), sliding windows or
// packed documents, which torch's CPU kernels, and ours before this, add tile by tile over every key.
// - A causal band: read once (two memcmp per row, stopping at the first row that differs), such a mask becomes the
//   causal call with its key-padding row: the tiles skip the blocks above the diagonal and add one bias row.
// - Any other mask: each row's keys between its leading and trailing -inf runs, so the tiles outside every row's
//   range are skipped (the mask still added inside it).
//
// Exact: on the keys left out the mask is -inf, so there P = exp(s - inf - m) = 0 and dS = 0 as long as every term
// is finite (terms_bounded); otherwise the mask stays as it is and a NaN reaches the output as in PyTorch.
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace fastattn::cpu {

namespace {

std::atomic<bool> g_enabled{true};

enum class Band { kNone, kCausal, kCausalBottomRight, kKeyPadding };

// FASTATTN_CPU_PLANT (tests only) names this file's planted bugs (planted, below), bugs the correctness checks must
// catch:
//   band_rows: rows_match compares only the rows' -inf tails, not their visible part, so a causal mask with holes
//              is read as plain causal;
//   mask_keys: neg_inf_run counts a -inf run that ends inside a chunk to the chunk's end, so rows' ranges lose up to
//              63 visible keys at each edge.

// The key-padding row candidate: only 0 and -inf (NaN, +inf or any other value keeps the mask as it is).
template <typename T>
bool zero_or_neg_inf(const T* row, int64_t Sk) {
  for (int64_t j = 0; j < Sk; ++j) {
    const float x = static_cast<float>(row[j]);
    if (x != 0.f && x != kNegInf) return false;
  }
  return true;
}

// Every row i of one batch's mask (rows ss apart) equals the last row, pad, on keys [0, hi(i)) and is -inf on
// [hi(i), Sk): hi(i) = clamp(i + off + 1, 0, Sk) for a causal band, Sk without one. Bitwise: -0 against 0 refuses.
template <typename T>
bool rows_match(const T* base, int64_t ss, int64_t Sq, int64_t Sk, bool causal, int64_t off, const T* neg_inf) {
  const T* pad = base + (Sq - 1) * ss;
  const bool check_visible = !planted("band_rows");
  for (int64_t i = 0; i < Sq; ++i) {
    const T* row = base + i * ss;
    const int64_t hi = causal ? std::clamp<int64_t>(i + off + 1, 0, Sk) : Sk;
    if (check_visible && i < Sq - 1 && std::memcmp(row, pad, hi * sizeof(T)) != 0) return false;
    if (std::memcmp(row + hi, neg_inf, (Sk - hi) * sizeof(T)) != 0) return false;
  }
  return true;
}

// The band a (B, H, Sq, Sk) mask (strides st, unit over keys, broadcast over heads) is, or kNone.
template <typename T>
Band find_band(const T* bias, const Strides4& st, int64_t B, int64_t Sq, int64_t Sk) {
  if (st.d != 1 || st.h != 0 || st.s == 0 || Sq == 0 || Sk == 0) return Band::kNone;
  const int64_t nb = st.b == 0 ? 1 : B;  // a mask broadcast over the batch is read once
  for (int64_t b = 0; b < nb; ++b) {
    if (!zero_or_neg_inf(bias + b * st.b + (Sq - 1) * st.s, Sk)) return Band::kNone;
  }
  const std::vector<T> neg_inf(Sk, T(kNegInf));
  const struct {
    Band band;
    bool causal;
    int64_t off;
  } candidates[] = {{Band::kCausal, true, 0}, {Band::kCausalBottomRight, true, Sk - Sq}, {Band::kKeyPadding, false, 0}};
  for (const auto& c : candidates) {
    if (c.band == Band::kCausalBottomRight && Sk == Sq) continue;  // the same band as top-left
    bool all = true;
    for (int64_t b = 0; b < nb && all; ++b) {
      all = rows_match(bias + b * st.b, st.s, Sq, Sk, c.causal, c.off, neg_inf.data());
    }
    if (all) return c.band;
  }
  return Band::kNone;
}

Band find_band(const void* bias, at::ScalarType dtype, const Strides4& st, int64_t B, int64_t Sq, int64_t Sk) {
  switch (dtype) {
    case at::kFloat: return find_band(static_cast<const float*>(bias), st, B, Sq, Sk);
    case at::kBFloat16: return find_band(static_cast<const c10::BFloat16*>(bias), st, B, Sq, Sk);
    default: return find_band(static_cast<const c10::Half*>(bias), st, B, Sq, Sk);
  }
}

// Length of the run of -inf (bitwise) that starts row[0] (from_end: that ends row[Sk - 1]): memcmp a chunk at a time
// against neg_inf (at least kChunk long), so a row whose first entry is finite costs one compare.
template <typename T>
int64_t neg_inf_run(const T* row, int64_t Sk, const T* neg_inf, bool from_end) {
  constexpr int64_t kChunk = 64;
  static const bool plant = planted("mask_keys");
  int64_t n = 0;
  while (n < Sk) {
    const int64_t w = std::min(kChunk, Sk - n);
    const T* at = from_end ? row + Sk - n - w : row + n;
    if (std::memcmp(at, neg_inf, w * sizeof(T)) == 0) {
      n += w;
      continue;
    }
    if (plant) return n + w;
    for (int64_t c = 0; c < w; ++c) {  // the run ends inside this chunk
      const T* x = from_end ? at + w - 1 - c : at + c;
      if (std::memcmp(x, neg_inf, sizeof(T)) != 0) return n + c;
    }
  }
  return Sk;
}

// Per (batch slice, head slice, row; one row for a bias broadcast over rows): [lo, hi) between the row's leading and
// trailing -inf runs ({Sk, 0} for a row all -inf).
template <typename T>
void row_ranges(const CpuParams& p, int64_t nb, int64_t nh, int64_t nrows, int32_t* out) {
  const Strides4& st = p.bias_st;
  const std::vector<T> neg_inf(std::min<int64_t>(p.Sk, 64), T(kNegInf));
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t i = 0; i < nrows; ++i, out += 2) {
        const T* row = static_cast<const T*>(p.bias) + b * st.b + h * st.h + i * st.s;
        const int64_t lead = neg_inf_run(row, p.Sk, neg_inf.data(), false);
        const int64_t trail = lead == p.Sk ? 0 : neg_inf_run(row, p.Sk, neg_inf.data(), true);
        out[0] = static_cast<int32_t>(lead == p.Sk ? p.Sk : lead);
        out[1] = static_cast<int32_t>(lead == p.Sk ? 0 : p.Sk - trail);
      }
    }
  }
}

// The keys every row of a 64-row block (the tiles' query rows) leaves out, summed over blocks times their rows.
int64_t block_hidden(const int32_t* ranges, int64_t slices, int64_t nrows, int64_t Sk) {
  constexpr int64_t kRows = 64;
  int64_t hidden = 0;
  for (int64_t sl = 0; sl < slices; ++sl) {
    for (int64_t i0 = 0; i0 < nrows; i0 += kRows) {
      const int64_t i1 = std::min(nrows, i0 + kRows);
      int64_t lo = Sk, hi = 0;
      for (int64_t i = i0; i < i1; ++i) {
        lo = std::min<int64_t>(lo, ranges[2 * (sl * nrows + i)]);
        hi = std::max<int64_t>(hi, ranges[2 * (sl * nrows + i) + 1]);
      }
      hidden += (i1 - i0) * (Sk - std::max<int64_t>(hi - lo, 0));
    }
  }
  return hidden;
}

// For a bias (after read_mask_band: a full mask that is no band, or a key-padding row), each row's keys between its
// leading and trailing -inf runs (into `store`, which must outlive p; p.mask_keys), where those runs hold at least
// 1/16 of the scores and the terms are bounded: the kernels then skip the tiles outside every row's range (a
// key-padding row's leading padding; key_end.cpp its trailing padding).
void mask_key_ranges(CpuParams& p, at::ScalarType dtype, bool backward, std::vector<int32_t>& store) {
  const Strides4& st = p.bias_st;
  if (!g_enabled.load(std::memory_order_relaxed) || p.bias == nullptr || p.cu_q != nullptr || p.q_start != nullptr ||
      p.alibi != nullptr || st.d != 1 || p.Sq == 0 || p.Sk == 0 || p.Sk > INT32_MAX) {
    return;
  }
  const int64_t nb = st.b == 0 ? 1 : p.B, nh = st.h == 0 ? 1 : p.Hq, nrows = st.s == 0 ? 1 : p.Sq;
  store.resize(2 * nb * nh * nrows);
  switch (dtype) {
    case at::kFloat: row_ranges<float>(p, nb, nh, nrows, store.data()); break;
    case at::kBFloat16: row_ranges<c10::BFloat16>(p, nb, nh, nrows, store.data()); break;
    default: row_ranges<c10::Half>(p, nb, nh, nrows, store.data()); break;
  }
  // Tiles skip what every row of a 64-row query block leaves out: too little of that is not worth the bounds' pass
  // (nor, in fp32, the smaller tiles). A key-padding row that only trails -inf is key_end.cpp's (its bounds read
  // only the padded keys: a second pass over all of them here cost 3-5% of a short padded call).
  if (block_hidden(store.data(), nb * nh, nrows, p.Sk) * 16 < nb * nh * nrows * p.Sk) return;
  if (nrows == 1) {
    bool leads = false;
    for (int64_t r = 0; r < nb * nh; ++r) leads = leads || (store[2 * r] > 0 && store[2 * r] < store[2 * r + 1]);
    if (!leads) return;
  }
  // Bounds on the keys some row skips, [0, the largest lo) and [the smallest hi, Sk), not on all of them.
  for (int64_t b = 0; b < p.B; ++b) {
    const int32_t* r = store.data() + 2 * (st.b == 0 ? 0 : b) * nh * nrows;
    int64_t lo = 0, hi = p.Sk;
    for (int64_t i = 0; i < nh * nrows; ++i) {
      lo = std::max<int64_t>(lo, r[2 * i]);
      hi = std::min<int64_t>(hi, r[2 * i + 1]);
    }
    const bool ok = lo >= hi ? terms_bounded(p, dtype, b, 0, p.Sk, backward)
                             : terms_bounded(p, dtype, b, 0, lo, backward) &&
                                   terms_bounded(p, dtype, b, hi, p.Sk, backward);
    if (!ok) return;
  }
  p.mask_keys = store.data();
  p.mask_keys_sb = st.b == 0 ? 0 : nh * nrows;
  p.mask_keys_sh = st.h == 0 ? 0 : nrows;
  p.mask_keys_ss = st.s == 0 ? 0 : 1;
}

// A full mask that is a causal mask (top-left or bottom-right) or none, times one key-padding row per batch, of 0
// and -inf only: p then runs as that causal call with its key-padding row, so the kernels skip the blocks the mask
// hides. Left as it is when any term there could be NaN or Inf (terms_bounded).
void read_mask_band(CpuParams& p, at::ScalarType dtype, bool backward) {
  // Masks beside varlen, block coordinates, alibi or a window keep their own path (rare; not worth the cases).
  if (!g_enabled.load(std::memory_order_relaxed) || p.bias == nullptr || p.bias_key_padding || p.cu_q != nullptr ||
      p.q_start != nullptr || p.alibi != nullptr || p.window_left >= 0 || p.window_right >= 0) {
    return;
  }
  const Band band = find_band(p.bias, dtype, p.bias_st, p.B, p.Sq, p.Sk);
  if (band == Band::kNone) return;
  // The band skips the keys above the diagonal, [off + 1, Sk) at most (row 0's); a key-padding row skips none (its
  // -inf keys are computed, or skipped with bounds of their own: mask_key_ranges, key_end.cpp).
  const int64_t k0 = band == Band::kKeyPadding ? p.Sk : std::clamp<int64_t>(band == Band::kCausal ? 1 : p.Sk - p.Sq + 1,
                                                                            0, p.Sk);
  for (int64_t b = 0; b < p.B; ++b) {
    if (!terms_bounded(p, dtype, b, k0, p.Sk, backward)) return;
  }
  // The last row, broadcast over query rows: one key-padding row per batch.
  p.bias = static_cast<const char*>(p.bias) + (p.Sq - 1) * p.bias_st.s * at::elementSize(dtype);
  p.bias_st.s = 0;
  p.bias_key_padding = true;
  if (band != Band::kKeyPadding) {
    p.window_right = 0;
    p.bottom_right = band == Band::kCausalBottomRight;
  }
}

}  // namespace

bool planted(const char* name) {
  static const char* env = std::getenv("FASTATTN_CPU_PLANT");  // read once
  return env != nullptr && std::strcmp(env, name) == 0;
}

void read_mask(CpuParams& p, at::ScalarType dtype, bool backward, MaskStore& store) {
  read_mask_band(p, dtype, backward);
  mask_key_ranges(p, dtype, backward, store.keys);
  skip_key_padding(p, dtype, backward, store.ends);
}

std::string mask_band(const at::Tensor& bias) {
  TORCH_CHECK(bias.dim() == 4, "mask_band: bias must be 4-D (B, H, Sq, Sk), got ", bias.sizes());
  const auto dt = bias.scalar_type();
  TORCH_CHECK(bias.device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "mask_band: bias must be a float32/bfloat16/float16 CPU tensor, got ", dt, " on ", bias.device());
  const Band band = find_band(bias.data_ptr(), dt, strides_of(bias), bias.size(0), bias.size(2), bias.size(3));
  switch (band) {
    case Band::kCausal: return "causal";
    case Band::kCausalBottomRight: return "causal bottom-right";
    case Band::kKeyPadding: return "key padding";
    default: return "";
  }
}

at::Tensor mask_rows(const at::Tensor& bias) {
  TORCH_CHECK(bias.dim() == 4, "mask_rows: bias must be 4-D (B, H, Sq, Sk), got ", bias.sizes());
  const auto dt = bias.scalar_type();
  TORCH_CHECK(bias.device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "mask_rows: bias must be a float32/bfloat16/float16 CPU tensor, got ", dt, " on ", bias.device());
  CpuParams p;
  p.bias = bias.data_ptr();
  p.bias_st = strides_of(bias);
  p.B = bias.size(0);
  p.Hq = bias.size(1);
  p.Sq = bias.size(2);
  p.Sk = bias.size(3);
  if (p.bias_st.d != 1 || p.Sq == 0 || p.Sk == 0) return at::empty({0}, at::kInt);
  const int64_t nb = p.bias_st.b == 0 ? 1 : p.B, nh = p.bias_st.h == 0 ? 1 : p.Hq;
  const int64_t nrows = p.bias_st.s == 0 ? 1 : p.Sq;
  at::Tensor out = at::empty({nb, nh, nrows, 2}, at::kInt);
  switch (dt) {
    case at::kFloat: row_ranges<float>(p, nb, nh, nrows, out.data_ptr<int32_t>()); break;
    case at::kBFloat16: row_ranges<c10::BFloat16>(p, nb, nh, nrows, out.data_ptr<int32_t>()); break;
    default: row_ranges<c10::Half>(p, nb, nh, nrows, out.data_ptr<int32_t>()); break;
  }
  return out;
}

void mask_band_enable(bool on) { g_enabled.store(on); }

}  // namespace fastattn::cpu
