// The matrix-unit tile product (mm.h): run-time probe, brgemm calls, VNNI packing.
#include "mm.h"
#include "kernels.h"  // decode::fetch_describe, few_rows_describe
#include "tile.h"  // packed_kt_available, scores_on_rows_describe, fp32_gemm_describe, bwd_transposed_form,
                   // best_seconds
#include "vec512.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <vector>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FASTATTN_X86_CPUID 1
#endif

// libtorch >= 2.6 exports brgemm for bf16/fp16 with a VNNI flag; older headers lack these macros.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
#define FASTATTN_HAS_BRGEMM 1
#endif

namespace fastattn::cpu::mm {

namespace {

struct Isa {
  bool avx512 = false;  // F + BW + DQ + VL: what the softmax helpers (vec512.h) and oneDNN's bf16 kernels need
  bool avx512_bf16 = false, avx512_fp16 = false, amx_bf16 = false, amx_fp16 = false, avx2 = false;
};

Isa detect_isa() {
  Isa isa;
#ifdef FASTATTN_X86_CPUID
  unsigned a, b, c, d;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    isa.avx2 = b & (1u << 5);
    isa.avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
    isa.avx512_fp16 = d & (1u << 23);
    isa.amx_bf16 = (d & (1u << 22)) && (d & (1u << 24));
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    isa.avx512_bf16 = a & (1u << 5);
    isa.amx_fp16 = a & (1u << 21);
  }
#endif
  if (isa_cap() < 2) isa.avx512 = isa.avx512_bf16 = isa.avx512_fp16 = isa.amx_bf16 = isa.amx_fp16 = false;
  if (isa_cap() < 1) isa.avx2 = false;
  return isa;
}

const Isa& isa() {
  static const Isa i = detect_isa();
  return i;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto pos = line.find(':');
      return pos == std::string::npos ? line : line.substr(pos + 2);
    }
  }
  return "unknown";
}

struct Rates {
  double brgemm = 0.0, fp32 = 0.0;  // GFLOP/s of the forward's score tile on each path (0: not measured)
};

struct Decision {
  Path path = Path::kFp32;
  std::string why;
  Rates rates;  // measured where oneDNN has no AMX
};

// Multiplies a small odd-shaped product whose exact result fp32 can hold (small integers) and compares. oneDNN's
// kernels without native pairs (fp16 on AVX512-FP16 without AMX-FP16) read B plainly, so the VNNI product is
// wrong there: that kernel converts to fp32 itself and measured slower than our fp32 tiles (0.65-0.8x vs 1.0x
// torch on a Xeon with AVX512-FP16, one thread), so the fp32 tiles are the right path then.
template <typename T>
bool probe_exact(std::string& why) {
  constexpr int64_t m = 7, n = 33, k = 38;
  std::vector<T> a(m * k), b(k * n), bv(mm::even(k) * n);
  std::vector<float> ref(m * n, 0.f), c(m * n, -1.f);
  for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<T>(float((i * 7) % 9) - 4.f);
  for (int64_t i = 0; i < k * n; ++i) b[i] = static_cast<T>(float((i * 5) % 11) - 5.f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t t = 0; t < k; ++t) ref[i * n + j] += float(a[i * k + t]) * float(b[t * n + j]);
  for (int64_t t = 0; t < k; ++t)  // by hand (not pack_rows, which a test may plant a bug in)
    for (int64_t j = 0; j < n; ++j) bv[((t / 2) * n + j) * 2 + t % 2] = b[t * n + j];
  mm_vnni<T>(m, n, k, a.data(), k, bv.data(), n, c.data(), n, false);
  mm_vnni<T>(m, n, k, a.data(), k, bv.data(), n, c.data(), n, true);  // accumulate: 2 * ref
  release();
  for (int64_t i = 0; i < m * n; ++i) {
    if (c[i] != 2.f * ref[i]) {
      why = std::is_same_v<T, c10::Half>
                ? "oneDNN's brgemm here does not take fp16 VNNI pairs (no AMX-FP16)"
                : "oneDNN's brgemm here does not take bf16 VNNI pairs (no AMX-BF16 / AVX512-BF16)";
      return false;
    }
  }
  return true;
}

