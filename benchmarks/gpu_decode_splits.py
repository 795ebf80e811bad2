"""The split-KV decode kernels against their number of splits, to set the heuristic from measurement.

The first GPU run (benchmarks/results/gpu-h200-20261204) had the CUDA C++ decode kernel at about 1 TB/s on a 32k-key
cache (a quarter of the copy rate) with the heuristic's 5 splits for B8 x 8 KV heads (about two waves of blocks over
132 SMs). Memory-bound kernels want more bytes in flight than two waves of these blocks give, so this times each
backend's kernel op directly (no dispatch: torch.ops.fastattn.decode_fwd / triton_decode_fwd, the cache full) for
num_splits in a list, and prints GB/s of K/V read beside PyTorch's SDPA on the same cache, at batch 8 (the first
run's) and 1 (where PyTorch's kernels have few blocks to spread: `auto` hands such steps to PyTorch on a GPU).

    python benchmarks/gpu_decode_splits.py [--keys 4096,32768] [--splits 0,1,2,4,5,8,12,16,24,32,48,64] [--batch 8,1]

0 is the heuristic's pick. Timing: fastattn.benchmark.timing (do_bench's median, the L2 flushed before each call).
Without CUDA it runs the cpu backend's kernel on a small cache (a rehearsal of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402, F401  (registers the ops)
from fastattn.benchmark.timing import bench_cpu, bench_cuda  # noqa: E402


def bench_ms(fn, dev):
    """Median ms: the benchmark suite's timers (do_bench on a GPU), shortened for a sweep."""
    t = bench_cuda(fn, warmup_ms=10, rep_ms=40) if dev == "cuda" else bench_cpu(fn, target_s=0.02, max_reps=20)
    return t.median_ms


def kernels(dev):
    """name -> op(q (B, Hq, 1, D), k_cache, v_cache (B, S, Hkv, D), seqlens, num_splits)."""
    out = {}
    if dev == "cuda":
        if hasattr(torch.ops.fastattn, "decode_fwd") and not fastattn.get_backend("cuda").unavailable():
            out["cuda"] = torch.ops.fastattn.decode_fwd
        from fastattn.backends.triton.kernels import decode  # noqa: F401  (registers triton_decode_fwd)
        out["triton"] = torch.ops.fastattn.triton_decode_fwd
    else:
        out["cpu"] = torch.ops.fastattn.decode_fwd
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", default="4096,32768", help="cache lengths")
    ap.add_argument("--splits", default="0,1,2,4,5,8,12,16,24,32,48,64", help="num_splits values (0: heuristic)")
    ap.add_argument("--batch", default="8,1", help="batch sizes (the first run measured 8; generation often has 1)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    Hq, Hkv, D = (32, 8, 128) if dev == "cuda" else (8, 2, 64)
    keys = [int(k) for k in a.keys.split(",")] if dev == "cuda" else [256]
    splits = [int(s) for s in a.splits.split(",")]
    dt = torch.bfloat16
    print(f"device {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu (a rehearsal)'}, torch {torch.__version__}"
          f", bf16 Hq{Hq} Hkv{Hkv} D{D}, one query token")
    for B, S in [(int(b), S) for b in a.batch.split(",") for S in keys]:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
        kc = torch.randn(B, S, Hkv, D, device=dev, dtype=dt, generator=g)  # (B, S, Hkv, D): flash-attn's layout
        vc = torch.randn_like(kc)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        gb = 2 * kc.numel() * kc.element_size() / 1e9
        kt, vt = kc.transpose(1, 2), vc.transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hkv, S, D) views
        ref = F.scaled_dot_product_attention(q, kt, vt, enable_gqa=True)
        ms = bench_ms(lambda: F.scaled_dot_product_attention(q, kt, vt, enable_gqa=True), dev)
        print(f"\nB {B}, keys {S}: K/V {gb * 1e3:.0f} MB; torch sdpa {ms:.3f} ms ({gb / ms * 1e3:.0f} GB/s)")
        for name, op in kernels(dev).items():
            row = []
            for n in splits:
                call = lambda: op(q, kc, vc, lens, None, None, D ** -0.5, -1, -1, 0.0, None, n)  # noqa: E731
                try:
                    err = (call()[0].float() - ref.float()).abs().max().item()
                    ms = bench_ms(call, dev)
                    row.append(f"{n}:{ms:.3f}ms/{gb / ms * 1e3:.0f}GB/s" + ("" if err < 5e-2 else f" WRONG {err:.2g}"))
                except Exception as e:  # noqa: BLE001 - a refused split count is a result too
                    row.append(f"{n}: {type(e).__name__}: {str(e)[:80]}")
            print(f"  {name:7} " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
