"""One thread, bf16, B1 GQA 32/8 D=128 causal backward at task targets 8 and 32, the partials advised to huge pages
or not (FASTATTN_CPU_HUGE_PAGES, read per call); S from the environment (default 4096). Output: partials_256mb.txt.

    S=4096 PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-bwdtasks/partials_256mb.py"""
import os
import statistics
import time

import torch

import fastattn

torch.set_num_threads(1)
B, Hq, Hkv, S, D = 1, 32, 8, int(os.environ.get("S", "4096")), 128
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, h, S, D, generator=g).bfloat16().requires_grad_() for h in (Hq, Hkv, Hkv))
go = torch.randn(B, Hq, S, D, generator=g).bfloat16()
out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="cpu")
configs = [("8", "1"), ("32", "1"), ("8", "0"), ("32", "0")]  # (FASTATTN_CPU_BWD_TASKS, FASTATTN_CPU_HUGE_PAGES)
ts = {c: [] for c in configs}
for r in range(8):
    for c in configs:
        os.environ["FASTATTN_CPU_BWD_TASKS"], os.environ["FASTATTN_CPU_HUGE_PAGES"] = c
        t0, t1 = time.process_time(), time.perf_counter()
        torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
        if r:
            ts[c].append((time.process_time() - t0, time.perf_counter() - t1))
for c in configs:
    cpu = statistics.median(x[0] for x in ts[c]) * 1e3
    wall = statistics.median(x[1] for x in ts[c]) * 1e3
    print(f"tasks {c[0]} huge {c[1]} cpu {cpu:.1f} ms wall {wall:.1f} ms")