// Without AMX the choice is measured, not assumed: oneDNN's bf16 kernels on AVX512-BF16 dot products ran at half the
// fp32 sgemm's rate on an Intel Xeon whose oneDNN and MKL were held to AVX-512 without AMX (ONEDNN_MAX_CPU_ISA=
// AVX512_CORE_BF16, MKL_ENABLE_INSTRUCTIONS=AVX512: 124 vs 238 GFLOP/s on this tile; the whole bf16 forward then
// 0.64-0.72x torch's SDPA on brgemm, 1.16-1.24x on the fp32 tiles), while a core whose dot-product instruction
// issues as fast as its FMA (two products a lane instead of one) should favour brgemm. The forward's score tile
// (64 x 512 x 128) is timed once on both paths, one thread, best of five; brgemm must be kBrgemmMargin times faster
// to be chosen, so a near tie (where timing noise could flip the choice, and with it the rounding, from run to run)
// keeps fp32.
constexpr double kBrgemmMargin = 1.2;

// The forward's score tile, the product every tile rate here times (measure_tile_rates, tile_gflops).
constexpr int64_t kTileM = 64, kTileN = 512, kTileK = 128;
constexpr double kTileFlops = 2.0 * kTileM * kTileN * kTileK;

// One score-tile product c = a b: T = float on the fp32 engine (gemm_rm), else brgemm on VNNI operands in T.
template <typename T>
void score_tile(const T* a, const T* b, float* c) {
  if constexpr (std::is_same_v<T, float>) {
    gemm_rm(false, false, kTileM, kTileN, kTileK, 1.f, a, kTileK, b, kTileN, 0.f, c, kTileN);
  } else {
    mm_vnni<T>(kTileM, kTileN, kTileK, a, kTileK, b, kTileN, c, kTileN, false);
  }
}

template <typename T>
Rates measure_tile_rates() {
  std::vector<T> a(kTileM * kTileK), bv(kTileK * kTileN);
  std::vector<float> af(a.size()), bf(bv.size()), c(kTileM * kTileN);
  for (size_t i = 0; i < a.size(); ++i) af[i] = float(i % 13) * 0.125f - 0.75f, a[i] = static_cast<T>(af[i]);
  for (size_t i = 0; i < bv.size(); ++i) bf[i] = float(i % 7) * 0.25f - 0.75f, bv[i] = static_cast<T>(bf[i]);
  BlasSingleThread blas1;
  Rates r;
  r.brgemm = kTileFlops / best_seconds([&] { score_tile<T>(a.data(), bv.data(), c.data()); }) / 1e9;
  release();
  r.fp32 = kTileFlops / best_seconds([&] { score_tile<float>(af.data(), bf.data(), c.data()); }) / 1e9;
  return r;
}

template <typename T>
Decision decide() {
  Decision d;
  const char* env = std::getenv("FASTATTN_CPU_MATMUL");
  if (env != nullptr && std::strcmp(env, "fp32") == 0) {
    d.why = "fp32 tiles forced by FASTATTN_CPU_MATMUL=fp32";
    return d;
  }
#ifndef FASTATTN_HAS_BRGEMM
  d.why = "this torch does not export cpublas::brgemm (needs torch >= 2.6)";
  return d;
#else
  if (!isa().avx512) {
    d.why = isa_cap() < 2 ? "AVX-512 held off by FASTATTN_CPU_ISA" : "no AVX-512 on this CPU";
    return d;
  }
  if (!at::globalContext().userEnabledMkldnn()) {
    d.why = "oneDNN disabled (torch.backends.mkldnn.enabled = False)";
    return d;
  }
  try {
    if (probe_exact<T>(d.why)) d.path = Path::kBrgemm;
  } catch (const std::exception& e) {
    d.why = std::string("brgemm refused: ") + e.what();
    const auto nl = d.why.find('\n');
    if (nl != std::string::npos) d.why.resize(nl);
  }
  if (d.path == Path::kBrgemm) {
    // AMX as oneDNN sees it (cpuid may list AMX that the OS or ONEDNN_MAX_CPU_ISA leaves unusable): what torch's own
    // flash kernel checks before it packs for the matrix units.
    const bool amx = at::native::cpublas::could_pack(c10::CppTypeToScalarType<T>::value);
    const bool dot = std::is_same_v<T, c10::BFloat16> ? isa().avx512_bf16 : isa().avx512_fp16;
    const char* how = amx ? "AMX tiles" : dot ? "AVX512 dot products" : "oneDNN AVX-512 kernels";
    d.why = how;
    const bool forced = env != nullptr && std::strcmp(env, "brgemm") == 0;
    if (!amx) {
      d.rates = measure_tile_rates<T>();
      char buf[160];
      std::snprintf(buf, sizeof(buf), "; measured %.0f GFLOP/s against the fp32 tiles' %.0f", d.rates.brgemm,
                    d.rates.fp32);
      if (forced || d.rates.brgemm >= kBrgemmMargin * d.rates.fp32) {
        d.why = std::string(how) + buf + (forced ? ", forced by FASTATTN_CPU_MATMUL=brgemm" : "");
      } else {
        d.path = Path::kFp32;
        d.why = std::string("no AMX; oneDNN's ") + how + buf;
      }
    }
  }
  return d;
#endif
}

