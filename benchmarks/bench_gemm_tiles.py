"""The fp32 tile products of the CPU forward on MKL's sgemm and on oneDNN's fp32 batch-reduce GEMM, one thread.

The `cpu` backend's fp32 path multiplies its tiles on whichever of MKL's sgemm and oneDNN's fp32 batch-reduce GEMM
(`at::native::cpublas::brgemm`, torch >= 2.6) it timed faster at start-up (csrc/cpu/blas.cpp: brgemm unless sgemm is
1.25x faster); this script times both on the forward's shapes (scores S = Q K^T: 128 x 512 x 128; O += P V: 128 x
128 x 512; and the windowed tiles, 64 x 256), the measurement behind that choice. brgemm is reached through a small C++
function built inline (needs a C++ compiler; ~30 s the first time).

    python benchmarks/bench_gemm_tiles.py
"""
import argparse
import time

import torch
from torch.utils.cpp_extension import load_inline

_SRC = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>
#include <dlfcn.h>
// GFLOP/s of C (M x N) (+)= A (M x K) B (K x N), row-major fp32 on oneDNN's brgemm: best of 5 batches of `reps`.
double brgemm_gflops(int64_t M, int64_t N, int64_t K, int64_t reps, bool accumulate) {
  std::vector<float> a(M * K, 0.5f), b(K * N, 0.25f), c(M * N, 0.f);
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i)
      at::native::cpublas::brgemm(M, N, K, K, N, N, accumulate, a.data(), b.data(), c.data(), false);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  at::native::cpublas::brgemm_release(false);
  return 2.0 * M * N * K / best / 1e9;
}

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
// The same product on MKL's Fortran sgemm_ (what the cpu backend calls, found the same way); 0 without it.
double sgemm_gflops(int64_t M, int64_t N, int64_t K, int64_t reps, bool accumulate) {
  void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  auto f = reinterpret_cast<sgemm_fn>(h ? dlsym(h, "sgemm_") : nullptr);
  if (f == nullptr) return 0.0;
  std::vector<float> a(M * K, 0.5f), b(K * N, 0.25f), c(M * N, 0.f);
  const int m = M, n = N, k = K;
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i)  // row-major C = A B is column-major C^T = B^T A^T
      f("N", "N", &n, &m, &k, &one, b.data(), &n, a.data(), &k, &beta, c.data(), &n);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return 2.0 * M * N * K / best / 1e9;
}
"""


def _mm_gflops(M, N, K, reps, accumulate):
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.zeros(M, N)
    f = (lambda: c.addmm_(a, b)) if accumulate else (lambda: torch.mm(a, b, out=c))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * M * N * K / best / 1e9


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, no options
    torch.set_num_threads(1)
    ext = load_inline("fastattn_bench_brgemm", cpp_sources=_SRC, functions=["brgemm_gflops", "sgemm_gflops"],
                      extra_cflags=["-O3"])
    from fastattn import ops  # noqa: F401  (the CPU model and ISA line)
    print(f"{ops.cpu_matmul() if ops.loaded() else 'fastattn._C not built'}; torch {torch.__version__}, 1 thread")
    print(f"{'tile (M x N x K)':<26} {'sgemm':>7} {'brgemm':>7} {'torch.mm':>8}  GFLOP/s")
    for name, (M, N, K, acc) in {"scores 128x512x128": (128, 512, 128, False),
                                 "P V 128x128x512 (+=)": (128, 128, 512, True),
                                 "scores 64x256x128": (64, 256, 128, False),
                                 "P V 64x128x256 (+=)": (64, 128, 256, True),
                                 "scores 128x512x64": (128, 512, 64, False),
                                 "P V 128x64x512 (+=)": (128, 64, 512, True)}.items():
        reps = max(50, int(2e8 / (2 * M * N * K)))
        rates = [(ext.sgemm_gflops(M, N, K, reps, acc), ext.brgemm_gflops(M, N, K, reps, acc),
                  _mm_gflops(M, N, K, reps, acc)) for _ in range(3)]  # interleaved, best of three
        print(f"{name:<26} " + " ".join(f"{max(r[i] for r in rates):{w}.0f}" for i, w in ((0, 7), (1, 7), (2, 8))))


if __name__ == "__main__":
    main()
