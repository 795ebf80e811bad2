"""torch's SDPA and the cpu kernels' forward side by side, wall time, median of 9 interleaved rounds.

    PYTHONPATH=. python causal_fwd.py THREADS DTYPE B,Hq,Hkv,S,D,causal ...
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastattn

torch.set_num_threads(int(sys.argv[1]))
dt = dict(bf16=torch.bfloat16, fp32=torch.float32, fp16=torch.float16)[sys.argv[2]]
for c in sys.argv[3:]:
    B, Hq, Hkv, S, D, causal = map(int, c.split(","))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dt) for h in (Hq, Hkv, Hkv))
    kw = dict(is_causal=bool(causal), enable_gqa=Hq != Hkv)
    fs = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, **kw),
          "cpu": lambda: fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)}
    ts = {n: [] for n in fs}
    for r in range(10):
        for n, f in fs.items():
            t0 = time.perf_counter()
            f()
            if r:
                ts[n].append(time.perf_counter() - t0)
    m = {n: statistics.median(v) for n, v in ts.items()}
    print(f"{sys.argv[1]}t {sys.argv[2]} B{B} H{Hq}/{Hkv} S{S} D{D} causal={causal}: torch {m['torch'] * 1e3:.2f} ms "
          f"cpu {m['cpu'] * 1e3:.2f} ms ({m['torch'] / m['cpu']:.2f}x)", flush=True)
