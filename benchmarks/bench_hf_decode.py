"""A transformers model swapped to fastattn: GPT-2 greedy decoding with attn_implementation "sdpa" (PyTorch) and
"fastattn", same random weights, same prompt, side by side in one process.

    python benchmarks/bench_hf_decode.py --dtype fp32 bf16 --prompt 512      # ~2 min on one CPU thread

Reports the milliseconds of the first token (the prompt's forward, causal attention over it, and one token) and of
each new token after it (the time of generating --new tokens minus that of generating one), each with the part spent
in the attention function transformers calls (timed around the AttentionInterface entry: the attention kernels with
the Python around them), the fastest of --rounds interleaved rounds (CPU time; wall time with --threads > 1), and
how many of the generated tokens the two implementations agree on before they first differ (all of them in fp32; in
bf16 a rounding difference may flip the greedy choice between two near-tied logits of this random-weight model,
after which the continuations differ). On a
CPU the rest of the model (its matrix products) is most of each token, so the whole-token ratio sits within
run-to-run noise of 1 and the attention ratio is the figure that compares the two. Speed is never asserted."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastattn
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hf_timing, next to this file
from fastattn import ops  # noqa: E402
from hf_timing import DTYPES, clock, timed_attention, use_threads  # noqa: E402


def _model(gqa: bool, layers: int, positions: int):
    """GPT-2 (12 heads, D=64), or with gqa a Llama-style model with grouped-query heads (16 query heads, 4 KV
    heads, D=128), random weights."""
    if gqa:
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                                            head_dim=128, intermediate_size=5632, num_hidden_layers=layers,
                                            vocab_size=32000, max_position_embeddings=max(1024, positions)))
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=12, n_embd=768, n_positions=max(1024, positions)))


def _inputs(vocab: int, batch: int, prompt: int):
    """(ids, attention_mask) (batch, prompt): row b left-padded by b * prompt / (2 * batch) tokens (batched
    generation's padding: up to half the prompt), the padding masked out."""
    ids = torch.randint(1, vocab, (batch, prompt))
    mask = torch.ones(batch, prompt, dtype=torch.long)
    for b in range(batch):
        pad = b * prompt // (2 * batch)
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


def measure(dtype, prompt: int, new: int, layers: int, rounds: int, batch: int = 1, gqa: bool = False):
    with timed_attention() as spent:
        torch.manual_seed(0)
        model = _model(gqa, layers, prompt + new).to(dtype).eval()
        ids, mask = _inputs(model.config.vocab_size, batch, prompt)
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=mask if batch > 1 else None)
        best, tokens = {}, {}
        for impl in ("sdpa", "fastattn"):  # warm-up: first-call work (allocations, lazy inits) timed by neither
            model.set_attn_implementation(impl)
            with torch.no_grad():
                model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        for _ in range(rounds):
            for impl in ("sdpa", "fastattn"):  # interleaved: load that comes and goes hits both
                model.set_attn_implementation(impl)
                with torch.no_grad():
                    spent.clear()
                    t0 = clock()
                    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
                    t1, a1 = clock(), spent[impl]
                    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
                    t2, a2 = clock(), spent[impl] - a1
                per_token = ((t2 - t1) - (t1 - t0)) / (new - 1) * 1e3
                attn = (a2 - a1) / (new - 1) * 1e3
                now = [(t1 - t0) * 1e3, a1 * 1e3, per_token, attn]  # the prompt (+1 token), then each new token
                best[impl] = [min(x, y) for x, y in zip(best.get(impl, now), now)]
                tokens[impl] = out[:, prompt:].tolist()  # (batch, new)
        agreed = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                  for a, b in zip(tokens["sdpa"], tokens["fastattn"])]
        return best, min(agreed)  # the tokens every row agreed on


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (the cache length decoding starts from)")
    ap.add_argument("--new", type=int, default=33, help="new tokens per generation")
    ap.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12: GPT-2 small)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1,
                    help="prompts per batch, left-padded by up to half the prompt (an attention mask from 2 up)")
    ap.add_argument("--gqa", action="store_true",
                    help="a Llama-style model with 16 query heads over 4 KV heads, D=128, instead of GPT-2")
    args = ap.parse_args()
    clock_name = use_threads(args.threads)
    model = "Llama-style, 16/4 heads, D=128" if args.gqa else "GPT-2, 12 heads, D=64"
    print(f"{ops.cpu_matmul()}\ntorch {torch.__version__}, {args.threads} thread(s); {model}, {args.layers} layers, "
          f"batch {args.batch}{' left-padded' if args.batch > 1 else ''}, prompt {args.prompt}, {args.new} new "
          f"tokens; fastest of {args.rounds} rounds ({clock_name})")
    groups = ("first token ms", "its attention", "new token ms", "its attention")
    print(f"{'':6}" + "".join(f"{g:>24}" for g in groups) + "  tokens")
    print(f"{'dtype':6}" + f"{'sdpa':>8}{'ours':>8}{'ratio':>8}" * 4 + "  agreed")
    for name in args.dtype:
        best, agreed = measure(DTYPES[name], args.prompt, args.new, args.layers, args.rounds, args.batch, args.gqa)
        cells = "".join(f"{s:8.2f}{f:8.2f}{s / f:7.3f}x" for s, f in zip(best["sdpa"], best["fastattn"]))
        print(f"{name:6}{cells}  {agreed}/{args.new}")

if __name__ == "__main__":
    main()