const Decision& decision(at::ScalarType dt) {
  static const Decision bf16 = decide<c10::BFloat16>();
  static const Decision fp16 = decide<c10::Half>();
  static const Decision fp32{Path::kFp32, "sgemm"};
  return dt == at::kBFloat16 ? bf16 : dt == at::kHalf ? fp16 : fp32;
}

std::atomic<bool> g_force_fp32{false};

// mm.h fp16_pairs, decided once; `why` says so for describe().
struct Pairs {
  bool on = false, forced = false;
  std::string why;
};

Pairs decide_pairs() {
  Pairs d;
  const char* env = std::getenv("FASTATTN_CPU_FP16_PAIRS");
  const bool forced = env != nullptr && std::strcmp(env, "1") == 0;
  // fp16 on the matrix units itself, or bf16 not there either (its own line says why): nothing to add
  if (decision(at::kHalf).path == Path::kBrgemm || decision(at::kBFloat16).path != Path::kBrgemm) return d;
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    d.why = "fp32 tiles (bf16 pairs turned off by FASTATTN_CPU_FP16_PAIRS=0)";
    return d;
  }
#ifdef FASTATTN_HAS_BRGEMM
  const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
#else
  const bool amx = false;
#endif
  d.on = amx || forced;
  d.forced = forced;
  d.why = amx      ? "matrix units as exact bf16 pairs (AMX tiles, three products a tile, from 64 query rows a KV "
                     "head forward and 128 backward)"
          : forced ? "matrix units as exact bf16 pairs (forced by FASTATTN_CPU_FP16_PAIRS=1, every fp16 call)"
                   : "fp32 tiles (no AMX for bf16 pairs: three dot-product passes cost more than one in fp32)";
  return d;
}

const Pairs& pairs_decision() {
  static const Pairs d = decide_pairs();
  return d;
}

// FASTATTN_CPU_PLANT=vnni_swap (tests only, read once): swaps the two halves of every VNNI pair that pack_rows
// writes, a packing bug the correctness checks must catch (tests/test_cpu_paths.py).
bool plant_vnni_swap() {
  static const bool on = [] {
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e != nullptr && std::strcmp(e, "vnni_swap") == 0;
  }();
  return on;
}

}  // namespace

Path path(at::ScalarType dt) { return g_force_fp32.load(std::memory_order_relaxed) ? Path::kFp32 : decision(dt).path; }

void force_fp32(bool on) { g_force_fp32.store(on); }

bool fp16_pairs() { return !g_force_fp32.load(std::memory_order_relaxed) && pairs_decision().on; }

bool fp16_pairs_forced() { return pairs_decision().forced; }

bool plant_pairs_lo(bool backward) {
  static const int where = [] {  // 1: everywhere, 2: the backward's pairs only
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e == nullptr ? 0 : std::strcmp(e, "pairs_lo") == 0 ? 1 : std::strcmp(e, "pairs_lo_bwd") == 0 ? 2 : 0;
  }();
  return where == 1 || (where == 2 && backward);
}

