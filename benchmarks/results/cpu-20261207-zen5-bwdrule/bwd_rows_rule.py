"""The bwd op on its two kernels, switched per call in one process: the tile backward (FASTATTN_CPU_FEW_ROWS=prefill)
and the one-pass backward (=decode: every row count), tile time over one-pass time (> 1: one pass is faster), per
dtype, rows per KV head, head dim and key count; no mask; each the best of 7 batches, the kernels alternating, twice.
For a backward rule of its own (register.cpp, few_rows_bwd_in_one_pass). glibc set to keep its heap (no page faults of
fresh gradients, which weigh alike on both but swing calls of megabytes run to run).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=. \
        python benchmarks/results/cpu-20261207-zen5-bwdrule/bwd_rows_rule.py --threads 1
"""
import argparse, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmarks/
from bench_few_rows import DTYPES, best_time
from interleave import with_env
from fastattn import ops

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16", "fp16"])
ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
ap.add_argument("--group", type=int, default=1, help="query heads per KV head (rows = group x Sq)")
ap.add_argument("--dim", type=int, nargs="+", default=[32, 48, 64, 128])
ap.add_argument("--keys", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--kv-heads", type=int, default=8)
a = ap.parse_args()
torch.set_num_threads(a.threads)
clock = time.process_time if a.threads == 1 else time.perf_counter
print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {a.threads} thread(s); bwd op, tile time over one-pass time")
for name in a.dtype:
    dt = DTYPES[name]
    for rows in a.rows:
        if rows % a.group:
            continue
        B, Hkv, Sq = a.batch, a.kv_heads, rows // a.group
        Hq = Hkv * a.group
        for D in a.dim:
            line = []
            for Sk in a.keys:
                q = torch.randn(B, Hq, Sq, D).to(dt)
                k = torch.randn(B, Hkv, Sk, D).to(dt)
                v = torch.randn(B, Hkv, Sk, D).to(dt)
                do = torch.randn_like(q)
                args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
                o, lse = torch.ops.fastattn.fwd(q, k, v, *args)
                call = lambda: torch.ops.fastattn.bwd(do, q, k, v, o, lse, *args)  # noqa: E731
                t = {"prefill": [], "decode": []}
                for kernel in ("prefill", "decode") * 2:
                    t[kernel].append(best_time(with_env("FASTATTN_CPU_FEW_ROWS", kernel, call), clock))
                line.append(f"{Sk}:{min(t['prefill']) / min(t['decode']):.2f}")
            print(f"{name:4} B{B} H{Hq}/{Hkv} rows {rows:2} D{D:3}  " + " ".join(line), flush=True)
