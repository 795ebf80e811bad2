// Reading a full mask as the causal band (kernels.h: read_mask_band). Models hand SDPA (B, 1, Sq, Sk) masks that are
// a causal mask and a key-padding row (transformers' sdpa masks, nn.Transformer's square subsequent mask), which
// torch's CPU kernels, and ours before this, add tile by tile over every key. Read once here (two memcmp per row,
// stopping at the first row that differs), such a mask becomes the causal call with its key-padding row: the tiles
// skip the blocks above the diagonal (key_end.cpp then the trailing padding) and add one bias row per batch.
//
// Exact: on the keys the causal call leaves out the mask is -inf, so there P = exp(s - inf - m) = 0 and dS = 0 as long
// as every term is finite (terms_bounded); otherwise the mask stays and a NaN reaches the output as in PyTorch.
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace fastattn::cpu {

namespace {

std::atomic<bool> g_enabled{true};

enum class Band { kNone, kCausal, kCausalBottomRight, kKeyPadding };

// FASTATTN_CPU_PLANT=band_rows (tests only, read once): compares only the rows' -inf tails, not their visible part,
// so a causal mask with holes is read as plain causal: a bug the correctness checks must catch.
bool plant_band_rows() {
  static const bool on = [] {
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e != nullptr && std::strcmp(e, "band_rows") == 0;
  }();
  return on;
}

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
  const bool check_visible = !plant_band_rows();
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

}  // namespace

void read_mask_band(CpuParams& p, at::ScalarType dtype, bool backward) {
  // Masks beside varlen, block coordinates, alibi or a window keep their own path (rare; not worth the cases).
  if (!g_enabled.load(std::memory_order_relaxed) || p.bias == nullptr || p.bias_key_padding || p.cu_q != nullptr ||
      p.q_start != nullptr || p.alibi != nullptr || p.window_left >= 0 || p.window_right >= 0) {
    return;
  }
  const Band band = find_band(p.bias, dtype, p.bias_st, p.B, p.Sq, p.Sk);
  if (band == Band::kNone) return;
  for (int64_t b = 0; b < p.B; ++b) {
    if (!terms_bounded(p, dtype, b, 0, backward)) return;
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

void mask_band_enable(bool on) { g_enabled.store(on); }

}  // namespace fastattn::cpu