std::map<std::string, std::string> report() {
  const Isa& i = isa();
  auto flag = [](bool b) { return std::string(b ? "1" : "0"); };
  auto rate = [](double g) { return std::to_string(static_cast<int64_t>(g + 0.5)); };
  const Decision &bf16 = decision(at::kBFloat16), &fp16 = decision(at::kHalf);
  const std::string fp16_lowp = path(at::kHalf) == Path::kBrgemm ? "brgemm" : fp16_pairs() ? "bf16_pairs" : "fp32";
#ifdef FASTATTN_HAS_BRGEMM
  const bool amx_bf16_usable = at::native::cpublas::could_pack(at::kBFloat16);
  const bool amx_fp16_usable = at::native::cpublas::could_pack(at::kHalf);
#else
  const bool amx_bf16_usable = false, amx_fp16_usable = false;
#endif
  return {{"cpu", cpu_model()},
          {"vendor", cpu_vendor()},
          {"family", std::to_string(cpu_family())},
          {"fp32", fp32_gemm_brgemm() ? "brgemm" : "sgemm"},
          {"bf16", path(at::kBFloat16) == Path::kBrgemm ? "brgemm" : "fp32"},
          {"fp16", path(at::kHalf) == Path::kBrgemm ? "brgemm" : "fp32"},
          {"fp16_forward", fp16_lowp},
          {"fp16_backward", fp16_lowp},  // (one decision for both passes; their row lines differ, kernels.h)
          // oneDNN's view: AMX it will use (torch's flash kernel multiplies bf16/fp16 on AMX only then)
          {"amx_bf16_usable", flag(amx_bf16_usable)},
          {"amx_fp16_usable", flag(amx_fp16_usable)},
          // measured tile rates where the choice was measured (no usable AMX), else "0"
          {"bf16_brgemm_gflops", rate(bf16.rates.brgemm)},
          {"bf16_fp32_gflops", rate(bf16.rates.fp32)},
          {"fp16_brgemm_gflops", rate(fp16.rates.brgemm)},
          {"fp16_fp32_gflops", rate(fp16.rates.fp32)},
          {"amx_bf16", flag(i.amx_bf16)},
          {"amx_fp16", flag(i.amx_fp16)},
          {"avx512_bf16", flag(i.avx512_bf16)},
          {"avx512_fp16", flag(i.avx512_fp16)},
          {"avx512", flag(i.avx512)},
          {"avx2", flag(i.avx2)},
          {"decode_fetch", decode::fetch_describe()},
          {"process_cpus", std::to_string(process_cpus())},
          {"bwd_min_tasks", std::to_string(bwd_min_tasks())}};
}

namespace {
// The score tile on every thread at once, reps products each: T = float on the fp32 engine, else brgemm in T (VNNI
// operands: the values do not matter). best_seconds of one parallel region, GFLOP/s.
template <typename T>
double tile_gflops_as() {
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<T>> a(threads, std::vector<T>(kTileM * kTileK, T(0.5f)));
  std::vector<std::vector<T>> b(threads, std::vector<T>(kTileK * kTileN, T(0.25f)));
  std::vector<std::vector<float>> c(threads, std::vector<float>(kTileM * kTileN));
  auto region = [&](int64_t reps) {
    return best_seconds([&] {
      at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
        BlasSingleThread blas1;
        for (int64_t t = begin; t < end; ++t) {
          for (int64_t i = 0; i < reps; ++i) score_tile<T>(a[t].data(), b[t].data(), c[t].data());
        }
        if constexpr (!std::is_same_v<T, float>) release();
      });
    });
  };
  // regions of ~2 ms, so that the parallel region's own cost stays small
  const int64_t reps = std::clamp<int64_t>(static_cast<int64_t>(2e-3 / std::max(region(1), 1e-7)), 4, 4096);
  return kTileFlops * reps * threads / region(reps) / 1e9;
}
}  // namespace

double tile_gflops(const std::string& dtype) {
  if (dtype == "float32") return tile_gflops_as<float>();
  if (dtype == "bfloat16") {
    return path(at::kBFloat16) == Path::kBrgemm ? tile_gflops_as<c10::BFloat16>() : tile_gflops_as<float>();
  }
  if (dtype == "float16") {
    if (path(at::kHalf) == Path::kBrgemm) return tile_gflops_as<c10::Half>();
    // pairs: three bf16 products for each fp16 one (the forward's; the backward runs the fp32 tiles)
    return fp16_pairs() ? tile_gflops_as<c10::BFloat16>() / 3 : tile_gflops_as<float>();
  }
  TORCH_CHECK(false, "fastattn: tile_gflops takes 'float32', 'bfloat16' or 'float16', got '", dtype, "'");
}

