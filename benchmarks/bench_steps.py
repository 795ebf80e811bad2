"""Inference steps on CPU: a few query tokens against a longer key cache (a chunked prefill, a speculative or a
batched generate() step), fastattn's paths against torch's SDPA on the same inputs, interleaved, median of rounds.

    python benchmarks/bench_steps.py --threads 1 --dtype fp16 --heads 12/12:64 8/8:128 8/4:128 16/4:128 \
        --keys 128 512 2048 --tokens 5 8 12 16 24 32 48 [--mask none causal pad] [--paths cpu sdpa auto]

Each line: `H{Hq}/{Hkv} D{D} Sk{Sk} Sq{Sq} {mask}: cpu 1.16x sdpa 0.96x (torch 0.037 ms)`, a path's ratio being
torch's time over its time (> 1: faster than torch). Paths: `cpu` and `sdpa` are fastattn's backends named
explicitly (`sdpa`: auto's hand-over, torch's kernel behind fastattn's dispatch), `auto` fastattn's choice. Masks:
`causal` is transformers' bottom-right causal mask of the step as a float (1, 1, Sq, Sk) tensor, `pad` a bool key
padding mask (1, 1, 1, Sk) hiding the first eighth of the keys. Batch 1, random normal inputs, wall time; name the
CPU (`python -m fastattn.info`) beside any figure."""
import argparse
import statistics
import time

import torch

import fastattn

SDPA = torch.nn.functional.scaled_dot_product_attention
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_mask(kind: str, Sq: int, Sk: int, dtype):
    """None, transformers' bottom-right causal mask (1, 1, Sq, Sk) in dtype, or a key-padding bool (1, 1, 1, Sk)."""
    if kind == "none":
        return None
    if kind == "causal":
        keep = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)  # query i sees keys up to Sk - Sq + i
        return torch.zeros(1, 1, Sq, Sk).masked_fill(~keep, float("-inf")).to(dtype)
    keep = torch.ones(1, 1, 1, Sk, dtype=torch.bool)
    keep[..., : Sk // 8] = False  # left padding
    return keep


def medians(fns: dict, calls: int, rounds: int) -> dict:
    """Median seconds per call of each function, rounds interleaved (each timed over `calls` calls after one warm-up)."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_case(Hq, Hkv, D, Sk, Sq, dtype, mask_kind, paths, rounds) -> str:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, Sq, D, generator=g).to(dtype)
    k, v = (torch.randn(1, Hkv, Sk, D, generator=g).to(dtype) for _ in range(2))
    kw = dict(attn_mask=step_mask(mask_kind, Sq, Sk, dtype), enable_gqa=Hq != Hkv)
    fns = {"torch": lambda: SDPA(q, k, v, **kw)}
    for path in paths:
        backend = None if path == "auto" else path
        fns[path] = lambda backend=backend: fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    calls = max(2, int(3e7 / (Hq * Sq * Sk * D)))  # ~a few ms a round
    m = medians(fns, calls, rounds)
    ratios = " ".join(f"{p} {m['torch'] / m[p]:.2f}x" for p in paths)
    tag = "" if mask_kind == "none" else f" {mask_kind}"
    return f"H{Hq}/{Hkv} D{D} Sk{Sk} Sq{Sq}{tag}: {ratios}  (torch {m['torch'] * 1e3:.3f} ms)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--heads", nargs="+", default=["12/12:64", "8/8:128", "8/4:128", "16/4:128"],
                    help="Hq/Hkv:D per configuration")
    ap.add_argument("--keys", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--tokens", type=int, nargs="+", default=[5, 8, 16, 32])
    ap.add_argument("--mask", nargs="+", choices=["none", "causal", "pad"], default=["none"])
    ap.add_argument("--paths", nargs="+", choices=["cpu", "sdpa", "auto"], default=["cpu", "sdpa"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for spec in args.heads:
        heads, D = spec.split(":")
        Hq, Hkv = (int(x) for x in heads.split("/"))
        for Sk in args.keys:
            for Sq in args.tokens:
                for kind in args.mask:
                    print(run_case(Hq, Hkv, int(D), Sk, Sq, DTYPES[args.dtype], kind, args.paths, args.rounds),
                          flush=True)


if __name__ == "__main__":
    main()
