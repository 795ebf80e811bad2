"""Random SDPA calls on the CPU, fastattn's auto against PyTorch's SDPA side by side: a search for the calls where
auto would make a user slower, beyond the classes the rule check (test_auto_rule.py) and the quick preset name.

Each call is drawn from a seeded generator: dtype (fp32, bf16, fp16), training (forward+backward) or not, batch,
heads (grouped-query too), head dim (32-256, odd ones among them), query and key lengths (square, a decode step of
1-4 tokens, a chunk of queries against a longer cache), the mask (none, is_causal, a bool key-padding mask, a float
mask per batch or shared) and the layout ((B, H, S, D) contiguous or (B, S, H, D) memory seen through transposes).
Calls whose work W = B * Hq * Sq * Sk * D passes --max-work (training: a quarter of it) are drawn again. Each is
timed in interleaved rounds (benchmarks/interleave.py): one batch of calls per side per round, the sides' order
alternating, and the ratio is the median over the rounds of torch's time over auto's within a round. One thread:
CPU time; more: wall time. Rows below --flag are marked `<<`; the summary gives the geomean and the lowest.

    python benchmarks/bench_random_calls.py --threads 1 --calls 60 --seed 1
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

import fastattn
from fastattn import ops
from fastattn.backends.sdpa import TORCH_SDPA
# (benchmarks/, the script's folder, is on sys.path)
from interleave import calls_per_batch, ratios_to, rounds_of, sdpa_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIMS = [32, 48, 64, 64, 80, 96, 128, 128, 160, 256]
MASKS = ["none", "none", "causal", "pad", "float_b", "float_1"]


def draw(rnd: random.Random, max_work: float) -> dict:
    """One call's description (plain values, for the JSON) with W within the budget."""
    while True:
        c = dict(dtype=rnd.choice(list(DTYPES)), grad=rnd.random() < 0.4, B=rnd.choice([1, 1, 2, 4, 8]),
                 Hkv=rnd.choice([1, 2, 4, 8, 12, 16]), G=rnd.choice([1, 1, 1, 2, 4]), D=rnd.choice(DIMS),
                 mask=rnd.choice(MASKS), bshd=rnd.random() < 0.3)
        S = int(2 ** rnd.uniform(4, 12))  # 16-4096 keys, log-uniform
        shape = rnd.choice(["square", "square", "decode", "chunk"])
        c["Sk"] = S
        c["Sq"] = S if shape == "square" else rnd.choice([1, 2, 4]) if shape == "decode" else max(1, S // rnd.choice(
            [2, 4, 8]))
        c["Hq"] = c["Hkv"] * c["G"]
        work = c["B"] * c["Hq"] * c["Sq"] * c["Sk"] * c["D"]
        if work <= (max_work / 4 if c["grad"] else max_work):
            c["log2W"] = round(math.log2(work), 1)
            return c


def tensors(c: dict, gen: torch.Generator):
    """q, k, v (B, H, S, D) views, the upstream gradient (training) and the SDPA keywords of call c."""
    dt = DTYPES[c["dtype"]]

    def make(h, s, grad):
        if c["bshd"]:
            t = torch.randn(c["B"], s, h, c["D"], generator=gen).to(dt).transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)
        else:
            t = torch.randn(c["B"], h, s, c["D"], generator=gen).to(dt)
        return t.requires_grad_(grad)
    q, k, v = make(c["Hq"], c["Sq"], c["grad"]), make(c["Hkv"], c["Sk"], c["grad"]), make(c["Hkv"], c["Sk"], c["grad"])
    kw = {"enable_gqa": c["G"] > 1}
    if c["mask"] == "causal":
        kw["is_causal"] = True
    elif c["mask"] == "pad":
        keep = torch.ones(c["B"], 1, 1, c["Sk"], dtype=torch.bool)  # (B, 1, 1, Sk): True = attend
        keep[::2, ..., c["Sk"] - c["Sk"] // 4:] = False
        kw["attn_mask"] = keep
    elif c["mask"].startswith("float"):
        b = c["B"] if c["mask"] == "float_b" else 1
        kw["attn_mask"] = torch.randn(b, 1, c["Sq"], c["Sk"], generator=gen).to(dt)  # (B | 1, 1, Sq, Sk)
    do = torch.randn(q.shape[:-1] + (c["D"],), generator=gen).to(dt) if c["grad"] else None
    return q, k, v, do, kw


def describe(c: dict) -> str:
    gqa = f" gqa{c['Hq']}/{c['Hkv']}" if c["G"] > 1 else ""
    return (f"{'fwd+bwd' if c['grad'] else 'fwd':<7} {c['dtype']} B{c['B']} H{c['Hq']}{gqa} Sq{c['Sq']} Sk{c['Sk']} "
            f"D{c['D']} {c['mask']}{' bshd' if c['bshd'] else ''}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-work", type=float, default=2 ** 29, help="W budget of a forward (training: a quarter)")
    ap.add_argument("--flag", type=float, default=0.95, help="mark rows where auto reads below this x torch")
    ap.add_argument("--json", help="write every call and its ratio here")
    ap.add_argument("--only", type=int, nargs="+", help="time these calls of the sequence only (the same draws)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {args.threads} thread(s), "
          f"{'CPU' if args.threads == 1 else 'wall'} time, median of {args.rounds} interleaved rounds, "
          f"seed {args.seed}")
    rnd, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    rows = []
    for i in range(args.calls):
        c = draw(rnd, args.max_work)
        q, k, v, do, kw = tensors(c, gen)
        if args.only and i not in args.only:
            continue
        impls = {"torch": sdpa_call(TORCH_SDPA, q, k, v, do, **kw),
                 "auto": sdpa_call(fastattn.scaled_dot_product_attention, q, k, v, do, **kw)}
        per = rounds_of(impls, clock, args.rounds, calls_per_batch(impls, clock))
        c["x_torch"] = round(ratios_to(per)["auto"], 3)
        c["torch_us"] = round(sorted(per["torch"])[len(per["torch"]) // 2] * 1e6, 1)
        c["chosen"] = fastattn.explain(q, k, v, **kw).chosen
        rows.append(c)
        mark = "  <<" if c["x_torch"] < args.flag else ""
        print(f"{i:>3} {describe(c):<62} log2W {c['log2W']:>4} torch {c['torch_us']:>9.0f} us  auto "
              f"{c['x_torch']:>5.2f}x  {c['chosen']}{mark}", flush=True)
    x = [r["x_torch"] for r in rows]
    low = min(rows, key=lambda r: r["x_torch"])
    print(f"{len(x)} calls: auto {math.exp(sum(map(math.log, x)) / len(x)):.2f}x torch (geomean), lowest "
          f"{low['x_torch']:.2f}x ({describe(low)}), {sum(r < args.flag for r in x)} below {args.flag}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": ops.cpu_matmul(), "torch": torch.__version__, "threads": args.threads,
                       "seed": args.seed, "rounds": args.rounds, "calls": rows}, f, indent=1)


if __name__ == "__main__":
    main()
