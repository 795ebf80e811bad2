// The tile gemm. torch's x86 wheels link MKL statically into libtorch_cpu and export its Fortran `sgemm_`
// (what ATen's own cpublas::gemm calls, but that wrapper is not exported to extensions), so we look it up
// at run time; builds without it (other BLAS, other platforms) use at::addmm_out on tile views instead.
//
// The fp32 engine: unless sgemm times clearly faster than oneDNN's fp32 batch-reduce GEMM
// (at::native::cpublas::brgemm, torch >= 2.6) on the forward's tiles, the row-major products without transposes and
// the packed key tiles run on brgemm instead (fp32_engine below).
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>
#ifdef __linux__
#include <sched.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FASTATTN_X86_CPUID 1
#endif

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "tile.h"
#include "vec.h"  // vec512::available: the rule below differs without AVX-512

namespace fastattn::cpu {

namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using set_threads_fn = int (*)(int);  // MKL_Set_Num_Threads_Local: the C entry (by value)

void* find_symbol(const char* name) {
  void* f = dlsym(RTLD_DEFAULT, name);
  if (f == nullptr) {
    if (void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) f = dlsym(h, name);
  }
  return f;
}

sgemm_fn blas_sgemm() {
  static const sgemm_fn f = [] {
    if (std::getenv("FASTATTN_CPU_NO_BLAS") != nullptr) return sgemm_fn(nullptr);
    return reinterpret_cast<sgemm_fn>(find_symbol("sgemm_"));
  }();
  return f;
}

// MKL's packed-GEMM entries (Fortran names, exported beside sgemm_).
using pack_size_fn = size_t (*)(const char*, const int*, const int*, const int*);
using pack_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, float*);
using compute_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const int*,
                            const float*, const int*, const float*, float*, const int*);
struct PackedApi {
  pack_size_fn size = nullptr;
  pack_fn pack = nullptr;
  compute_fn compute = nullptr;
};

const PackedApi& packed_api() {
  static const PackedApi api = [] {
    PackedApi a;
    // Intel CPUs only: there MKL's packed products round as its plain ones (tile.h), as the backward needs to
    // round its scores as the forward did. On an AMD EPYC Zen 4 (2026-12-03), where MKL runs other kernels, the
    // fp32 backward with packed key blocks after an unpacked forward put dV 3.2x as far from float64 as the naive
    // computation's (1.5x with packing off; tests/test_cpu_fp32_engine.py, D = 256).
    if (blas_sgemm() == nullptr || std::getenv("FASTATTN_CPU_NO_PACKED_GEMM") != nullptr ||
        cpu_vendor() != "GenuineIntel")
      return a;
    a.size = reinterpret_cast<pack_size_fn>(find_symbol("sgemm_pack_get_size"));
    a.pack = reinterpret_cast<pack_fn>(find_symbol("sgemm_pack"));
    a.compute = reinterpret_cast<compute_fn>(find_symbol("sgemm_compute"));
    if (!a.size || !a.pack || !a.compute) a = PackedApi{};
    return a;
  }();
  return api;
}

set_threads_fn mkl_threads_local() {
  static const set_threads_fn f = reinterpret_cast<set_threads_fn>(find_symbol("MKL_Set_Num_Threads_Local"));
  return f;
}

// gemm_rm on the BLAS (sgemm; ATen's addmm without one).
void blas_gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_fn f = blas_sgemm()) {
    // Column-major BLAS sees a row-major (r x c, ld) matrix as its (c x r) transpose, so row-major
    // C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and m, n.
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(std::max<int64_t>(ldb, 1)), LDB = static_cast<int>(std::max<int64_t>(lda, 1));
    const int LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    if (K == 0) {  // BLAS may skip scaling C when K == 0; do it ourselves
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
      return;
    }
    f(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // A view (m, k) of a: stored (k, m) when transposed.
  at::Tensor A = trans_a ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor B = trans_b ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == 0.f) {
    at::mm_out(C, A, B);
    if (alpha != 1.f) C.mul_(alpha);
  } else {
    at::addmm_out(C, C, A, B, beta, alpha);
  }
}

