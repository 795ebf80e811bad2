"""The CPU forward's unwindowed tile shapes against each other and against PyTorch's SDPA, side by side in one process.

The kernels size their unwindowed tiles to the core's L2 (csrc/cpu/fwd.cpp, fwd_full_keys: 128 query rows, keys halved
from 512 down to 128 while a key tile's fp32 K and V rows and scores outgrow it). Here each column forces the L2 size
the rule sees (ops._C.cpu_fwd_l2_force), so every shape runs on any machine: 4 MB gives 128 x 512 up to D = 256, 512 KB
128 x 512 at D = 64, 128 x 256 at D = 96-128 and 128 x 128 at D = 256; `cpu` is this CPU's own L2. Interleaved rounds (each
round one batch of calls per path, orders rotating), median of each round's ratio torch / path. One thread: CPU time.

    python benchmarks/bench_fwd_tiles.py
    python benchmarks/bench_fwd_tiles.py --dtype bf16 --shapes 1x8x2048x128 4x8x512x128 --rounds 21
"""
from __future__ import annotations

import argparse
import time

import torch

import fastattn
from fastattn import ops
from interleave import calls_per_batch, ratios_to, rounds_of, switched  # (benchmarks/, the script's folder)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
L2 = {"l2=4M": 1 << 22, "l2=1M": 1 << 20, "l2=512K": 1 << 19, "cpu": 0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--shapes", nargs="+", default=["1x8x1024x128", "1x8x2048x128", "1x8x1024x64", "4x8x512x128",
                                                    "1x8x1024x256", "2x8x1024x96"], help="BxHxSxD")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {a.threads} thread(s), {a.dtype}, "
          f"{'CPU' if a.threads == 1 else 'wall'} time, median of {a.rounds} interleaved rounds; x torch")
    print(f"{'B':>2} {'H':>3} {'S':>5} {'D':>4} {'torch ms':>9} " + " ".join(f"{n:>8}" for n in L2))
    g = torch.Generator().manual_seed(0)
    for shape in a.shapes:
        B, H, S, D = (int(x) for x in shape.split("x"))
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(DTYPES[a.dtype]) for _ in range(3))
        impls = {"torch": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
        ours = lambda: fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
        impls.update({name: switched(ops._C.cpu_fwd_l2_force, bytes_, ours) for name, bytes_ in L2.items()})
        per = rounds_of(impls, clock, a.rounds, calls_per_batch(impls, clock, batch_s=0.2))
        x = ratios_to(per)
        torch_ms = sorted(per["torch"])[len(per["torch"]) // 2] * 1e3
        print(f"{B:>2} {H:>3} {S:>5} {D:>4} {torch_ms:>9.1f} " + " ".join(f"{x[n]:>7.3f}x" for n in L2), flush=True)


if __name__ == "__main__":
    main()
