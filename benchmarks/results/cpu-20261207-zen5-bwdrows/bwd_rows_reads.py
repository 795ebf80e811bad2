"""The one-pass backward op (csrc/cpu/bwd_rows.cpp) under its read policies, switched per call in one process: time
with the plain reads (FASTATTN_CPU_PREFETCH=none, FASTATTN_CPU_LONE_ROW=chunks) over time with rows fetched ahead and
lone rows streamed (=stream, =stream), for the size rule in RowsStreams. glibc set to keep its heap (no page faults
of fresh gradients, which otherwise swing calls of megabytes by 2-10x run to run).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=.:benchmarks python benchmarks/results/cpu-20261207-zen5-bwdrows/bwd_rows_reads.py --threads 1
"""
import argparse, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmarks/
from bench_few_rows import best_time
from interleave import with_env
ap = argparse.ArgumentParser(); ap.add_argument("--threads", type=int, default=1); a = ap.parse_args()
torch.set_num_threads(a.threads)
clock = time.process_time if a.threads == 1 else time.perf_counter
POL = {"plain": ("none", "chunks"), "stream+lone": ("stream", "stream")}
print("one-pass backward op, plain time over each policy's (>1: faster than plain);", a.threads, "thread(s)")
for dt in (torch.float32, torch.bfloat16):
    for (B, Hq, Hkv, Sq) in ((2, 1, 1, 1), (2, 1, 1, 2), (1, 12, 12, 1), (8, 2, 2, 1), (4, 8, 2, 1)):
        for D in (64, 128):
            for Sk in (256, 1024, 4096):
                q = torch.randn(B, Hq, Sq, D).to(dt); k = torch.randn(B, Hkv, Sk, D).to(dt); v = torch.randn(B, Hkv, Sk, D).to(dt)
                do = torch.randn_like(q)
                args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
                o, lse = torch.ops.fastattn.fwd(q, k, v, *args)
                call = lambda: torch.ops.fastattn.bwd(do, q, k, v, o, lse, *args)
                t = {n: [] for n in POL}
                for _ in range(2):
                    for n, pol in POL.items():
                        f = call if pol is None else with_env("FASTATTN_CPU_PREFETCH", pol[0], with_env("FASTATTN_CPU_LONE_ROW", pol[1], call))
                        t[n].append(best_time(f, clock))
                base = min(t["plain"])
                print(f"{str(dt)[6:]:8} B{B} H{Hq}/{Hkv} Sq{Sq} D{D} keys {Sk:5}: plain {base*1e6:7.0f} us  " +
                      "  ".join(f"{n} {base / min(v):.2f}x" for n, v in t.items() if n != "plain"), flush=True)
