# One-token SDPA-layout steps of 8-16 rows per KV head: the prefill kernel against the decode op as the dispatcher's route runs it (num_splits=0).
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/onetok.py 1  (or 2)
import time, torch, itertools, fastattn, os, sys
th = int(sys.argv[1]); torch.set_num_threads(th); clock = time.process_time if th == 1 else time.perf_counter
def t(f):
    for _ in range(3): f()
    t0 = clock(); f(); one = clock() - t0
    n = max(5, int(0.05 / max(one, 1e-6))); best = 1e9
    for r in range(7):
        t0 = clock()
        for _ in range(n): f()
        best = min(best, (clock() - t0) / n)
    return best * 1e6
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
os.environ["FASTATTN_CPU_FEW_ROWS"] = "prefill"
for dt, (B, Hq, Hkv), D, Sk in itertools.product(["fp32", "bf16", "fp16"], [(1, 8, 1), (1, 12, 1), (1, 16, 1), (1, 32, 2), (4, 32, 2), (1, 64, 8)], [64, 128], [512, 4096]):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g).to(DT[dt]); k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(DT[dt]) for _ in range(2))
    sc = D ** -0.5
    a = t(lambda: torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, sc, -1, -1, False, 0.0, None, 0.0, 0, 0, False))
    b = t(lambda: torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, sc, -1, -1, 0.0, None, 0, True))
    print(f"{dt} B{B} H{Hq}/{Hkv} rows {Hq//Hkv:>2} D{D} Sk{Sk}: prefill {a:8.1f} decode {b:8.1f} us  prefill/decode {a/b:.2f}", flush=True)