// ---------------------------------------------------------------- the fp32 engine
// oneDNN's kernels for the CPU at hand against MKL's: on an AMD EPYC (Zen 4) brgemm ran the forward's tiles (scores
// 128x512x128, P V 128x128x512, and the windowed 64x256 ones) at 112-117 GFLOP/s against sgemm's 95-101, on the
// Intel Xeon level with it (147-168 against 149-166; benchmarks/bench_gemm_tiles.py, one thread). On the Xeon the
// whole kernel ran faster on brgemm all the same (one thread, 2026-12-02, FASTATTN_CPU_FP32_GEMM forced: forward
// B1 H8 S1024 1.13-1.22x torch against sgemm's 1.06-1.13x, causal 1.54-1.63x against 1.37-1.45x with the diagonal
// tiles packed once, B4 S128-512 short calls 5-10% faster): no transposes in the backward (bwd.cpp), key tiles
// packed once for any tile shape (fwd.cpp). So the two tiles are timed once (best of five, one thread) and sgemm is
// taken only when kSgemmMargin times faster: a near tie keeps brgemm. At 1.08 timing noise still flipped it on a
// noisy ~2 GHz Xeon host (2026-12-02 late: MKL/brgemm tile ratios 0.98-1.04 in most processes, 1.083 in 1 of 20, and
// 1.09 / 1.14 in 2 of 40 with the two engines' batches alternated; those processes ran sgemm's slower kernels, with
// other bits); no CPU measured so far has sgemm's tiles 1.25x ahead.
// Without AVX-512 the tiles alone mislead: on an AMD EPYC Zen 1 (AVX2) they tie within the timing noise (brgemm
// 22-42 GFLOP/s, sgemm 35-42, one probe to the next on a busy host) while the whole kernel ran faster on brgemm in
// every class timed (one thread, 2026-12-02, FASTATTN_CPU_FP32_GEMM forced, alternating: forward S = 1024 7-8%,
// forward+backward S = 512 4-6%, B4 S128 6-8%, grouped-query steps of 4-8 tokens 1.2-1.45x). There brgemm is kept
// whenever it runs, without a timing to flip.
constexpr double kSgemmMargin = 1.25;

struct Fp32Engine {
  bool brgemm = false;
  std::string why;
};

#ifdef CPUBLAS_BRGEMM_F32F32F32
void brgemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// GFLOP/s of the score and P V tiles (row-major, no transposes) on one engine.
template <typename F>
double tile_rate(F&& product) {
  constexpr int64_t m = 128, n = 512, k = 128;
  std::vector<float> a(m * n), b(n * n), c(m * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i % 13) * 0.125f - 0.75f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(i % 7) * 0.25f - 0.75f;
  auto both = [&] {
    product(m, n, k, a.data(), k, b.data(), n, c.data(), n, false);  // S = Qs K^T's shape
    product(m, k, n, a.data(), n, b.data(), k, c.data(), k, true);   // acc += P V's
  };
  return 4.0 * m * n * k / best_seconds(both) / 1e9;
}
#endif

