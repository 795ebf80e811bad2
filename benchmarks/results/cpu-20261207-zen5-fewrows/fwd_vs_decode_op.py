# The fwd op held on the prefill kernel (FASTATTN_CPU_FEW_ROWS=prefill) against the decode op called directly: prefill
# time over decode time. Three grids, as committed here:
#   rows   fwd_ops_rows_1thread.txt: 1-32 query rows per KV head, the decode op with one split
#   groups fwd_ops_one_token_groups_1thread.txt: one token of 4-16 rows (grouped-query heads), one split
#   route  one_token_route_rows_{1thread,2threads}.txt: one token of 8-16 rows, num_splits=0 as the dispatcher's
#          route runs it, both times printed
# (The op-on-either-kernel grids, fwd_op_rows_keys*.txt and few_rows_dims_1thread.txt, are benchmarks/bench_few_rows.py.)
# Run from the repository root: PYTHONPATH=.:benchmarks python benchmarks/results/cpu-20261207-zen5-fewrows/fwd_vs_decode_op.py rows 1
import itertools
import os
import sys
import time

import torch

import fastattn  # noqa: F401  (registers the ops)
from bench_few_rows import best_time

grid, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
clock = time.process_time if threads == 1 else time.perf_counter
os.environ["FASTATTN_CPU_FEW_ROWS"] = "prefill"
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
if grid == "rows":
    cases = [(dt, h, D, Sk, Sq) for dt, h, D, Sk, Sq in itertools.product(
        ["fp32", "bf16"], [(1, 12, 12), (2, 1, 1), (4, 8, 2)], [64, 128], [128, 1024], [1, 2, 4, 8, 16, 32])]
elif grid == "groups":
    cases = [(dt, h, D, Sk, 1) for dt, h, D, Sk in itertools.product(
        ["fp32", "bf16"], [(1, 8, 1), (1, 16, 2), (2, 32, 2), (1, 32, 8), (1, 16, 16)], [64, 128], [256, 2048])]
else:
    cases = [(dt, h, D, Sk, 1) for dt, h, D, Sk in itertools.product(
        ["fp32", "bf16", "fp16"], [(1, 8, 1), (1, 12, 1), (1, 16, 1), (1, 32, 2), (4, 32, 2), (1, 64, 8)], [64, 128],
        [512, 4096])]
splits, batches = (0, 7) if grid == "route" else (1, 5)
for dt, (B, Hq, Hkv), D, Sk, Sq in cases:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(DT[dt])
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(DT[dt]) for _ in range(2))
    sc = D ** -0.5
    a = best_time(lambda: torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, sc, -1, -1, False, 0.0, None, 0.0,
                                                 0, 0, False), clock, 0.05, batches)
    b = best_time(lambda: torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, sc, -1, -1, 0.0, None, splits, True),
                  clock, 0.05, batches)
    print(f"{dt} B{B} H{Hq}/{Hkv} rows {Hq // Hkv * Sq:>2} Sq{Sq} D{D} Sk{Sk}: prefill {a * 1e6:8.1f} decode "
          f"{b * 1e6:8.1f} us  prefill/decode {a / b:.2f}", flush=True)
