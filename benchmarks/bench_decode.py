"""Decode on CPU: one new token against a KV cache (GPT-2 small shapes: 12 heads of 64), batch 1 and 8.

Compares, side by side and interleaved round by round (so background load hits every column alike):
  ours     torch.ops.fastattn.decode_fwd on the cache in its own layout (B, S, H, D)  (csrc/cpu/decode.cpp)
  api      fastattn.flash_attn_with_kvcache(..., backend="cpu"): validation + the same kernel
  sdpa     torch.nn.functional.scaled_dot_product_attention, q (B, H, 1, D) against k/v (B, H, N, D)
  generic  fastattn.flash_attn_with_kvcache(..., backend="sdpa"): the generic path (length bias) on SDPA
Prints median milliseconds and the ratio sdpa / ours (> 1: ours is faster). Speed is never asserted.

    python benchmarks/bench_decode.py [--dtype float32|bfloat16] [--rounds 30] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn import decode


def _timer(fn, inner):
    def once():
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) / inner * 1e3
    return once


def bench_shape(B, N, H, D, dtype, rounds):
    q = torch.randn(B, 1, H, D, dtype=dtype)  # flash layout (B, Sq, H, D)
    kc, vc = torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, N, H, D, dtype=dtype)
    lens = torch.full((B,), N, dtype=torch.int32)
    qh = q.transpose(1, 2).contiguous()  # (B, H, 1, D) for SDPA
    kh, vh = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()  # (B, H, N, D): SDPA's best layout
    scale = D ** -0.5
    fns = {}
    if decode.DECODE_KERNELS["cpu"].unavailable() == [] or (
            hasattr(torch.ops.fastattn, "decode_fwd")
            and torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::decode_fwd", "CPU")):
        qt = q.transpose(1, 2)  # (B, 1, H, D) -> (B, H, 1, D) view
        fns["ours"] = lambda: torch.ops.fastattn.decode_fwd(qt, kc, vc, lens, None, None, scale, -1, -1, 0.0, None, 0)
    if not decode.DECODE_KERNELS["cpu"].unavailable():
        fns["api"] = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="cpu")
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh)
    fns["generic"] = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="sdpa")
    inner = max(1, int(2e6 // (B * N * H * D)))  # ~tens of ms per sample
    timers = {k: _timer(f, inner) for k, f in fns.items()}
    with torch.inference_mode():
        for t in timers.values():  # warm-up
            t()
        samples = {k: [] for k in timers}
        for _ in range(rounds):
            for k, t in timers.items():
                samples[k].append(t())
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    why = decode.DECODE_KERNELS["cpu"].unavailable()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, H={args.heads} "
          f"D={args.head_dim}; cpu decode kernel: {'available' if not why else 'unavailable: ' + '; '.join(why)}")
    print(f"{'B':>3} {'cache':>6} | " + " ".join(f"{c:>9}" for c in ("ours", "api", "sdpa", "generic"))
          + " | sdpa/ours  generic/ours  (ms, median)")
    for B in (1, 8):
        for N in (1024, 2048, 4096, 8192):
            r = bench_shape(B, N, args.heads, args.head_dim, dtype, args.rounds)
            cols = " ".join(f"{r[c]:9.3f}" if c in r else f"{'-':>9}" for c in ("ours", "api", "sdpa", "generic"))
            ratio = (f"{r['sdpa'] / r['ours']:9.2f}  {r['generic'] / r['ours']:12.2f}" if "ours" in r else "")
            print(f"{B:>3} {N:>6} | {cols} | {ratio}")


if __name__ == "__main__":
    main()
