"""Small training calls (forward+backward) on the CPU: the `cpu` kernels and `auto` against PyTorch's SDPA, side by
side in one process, for auto's small-training rules (fastattn/backends/cpu.py, _small_grad and the tiny fp32 rule).

Each case times torch.nn.functional.scaled_dot_product_attention, fastattn with backend="cpu" and fastattn's auto
in interleaved rounds (each round one batch of calls per path, the paths' order rotating), and prints the median over
the rounds of each round's ratio (torch's time over the path's), with W = B * Hq * Sq * Sk * D, the work the rules
bound. One thread: CPU time; more: wall time.

    python benchmarks/bench_small_grad.py --threads 1
    python benchmarks/bench_small_grad.py --threads 2 --heads 1x1 1x4 1x12 4x12 --seq 16 32 64 128 --dim 64
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import fastattn
from fastattn import lean, ops
from fastattn.backends.sdpa import TORCH_SDPA
# (benchmarks/, the script's folder, is on sys.path)
from interleave import calls_per_batch, ratios_to, rounds_of, sdpa_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _python_autograd(run):
    """run with the cpu kernels' gradient recorded as before 2026-12-06: the Python autograd.Function on the full
    path (no C++ node, no lean replay), switched on for this call only."""
    def before():
        routes, call = ops._ROUTES, lean.call
        ops._ROUTES, lean.call = False, lambda *a: None
        try:
            run()
        finally:
            ops._ROUTES, lean.call = routes, call
    return before


def ratios(impls, clock, rounds, batch_s=0.02):
    """(torch's time over each path's, the median over rounds of the ratio within a round; torch's median time)."""
    per = rounds_of(impls, clock, rounds, calls_per_batch(impls, clock, batch_s))
    return ratios_to(per), statistics.median(per["torch"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--heads", nargs="+", default=["1x1", "1x2", "1x4", "1x12", "4x12", "8x12"],
                    help="BxH: batch x heads")
    ap.add_argument("--seq", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--mask", choices=["none", "pad"], default="none",
                    help="pad: a bool key-padding mask (B, 1, 1, S), the last quarter of every other row's keys off")
    ap.add_argument("--before", action="store_true",
                    help="add a `before` column: the cpu kernels through the Python autograd.Function, as before the "
                         "C++ autograd node")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--max-work", type=float, default=2 ** 25, help="skip cases with W above this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    dt = DTYPES[args.dtype]
    print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, "
          f"{'CPU' if args.threads == 1 else 'wall'} time, median of {args.rounds} interleaved rounds, "
          f"mask {args.mask}")
    print(f"{'B':>2} {'H':>3} {'S':>4} {'D':>4} {'causal':>6} {'log2 W':>6} {'torch us':>9} {'cpu':>6} {'auto':>6}  "
          "chosen")
    g = torch.Generator().manual_seed(0)
    for hb, S, D, causal in itertools.product(args.heads, args.seq, args.dim, args.causal):
        B, H = map(int, hb.split("x"))
        causal = bool(causal)
        if causal and args.mask == "pad":
            continue  # (SDPA takes a mask or is_causal)
        work = B * H * S * S * D
        if work > args.max_work:
            continue
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(dt).requires_grad_(True) for _ in range(3))
        do = torch.randn(B, H, S, D, generator=g).to(dt)
        mask = None
        if args.mask == "pad":
            mask = torch.ones(B, 1, 1, S, dtype=torch.bool)  # (B, 1, 1, Sk): True = attend
            mask[::2, ..., S - S // 4:] = False
        kw = dict(attn_mask=mask, is_causal=causal)
        impls = {"torch": sdpa_call(TORCH_SDPA, q, k, v, do, **kw),
                 "cpu": sdpa_call(fastattn.scaled_dot_product_attention, q, k, v, do, backend="cpu", **kw),
                 "auto": sdpa_call(fastattn.scaled_dot_product_attention, q, k, v, do, **kw)}
        if args.before:
            impls["before"] = _python_autograd(sdpa_call(fastattn.scaled_dot_product_attention, q, k, v, do,
                                                         backend="cpu", **kw))
        x, t_torch = ratios(impls, clock, args.rounds)
        chosen = fastattn.explain(q, k, v, attn_mask=mask, is_causal=causal).chosen
        print(f"{B:>2} {H:>3} {S:>4} {D:>4} {int(causal):>6} {work.bit_length() - 1:>6} {t_torch * 1e6:>9.0f} "
              f"{x['cpu']:>5.2f}x {x['auto']:>5.2f}x  {chosen}"
              + (f"  before {x['before']:.2f}x" if args.before else ""), flush=True)


if __name__ == "__main__":
    main()
