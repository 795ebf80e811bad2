"""scores_avx512_rows4 (decode_tiles.h) against scores_avx512_c for every row, the ops timed both ways in one process.
Run once with a temporary per-call switch, FASTATTN_CPU_SCORE_ROWS=1 taking the old path, which the commit then
removed (a getenv in the block helper; both columns paid it); output in scores_rows4_ab_1thread.txt. Kept as the
record of the method: it no longer switches anything.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=. python scores_rows4_ab.py 1
"""
import os, sys, time, torch
sys.path.insert(0, "/work/main/benchmarks")
import fastattn
from bench_few_rows import best_time
from interleave import with_env
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
os.environ["FASTATTN_CPU_FEW_ROWS"] = "decode"
print("old (FASTATTN_CPU_SCORE_ROWS=1) time over new time; bwd op (one pass) and fwd op (decode kernel)")
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    for (B, Hq, Hkv, Sq) in ((1, 8, 8, 4), (1, 8, 8, 8), (2, 8, 2, 2), (1, 8, 8, 12), (4, 8, 1, 1)):
        for D in (32, 64, 128):
            cells = []
            for Sk in (256, 1024):
                q = torch.randn(B, Hq, Sq, D).to(dt); k = torch.randn(B, Hkv, Sk, D).to(dt); v = torch.randn(B, Hkv, Sk, D).to(dt)
                args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
                o, lse = torch.ops.fastattn.fwd(q, k, v, *args); do = torch.randn_like(o)
                for op, call in (("bwd", lambda: torch.ops.fastattn.bwd(do, q, k, v, o, lse, *args)),
                                 ("fwd", lambda: torch.ops.fastattn.fwd(q, k, v, *args))):
                    t = {"old": [], "new": []}
                    for which in ("old", "new") * 2:
                        f = with_env("FASTATTN_CPU_SCORE_ROWS", "1" if which == "old" else "0", call)
                        t[which].append(best_time(f, clock))
                    cells.append(f"{op} {Sk}: {min(t['old']) / min(t['new']):.2f}")
            print(f"{name} B{B} H{Hq}/{Hkv} Sq{Sq} (rows {Hq // Hkv * Sq}) D{D}: " + "  ".join(cells), flush=True)
