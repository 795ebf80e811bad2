"""The two ceilings every number is read against, measured on this device in this run:
a large matmul's FLOP rate per dtype (compute floor; on a CPU the faster of it and the cpu kernels' own tile
product) and a device-to-device copy's bandwidth, counting bytes read plus written (memory floor; decode's GB/s is
compared with it). Both are the fastest repetition, not the median: a
ceiling is the best rate the device reaches, and on a shared CPU the median also measures the neighbours."""
from __future__ import annotations

import torch

from .. import ops
from .timing import bench


def _matmul_tflops(n: int, dt: torch.dtype, device: str) -> float:
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    # Two rounds, the faster kept: the first round of a run can read 20-45% low on a CPU (measured on a shared
    # Xeon VM, fp32 1024^3: 117-143 GFLOP/s in the first 0.3 s of a process, 207-215 after).
    return max(2 * n ** 3 / (bench(lambda: a @ b, device, target_s=0.3).min_ms / 1e3) / 1e12 for _ in range(2))


def _tile_tflops(dt: torch.dtype) -> float:
    """The cpu kernels' own tile product's rate for dt on this run's threads (two probes, the faster kept; 0.0
    without the C++ extension)."""
    return max(ops.cpu_tile_gflops(dt) for _ in range(2)) / 1e3


def measure(device: str) -> dict:
    """matmul_by_dtype: each dtype's matmul ceiling (TFLOP/s) its rows are read against (on CPUs with AMX or
    AVX512-BF16, bf16 runs several times faster than fp32). On a GPU a square matmul's rate; on a CPU the faster of
    that and the cpu kernels' own tile product on the same threads (matmul_square_by_dtype, tile_by_dtype), as torch's
    square matmul can trail what the CPU reaches: MKL's fp32 sgemm on an AMD EPYC (Zen 4) read 43-91 GFLOP/s where
    oneDNN's tiles ran at 113, and fp16 without AVX512-FP16 reads ~1."""
    cuda = device.startswith("cuda")
    dt = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 1024
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
    square = {name: _matmul_tflops(n, d, device) for name, d in dtypes}
    tiles = {} if cuda else {name: _tile_tflops(d) for name, d in dtypes}
    by_dtype = {name: max(square[name], tiles.get(name, 0.0)) for name, _ in dtypes}
    t_mm = 2 * n ** 3 / (by_dtype["bf16" if cuda else "fp32"] * 1e12)
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t_cp = bench(lambda: dst.copy_(src), device, target_s=0.2).min_ms / 1e3
    out = {"matmul_tflops": 2 * n ** 3 / t_mm / 1e12, "matmul": f"{str(dt)[6:]} {n}x{n}x{n}" + (
               "" if cuda else " matmul or the cpu kernels' tile product, the faster"),
           "matmul_by_dtype": by_dtype, "copy_gbps": 2 * nbytes / t_cp / 1e9,
           "copy": f"{nbytes >> 20} MiB {'device-to-device' if cuda else 'in memory'}, read + write"}
    if not cuda:
        out.update(matmul_square_by_dtype=square, tile_by_dtype=tiles, tile="64x512x128 score tile")
    return out
