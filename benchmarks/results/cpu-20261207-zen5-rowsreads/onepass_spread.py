# The run behind onepass_spread.txt: python onepass_spread.py bf16 64 4 4096 (PYTHONPATH=., glibc keeping its heap as in bwd_rows_stream.py)
import sys, time, torch, os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmarks/
from bench_few_rows import best_time
torch.set_num_threads(1)
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
D, Sq, Sk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
q = torch.randn(1, 8, Sq, D).to(dt); k = torch.randn(1, 8, Sk, D).to(dt); v = torch.randn(1, 8, Sk, D).to(dt)
do = torch.randn_like(q)
args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
o, lse = torch.ops.fastattn.fwd(q, k, v, *args)
call = lambda: torch.ops.fastattn.bwd(do, q, k, v, o, lse, *args)
def setenv(kern, pf):
    os.environ["FASTATTN_CPU_FEW_ROWS"] = kern
    if pf: os.environ["FASTATTN_CPU_PREFETCH"] = pf
    else: os.environ.pop("FASTATTN_CPU_PREFETCH", None)
res = {}
for rnd in range(5):
    for name, kern, pf in (("tile", "prefill", None), ("onepass", "decode", None), ("onepass+stream", "decode", "stream")):
        setenv(kern, pf)
        res.setdefault(name, []).append(best_time(call, time.process_time) * 1e9 / (8 * Sk))
for n, ts in res.items(): print(f"{n:15} ns/key " + " ".join(f"{t:5.1f}" for t in ts))
