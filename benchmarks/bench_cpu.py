"""Quick side-by-side: fastattn's `cpu` kernels vs torch.nn.functional.scaled_dot_product_attention on CPU.

    python benchmarks/bench_cpu.py                       # default grid (B*H=8, S 512..2048, D 64/128)
    python benchmarks/bench_cpu.py --seq 1024 --dim 64 --dtype bf16 --mask --reps 5
    python benchmarks/bench_cpu.py --batch 2 --causal 1 --mask-kinds causal window documents   # structured masks

Each cell times both implementations alternately in the same process (median of --reps runs after a warm-up)
and prints torch_ms / ours_ms (> 1 means fastattn is faster). Forward and forward+backward. FLOPs follow
FlashAttention's convention (4*B*H*Sq*Sk*D forward, halved for causal; 3.5x for forward+backward). Speed is never
asserted; on a shared machine repeat and compare the spread.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn import ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


CLOCK = time.perf_counter  # --cpu-time: time.process_time (one thread on a shared machine: waiting is not counted)


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts) * 1e3


STRUCTURED = {
    "causal": "causal and key padding as one bool mask, as transformers' sdpa masks (a quarter of the last "
              "sequence's keys padding when B > 1)",
    "window": "causal, 256 keys back (a sliding window as a dense bool mask)",
    "documents": "four packed documents of 300, 800, 400 and the rest of the keys, causal within each",
}


def structured_mask(kind: str, B: int, S: int) -> torch.Tensor:
    """A bool (B, 1, S, S) mask (True = attend) of one of the STRUCTURED kinds."""
    i, j = torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    keep = j <= i  # (S, S)
    if kind == "window":
        keep = keep & (j >= i - 256)
    elif kind == "documents":
        doc = torch.bucketize(torch.arange(S), torch.tensor([300, 1100, 1500]), right=True)  # (S,) document of each
        keep = keep & (doc.view(S, 1) == doc.view(1, S))
    real = torch.ones(B, 1, S, dtype=torch.bool)
    if kind == "causal" and B > 1:
        real[B - 1, :, S - S // 4:] = False
    return (keep & real).unsqueeze(1)  # (B, 1, S) & (S, S) -> (B, S, S) -> (B, 1, S, S)


def bench_cell(B, H, S, D, dtype, causal, mask, reps, backward):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))
    attn_mask = None
    if mask == "float":  # dense float mask (B, 1, S, S), the case SDPA cannot fuse cheaply
        attn_mask = torch.randn(B, 1, S, S, generator=g).to(dtype)
    elif mask:
        attn_mask = structured_mask(mask, B, S)
    do = torch.randn(B, H, S, D, generator=g).to(dtype)
    causal_flag = causal and not mask

    def run(impl):
        def f():
            if backward:
                out = impl(q, k, v, attn_mask=attn_mask, is_causal=causal_flag)
                out.backward(do)
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    impl(q, k, v, attn_mask=attn_mask, is_causal=causal_flag)
        return f

    ours = lambda *a, **kw: fastattn.scaled_dot_product_attention(*a, backend="cpu", **kw)  # noqa: E731
    # Alternate the two so background load hits both alike.
    t_torch, t_ours = [], []
    for _ in range(2):
        t_torch.append(_time(run(F.scaled_dot_product_attention), reps))
        t_ours.append(_time(run(ours), reps))
    tt, to = min(t_torch), min(t_ours)
    seen = 0.5 if causal else 1.0  # a structured mask's FLOPs: the scores it leaves visible
    if mask in STRUCTURED:
        seen = attn_mask.float().mean().item()
    flops = 4 * B * H * S * S * D * seen * (3.5 if backward else 1.0)
    return tt, to, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--causal", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--mask", action="store_true", help="also time a dense float mask (no causal)")
    ap.add_argument("--mask-kinds", nargs="*", default=[], choices=list(STRUCTURED),
                    help="also time these bool (B, 1, S, S) masks (FLOPs: the scores they leave visible): "
                         + "; ".join(f"{k}: {v}" for k, v in STRUCTURED.items()))
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time (one thread on a busy machine), not wall time")
    a = ap.parse_args()
    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        if torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time needs --threads 1 (CPU time adds up over threads)")
        CLOCK = time.process_time
    print(ops.cpu_matmul())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={a.batch} H={a.heads}, "
          f"{'CPU' if a.cpu_time else 'wall'} time")
    print(f"{'dtype':5} {'S':>5} {'D':>4} {'kind':7} {'pass':7} {'torch ms':>9} {'ours ms':>9} {'GFLOP/s':>8} "
          f"{'speedup':>7}")
    kinds = [("causal" if c else "full", bool(c), None) for c in a.causal]
    kinds += [("mask", False, "float")] if a.mask else []
    label = {"causal": "cmask", "window": "window", "documents": "docs"}
    kinds += [(label[kind], False, kind) for kind in a.mask_kinds]
    for dt in a.dtype:
        for S in a.seq:
            for D in a.dim:
                for kind, causal, mask in kinds:
                    for backward in ([False] if a.no_bwd else [False, True]):
                        tt, to, flops = bench_cell(a.batch, a.heads, S, D, DTYPES[dt], causal, mask, a.reps, backward)
                        print(f"{dt:5} {S:5d} {D:4d} {kind:7} {'fwd+bwd' if backward else 'fwd':7} {tt:9.2f} "
                              f"{to:9.2f} {flops / to / 1e6:8.1f} {tt / to:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
