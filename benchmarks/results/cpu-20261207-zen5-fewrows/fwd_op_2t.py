# The fwd op on either kernel (FASTATTN_CPU_FEW_ROWS switched in one process), training-sized calls of 1-4 rows.
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/fwd_op_2t.py 2  (or 1)
import time, torch, itertools, fastattn, os, sys
torch.set_num_threads(int(sys.argv[1])); clock = time.perf_counter if torch.get_num_threads() > 1 else time.process_time
def t(f):
    for _ in range(3): f()
    t0 = clock(); f(); one = clock() - t0
    n = max(3, int(0.05 / max(one, 1e-6))); best = 1e9
    for r in range(7):
        t0 = clock()
        for _ in range(n): f()
        best = min(best, (clock() - t0) / n)
    return best * 1e6
for dt, (B, H), Sq, D, Sk in [("fp32", (8, 2), 4, 128, 4096), ("fp32", (8, 2), 1, 128, 4096), ("fp32", (8, 2), 4, 128, 1024), ("fp32", (8, 2), 4, 64, 4096), ("fp32", (1, 12), 4, 128, 1024), ("fp32", (2, 1), 1, 128, 1024), ("fp32", (1, 12), 1, 64, 1024), ("bf16", (8, 2), 4, 128, 4096)]:
    g = torch.Generator().manual_seed(0)
    d = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    q = torch.randn(B, H, Sq, D, generator=g).to(d); k, v = (torch.randn(B, H, Sk, D, generator=g).to(d) for _ in range(2))
    sc = D ** -0.5
    res = {}
    for mode in ("prefill", "decode", "prefill", "decode"):
        os.environ["FASTATTN_CPU_FEW_ROWS"] = mode
        res.setdefault(mode, []).append(t(lambda: torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, sc, -1, -1, False, 0.0, None, 0.0, 0, 0, False)))
    print(f"{dt} B{B} H{H} Sq{Sq} D{D} Sk{Sk}: prefill {min(res['prefill']):8.1f} us decode {min(res['decode']):8.1f} us  prefill/decode {min(res['prefill'])/min(res['decode']):.2f}", flush=True)
