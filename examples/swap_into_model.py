"""Swap fastattn into an existing PyTorch model with one call: fastattn.patch(model).

Builds an nn.TransformerEncoder (or loads one saved with torch.save(model) via --model PATH), runs it on a
right-padded batch, patches every nn.MultiheadAttention in place (weights kept, state_dict unchanged), checks that
the outputs agree on real tokens, times both, and unpatches.

    python examples/swap_into_model.py
    python examples/swap_into_model.py --seq 1024 --d-model 512 --device cuda --dtype float16
"""
import argparse
import time

import torch

import fastattn


def bench(fn, iters):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a module saved with torch.save(model) (default: a fresh TransformerEncoder)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default=None, help="fastattn backend for the swapped modules (default: auto)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    if args.model:
        model = torch.load(args.model, weights_only=False)
    else:
        layer = torch.nn.TransformerEncoderLayer(args.d_model, args.heads, dim_feedforward=2 * args.d_model,
                                                 dropout=0.1, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, num_layers=args.layers)  # torch may use its nested fast path
    model = model.to(args.device, dtype).eval()
    d_model = next(m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)).embed_dim
    x = torch.randn(args.batch, args.seq, d_model, device=args.device, dtype=dtype)
    pad = torch.zeros(args.batch, args.seq, dtype=torch.bool, device=args.device)
    for b in range(args.batch):  # right padding: row b keeps a different number of real tokens
        pad[b, args.seq - b * args.seq // (2 * args.batch):] = True
    real = ~pad
    keys = list(model.state_dict())

    with torch.no_grad():
        run = lambda: model(x, src_key_padding_mask=pad)  # noqa: E731
        before = run()
        t_torch = bench(run, args.iters)
        replaced = fastattn.patch(model, backend=args.backend)
        after = run()
        t_fast = bench(run, args.iters)
        assert list(model.state_dict()) == keys, "patch changed the state_dict"
        fastattn.unpatch(model)

    diff = (after[real].float() - before[real].float()).abs().max().item()
    scale = before[real].float().abs().max().item()
    print(f"patched {len(replaced)} modules: {', '.join(replaced)}")
    print(f"input ({args.batch}, {args.seq}, {d_model}) {args.dtype} on {args.device}, right-padded")
    print(f"max |fastattn - torch| on real tokens: {diff:.3g} (relative {diff / scale:.3g})")
    print(f"torch: {t_torch * 1e3:8.2f} ms/forward   fastattn: {t_fast * 1e3:8.2f} ms/forward   "
          f"speedup {t_torch / t_fast:.2f}x")


if __name__ == "__main__":
    main()
