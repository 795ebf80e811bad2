// Skipping key padding exactly (CpuParams::key_end). Under a key-padding mask the trailing keys of a batch whose
// bias is -inf have score -inf and P = 0 as long as scale * q.k_j is finite; they then add nothing to the forward
// (0 * V_j, V_j finite) nor to the backward (dS = 0 * (dO.V_j - delta), dO, V_j and delta = dO.O finite). A batch
// skips them only when bounds on Q, those K/V rows (and dO, O in the backward) show no term can be NaN or overflow;
// otherwise the kernels compute them and the NaN comes out as in PyTorch's full computation.
#include <cmath>
#include <limits>

#include "kernels.h"
#include "vec.h"

namespace fastattn::cpu {

namespace {

// Padding worth skipping: at least 1/16 of all keys (below that the bounds' pass costs more than it saves).
constexpr int64_t kMinFraction = 16;
// Far inside float range: products and partial sums of terms below this cannot reach Inf.
constexpr double kSafeBound = 1e30;

// The larger of two maxima, NaN once either is NaN.
inline float nan_max(float a, float b) {
  return a != a || b != b ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b);
}

// max |x[b, h, r, c]| over h < H, r in [r0, r1), c < C of a (B, H, S, C) tensor; NaN when any element is NaN.
template <typename T>
float max_abs(const void* base, const Strides4& st, int64_t b, int64_t H, int64_t r0, int64_t r1, int64_t C) {
  float m = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    const T* head = static_cast<const T*>(base) + b * st.b + h * st.h;
    if (st.d == 1 && st.s == C) {  // the head's rows [r0, r1) are one run: one pass
      m = nan_max(m, vec::max_abs_row<T>(head + r0 * C, (r1 - r0) * C));
      continue;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = head + r * st.s;
      if (st.d == 1) {
        m = nan_max(m, vec::max_abs_row<T>(row, C));
        continue;
      }
      for (int64_t c = 0; c < C; ++c) m = nan_max(m, std::abs(static_cast<float>(row[c * st.d])));
    }
  }
  return m;
}

template <typename T>
int64_t last_visible_key(const CpuParams& p, int64_t b) {
  const T* row = static_cast<const T*>(p.bias) + b * p.bias_st.b;
  int64_t j = p.Sk;
  while (j > 0 && static_cast<float>(row[(j - 1) * p.bias_st.d]) == kNegInf) --j;
  return j;
}

// Every term touching keys [k0, k1) of batch b is finite and far from overflow (NaN bounds compare false); true for
// no keys.
template <typename T>
bool exact_to_skip(const CpuParams& p, int64_t b, int64_t k0, int64_t k1, bool backward) {
  if (k0 >= k1) return true;
  const double q = max_abs<T>(p.q, p.q_st, b, p.Hq, 0, p.Sq, p.D);
  const double k = max_abs<T>(p.k, p.k_st, b, p.Hkv, k0, k1, p.D);
  const double v = max_abs<T>(p.v, p.v_st, b, p.Hkv, k0, k1, p.Dv);
  bool ok = q * k * double(p.D) * std::abs(double(p.scale)) < kSafeBound && v < kSafeBound;
  if (ok && backward) {
    const double d = max_abs<T>(p.dout, p.do_st, b, p.Hq, 0, p.Sq, p.Dv);
    const double o = max_abs<T>(p.out, p.o_st, b, p.Hq, 0, p.Sq, p.Dv);
    ok = d * v * double(p.Dv) < kSafeBound && d * o * double(p.Dv) < kSafeBound;  // dP and delta
  }
  return ok;
}

template <typename T>
std::vector<int64_t> ends(const CpuParams& p, bool backward) {
  std::vector<int64_t> kend(p.B);
  int64_t cut = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    kend[b] = last_visible_key<T>(p, b);
    cut += p.Sk - kend[b];
  }
  if (cut * kMinFraction < p.B * p.Sk) return {};
  for (int64_t b = 0; b < p.B; ++b) {
    if (kend[b] < p.Sk && !exact_to_skip<T>(p, b, kend[b], p.Sk, backward)) kend[b] = p.Sk;
  }
  return kend;
}

// The bias row of every batch is exactly 0 on keys [0, ends[b]) (all keys when ends is empty); -0 counts as 0, NaN
// does not (it must reach the output).
template <typename T>
bool zero_below_ends(const CpuParams& p, const std::vector<int64_t>& ends) {
  for (int64_t b = 0; b < p.B; ++b) {
    const T* row = static_cast<const T*>(p.bias) + b * p.bias_st.b;
    const int64_t end = ends.empty() ? p.Sk : ends[b];
    for (int64_t j = 0; j < end; ++j) {
      if (static_cast<float>(row[j * p.bias_st.d]) != 0.f) return false;
    }
  }
  return true;
}

}  // namespace

bool terms_bounded(const CpuParams& p, at::ScalarType dtype, int64_t b, int64_t k0, int64_t k1, bool backward) {
  switch (dtype) {
    case at::kFloat: return exact_to_skip<float>(p, b, k0, k1, backward);
    case at::kBFloat16: return exact_to_skip<c10::BFloat16>(p, b, k0, k1, backward);
    default: return exact_to_skip<c10::Half>(p, b, k0, k1, backward);
  }
}

void skip_key_padding(CpuParams& p, at::ScalarType dtype, bool backward, std::vector<int64_t>& ends) {
  ends = key_padding_ends(p, dtype, backward);
  p.key_end = ends.empty() ? nullptr : ends.data();
  if (!p.bias_key_padding || p.cu_q != nullptr) return;
  const bool zero = dtype == at::kFloat      ? zero_below_ends<float>(p, ends)
                    : dtype == at::kBFloat16 ? zero_below_ends<c10::BFloat16>(p, ends)
                                             : zero_below_ends<c10::Half>(p, ends);
  if (zero) {
    p.bias = nullptr;
    p.bias_key_padding = false;
  }
}

std::vector<int64_t> key_padding_ends(const CpuParams& p, at::ScalarType dtype, bool backward) {
  if (!p.bias_key_padding || p.cu_q != nullptr || p.Sk == 0 || p.Sq == 0) return {};
  switch (dtype) {
    case at::kFloat: return ends<float>(p, backward);
    case at::kBFloat16: return ends<c10::BFloat16>(p, backward);
    default: return ends<c10::Half>(p, backward);
  }
}

}  // namespace fastattn::cpu