std::string describe() {
  const Isa& i = isa();
  std::string s = "CPU: " + cpu_model() + " (family " + std::to_string(cpu_family()) + "); ISA:";
  if (i.amx_bf16) s += " AMX-BF16";
  if (i.amx_fp16) s += " AMX-FP16";
  if (i.avx512_fp16) s += " AVX512-FP16";
  if (i.avx512_bf16) s += " AVX512-BF16";
  if (i.avx512) s += " AVX512";
  if (i.avx2) s += " AVX2";
  if (!i.avx2) s += " none (scalar helpers)";
  if (isa_cap() < 2) s += std::string(" (held there by FASTATTN_CPU_ISA=") + std::getenv("FASTATTN_CPU_ISA") + ")";
  for (auto [name, dt] : {std::pair{"bf16", at::kBFloat16}, std::pair{"fp16", at::kHalf}}) {
    const Decision& d = decision(dt);
    s += std::string("; ") + name + ": " +
         (d.path == Path::kBrgemm ? "matrix units (oneDNN brgemm, " + d.why + ")" : "fp32 tiles (" + d.why + ")");
  }
  if (!pairs_decision().why.empty()) s += "; fp16 forward and backward: " + pairs_decision().why;
  s += "; fp32: " + fp32_gemm_describe();
  if (packed_kt_available()) s += ", key tiles packed once per head";
  if (const std::string rows = scores_on_rows_describe(); !rows.empty()) s += " (" + rows + ")";
  if (fp32_gemm_brgemm()) {
    s += bwd_transposed_form() ? ", backward key blocks transposed (all products on brgemm)"
                               : ", backward key blocks plain (dV, dK, dQ on sgemm)";
  }
  s += "; decode steps: " + decode::fetch_describe();
  s += "; few query rows: " + few_rows_describe();
  const int64_t min_tasks = bwd_min_tasks();
  const std::string tasks = std::to_string(min_tasks);
  s += "; backward: fewer (sequence, KV head) pairs than " + tasks + " cut into key chunks, up to " + tasks +
       " tasks (8, or one per CPU of the process's " + std::to_string(process_cpus()) + "), dQ partials within " +
       std::to_string(max_partial_bytes(min_tasks) >> 20) + " MB";
  return s;
}

template <typename T>
void mm_vnni(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
             int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
#ifdef FASTATTN_HAS_BRGEMM
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "fastattn: brgemm is not available in this torch");
#endif
}

void release() {
#ifdef FASTATTN_HAS_BRGEMM
  at::native::cpublas::brgemm_release(true);
#endif
}

#ifdef FASTATTN_VEC512
// d[2j] = s0[j], d[2j + 1] = s1[j] (0 without s1) for j < cols, 16 pairs a step as 32-bit words: the element loop
// was ~10% of a short bf16 forward (S = 128, D = 128).
template <typename T>
FA_AVX512 void pack_pair_row(const T* s0, const T* s1, int64_t cols, T* d) {
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 t = vec512::tail(cols - j);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, s0 + j));
    const __m512i hi = s1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, s1 + j)) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(d + 2 * j, t, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}
#endif

template <typename T>
void pack_rows(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t ld, T* dst) {
  const bool swap = plant_vnni_swap();
  for (int64_t r = 0; r < rows; r += 2) {
    const T* s0 = src + r * ss;
    T* d = dst + (r / 2) * ld * 2;
#ifdef FASTATTN_VEC512
    if (sd == 1 && vec512::available()) {
      const T* s1 = r + 1 < rows ? s0 + ss : nullptr;
      if (swap && s1) std::swap(s0, s1);
      pack_pair_row<T>(s0, s1, cols, d);
      continue;
    }
#endif
    if (r + 1 < rows) {
      const T* s1 = s0 + ss;
      if (swap) std::swap(s0, s1);
      for (int64_t j = 0; j < cols; ++j) {
        d[2 * j] = s0[j * sd];
        d[2 * j + 1] = s1[j * sd];
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        d[2 * j] = s0[j * sd];
        d[2 * j + 1] = T(0.f);
      }
    }
  }
}

#ifdef FASTATTN_VEC512
// dst word (w0 + c, r0 + i) = src word (r0 + i, w0 + c) for a 16 x 16 block of 32-bit words: 16 row loads, a
// transpose in registers and 16 contiguous stores, instead of 256 scattered 4-byte stores.
FA_AVX512 inline void transpose_words16(const uint32_t* src, int64_t ss_words, uint32_t* dst, int64_t ld) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ss_words);
  vec512::transpose_regs16(r);
  for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * ld, r[c]);
}

