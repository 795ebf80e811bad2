"""Greedy GPT-2 generation with fastattn's KV-cache attention, against transformers' eager attention.

Three runs on the same weights and prompts (a left-padded batch): transformers' generate() with
attn_implementation="eager", the same with "fastattn", and fastattn.models.GPT2 (a compact GPT-2 whose cache goes
through fastattn.flash_attn_with_kvcache), each generating exactly --new-tokens tokens (end-of-text suppressed
until then, as transformers' min_new_tokens does). Prints the generated text, whether the tokens agree, and tokens/s
in steady state (warm-up, then the median of --runs rounds that run each generate() once, alternating, so that load
on a shared machine falls on all three alike; a single call is mostly noise).

Offline by default: a tiny random GPT-2 (so the text is gibberish) and a byte-level BPE tokenizer trained on a few
sentences on the fly. With --model PATH it uses a real checkpoint and its tokenizer from disk.

    python examples/gpt2_generate.py
    python examples/gpt2_generate.py --model ./gpt2 --new-tokens 64 --dtype bfloat16
Needs transformers >= 5 and tokenizers (pip install "transformers>=5" accelerate).
"""
import argparse
import copy

import torch

import fastattn.integrations.transformers  # noqa: F401  (registers attn_implementation="fastattn")
from _timing import interleaved, spread, threads_line
from fastattn.models import GPT2
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PROMPTS = ["Attention is all you", "The quick brown fox jumps over the lazy dog and then", "Once upon a time"]
CORPUS = PROMPTS + ["Flash attention computes exact attention in tiles without forming the score matrix.",
                    "A key value cache keeps past keys and values so each new token costs one query."]


def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="folder with a GPT-2 checkpoint and tokenizer (default: tiny random GPT-2)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=5, help="timed generate() calls after 2 warm-up calls (median shown)")
    args = ap.parse_args()
    if args.new_tokens < 1 or args.runs < 1:
        ap.error(f"--new-tokens and --runs must be at least 1, got {args.new_tokens} and {args.runs}")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        tok.pad_token = tok.pad_token or tok.eos_token
        eager = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=dtype)
    else:
        tok = tiny_tokenizer()
        config = GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=256,
                            initializer_range=0.2, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        eager = GPT2LMHeadModel._from_config(config, attn_implementation="eager").to(dtype)
    eager = eager.to(args.device).eval()
    fast = copy.deepcopy(eager)
    fast.set_attn_implementation("fastattn")
    ours = GPT2.from_transformers(eager).eval()

    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to(args.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    limit = getattr(eager.config, "n_positions", None)
    if limit is not None and ids.shape[1] + args.new_tokens > limit:
        ap.error(f"--new-tokens {args.new_tokens}: the {ids.shape[1]}-token prompts plus the new tokens exceed the "
                 f"model's {limit} positions (at most {limit - ids.shape[1]})")
    n_new = args.new_tokens * ids.shape[0]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        results = interleaved({
            "eager": lambda: eager.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:],
            "fastattn": lambda: fast.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:],
            "fastattn.models.GPT2": lambda: ours.generate(ids, mask, max_new_tokens=args.new_tokens,
                                                          min_new_tokens=args.new_tokens,
                                                          eos_token_id=tok.eos_token_id,
                                                          pad_token_id=tok.pad_token_id)}, runs=args.runs)
    results = {name: (tokens, sec, times) for name, (sec, times, tokens) in results.items()}

    print(f"model: {args.model or 'tiny random GPT-2 (gibberish text)'}, {args.dtype} on {args.device}, "
          f"batch {ids.shape[0]} (left-padded to {ids.shape[1]}), {args.new_tokens} new tokens each")
    for prompt, new in zip(PROMPTS, results["fastattn"][0]):
        print(f"  {prompt!r} -> {tok.decode(new, skip_special_tokens=True)!r}")
    base = results["eager"][0]
    print(f"timing: median of {args.runs} generate() calls after 2 warm-up calls (rounds alternating the three), "
          f"{threads_line(args.device)}")
    for name, (tokens, sec, times) in results.items():
        same = "same tokens as eager" if torch.equal(tokens, base) else \
            f"{(tokens != base).any(1).sum().item()} rows differ from eager"
        print(f"{name:>22}: {n_new / sec:9.1f} tokens/s  ({same}; {spread(times)} per call)")
    if dtype != torch.float32 and any(not torch.equal(t, base) for t, _, _ in results.values()):
        print(f"note: in {args.dtype} greedy decoding can take another token wherever two logits lie within the "
              f"dtype's rounding of each other, and every later token follows from it: differing rows alone are not "
              f"an error (float32 compares tokens strictly)")
    step = results["eager"][1] / args.new_tokens
    if not args.model or step < (5e-3 if args.device == "cpu" else 1e-3):
        print(f"note: one decode step takes {step * 1e3:.2f} ms for the whole batch on this "
              f"{'tiny model' if not args.model else 'model'}: attention is a small part of it, so per-call overhead "
              f"(Python, dispatch, small GEMMs) decides tokens/s and the comparison says little about the kernels; "
              f"a real checkpoint (--model) or --new-tokens 128 shows them better")


if __name__ == "__main__":
    main()
