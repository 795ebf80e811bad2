"""Overhead of the context-parallel machinery (merge, bookkeeping, simulated communication) vs the kernel time.

W simulated ranks (threads, LocalComm) run cp_attention forward + backward; rank 0's thread times its block
kernel calls (block_forward / block_backward), its merges (merge_), and the rest of its wall time (bookkeeping,
buffer copies, waiting for the simulated peers). Issue 15's target: merge + bookkeeping <= 5% of the kernel time at
8k tokens per rank. Also printed: one full-sequence kernel call (fwd + bwd) in one process, for scale.

    python benchmarks/bench_cp.py --device cuda --dtype bfloat16 --tokens 8192 --world 2 4 8
    python benchmarks/bench_cp.py --quick           # tiny sizes on CPU: checks that it runs, numbers meaningless

Caveats: the simulated ranks share one device, so "rest" includes waiting for the others (on a GPU their kernels
serialise); timed regions synchronise the device, which removes the overlap of real runs. The kernel and merge
columns are the meaningful ones. Whether real hops hide behind compute: benchmarks/bench_cp_gloo.py (W gloo processes).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastattn
import fastattn.distributed.ring as ring  # noqa: E402
from fastattn.blocks import block_backward, block_forward  # noqa: E402
from fastattn.distributed import CPConfig, cp_attention, run_local  # noqa: E402


class RankZeroTimer:
    """Accumulates the time of wrapped calls made on rank 0's thread (threads are named cp-rank<r>)."""

    def __init__(self, device):
        self.device, self.t = device, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn, name):
        def timed(*a, **kw):
            if threading.current_thread().name != "cp-rank0":
                return fn(*a, **kw)
            self.sync()
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            self.sync()
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            return r
        return timed


@contextmanager
def instrumented(timer):
    saved = ring.block_forward, ring.block_backward, ring.merge_
    ring.block_forward = timer.wrap(ring.block_forward, "kernel")
    ring.block_backward = timer.wrap(ring.block_backward, "kernel")
    ring.merge_ = timer.wrap(ring.merge_, "merge")
    try:
        yield
    finally:
        ring.block_forward, ring.block_backward, ring.merge_ = saved


def one_step(W, q, k, v, dout, balance, causal, timer, reps):
    def rank(comm):
        cp = CPConfig(comm, strategy="ring", balance=balance)
        ql, kl, vl = (cp.shard(t, 1).detach().requires_grad_() for t in (q, k, v))
        do = cp.shard(dout, 1)
        total = 0.0
        for i in range(reps + 1):  # the first round warms up
            if comm.rank == 0 and i == 1:
                timer.t.clear()
            timer.sync()
            t0 = time.perf_counter()
            cp_attention(ql, kl, vl, cp=cp, causal=causal).backward(do)
            timer.sync()
            if i:
                total += time.perf_counter() - t0
        return total / reps
    total = run_local(W, rank)[0]
    return total, {k: v / reps for k, v in timer.t.items()}


def full_kernel(q, k, v, dout, causal, device, reps):
    qb, kb, vb, db = (t.transpose(1, 2) for t in (q, k, v, dout))  # (B, S, H, D) -> (B, H, S, D) views
    kw = dict(q_start=0, k_start=0, causal=causal)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        o, lse = block_forward(qb, kb, vb, **kw)
        block_backward(db, qb, kb, vb, o.to(q.dtype), lse, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--balance", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny CPU sizes: checks the script runs")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.world, args.heads, args.head_dim, args.reps = 64, [2], 2, 16, 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"# bench_cp: ring ({args.balance}), causal, {args.tokens} tokens/rank, H={args.heads}, "
          f"D={args.head_dim}, {args.dtype} on {device}; fwd+bwd per step, ms (rank 0)")
    print(f"{'W':>3} {'step':>10} {'kernel':>10} {'merge':>9} {'rest':>9} {'merge/kernel':>13} "
          f"{'(merge+rest)/kernel':>20} {'1-proc full':>12}")
    for W in args.world:
        S = args.tokens * W
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, S, args.heads, args.head_dim, generator=g).to(device, dtype)
                         for _ in range(4))
        timer = RankZeroTimer(device)
        with instrumented(timer):
            total, t = one_step(W, q, k, v, dout, args.balance, True, timer, args.reps)
        kern, merge = t.get("kernel", 0.0), t.get("merge", 0.0)
        rest = max(total - kern - merge, 0.0)
        full = full_kernel(q, k, v, dout, True, device, args.reps)
        print(f"{W:>3} {total * 1e3:>10.2f} {kern * 1e3:>10.2f} {merge * 1e3:>9.2f} {rest * 1e3:>9.2f} "
              f"{merge / kern:>13.1%} {(merge + rest) / kern:>20.1%} {full * 1e3:>12.2f}")


if __name__ == "__main__":
    main()