// dst (c, i) = src (i, c) for a block of nr <= 16 rows and nc <= 16 columns of 16-bit elements (row stride ss):
// widened to 32-bit words, transposed in registers, narrowed back; bits copied as they are.
FA_AVX512 inline void transpose_halves16(const uint16_t* src, int64_t ss, int64_t nr, int64_t nc, uint16_t* dst,
                                         int64_t ld) {
  const __mmask16 cm = vec512::tail(nc), rm = vec512::tail(nr);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < nr ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cm, src + i * ss)) : _mm512_setzero_si512();
  }
  vec512::transpose_regs16(r);
  for (int c = 0; c < nc; ++c) _mm256_mask_storeu_epi16(dst + c * ld, rm, _mm512_cvtepi32_epi16(r[c]));
}
#endif

template <typename T>
void transpose(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t ld, T* dst) {
  static_assert(sizeof(T) == 2);
#ifdef FASTATTN_VEC512
  if (sd == 1 && vec512::available()) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        transpose_halves16(s + r0 * ss + c0, ss, std::min<int64_t>(16, rows - r0), std::min<int64_t>(16, cols - c0),
                           d + c0 * ld + r0, ld);
      }
    }
  } else
#endif
  {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < rows; ++r) dst[c * ld + r] = src[r * ss + c * sd];
    }
  }
  if (rows & 1) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + rows] = T(0.f);
  }
}

template <typename T>
void pack_transposed(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t ld, T* dst) {
  static_assert(sizeof(T) == 2);
  // dst word (c / 2, r) = (src[r][c], src[r][c + 1]).
  const int64_t cp = cols / 2;
  int64_t r16 = 0, w16 = 0;  // rows and words done by 16 x 16 blocks
#ifdef FASTATTN_VEC512
  // Word-aligned rows only (src rows may be only 2-byte aligned): an odd row stride or base takes the loop below.
  if (sd == 1 && ss % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0 && vec512::available()) {
    r16 = rows / 16 * 16;
    w16 = cp / 16 * 16;
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t r0 = 0; r0 < r16; r0 += 16)
      for (int64_t w0 = 0; w0 < w16; w0 += 16) transpose_words16(s + r0 * (ss / 2) + w0, ss / 2, d + w0 * ld + r0, ld);
  }
#endif
  if (sd == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint32_t* s = reinterpret_cast<const uint32_t*>(src + r * ss);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst) + r;
      for (int64_t w = r < r16 ? w16 : 0; w < cp; ++w) {  // what the blocks above did not cover
        uint32_t word;
        std::memcpy(&word, s + w, 4);  // src rows may be only 2-byte aligned
        d[w * ld] = word;
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t w = 0; w < cp; ++w) {
        dst[(w * ld + r) * 2] = src[r * ss + 2 * w * sd];
        dst[(w * ld + r) * 2 + 1] = src[r * ss + (2 * w + 1) * sd];
      }
  }
  if (cols & 1) {
    for (int64_t r = 0; r < rows; ++r) {
      dst[(cp * ld + r) * 2] = src[r * ss + (cols - 1) * sd];
      dst[(cp * ld + r) * 2 + 1] = T(0.f);
    }
  }
}

template <typename T>
void copy_rows(const T* src, int64_t ss, int64_t sd, int64_t rows, int64_t cols, int64_t cols_pad, int64_t ld,
               T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * ld;
    const T* s = src + r * ss;
    if (sd == 1) {
      std::memcpy(d, s, cols * sizeof(T));
    } else {
      for (int64_t j = 0; j < cols; ++j) d[j] = s[j * sd];
    }
    for (int64_t j = cols; j < cols_pad; ++j) d[j] = T(0.f);
  }
}

#define FA_MM_INSTANTIATE(T)                                                                                    \
  template void mm_vnni<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, float*, int64_t,  \
                           bool);                                                                             \
  template void pack_rows<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);                      \
  template void pack_transposed<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);                \
  template void copy_rows<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T*);              \
  template void transpose<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
FA_MM_INSTANTIATE(c10::BFloat16)
FA_MM_INSTANTIATE(c10::Half)
#undef FA_MM_INSTANTIATE

}  // namespace fastattn::cpu::mm
