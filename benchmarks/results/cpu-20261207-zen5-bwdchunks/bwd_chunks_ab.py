"""The CPU backward of few (sequence, kv head) pairs, heads cut into key chunks (the default) against uncut
(FASTATTN_CPU_BWD_CHUNKS=0 when measured; now FASTATTN_CPU_BWD_TASKS=1 against 8, read per call), and the training
call against torch's SDPA, interleaved in one process.

    PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-bwdchunks/bwd_chunks_ab.py --threads 1 --dtype bf16 \
        --shapes 1,1,1,2048,128 1,8,1,1024,64   # B,Hq,Hkv,S,D[,causal]

One thread: CPU time (process_time); more: wall time. Median of --rounds rounds."""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
ap.add_argument("--shapes", nargs="+", required=True)
ap.add_argument("--rounds", type=int, default=9)
a = ap.parse_args()
torch.set_num_threads(a.threads)
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
clock = time.process_time if a.threads == 1 else time.perf_counter
print(f"# threads {a.threads} ({'CPU' if a.threads == 1 else 'wall'} time), {a.dtype}, median of {a.rounds}, "
      f"torch {torch.__version__}")
for spec in a.shapes:
    B, Hq, Hkv, S, D, *rest = map(int, spec.split(","))
    causal = bool(rest and rest[0])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dt).requires_grad_() for h in (Hq, Hkv, Hkv))
    go = torch.randn(B, Hq, S, D, generator=g).to(dt)
    gqa = Hq != Hkv

    def ours():
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend="cpu")
        torch.autograd.grad(out, (q, k, v), go)

    def theirs():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        torch.autograd.grad(out, (q, k, v), go)

    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend="cpu")

    def bwd():
        torch.autograd.grad(out, (q, k, v), go, retain_graph=True)

    runs = {"bwd uncut": ("1", bwd), "bwd cut": ("8", bwd), "torch": (None, theirs), "ours uncut": ("1", ours),
            "ours cut": ("8", ours)}
    ts = {n: [] for n in runs}
    for r in range(a.rounds + 1):
        for n, (env, f) in runs.items():
            if env is not None:
                os.environ["FASTATTN_CPU_BWD_TASKS"] = env
            t0 = clock()
            f()
            if r:
                ts[n].append(clock() - t0)
    m = {n: statistics.median(t) for n, t in ts.items()}
    print(f"B{B} H{Hq}/{Hkv} S{S} D{D}{' causal' if causal else ''}: backward cut {m['bwd uncut'] / m['bwd cut']:.3f}x "
          f"uncut ({m['bwd uncut'] * 1e3:.2f} ms); fwd+bwd torch {m['torch'] * 1e3:.2f} ms, ours uncut "
          f"{m['torch'] / m['ours uncut']:.2f}x, cut {m['torch'] / m['ours cut']:.2f}x torch", flush=True)
