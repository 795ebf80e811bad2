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

}  // namespace fastattn::cpu