Fp32Engine decide_fp32_engine() {
  Fp32Engine e;
  if (blas_sgemm() == nullptr) {
    e.why = "sgemm (no BLAS found: ATen's addmm)";
    return e;
  }
#ifndef CPUBLAS_BRGEMM_F32F32F32
  e.why = "sgemm (MKL; this torch exports no fp32 brgemm)";
  return e;
#else
  const char* env = std::getenv("FASTATTN_CPU_FP32_GEMM");
  if (env != nullptr && std::strcmp(env, "sgemm") == 0) {
    e.why = "sgemm (MKL; forced by FASTATTN_CPU_FP32_GEMM=sgemm)";
    return e;
  }
  try {
    BlasSingleThread blas1;
    const double mkl = tile_rate([](int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                    int64_t ldb, float* c, int64_t ldc, bool acc) {
      blas_gemm_rm(false, false, m, n, k, 1.f, a, lda, b, ldb, acc ? 1.f : 0.f, c, ldc);
    });
    const double dnnl = tile_rate(brgemm_f32);
    const bool forced = env != nullptr && std::strcmp(env, "brgemm") == 0;
    const bool avx2_only = !vec512::available();
    e.brgemm = forced || avx2_only || mkl < kSgemmMargin * dnnl;
    char buf[200];
    std::snprintf(buf, sizeof(buf), "%s (measured oneDNN's brgemm %.0f GFLOP/s against MKL's sgemm %.0f%s)",
                  e.brgemm ? "brgemm" : "sgemm", dnnl, mkl,
                  forced ? ", forced by FASTATTN_CPU_FP32_GEMM" : avx2_only ? "; no AVX-512: brgemm kept" : "");
    e.why = buf;
  } catch (const std::exception& ex) {
    e.why = std::string("sgemm (MKL; brgemm refused: ") + ex.what();
    const auto nl = e.why.find('\n');
    if (nl != std::string::npos) e.why.resize(nl);
    e.why += ")";
  }
  return e;
#endif
}

const Fp32Engine& fp32_engine() {
  static const Fp32Engine e = decide_fp32_engine();
  return e;
}

// FASTATTN_CPU_PLANT=kt_swap (tests only, read once): brgemm's packed key tiles swap neighbouring keys, a packing bug
// the correctness checks must catch (tests/test_cpu_fp32_engine.py).
bool plant_kt_swap() {
  static const bool on = [] {
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e != nullptr && std::strcmp(e, "kt_swap") == 0;
  }();
  return on;
}

// FASTATTN_CPU_PLANT=rows_scale (tests only, read once): scores_on_rows tiles lose their scale, a bug the correctness
// checks must catch (tests/test_cpu_fp32_engine.py).
bool plant_rows_scale() {
  static const bool on = [] {
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e != nullptr && std::strcmp(e, "rows_scale") == 0;
  }();
  return on;
}

std::atomic<int> g_fp32_gemm_force{0};  // tests: 0 the decided engine, 1 sgemm, 2 brgemm
std::atomic<int> g_rows_force{0};       // tests: 0 scores_on_rows's rule, 1 never, 2 always

}  // namespace

std::string cpu_vendor() {
#ifdef FASTATTN_X86_CPUID
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    char v[13];
    std::memcpy(v, &b, 4), std::memcpy(v + 4, &d, 4), std::memcpy(v + 8, &c, 4);  // the order cpuid spells it in
    v[12] = '\0';
    return v;
  }
#endif
  return "unknown";
}

namespace {
int read_cpu_family() {
#ifdef FASTATTN_X86_CPUID
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    const unsigned base = (a >> 8) & 0xf;  // the extended family adds on where the base reads 15 (AMD from K8 on)
    return static_cast<int>(base == 0xf ? base + ((a >> 20) & 0xff) : base);
  }
#endif
  return 0;
}
}  // namespace

// Asked once: under a hypervisor each cpuid traps to it (the decode kernel's fetch_mode asks on every call).
int cpu_family() {
  static const int family = read_cpu_family();
  return family;
}

bool amd_cpu() {
  static const bool amd = cpu_vendor() == "AuthenticAMD";
  return amd;
}

int64_t process_cpus() {
  static const int64_t cpus = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return int64_t{CPU_COUNT(&set)};
#endif
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return cpus;
}

double best_seconds(const std::function<void()>& f) {
  f();  // warm-up: kernel generation, first touch
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 4; ++i) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 4);
  }
  return best;
}

std::string fp32_gemm_describe() { return fp32_engine().why; }

bool fp32_gemm_brgemm() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  const int f = g_fp32_gemm_force.load(std::memory_order_relaxed);
  return f == 2 || (f == 0 && fp32_engine().brgemm);
#else
  return false;
#endif
}

void fp32_gemm_force(int engine) { g_fp32_gemm_force.store(engine, std::memory_order_relaxed); }

BlasSingleThread::BlasSingleThread() : prev(0) {
  if (auto f = mkl_threads_local()) prev = f(1);
}
BlasSingleThread::~BlasSingleThread() {
  if (auto f = mkl_threads_local()) f(prev);  // 0 restores the global setting
}

