"""The one-pass backward's reads of K and V (csrc/cpu/bwd_rows.cpp, RowsStreams, kStreamBytes): the bwd op on the
one-pass kernel (FASTATTN_CPU_FEW_ROWS=decode), per size of K and V, with the rows read three ways, switched per call
in one process, 4 rounds in alternating order, each the best of 5 batches; printed as medians over the rounds:

  plain   FASTATTN_CPU_PREFETCH=none FASTATTN_CPU_LONE_ROW=chunks: no fetches, the 16-lane chunk loops
  none    FASTATTN_CPU_PREFETCH=none: no fetches, a lone row streamed (this CPU's lone-row policy)
  stream  FASTATTN_CPU_PREFETCH=stream: rows fetched ahead (decode_fetch.h), a lone row streamed
  rule    no switch: what kStreamBytes picks at this size

columns: plain/stream, none/stream, rule/stream (> 1: stream is faster). B1, MHA 8 heads at 1 and 4 query rows and GQA
32/8 at one token, D = 64 / 128, fp32 and bf16, no mask. glibc set to keep its heap:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=. \
        python benchmarks/results/cpu-20261207-zen5-rowsreads/bwd_rows_stream.py [--threads 2] [--mb 4 8 12]
"""
import argparse, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmarks/
from bench_few_rows import best_time
from fastattn import ops

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--mb", type=float, nargs="+", default=[1, 2, 4, 8, 12, 16], help="MB of K and V together")
a = ap.parse_args()
torch.set_num_threads(a.threads)
clock = time.process_time if a.threads == 1 else time.perf_counter
WAYS = {"plain": {"FASTATTN_CPU_PREFETCH": "none", "FASTATTN_CPU_LONE_ROW": "chunks"},
        "none": {"FASTATTN_CPU_PREFETCH": "none"}, "stream": {"FASTATTN_CPU_PREFETCH": "stream"}, "rule": {}}


def setenv(way):
    for name in ("FASTATTN_CPU_PREFETCH", "FASTATTN_CPU_LONE_ROW"):
        os.environ.pop(name, None)
    os.environ.update(WAYS[way])


print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {a.threads} thread(s); one-pass bwd op, X time over stream time")
os.environ["FASTATTN_CPU_FEW_ROWS"] = "decode"
for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    for D in (64, 128):
        for Hq, Hkv, Sq in ((8, 8, 1), (8, 8, 4), (32, 8, 1)):
            for mb in a.mb:
                Sk = int(mb * 2**20 / (Hkv * 2 * D * dt.itemsize))
                q = torch.randn(1, Hq, Sq, D).to(dt)
                k, v = torch.randn(1, Hkv, Sk, D).to(dt), torch.randn(1, Hkv, Sk, D).to(dt)
                do = torch.randn_like(q)
                args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, 0.0, 0, 0, False)
                o, lse = torch.ops.fastattn.fwd(q, k, v, *args)
                call = lambda: torch.ops.fastattn.bwd(do, q, k, v, o, lse, *args)  # noqa: E731
                t = {w: [] for w in WAYS}
                for rnd in range(4):
                    for way in (list(WAYS) if rnd % 2 == 0 else list(WAYS)[::-1]):
                        setenv(way)
                        t[way].append(best_time(call, clock, batches=5))
                setenv("rule")
                m = {w: statistics.median(ts) for w, ts in t.items()}
                print(f"{name} D{D:3} H{Hq}/{Hkv} Sq{Sq} K+V {mb:4.1f} MB ({Sk:5} keys): plain {m['plain'] / m['stream']:.2f}"
                      f"  none {m['none'] / m['stream']:.2f}  rule {m['rule'] / m['stream']:.2f}", flush=True)
