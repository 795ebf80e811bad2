"""A transformers encoder swapped to fastattn: BERT-base forward on a padded batch with attn_implementation "sdpa"
(PyTorch) and "fastattn", same random weights, same batch, side by side in one process.

    python benchmarks/bench_hf_bert.py --batch 4 --seq 512       # ~1 min on one CPU thread

The batch pads its sequences as the benchmark suite's padded cases do (valid lengths spread from 50% to 100% of
--seq, a 0/1 attention_mask). Reports the milliseconds of one forward and the part spent in the attention function
transformers calls (timed around the AttentionInterface entry: the kernels with the Python around them), the
fastest of --rounds interleaved rounds (CPU time; wall time with --threads > 1), and the largest difference between
the two models' outputs at the valid tokens (fp32 near 1e-6; bf16 and fp16 a few rounding steps of the hidden
states' magnitude). Speed is never asserted."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastattn
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hf_timing, next to this file
from fastattn import ops  # noqa: E402
from hf_timing import DTYPES, clock, timed_attention, use_threads  # noqa: E402


def padded_batch(batch: int, seq: int, vocab: int):
    """(input_ids, attention_mask) (B, S): sequence b keeps round(S * (0.5 + 0.5 b / (B - 1))) tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        mask[b, :max(1, round(seq * (0.5 + 0.5 * b / max(batch - 1, 1))))] = 1
    return ids, mask


def measure(dtype, batch: int, seq: int, layers: int, rounds: int):
    from transformers import BertConfig, BertModel
    with timed_attention() as spent:
        torch.manual_seed(0)
        model = BertModel(BertConfig(num_hidden_layers=layers)).to(dtype).eval()
        ids, mask = padded_batch(batch, seq, model.config.vocab_size)
        best, out = {}, {}
        for _ in range(rounds + 1):  # round 0 warms up (allocations, lazy inits) and is not kept
            for impl in ("sdpa", "fastattn"):  # interleaved: load that comes and goes hits both
                model.set_attn_implementation(impl)
                with torch.no_grad():
                    spent.clear()
                    t0 = clock()
                    out[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    now = [(clock() - t0) * 1e3, spent[impl] * 1e3]
                if _:
                    best[impl] = [min(x, y) for x, y in zip(best.get(impl, now), now)]
        valid = mask.bool()
        return best, (out["sdpa"].float() - out["fastattn"].float())[valid].abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="padded length (the longest sequence)")
    ap.add_argument("--layers", type=int, default=12, help="BERT layers (12: BERT-base)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    clock_name = use_threads(args.threads)
    print(f"{ops.cpu_matmul()}\ntorch {torch.__version__}, {args.threads} thread(s); BERT {args.layers} layers, "
          f"12 heads, D=64, batch {args.batch} x {args.seq} tokens padded to 50-100%; fastest of {args.rounds} "
          f"rounds ({clock_name})")
    print(f"{'':6}{'forward ms':>24}{'its attention':>24}")
    print(f"{'dtype':6}" + f"{'sdpa':>8}{'ours':>8}{'ratio':>8}" * 2 + "  max |diff|")
    for name in args.dtype:
        best, diff = measure(DTYPES[name], args.batch, args.seq, args.layers, args.rounds)
        cells = "".join(f"{s:8.1f}{f:8.1f}{s / f:7.3f}x" for s, f in zip(best["sdpa"], best["fastattn"]))
        print(f"{name:6}{cells}  {diff:.1e}")


if __name__ == "__main__":
    main()