void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (!trans_a && !trans_b && alpha == 1.f && (beta == 0.f || beta == 1.f) && k > 0 && fp32_gemm_brgemm()) {
    brgemm_f32(m, n, k, a, lda, b, ldb, c, ldc, beta == 1.f);
    return;
  }
#endif
  blas_gemm_rm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major S = Qs K^T is column-major S^T (bk x bq) = op(A) B with A = K's memory read transposed ('T', the
// matrix MKL packs: m = bk, k = D) and B = Qs's memory ('N').
// On brgemm the packed tile is alpha K^T itself, row-major (D x bk): brgemm reads B (k x n) row-major.
bool packed_kt_available() { return fp32_gemm_brgemm() || packed_api().compute != nullptr; }

int64_t packed_kt_floats(int64_t bk, int64_t D) {
  if (fp32_gemm_brgemm()) return bk * D;
  const char id = 'A';
  const int m = static_cast<int>(bk), n = 1, k = static_cast<int>(D);
  return static_cast<int64_t>((packed_api().size(&id, &m, &n, &k) + sizeof(float) - 1) / sizeof(float));
}

template <typename T>
void pack_kt_rows(const T* k, int64_t ldk, int64_t bk, int64_t D, float* dst, float alpha) {
  TORCH_INTERNAL_ASSERT(fp32_gemm_brgemm(), "pack_kt_rows: brgemm's layout only");
  if (!plant_kt_swap()) return vec::transpose<T>(k, ldk, 1, bk, D, dst, bk, alpha);
  for (int64_t j = 0; j < bk; ++j) {
    const int64_t src = (j ^ 1) < bk ? j ^ 1 : j;
    for (int64_t d = 0; d < D; ++d) dst[d * bk + j] = alpha * static_cast<float>(k[src * ldk + d]);
  }
}
template void pack_kt_rows<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, float*, float);
template void pack_kt_rows<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, float*, float);

void pack_kt(const float* k, int64_t ldk, int64_t bk, int64_t D, float* dst, float alpha) {
  if (fp32_gemm_brgemm()) return pack_kt_rows<float>(k, ldk, bk, D, dst, alpha);
  const char id = 'A', trans = 'T';
  const int m = static_cast<int>(bk), n = 1, kk = static_cast<int>(D), ld = static_cast<int>(std::max<int64_t>(ldk, 1));
  packed_api().pack(&id, &trans, &m, &n, &kk, &alpha, k, &ld, dst);
}

#ifdef CPUBLAS_BRGEMM_F32F32F32
// S (bq x bk, ldS) = Qs Kt for Kt (D x bk, ldb) on brgemm, the head dim taken in chunks of at most kScoreChain
// summed one after another: brgemm accumulates each score in one FMA chain over the whole head dim, and on an AMD
// EPYC Zen 4 (2026-12-03) a 256-long chain put the fp32 forward's output 1.2-3.1x (median 1.9x) as far from float64
// as torch's matmul-softmax-matmul (D = 256; 1.0x at D = 64 and 128), past the 2x the fuzz allows. Every score tile,
// forward and backward, is made here, so the backward's scores still round as the forward's.
namespace {

constexpr int64_t kScoreChain = 128;

void scores_brgemm(int64_t bq, int64_t bk, int64_t D, const float* qs, int64_t ldq, const float* kt, int64_t ldb,
                   float* S, int64_t ldS) {
  brgemm_f32(bq, bk, std::min(D, kScoreChain), qs, ldq, kt, ldb, S, ldS, false);
  if (D <= kScoreChain) return;
  thread_local std::vector<float> part;  // one chunk's scores (bq x bk)
  part.resize(bq * bk);
  for (int64_t d0 = kScoreChain; d0 < D; d0 += kScoreChain) {
    brgemm_f32(bq, bk, std::min(kScoreChain, D - d0), qs + d0, ldq, kt + d0 * ldb, ldb, part.data(), bk, false);
    for (int64_t r = 0; r < bq; ++r) {
      float* s_r = S + r * ldS;
      const float* p_r = part.data() + r * bk;
      for (int64_t j = 0; j < bk; ++j) s_r[j] += p_r[j];
    }
  }
}

}  // namespace
#endif

