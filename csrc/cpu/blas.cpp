// The tile gemm. torch's x86 wheels link MKL statically into libtorch_cpu and export its Fortran `sgemm_`
// (what ATen's own cpublas::gemm calls, but that wrapper is not exported to extensions), so we look it up
// at run time; builds without it (other BLAS, other platforms) use at::addmm_out on tile views instead.
#include <ATen/ATen.h>
#include <dlfcn.h>

#include "tile.h"

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
    if (blas_sgemm() == nullptr || std::getenv("FASTATTN_CPU_NO_PACKED_GEMM") != nullptr) return a;
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

}  // namespace

BlasSingleThread::BlasSingleThread() : prev(0) {
  if (auto f = mkl_threads_local()) prev = f(1);
}
BlasSingleThread::~BlasSingleThread() {
  if (auto f = mkl_threads_local()) f(prev);  // 0 restores the global setting
}

void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
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

// Row-major S = Qs K^T is column-major S^T (bk x bq) = op(A) B with A = K's memory read transposed ('T', the
// matrix MKL packs: m = bk, k = D) and B = Qs's memory ('N').
bool packed_kt_available() { return packed_api().compute != nullptr; }

int64_t packed_kt_floats(int64_t bk, int64_t D) {
  const char id = 'A';
  const int m = static_cast<int>(bk), n = 1, k = static_cast<int>(D);
  return static_cast<int64_t>((packed_api().size(&id, &m, &n, &k) + sizeof(float) - 1) / sizeof(float));
}

void pack_kt(const float* k, int64_t ldk, int64_t bk, int64_t D, float* dst, float alpha) {
  const char id = 'A', trans = 'T';
  const int m = static_cast<int>(bk), n = 1, kk = static_cast<int>(D), ld = static_cast<int>(std::max<int64_t>(ldk, 1));
  packed_api().pack(&id, &trans, &m, &n, &kk, &alpha, k, &ld, dst);
}

void gemm_packed_kt(const float* packed, int64_t bk, int64_t D, const float* qs, int64_t ldq, int64_t bq, float* S,
                    int64_t ldS) {
  if (bq == 0 || bk == 0) return;
  const char ta = 'P', tb = 'N';
  const int m = static_cast<int>(bk), n = static_cast<int>(bq), k = static_cast<int>(D);
  const int lda = k, ldb = static_cast<int>(std::max<int64_t>(ldq, 1)), ldc = static_cast<int>(ldS);
  const float zero = 0.f;
  packed_api().compute(&ta, &tb, &m, &n, &k, packed, &lda, qs, &ldb, &zero, S, &ldc);
}

}  // namespace fastattn::cpu
