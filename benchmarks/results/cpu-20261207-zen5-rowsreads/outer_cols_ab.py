"""The one-pass backward's dK/dV row additions (csrc/cpu/bwd_rows.cpp, outer_rows_avx512) in passes of only the
16-column vectors a head dim fills (outer_cols<V>, masks set once per pass) against the earlier form (four vectors a
64-column pass whatever the head dim, masks per key), switched per call in one process by a temporary switch
(FA_OLD_OUTER, since removed), 8 rounds in alternating order, each the best of 5 batches; the bwd op on the one-pass
kernel (FASTATTN_CPU_FEW_ROWS=decode), no mask; printed: old time / new time (> 1: the new form is faster), median.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=. python outer_cols_ab.py
"""
import os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmarks/
from bench_few_rows import best_time

torch.set_num_threads(1)
os.environ["FASTATTN_CPU_FEW_ROWS"] = "decode"
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    for Hq, Hkv, Sq in ((8, 8, 2), (8, 8, 4), (32, 8, 2)):
        line = []
        for D in (32, 48, 64, 80, 96, 128, 160):
            Sk = 1024
            q = torch.randn(1, Hq, Sq, D).to(dt)
            k, v = torch.randn(1, Hkv, Sk, D).to(dt), torch.randn(1, Hkv, Sk, D).to(dt)
            args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
            o, lse = torch.ops.fastattn.fwd(q, k, v, *args)
            do = torch.randn_like(o)
            call = lambda: torch.ops.fastattn.bwd(do, q, k, v, o, lse, *args)  # noqa: E731
            t = {"old": [], "new": []}
            for r in range(8):
                for way in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    if way == "old":
                        os.environ["FA_OLD_OUTER"] = "1"
                    else:
                        os.environ.pop("FA_OLD_OUTER", None)
                    t[way].append(best_time(call, time.process_time, batches=5))
            line.append(f"D{D}:{statistics.median(t['old']) / statistics.median(t['new']):.2f}")
        print(f"{name} B1 H{Hq}/{Hkv} Sq{Sq} (rows {Hq // Hkv * Sq}), 1024 keys: " + " ".join(line), flush=True)
