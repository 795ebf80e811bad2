# The fwd op on the prefill kernel against the decode op (one split), 1-32 query rows per KV head: prefill time over decode time (before FASTATTN_CPU_FEW_ROWS existed; with it, set FASTATTN_CPU_FEW_ROWS=prefill).
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/fwd_op_grid.py 1
import time, torch, itertools, sys
import fastattn
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
def t(f, n=None):
    for _ in range(3): f()
    t0 = clock(); f(); one = clock() - t0
    n = max(5, int(0.05 / max(one, 1e-6)))
    best = 1e9
    for r in range(5):
        t0 = clock()
        for _ in range(n): f()
        best = min(best, (clock() - t0) / n)
    return best * 1e6
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
for dt, (B, Hq, Hkv), D, Sk in itertools.product(["fp32", "bf16"], [(1, 12, 12), (2, 1, 1), (4, 8, 2)], [64, 128], [128, 1024]):
    row = []
    for Sq in (1, 2, 4, 8, 16, 32):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, Sq, D, generator=g).to(DT[dt]); k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(DT[dt]) for _ in range(2))
        sc = D ** -0.5
        a = t(lambda: torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, sc, -1, -1, False, 0.0, None, 0.0, 0, 0, False))
        b = t(lambda: torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, sc, -1, -1, 0.0, None, 1, True))
        row.append(f"Sq{Sq}: {a/b:4.2f}")
    print(f"{dt} B{B} H{Hq}/{Hkv} D{D} Sk{Sk}: fwd/decode time " + "  ".join(row), flush=True)
