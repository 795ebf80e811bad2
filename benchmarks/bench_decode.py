"""Decode: one new token against a KV cache, batch 1 and 8 (CPU) or 1/8/32 (GPU), caches of 1k-8k (GPU: to 32k).

Columns, measured side by side and interleaved round by round (so background load hits every column alike):
  ours     the split-KV decode kernel on the cache in its own layout (B, S, Hkv, D):
           CPU torch.ops.fastattn.decode_fwd (csrc/cpu/decode.cpp), GPU the Triton kernel (backends/triton/kernels/decode.py)
  api      fastattn.flash_attn_with_kvcache(...): validation + the router + the same kernel
  sdpa     torch.nn.functional.scaled_dot_product_attention, q (B, H, 1, D) against k/v (B, H, N, D)
  generic  fastattn.flash_attn_with_kvcache(..., backend="sdpa"): the generic path (length bias) on SDPA
CPU prints median ms and sdpa/ours (> 1: ours is faster). GPU also prints the bandwidth ours reaches reading K and
V, as a fraction of this GPU's copy bandwidth (torch copy_ of a buffer of the same size). Speed is never asserted.

    python benchmarks/bench_decode.py [--dtype float32|bfloat16|float16] [--rounds 30] [--threads N]
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 128
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn.params import DecodeCall


def _timer(fn, inner, device):
    def once():
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / inner
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) / inner * 1e3
    return once


def bench_shape(B, N, H, Hkv, D, dtype, rounds, device):
    q = torch.randn(B, 1, H, D, dtype=dtype, device=device)  # flash layout (B, Sq, H, D)
    kc = torch.randn(B, N, Hkv, D, dtype=dtype, device=device)
    vc = torch.randn(B, N, Hkv, D, dtype=dtype, device=device)
    lens = torch.full((B,), N, dtype=torch.int32, device=device)
    qh = q.transpose(1, 2).contiguous()  # (B, H, 1, D) for SDPA
    rep = H // Hkv  # SDPA gets k/v expanded to every query head only when enable_gqa is unavailable
    kh, vh = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()  # (B, Hkv, N, D): SDPA's best layout
    qt = q.transpose(1, 2)  # (B, 1, H, D) -> (B, H, 1, D) view
    scale = D ** -0.5
    fns = {}
    name = "cpu" if device == "cpu" else "triton"
    kern = fastattn.BACKENDS[name].decode
    if not kern.unavailable():
        fns["ours"] = lambda: kern.run(DecodeCall(q=qt, k_cache=kc, v_cache=vc, seqlens_k=lens, scale=scale))
        fns["api"] = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=name)
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=rep > 1)
    fns["generic"] = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="sdpa")
    work = B * N * Hkv * D
    inner = max(1, int((2e8 if device == "cuda" else 2e6) // work))
    timers = {k: _timer(f, inner, device) for k, f in fns.items()}
    with torch.inference_mode():
        for t in timers.values():  # warm-up (and Triton compilation)
            t()
        samples = {k: [] for k in timers}
        for _ in range(rounds):
            for k, t in timers.items():
                samples[k].append(t())
        res = {k: statistics.median(v) for k, v in samples.items()}
        if device == "cuda":  # copy bandwidth: read + write of a buffer as large as K + V
            src = torch.empty(2 * work, dtype=dtype, device=device)
            dst = torch.empty_like(src)
            t = _timer(lambda: dst.copy_(src), 10, device)
            t()
            copy_ms = statistics.median(t() for _ in range(rounds))
            res["copy_GBps"] = 2 * src.numel() * src.element_size() / copy_ms / 1e6
            if "ours" in res:
                res["ours_GBps"] = 2 * work * kc.element_size() / res["ours"] / 1e6
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    H, Hkv = args.heads, args.kv_heads or args.heads
    kern = fastattn.BACKENDS["cpu" if args.device == "cpu" else "triton"].decode
    why = kern.unavailable()
    print(f"torch {torch.__version__}, {args.device}" + (f" {torch.get_num_threads()} threads" if args.device == "cpu"
                                                         else f" {torch.cuda.get_device_name()}")
          + f", {args.dtype}, H={H} Hkv={Hkv} D={args.head_dim}; {kern.name}: "
          + ("available" if not why else "unavailable: " + "; ".join(why)))
    gpu = args.device == "cuda"
    print(f"{'B':>3} {'cache':>6} | " + " ".join(f"{c:>9}" for c in ("ours", "api", "sdpa", "generic"))
          + " | sdpa/ours  generic/ours" + ("   ours GB/s  copy GB/s  fraction" if gpu else "") + "  (ms, median)")
    batches, lengths = ((1, 8, 32), (1024, 4096, 8192, 32768)) if gpu else ((1, 8), (1024, 2048, 4096, 8192))
    for B in batches:
        for N in lengths:
            r = bench_shape(B, N, H, Hkv, args.head_dim, dtype, args.rounds, args.device)
            cols = " ".join(f"{r[c]:9.3f}" if c in r else f"{'-':>9}" for c in ("ours", "api", "sdpa", "generic"))
            ratio = (f"{r['sdpa'] / r['ours']:9.2f}  {r['generic'] / r['ours']:12.2f}" if "ours" in r else "")
            if gpu and "ours_GBps" in r:
                ratio += f"   {r['ours_GBps']:9.0f}  {r['copy_GBps']:9.0f}  {r['ours_GBps'] / r['copy_GBps']:8.2f}"
            print(f"{B:>3} {N:>6} | {cols} | {ratio}")


if __name__ == "__main__":
    main()
