# The fwd op on the prefill kernel against the decode kernel (FASTATTN_CPU_FEW_ROWS switched per call), by query rows per KV head and keys: prefill time over decode time.
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/fwd_alone3.py 1 "2,8,4,2;2,4,4,1;2,4,4,2"
import os, sys, time, torch, fastattn, itertools
torch.set_num_threads(int(sys.argv[1])); clock = time.process_time if sys.argv[1] == "1" else time.perf_counter
def t(f):
    for _ in range(3): f()
    t0 = clock(); f(); one = clock() - t0
    n = max(5, int(0.02 / max(one, 1e-6))); best = 1e9
    for r in range(7):
        t0 = clock()
        for _ in range(n): f()
        best = min(best, (clock() - t0) / n)
    return best * 1e6
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
cases = sys.argv[2].split(";")
for dt, D in itertools.product(["fp32", "bf16", "fp16"], [64, 128]):
    for case in cases:
        B, Hq, Hkv, Sq = map(int, case.split(","))
        row = []
        for Sk in [64, 128, 256, 384, 512, 1024, 2048]:
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, Hq, Sq, D, generator=g).to(DT[dt]); k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(DT[dt]) for _ in range(2))
            sc = D ** -0.5
            r = {}
            for mode in ("prefill", "decode") * 2:
                os.environ["FASTATTN_CPU_FEW_ROWS"] = mode
                r.setdefault(mode, []).append(t(lambda: torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, sc, -1, -1, False, 0.0, None, 0.0, 0, 0, False)))
            row.append(f"{Sk} {min(r['prefill'])/min(r['decode']):.2f}")
        print(f"{dt} D{D} B{B} H{Hq}/{Hkv} Sq{Sq} (rows {Hq//Hkv*Sq}): " + "  ".join(row), flush=True)
