"""The CPU backward at several task targets (FASTATTN_CPU_BWD_TASKS, read per call: how many tasks the backward cuts
its (sequence, kv head) pairs into, at least; 1 never cuts), interleaved in one process, beside torch's training call
(--train: ours too, at each target). On one thread the CPU time per target is what cutting costs each thread of a
machine with that many CPUs. `--tasks 1 8 --train` is what ../cpu-20261207-zen5-bwdchunks measured (uncut / cut).

    PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-bwdtasks/bwd_tasks_ab.py --threads 1 --dtype bf16 \
        --tasks 1 8 32 --shapes 1,32,8,2048,128 1,16,16,2048,64,1   # B,Hq,Hkv,S,D[,causal]

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
ap.add_argument("--tasks", nargs="+", type=int, default=[1, 8, 32])
ap.add_argument("--shapes", nargs="+", required=True)
ap.add_argument("--rounds", type=int, default=9)
ap.add_argument("--train", action="store_true", help="also time our forward+backward at each target")
a = ap.parse_args()
torch.set_num_threads(a.threads)
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
clock = time.process_time if a.threads == 1 else time.perf_counter
print(f"# {fastattn.ops.cpu_matmul().split(';')[0]}; threads {a.threads} ({'CPU' if a.threads == 1 else 'wall'} "
      f"time), {a.dtype}, median of {a.rounds}, torch {torch.__version__}")
for spec in a.shapes:
    B, Hq, Hkv, S, D, *rest = map(int, spec.split(","))
    causal = bool(rest and rest[0])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dt).requires_grad_() for h in (Hq, Hkv, Hkv))
    go = torch.randn(B, Hq, S, D, generator=g).to(dt)
    gqa = Hq != Hkv
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend="cpu")

    def bwd():
        torch.autograd.grad(out, (q, k, v), go, retain_graph=True)

    def train(fn):
        def call():
            o = fn(q, k, v, is_causal=causal, enable_gqa=gqa)
            torch.autograd.grad(o, (q, k, v), go)
        return call

    runs = {f"tasks {t}": (str(t), bwd) for t in a.tasks}
    runs["torch fwd+bwd"] = (None, train(F.scaled_dot_product_attention))
    if a.train:
        ours = train(lambda *t, **kw: fastattn.scaled_dot_product_attention(*t, **kw, backend="cpu"))
        runs.update({f"ours fwd+bwd {t}": (str(t), ours) for t in a.tasks})
    ts = {n: [] for n in runs}
    for r in range(a.rounds + 1):
        for n, (env, f) in runs.items():
            if env is not None:
                os.environ["FASTATTN_CPU_BWD_TASKS"] = env
            t0 = clock()
            f()
            if r:
                ts[n].append(clock() - t0)
    os.environ.pop("FASTATTN_CPU_BWD_TASKS", None)
    m = {n: statistics.median(t) for n, t in ts.items()}
    base = m[f"tasks {a.tasks[0]}"]
    cells = ", ".join(f"{n} {m[n] * 1e3:.2f} ms ({base / m[n]:.3f}x)" for n in runs if n.startswith("tasks"))
    trains = "".join(f", at {t} tasks {m['torch fwd+bwd'] / m[f'ours fwd+bwd {t}']:.2f}x torch"
                     for t in a.tasks if a.train)
    print(f"B{B} H{Hq}/{Hkv} S{S} D{D}{' causal' if causal else ''}: backward {cells}; torch fwd+bwd "
          f"{m['torch fwd+bwd'] * 1e3:.2f} ms{trains}", flush=True)