// One-thread A/B of the two forms on an AMD EPYC Zen 3 (AVX2, 2026-12-06; fp32 MHA 12 D = 64 through the cpu backend,
// B1, torch's SDPA as the yardstick, 12 interleaved rounds): 8-32 query rows at 512-2048 keys 1.04-1.16x torch on
// rows against 0.84-1.01x transposed (two threads 1.35-1.36x against 1.01-1.24x), at 256 keys 1.02-1.03x against
// 0.97-1.01x; at 128 keys or fewer, 64 query rows and more, or head dim 128 from memory the transposed form led by
// 2-15%. Grouped-query heads (12/4, 8-16 rows) level or 10% faster on rows.
namespace {
constexpr int64_t kRowsMaxSq = 32, kRowsMinSk = 256, kRowsMaxD = 64;  // scores_on_rows's line
bool rows_cpu() { return fp32_gemm_brgemm() && !vec512::available(); }
}  // namespace

bool scores_on_rows(int64_t sq, int64_t sk, int64_t D) {
  const int f = g_rows_force.load(std::memory_order_relaxed);
  return f == 2 || (f == 0 && sq <= kRowsMaxSq && sk >= kRowsMinSk && D <= kRowsMaxD && rows_cpu());
}

std::string scores_on_rows_describe() {
  const int f = g_rows_force.load(std::memory_order_relaxed);
  if (f == 1 || (f == 0 && !rows_cpu())) return "";
  if (f == 2) return "every sequence's score tiles on K's rows (forced)";
  return "sequences of <= " + std::to_string(kRowsMaxSq) + " query rows from " + std::to_string(kRowsMinSk) +
         " keys at head dim <= " + std::to_string(kRowsMaxD) + ": on K's rows";
}

void scores_on_rows_force(int mode) { g_rows_force.store(mode, std::memory_order_relaxed); }

void gemm_scores(int64_t bq, int64_t bk, int64_t D, float alpha, const float* qs, int64_t ldq, const float* k,
                 int64_t ldk, float* S, int64_t ldS, bool on_rows) {
  if (bq == 0 || bk == 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (on_rows && plant_rows_scale()) alpha = 1.f;
  if (fp32_gemm_brgemm() && !on_rows) {
    thread_local std::vector<float> kt;  // this tile's keys packed as pack_kt packs them
    kt.resize(bk * D);
    pack_kt(k, ldk, bk, D, kt.data(), alpha);
    scores_brgemm(bq, bk, D, qs, ldq, kt.data(), bk, S, ldS);
    return;
  }
#endif
  gemm_rm(false, true, bq, bk, D, alpha, qs, ldq, k, ldk, 0.f, S, ldS);
}

void gemm_packed_kt(const float* packed, int64_t bk, int64_t D, const float* qs, int64_t ldq, int64_t bq, float* S,
                    int64_t ldS, int64_t ldp) {
  if (bq == 0 || bk == 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (fp32_gemm_brgemm()) {
    scores_brgemm(bq, bk, D, qs, ldq, packed, ldp > 0 ? ldp : bk, S, ldS);
    return;
  }
#endif
  TORCH_CHECK(ldp == 0 || ldp == bk, "gemm_packed_kt: MKL's packed tile holds exactly bk = ", bk, " keys, not ", ldp);
  const char ta = 'P', tb = 'N';
  const int m = static_cast<int>(bk), n = static_cast<int>(bq), k = static_cast<int>(D);
  const int lda = k, ldb = static_cast<int>(std::max<int64_t>(ldq, 1)), ldc = static_cast<int>(ldS);
  const float zero = 0.f;
  packed_api().compute(&ta, &tb, &m, &n, &k, packed, &lda, qs, &ldb, &zero, S, &ldc);
}

}  // namespace fastattn::cpu
