"""Where a GPU call's time goes on the host: for the first run's decode figures, which were flat at 0.47-0.74 ms from
4k to 32k keys (benchmarks/results/gpu-h200-20261204) while cuDNN took 0.05-0.29 ms.

For each call (one-token decode through flash_attn_with_kvcache on each backend, PyTorch's SDPA on the same cache,
and a short prefill through the SDPA surface) it prints, one line each:
  enqueue  host time per call, calls issued back to back without a synchronize (what a model's Python waits for)
  total    per call including the GPU finishing them (200 calls, then one synchronize)
  gpu      kernel time per call from torch.profiler (CUDA kernels only, summed)
  syncs    host synchronizations in one call (torch.cuda.set_sync_debug_mode counts them as warnings)
and then the cProfile of the slowest call kinds (the functions with the most cumulative time), so a second GPU
session can tell a host sync from Python work from Triton's launcher.

    python benchmarks/gpu_host_time.py [--keys 4096] [--calls 200] [--profile 12]

On a machine without CUDA it runs the same code on CPU tensors with the Triton kernels stubbed (TRITON_INTERPRET
would spend seconds per call), as a rehearsal: the figures are then only this host's Python.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, installed or not

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before triton is imported: the kernels then run (stubbed) on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastattn  # noqa: E402


def _stub_triton_launches():
    """CPU rehearsal: the Triton decode and attention kernels return at once (the Python around them still runs)."""
    class _Noop:
        def __getitem__(self, grid):
            return lambda *a, **k: None
    from fastattn.backends.triton.kernels import decode, op
    decode._wrap = lambda kernel: _Noop()
    op._wrap = lambda kernel: _Noop()


def calls(dev, keys):
    """name -> zero-argument callable; the decode shape is the first run's (B8, 32 query heads over 8, hd 128)."""
    B, Hq, Hkv, D = 8, 32, 8, 128
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, 1, Hq, D, device=dev, dtype=dt, generator=g)  # flash-attn layout (B, Sq, Hq, D)
    kc = torch.randn(B, keys, Hkv, D, device=dev, dtype=dt, generator=g)  # (B, Sk, Hkv, D)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), keys, dtype=torch.int32, device=dev)
    out = {}
    backends = ["auto", "triton"] + (["cuda"] if dev == "cuda" else [])
    for be in backends:
        out[f"decode {be} (cache_seqlens)"] = (
            lambda be=be: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=be))
        out[f"decode {be} (no cache_seqlens)"] = (
            lambda be=be: fastattn.flash_attn_with_kvcache(q, kc, vc, backend=be))
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D) views
    out["decode torch sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    qp, kp, vp = (torch.randn(1, 8, 512, 64, device=dev, dtype=dt, generator=g) for _ in range(3))
    out["prefill torch sdpa (1,8,512,64)"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    out["prefill triton (1,8,512,64)"] = (
        lambda: fastattn.scaled_dot_product_attention(qp, kp, vp, is_causal=True, backend="triton"))
    return out


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def enqueue_total_us(fn, dev, n):
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    _sync(dev)
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def gpu_us(fn, dev, n):
    if dev != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        _sync(dev)
    total = sum(e.device_time_total for e in prof.key_averages())  # microseconds
    return total / n


def syncs(fn, dev):
    if dev != "cuda":
        return -1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(x.message) for x in w)


def profile_text(fn, n, top):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
    return s.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=4096, help="decode cache length")
    ap.add_argument("--calls", type=int, default=200, help="calls per measurement")
    ap.add_argument("--profile", type=int, default=12, help="cProfile lines per profiled call (0: none)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        _stub_triton_launches()
        a.keys = min(a.keys, 256)
        print("no CUDA: CPU tensors, Triton launches stubbed (a rehearsal; the figures are this host's Python)")
    print(f"device {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"keys {a.keys}, {a.calls} calls each")
    print(f"{'call':36} {'enqueue us':>10} {'total us':>9} {'gpu us':>8} {'syncs':>5}")
    fns = calls(dev, a.keys)
    for name, fn in fns.items():
        try:
            enq, tot = enqueue_total_us(fn, dev, a.calls)
            print(f"{name:36} {enq:10.1f} {tot:9.1f} {gpu_us(fn, dev, 20):8.1f} {syncs(fn, dev):5d}", flush=True)
        except Exception as e:  # noqa: BLE001 - a refusal is a result here
            print(f"{name:36} failed: {type(e).__name__}: {str(e)[:150]}", flush=True)
    if a.profile:
        for name in ("decode triton (cache_seqlens)", "decode cuda (cache_seqlens)", "prefill triton (1,8,512,64)"):
            if name in fns:
                print(f"\n--- cProfile, {name}, {a.calls} calls, by cumulative time")
                try:
                    print("\n".join(profile_text(fns[name], a.calls, a.profile).splitlines()[:a.profile + 10]))
                except Exception as e:  # noqa: BLE001
                    print(f"failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
