"""The two ceilings every number is read against, measured on this device in this run:
a large matmul's FLOP rate (compute floor) and a device-to-device copy's bandwidth, counting bytes read plus
written (memory floor; decode's GB/s is compared with it)."""
from __future__ import annotations

import torch

from .timing import bench


def measure(device: str) -> dict:
    cuda = device.startswith("cuda")
    dt = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t_mm = bench(lambda: a @ b, device, target_s=0.2).median_ms / 1e3
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t_cp = bench(lambda: dst.copy_(src), device, target_s=0.2).median_ms / 1e3
    return {"matmul_tflops": 2 * n ** 3 / t_mm / 1e12, "matmul": f"{str(dt)[6:]} {n}x{n}x{n}",
            "copy_gbps": 2 * nbytes / t_cp / 1e9, "copy": f"{nbytes >> 20} MiB device-to-device, read + write"}
