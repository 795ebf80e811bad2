"""Swap fastattn into an existing PyTorch model with one call: fastattn.patch(model).

Builds an nn.TransformerEncoder (or loads one saved with torch.save(model) via --model PATH), runs it on a
right-padded batch, patches every nn.MultiheadAttention in place (weights kept, state_dict unchanged), checks the
outputs on real tokens against the same model in float64 (the patched model's error may be at most twice torch's
plus a rounding floor: the project's tolerance rule), times both in steady state (warm-up, then the median of
--iters rounds that run each once, alternating, so that load on a shared machine falls on both alike), and
unpatches. The baseline is the same model on torch's plain path (nn.MultiheadAttention -> SDPA), which is what the
patched model replaces; torch's fused "fast path" (nested tensors, inference only) is timed too, for reference.

    python examples/swap_into_model.py
    python examples/swap_into_model.py --seq 1024 --d-model 512 --device cuda --dtype float16
"""
import argparse
import contextlib
import copy
import warnings

import torch

import fastattn
from _timing import interleaved, spread, threads_line

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@contextlib.contextmanager
def torch_fastpath(enabled: bool):
    """Turns torch's fused encoder/MHA inference path (and its nested-tensor conversion) on or off."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def attention_share(model, seq: int) -> float:
    """Fraction of the encoder's matmul FLOPs spent in attention (QK^T and PV): how much of the forward's arithmetic
    the swap can touch (the softmax and mask work of torch's masked path is not counted, so not a bound on time)."""
    attn = lin = 0
    for m in model.modules():
        if isinstance(m, torch.nn.TransformerEncoderLayer):
            d, ff = m.self_attn.embed_dim, m.linear1.out_features
            attn += 4 * seq * seq * d  # QK^T and PV, 2 FLOPs per multiply-add
            lin += 2 * seq * (4 * d * d + 2 * d * ff)  # in/out projections and the feed-forward block
    return attn / (attn + lin) if attn else float("nan")


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
    ap.add_argument("--iters", type=int, default=7, help="timed runs after 2 warm-up runs; the median is shown")
    ap.add_argument("--backend", default=None, help="fastattn backend for the swapped modules (default: auto)")
    args = ap.parse_args()
    for name in ("batch", "seq", "d_model", "heads", "layers", "iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    if args.model:
        model = torch.load(args.model, weights_only=False)
    else:
        layer = torch.nn.TransformerEncoderLayer(args.d_model, args.heads, dim_feedforward=2 * args.d_model,
                                                 dropout=0.1, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, num_layers=args.layers)  # torch may use its nested fast path
    model = model.to(args.device, dtype).eval()
    mha = next(m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))
    d_model, batch_first = mha.embed_dim, mha.batch_first
    x = torch.randn(args.batch, args.seq, d_model, device=args.device, dtype=dtype)  # (B, S, E)
    if not batch_first:
        x = x.transpose(0, 1)  # (B, S, E) -> (S, B, E): the layout the model takes
    pad = torch.zeros(args.batch, args.seq, dtype=torch.bool, device=args.device)
    for b in range(args.batch):  # right padding: row b keeps a different number of real tokens
        pad[b, args.seq - b * args.seq // (2 * args.batch):] = True
    real = ~pad
    keys = list(model.state_dict())

    torch_model = copy.deepcopy(model)  # stays unpatched: the baseline, timed beside the patched model
    was_patched = fastattn.unpatch(torch_model)  # a model saved after patch() holds fastattn modules already
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype.*")
        with torch_fastpath(False):
            ref = copy.deepcopy(torch_model).double()(x.double(), src_key_padding_mask=pad)  # the float64 oracle
        replaced = fastattn.patch(model, backend=args.backend)
        assert list(model.state_dict()) == keys, "patch changed the state_dict"

        def plain(m):  # torch's plain path (its fused fast path off), as a training-mode model would run
            def f():
                with torch_fastpath(False):
                    return m(x, src_key_padding_mask=pad)
            return f

        def nested():
            with torch_fastpath(True):
                return torch_model(x, src_key_padding_mask=pad)
        res = interleaved({"torch": plain(torch_model), "fastattn": plain(model), "nested": nested},
                          runs=args.iters)
        fastattn.unpatch(model)

    (t_torch, times_torch, before), (t_fast, times_fast, after) = res["torch"][:3], res["fastattn"][:3]
    if not batch_first:  # (S, B, E) -> (B, S, E), to index real tokens by the (B, S) mask
        before, after, ref = (t.transpose(0, 1) for t in (before, after, ref))
    t_nested = res["nested"][0]
    scale = ref[real].abs().max().item()
    err_torch = (before[real].double() - ref[real]).abs().max().item()
    err_fast = (after[real].double() - ref[real]).abs().max().item()
    bound = 2 * err_torch + EPS[dtype] * scale
    print(f"patched {len(replaced)} modules: {', '.join(replaced) or 'none'}" + (
        f" (the loaded model held {len(was_patched)} fastattn modules: the baseline runs them unpatched)"
        if was_patched else ""))
    print(f"input ({args.batch}, {args.seq}, {d_model}) {args.dtype} on {args.device}, "
          + ("right-padded" if pad.any() else "no padding (one row, full length)")
          + ("" if batch_first else ", sequence first (batch_first=False)"))
    print(f"error against the float64 model on real tokens: fastattn {err_fast:.3g}, torch {err_torch:.3g} "
          f"(relative {err_fast / scale:.3g} / {err_torch / scale:.3g}): "
          + ("agree (within 2x torch's error + rounding floor)" if err_fast <= bound else
             f"DIFFER: fastattn's error exceeds {bound:.3g}"))
    print(f"timing: median of {args.iters} rounds after 2 warm-up runs, each round running every variant once "
          f"(alternating order), {threads_line(args.device)}")
    print(f"  torch (nn.MultiheadAttention -> SDPA): {t_torch * 1e3:8.2f} ms/forward  ({spread(times_torch)})")
    print(f"  fastattn.patch(model):                 {t_fast * 1e3:8.2f} ms/forward  ({spread(times_fast)})  "
          f"speedup {t_torch / t_fast:.2f}x over torch SDPA")
    print(f"  torch fused fast path (nested tensors, inference only, for reference): {t_nested * 1e3:8.2f} ms/forward")
    share = attention_share(model, args.seq)
    if share == share:  # not NaN: a TransformerEncoder we can count
        print(f"attention (QK^T and PV) is {share:.0%} of this model's matmul FLOPs; the rest of the forward is the "
              f"same code in both (softmax and mask work not counted)")
    if t_torch < (5e-3 if args.device == "cpu" else 1e-3):
        print(f"note: a {t_torch * 1e3:.1f} ms forward is overhead-bound (Python, dispatch, small GEMMs): the "
              f"speedup says little about the attention kernels; try --seq 1024 --d-model 512")


if __name__ == "__main__":
    main()
