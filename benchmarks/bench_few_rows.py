"""Calls of few query rows per KV head on the CPU: the ops' two kernels side by side, the data behind the rules that
send such calls to the split-KV decode kernel (forward) and to the one-pass backward (csrc/cpu/register.cpp,
few_rows_on_decode and few_rows_in_one_pass). FASTATTN_CPU_FEW_ROWS=prefill|decode, read per call, switches the
kernels inside one process (decode: at any row count).

Default: the fwd op alone, prefill time over decode time (> 1: the decode kernel is faster), per shape and key count;
each the best of 7 batches, the two kernels alternating. --bwd: the bwd op alone, tile time over one-pass time (> 1:
one pass is faster), the same way (run with glibc keeping its heap, MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=4294967296, so that fresh gradients do not fault in pages). --training: forward+backward
through the SDPA function (backend cpu) against torch's SDPA, interleaved rounds (benchmarks/interleave.py), three
columns (x torch): "prefill" the tile kernels forward and backward, "rule" what the rules pick, "decode" the decode
kernel's forward and the one-pass backward (csrc/cpu/bwd_rows.cpp) at any row count.
One thread: CPU time; more: wall time.

    python benchmarks/bench_few_rows.py --threads 1
    python benchmarks/bench_few_rows.py --threads 1 --bwd --shapes 1,8,8,4 2,8,2,2 --dim 32 64 128
    python benchmarks/bench_few_rows.py --threads 2 --shapes 1,12,12,4 8,2,2,1 --keys 256 1024 --training
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import fastattn
from fastattn import ops
from fastattn.backends.sdpa import TORCH_SDPA
# (benchmarks/, the script's folder, is on sys.path)
from interleave import calls_per_batch, ratios_to, rounds_of, sdpa_call, with_env

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SWITCH = "FASTATTN_CPU_FEW_ROWS"


def best_time(f, clock, batch_s=0.02, batches=7):
    f(), f()
    t0 = clock()
    f()
    n = max(3, int(batch_s / max(clock() - t0, 1e-6)))
    best = float("inf")
    for _ in range(batches):
        t0 = clock()
        for _ in range(n):
            f()
        best = min(best, (clock() - t0) / n)
    return best


def op_ratio(q, k, v, clock, bwd=False):
    """Prefill time over decode time of the fwd op (bwd: of the bwd op) on q, k, v (B, H, S, D), no mask."""
    args = (None, None, None, 0, 0, q.shape[-1] ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
    call = lambda: torch.ops.fastattn.fwd(q, k, v, *args)  # noqa: E731
    if bwd:
        out, lse = call()
        dout = torch.randn_like(out)
        call = lambda: torch.ops.fastattn.bwd(dout, q, k, v, out, lse, *args)  # noqa: E731
    t = {"prefill": [], "decode": []}
    for kernel in ("prefill", "decode") * 2:
        t[kernel].append(best_time(with_env(SWITCH, kernel, call), clock))
    return min(t["prefill"]) / min(t["decode"])


def training(q, k, v, do, clock, rounds):
    """(torch's median time, {kernel: x torch}) of forward+backward through the SDPA function."""
    cpu = sdpa_call(fastattn.scaled_dot_product_attention, q, k, v, do, enable_gqa=True, backend="cpu")
    impls = {"torch": sdpa_call(TORCH_SDPA, q, k, v, do, enable_gqa=True),
             "prefill": with_env(SWITCH, "prefill", cpu), "rule": with_env(SWITCH, "", cpu),
             "decode": with_env(SWITCH, "decode", cpu)}
    per = rounds_of(impls, clock, rounds, calls_per_batch(impls, clock))
    return statistics.median(per["torch"]), ratios_to(per)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    ap.add_argument("--shapes", nargs="+", default=["1,12,12,1", "1,12,12,2", "1,12,12,4", "2,8,4,2", "4,8,2,1"],
                    help="B,Hq,Hkv,Sq (rows per KV head: Hq / Hkv x Sq)")
    ap.add_argument("--keys", type=int, nargs="+", default=[64, 128, 256, 384, 512, 1024, 2048])
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bwd", action="store_true", help="the bwd op: tile time over one-pass time")
    ap.add_argument("--training", action="store_true", help="forward+backward through SDPA against torch")
    ap.add_argument("--rounds", type=int, default=8,
                    help="interleaved rounds (--training; a multiple of 4 balances the order)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {args.threads} thread(s), "
          f"{'CPU' if args.threads == 1 else 'wall'} time; "
          + ("forward+backward x torch, median of interleaved rounds" if args.training
             else "the bwd op, tile time over one-pass time" if args.bwd
             else "the fwd op, prefill time over decode time"))
    gen = torch.Generator().manual_seed(0)
    for dt, D, shape in itertools.product(args.dtype, args.dim, args.shapes):
        B, Hq, Hkv, Sq = map(int, shape.split(","))
        name = f"{dt} D{D} B{B} H{Hq}/{Hkv} Sq{Sq} (rows {Hq // Hkv * Sq})"
        cells = []
        for Sk in args.keys:
            x = (torch.randn(B, h, s, D, generator=gen).to(DTYPES[dt]).requires_grad_(args.training)
                 for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
            q, k, v = x
            if args.training:
                t_torch, r = training(q, k, v, torch.randn(B, Hq, Sq, D, generator=gen).to(DTYPES[dt]), clock,
                                      args.rounds)
                print(f"{name} keys {Sk}: torch {t_torch * 1e6:.0f} us, prefill {r['prefill']:.2f}x, "
                      f"rule {r['rule']:.2f}x, decode {r['decode']:.2f}x", flush=True)
            else:
                cells.append(f"{Sk} {op_ratio(q, k, v, clock, args.bwd):.2f}")
        if cells:
            print(f"{name}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
