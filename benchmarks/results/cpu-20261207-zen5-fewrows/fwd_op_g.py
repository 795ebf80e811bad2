# One-token calls of 4-16 rows per KV head (grouped-query heads): the fwd op kept on the prefill kernel against the decode op, one split.
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/fwd_op_g.py
import time, torch, itertools, fastattn, os
torch.set_num_threads(1); clock = time.process_time
def t(f):
    for _ in range(3): f()
    t0 = clock(); f(); one = clock() - t0
    n = max(5, int(0.05 / max(one, 1e-6))); best = 1e9
    for r in range(5):
        t0 = clock()
        for _ in range(n): f()
        best = min(best, (clock() - t0) / n)
    return best * 1e6
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
for dt, (B, Hq, Hkv), D, Sk in itertools.product(["fp32", "bf16"], [(1, 8, 1), (1, 16, 2), (2, 32, 2), (1, 32, 8), (1, 16, 16)], [64, 128], [256, 2048]):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g).to(DT[dt]); k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(DT[dt]) for _ in range(2))
    sc = D ** -0.5
    os.environ["FASTATTN_CPU_FEW_ROWS"] = "prefill"
    a = t(lambda: torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, sc, -1, -1, False, 0.0, None, 0.0, 0, 0, False))
    b = t(lambda: torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, sc, -1, -1, 0.0, None, 1, True))
    print(f"{dt} B{B} H{Hq}/{Hkv} (rows {Hq//Hkv}) D{D} Sk{Sk}: prefill/decode time {a/b:.2f}", flush=True)
