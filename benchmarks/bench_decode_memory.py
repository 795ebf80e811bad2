"""One-token decode steps as a model's generate() makes them: each call on the next of L layers' caches (SDPA's
layout (1, Hkv, Sk, D), ~96 MB in all by default, --mb: past the 32 MB L3 of the AMD EPYC it was written on, so
every cache comes from memory there; an Intel Xeon with a 480 MB L3 holds them all, and --mb 1024 reaches DRAM).
Columns, interleaved round by round (each round takes the implementations in a rotated order, so background load hits
every column alike):
  cpu   fastattn.scaled_dot_product_attention(..., backend="cpu"): the split-KV decode kernel (csrc/cpu/decode.cpp)
  auto  fastattn.scaled_dot_product_attention(...): whatever auto picks (printed)
  cpu[v] with --switch NAME=v1,v2,...: the cpu column once per value v of an environment switch the CPU kernels read
        on every call (FASTATTN_CPU_LONE_ROW, FASTATTN_CPU_PREFETCH, FASTATTN_CPU_HEAD_CHUNKS), set just before that
        column's calls: builds compared in one process, round by round, which separate runs on a shared host cannot do
Prints torch's time per layer and each column as torch's time over its own (median of the per-round ratios; > 1:
faster than torch's SDPA). Speed is never asserted here (benchmarks/test_auto_rule.py holds the rule).

    python benchmarks/bench_decode_memory.py [--threads 1] [--rounds 24] [--switch FASTATTN_CPU_LONE_ROW=stream,chunks]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastattn
from fastattn import ops
from interleave import with_env  # (benchmarks/, the script's folder, is on sys.path)

CASES = [  # dtype, Hq, Hkv, D, Sk
    (torch.float32, 12, 12, 64, 512), (torch.float32, 12, 12, 64, 4096), (torch.float32, 8, 8, 128, 2048),
    (torch.float32, 16, 4, 128, 4096), (torch.float32, 32, 8, 128, 1024), (torch.bfloat16, 12, 12, 64, 4096),
    (torch.bfloat16, 16, 4, 128, 4096), (torch.float16, 12, 12, 64, 4096),
]


def _ratios(impls: dict, rounds: int) -> dict:
    names = list(impls)
    per = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            impls[n]()
            per[n].append(time.perf_counter() - t0)
    out = {n: statistics.median(a / b for a, b in zip(per["torch"], per[n])) for n in names}
    out["torch_s"] = statistics.median(per["torch"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--mb", type=int, default=96, help="cache bytes over all layers (MB)")
    ap.add_argument("--switch", default=None, metavar="NAME=v1,v2",
                    help="add a cpu column per value of this environment switch (read by the kernels per call)")
    a = ap.parse_args()
    if a.switch and ("=" not in a.switch or not all(a.switch.split("=", 1))):
        ap.error(f"--switch wants NAME=v1,v2,..., got {a.switch!r}")
    switch, values = (a.switch.split("=", 1)[0], a.switch.split("=", 1)[1].split(",")) if a.switch else (None, [])
    torch.set_num_threads(a.threads)
    print(ops.cpu_matmul())  # the CPU model, its ISA and the path each dtype takes
    print(f"torch {torch.__version__}, {a.threads} thread(s)")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dtype, Hq, Hkv, D, Sk in CASES:
        g = torch.Generator().manual_seed(0)
        per_layer = 2 * Hkv * Sk * D * torch.finfo(dtype).bits // 8
        q = torch.randn(1, Hq, 1, D, generator=g).to(dtype)
        caches = [tuple(torch.randn(1, Hkv, Sk, D, generator=g).to(dtype) for _ in range(2))
                  for _ in range(max(2, a.mb * 2 ** 20 // per_layer))]
        kw = {"enable_gqa": Hq != Hkv}

        def layers(f):
            return lambda: [f(q, k, v, **kw) for k, v in caches]
        cpu = layers(lambda *x, **k: fastattn.scaled_dot_product_attention(*x, backend="cpu", **k))
        impls = {"torch": layers(sdpa), "cpu": cpu, "auto": layers(fastattn.scaled_dot_product_attention)}
        for v in values:
            impls[f"cpu[{v}]"] = with_env(switch, v, cpu)
        with torch.no_grad():
            x = _ratios(impls, a.rounds)
        chosen = fastattn.explain(q, *caches[0], **kw).chosen
        cols = "".join(f", cpu[{v}] {x[f'cpu[{v}]']:.2f}x" for v in values)
        print(f"{str(dtype)[6:]:8} Hq={Hq:2} Hkv={Hkv:2} D={D:3} Sk={Sk:4} ({len(caches):3} layers): torch "
              f"{x['torch_s'] / len(caches) * 1e6:7.1f} us/layer; cpu {x['cpu']:.2f}x, auto ({chosen}) "
              f"{x['auto']:.2f}x{cols}", flush=True)


if __name__ == "__main__":
    main()
