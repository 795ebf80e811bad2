"""Seeded fuzz test: a few hundred random calls across the public surfaces (SDPA, flash-attn, varlen) and the
CPU-runnable backends (cpu, sdpa, reference; triton through its interpreter for a handful) against the float64
oracle, forward and gradients, under the tolerance rule (fastattn/benchmark/tolerance.py, via tests/support/oracle.py).

Each case draws its own configuration from (seed, index): dtype, GQA, head dims (Dv != D too), lengths including 0
and varlen batches with empty sequences (one case in eight: lengths up to 600 around the tile edges, D up to 256),
causal (both alignments), sliding windows, masks with fully masked rows, softcap, alibi, and layouts — contiguous,
transposed (BSHD memory behind BHSD views and the reverse), stride 0 (expanded over batch or heads) and a strided
head dim. About one case in six puts a NaN, +Inf or -Inf into q, k or v: it must propagate as in PyTorch's SDPA
(fully masked rows still give 0); those cases check the forward only.

The seed is printed and in every failure message; replay a run with FASTATTN_FUZZ_SEED=<seed> (and
FASTATTN_FUZZ_CASES=<n> if it was changed), one case with `-k "case17-"`. FASTATTN_FUZZ_BACKENDS=cpu restricts the
backends drawn (tests/asan/run_asan.sh)."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import fastattn
from fastattn.backends import BACKENDS
from support.oracle import base_factor, base_fp32_rel, check_rule, delta_error, oracle_attention

SEED = int(os.environ.get("FASTATTN_FUZZ_SEED", random.SystemRandom().randrange(2 ** 31)))
N_CASES = int(os.environ.get("FASTATTN_FUZZ_CASES", "240"))
N_TRITON = 3  # the interpreter is slow: a handful of cases, drawn like the rest
LOW = (torch.float16, torch.bfloat16)
BIG_LENGTHS = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300, 511, 512, 513, 600)
print(f"[fuzz seed {SEED}] replay with FASTATTN_FUZZ_SEED={SEED}")


@dataclass(frozen=True)
class FuzzCase:
    idx: int
    backend: str
    surface: str  # sdpa | flash | varlen
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    Dv: int
    causal: bool
    window: Tuple[int, int]
    mask: Optional[str]  # sdpa surface: bool_kpad | float_2d | bool_rows_empty
    softcap: float
    alibi: Optional[str]  # h | bh
    seqlens: Tuple[Tuple[int, int], ...]
    layout: str  # contig | transposed | expanded | strided_d
    nonfinite: Optional[Tuple[str, float]]  # (tensor, value)
    scale: Optional[float]

    @property
    def grad(self) -> bool:
        return self.nonfinite is None and "grad" in BACKENDS[self.backend].features

    def describe(self) -> str:
        return (f"case {self.idx} (seed {SEED}): {self.backend} {self.surface} {str(self.dtype)[6:]} B={self.B} "
                f"Hq={self.Hq} Hkv={self.Hkv} Sq={self.Sq} Sk={self.Sk} D={self.D} Dv={self.Dv} causal={self.causal} "
                f"window={self.window} mask={self.mask} softcap={self.softcap} alibi={self.alibi} "
                f"seqlens={self.seqlens} layout={self.layout} nonfinite={self.nonfinite} scale={self.scale}")


def _available(name):
    b = BACKENDS[name]
    return not b.unavailable() and "cpu" in b.devices


def draw(idx: int) -> FuzzCase:
    r = random.Random(SEED * 1_000_003 + idx)
    names = [n for n in os.environ.get("FASTATTN_FUZZ_BACKENDS", "cpu,sdpa,reference").split(",") if _available(n)]
    backend = "triton" if idx < N_TRITON and _available("triton") else r.choice(names)
    f = BACKENDS[backend].features
    lo, hi = BACKENDS[backend].head_dims
    surfaces = ["sdpa", "flash"] + (["varlen"] if "varlen" in f else [])
    surface = r.choice(surfaces)
    dtype = r.choice([d for d in (torch.float32, torch.float32, torch.bfloat16, torch.float16)
                      if d in BACKENDS[backend].dtypes])
    Hkv = r.choice([1, 2])
    Hq = Hkv * (r.choice([1, 2, 3]) if "gqa" in f else 1)
    # One case in eight but the interpreter's is large (its own stream, so the small cases draw as before): lengths
    # at and around the kernels' tile edges up to 600, head dims up to 256, windows up to 300 keys: the tiled paths
    # small cases never reach (128 x 512 tiles, packed key tiles, AMX's VNNI pairs, split-KV decode splits).
    big = backend != "triton" and random.Random(SEED * 7919 + idx).random() < 0.125
    D = r.choice([d for d in ((64, 72, 96, 128, 256) if big else (8, 16, 24, 32, 40, 64)) if lo <= d <= hi])
    Dv = r.choice([d for d in ((32, 64, 128) if big else (8, 16, 32)) if lo <= d <= hi]) \
        if "dv_ne_d" in f and r.random() < 0.2 else D
    length = lambda: 0 if r.random() < 0.06 else r.randint(1, 24)  # noqa: E731
    if big:
        length = lambda: r.choice(BIG_LENGTHS) if r.random() < 0.6 else r.randint(1, 600)  # noqa: E731
    B, Sq, Sk, seqlens = r.choice([1, 2]), length(), length(), ()
    if surface == "varlen":
        seqlens = tuple((length(), length()) for _ in range(r.randint(1, 4)))
        B, Sq, Sk = len(seqlens), max(a for a, _ in seqlens), max(b for _, b in seqlens)
    causal = "causal" in f and r.random() < 0.3
    window = (-1, -1)
    if surface != "sdpa" and "window" in f and r.random() < 0.2:
        window = (r.randint(-1, 300), r.randint(-1, 300)) if big else (r.randint(-1, 8), r.randint(-1, 8))
    mask = r.choice(["bool_kpad", "float_2d", "bool_rows_empty"]) if (
        surface == "sdpa" and "mask" in f and r.random() < 0.25) else None
    softcap = round(r.uniform(0.5, 5.0), 2) if surface != "sdpa" and "softcap" in f and r.random() < 0.15 else 0.0
    alibi = r.choice(["h", "bh"]) if surface != "sdpa" and "alibi" in f and r.random() < 0.15 else None
    layout = r.choice(["contig", "contig", "transposed", "expanded", "strided_d"])
    nonfinite = None
    if r.random() < 0.16:
        nonfinite = (r.choice("qkv"), r.choice([float("nan"), float("inf"), float("-inf")]))
    scale = None if r.random() < 0.6 else round(r.uniform(0.05, 1.5), 3)
    return FuzzCase(idx, backend, surface, dtype, B, Hq, Hkv, Sq, Sk, D, Dv, causal, window, mask, softcap, alibi,
                    seqlens, layout, nonfinite, scale)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: leaves (what gradients are taken against) and the surface views built from them


def _leaf(shape, layout, dtype, gen, expand_dim):
    """(leaf, fn leaf -> view of `shape`): the view has the case's layout; gradients flow back to the leaf."""
    if layout == "transposed":  # stored with dims 1 and 2 (varlen: 0 and 1) swapped
        d0, d1 = (0, 1) if len(shape) == 3 else (1, 2)
        st = list(shape)
        st[d0], st[d1] = st[d1], st[d0]
        return torch.randn(st, generator=gen).to(dtype), lambda t: t.transpose(d0, d1)
    if layout == "expanded" and shape[expand_dim] > 1:  # stride 0 over batch (or heads for varlen)
        st = list(shape)
        st[expand_dim] = 1
        return torch.randn(st, generator=gen).to(dtype), lambda t: t.expand(shape)
    if layout == "strided_d":  # head dim with stride 2 (the Python layer copies it)
        st = list(shape[:-1]) + [2 * shape[-1]]
        return torch.randn(st, generator=gen).to(dtype), lambda t: t[..., ::2]
    return torch.randn(shape, generator=gen).to(dtype), lambda t: t


def make(c: FuzzCase):
    gen = torch.Generator().manual_seed(SEED * 7 + c.idx)
    if c.surface == "varlen":
        tq, tk = sum(a for a, _ in c.seqlens), sum(b for _, b in c.seqlens)
        shapes, ex = ((tq, c.Hq, c.D), (tk, c.Hkv, c.D), (tk, c.Hkv, c.Dv)), 1
    elif c.surface == "flash":
        shapes, ex = ((c.B, c.Sq, c.Hq, c.D), (c.B, c.Sk, c.Hkv, c.D), (c.B, c.Sk, c.Hkv, c.Dv)), 0
    else:
        shapes, ex = ((c.B, c.Hq, c.Sq, c.D), (c.B, c.Hkv, c.Sk, c.D), (c.B, c.Hkv, c.Sk, c.Dv)), 0
    leaves, views = [], []
    for shape in shapes:
        leaf, view = _leaf(shape, c.layout, c.dtype, gen, ex)
        leaves.append(leaf)
        views.append(view)
    if c.nonfinite is not None:
        t = leaves["qkv".index(c.nonfinite[0])]
        if t.numel():
            t.view(-1)[int(torch.randint(t.numel(), (1,), generator=gen))] = c.nonfinite[1]
    g = {}
    if c.surface == "varlen":
        cq, ck = [0], [0]
        for a, b in c.seqlens:
            cq.append(cq[-1] + a)
            ck.append(ck[-1] + b)
        g["cu_q"], g["cu_k"] = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    if c.mask == "bool_kpad":
        g["mask"] = torch.arange(c.Sk).view(1, 1, 1, c.Sk) < torch.randint(0, c.Sk + 1, (c.B, 1, 1, 1), generator=gen)
    elif c.mask == "float_2d":
        g["mask"] = torch.randn(c.Sq, c.Sk, generator=gen).to(c.dtype)
    elif c.mask == "bool_rows_empty":
        m = torch.rand(c.B, c.Hq, c.Sq, c.Sk, generator=gen) > 0.4
        m[:, :, ::3] = False
        g["mask"] = m
    if c.alibi:
        n = len(c.seqlens) if c.surface == "varlen" else c.B
        g["alibi"] = torch.rand((c.Hq,) if c.alibi == "h" else (n, c.Hq), generator=gen) * 0.5 + 0.05
    g["scale"] = c.scale if c.scale is not None else 1.0 / math.sqrt(c.D)
    return leaves, views, g


def run_fastattn(c: FuzzCase, q, k, v, g):
    kw = dict(backend=c.backend)
    if c.surface == "sdpa":
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=g.get("mask"), is_causal=c.causal,
                                                     scale=c.scale, enable_gqa=c.Hq != c.Hkv, **kw)
    common = dict(softmax_scale=c.scale, causal=c.causal, window_size=c.window, softcap=c.softcap,
                  alibi_slopes=g.get("alibi"), **kw)
    if c.surface == "flash":
        return fastattn.flash_attn_func(q, k, v, **common)
    mq, mk = max(a for a, _ in c.seqlens), max(b for _, b in c.seqlens)
    return fastattn.flash_attn_varlen_func(q, k, v, g["cu_q"], g["cu_k"], mq, mk, **common)


def run_oracle(c: FuzzCase, q, k, v, g, dtype=torch.float64, masked="fill"):
    """The oracle on the same views, in the surface layout."""
    window = (c.window[0], 0) if c.causal else c.window
    kw = dict(scale=g["scale"], window=window, bottom_right=c.surface != "sdpa", softcap=c.softcap, dtype=dtype,
              masked=masked)
    if c.surface == "varlen":
        outs = []
        cq, ck = g["cu_q"].tolist(), g["cu_k"].tolist()
        for n in range(len(cq) - 1):
            # (len, H, D) -> (1, H, len, D)
            qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in
                          ((q, cq[n], cq[n + 1]), (k, ck[n], ck[n + 1]), (v, ck[n], ck[n + 1])))
            al = g.get("alibi")
            al = al[n] if al is not None and al.dim() == 2 else al
            outs.append(oracle_attention(qs, ks, vs, alibi_slopes=al, **kw)[0].transpose(0, 1))
        return torch.cat(outs, 0)
    if c.surface == "flash":
        o = oracle_attention(*(t.transpose(1, 2) for t in (q, k, v)), alibi_slopes=g.get("alibi"), **kw)
        return o.transpose(1, 2)  # (B, H, S, Dv) -> (B, S, H, Dv)
    return oracle_attention(q, k, v, mask=g.get("mask"), **kw)


def check_nonfinite(name, fast, strict, skip, base, dtype):
    """NaN/Inf must appear where both oracles have them and nowhere both are finite; elsewhere (a NaN/Inf hidden
    from a query by the mask: SDPA's math path adds -inf to it and multiplies its value row by 0, fused kernels skip
    it) either is accepted. Finite values follow the tolerance rule against the skipping oracle."""
    fast = fast.detach().double()
    fs, fk = torch.isfinite(strict), torch.isfinite(skip)
    nf = ~torch.isfinite(fast)
    swallowed = ~fs & ~fk & ~nf
    if swallowed.any():
        return False, (f"{name}: {int(swallowed.sum())} finite values where the oracle has NaN/Inf (first at "
                       f"{swallowed.nonzero()[0].tolist()}): NaN/Inf swallowed")
    spurious = fs & fk & nf
    if spurious.any():
        return False, f"{name}: NaN/Inf where the oracle is finite (first at {spurious.nonzero()[0].tolist()})"
    cmp = ~nf & fk
    ref = skip.where(cmp, torch.zeros((), dtype=skip.dtype))
    base = base.double().where(cmp & torch.isfinite(base.double()), ref)
    return check_rule(name, fast.where(cmp, torch.zeros((), dtype=fast.dtype)), ref, base, dtype)


CASES = [draw(i) for i in range(N_CASES + N_TRITON)]
# The sdpa backend calls torch's SDPA, whose CPU flash kernel (its default) returns finite rows for a NaN query or
# (fp16/bf16) an Inf key where torch's math path and the oracle give NaN (torch 2.14): upstream behaviour.
_XFAIL_SDPA = pytest.mark.xfail(strict=False, reason="torch's CPU flash SDPA kernel swallows some NaN/Inf")
# The reference backend computes in the input dtype: an Inf in k can turn bf16/fp16 scores into inf - inf = NaN where
# the float64 oracle stays finite (seed 1344705677, case 35), so those cases may fail.
_XFAIL_REFERENCE_LOW = pytest.mark.xfail(strict=False, reason="reference in bf16/fp16 can overflow an Inf key to NaN")


def _param(c):
    marks = []
    if c.nonfinite is not None and c.backend == "sdpa":
        marks = [_XFAIL_SDPA]
    elif c.nonfinite is not None and c.backend == "reference" and c.dtype in LOW:
        marks = [_XFAIL_REFERENCE_LOW]
    return pytest.param(c, id=f"case{c.idx}-{c.backend}-{c.surface}", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_fuzz(case: FuzzCase):
    c = case
    leaves, views, g = make(c)
    fl = [t.clone().requires_grad_(c.grad) for t in leaves]
    out = run_fastattn(c, *(f(t) for f, t in zip(views, fl)), g)
    rl = [t.double().requires_grad_(c.grad) for t in leaves]
    ref = run_oracle(c, *(f(t) for f, t in zip(views, rl)), g)
    bl = [t.clone().requires_grad_(c.grad) for t in leaves]
    base = run_oracle(c, *(f(t) for f, t in zip(views, bl)), g, dtype=c.dtype)  # fp32 too (tolerance.py)
    if c.nonfinite is None:
        results = [check_rule("out", out, ref, base, c.dtype)]
    else:
        strict = run_oracle(c, *(f(t) for f, t in zip(views, rl)), g, masked="add")
        skip = run_oracle(c, *(f(t) for f, t in zip(views, rl)), g, masked="skip")
        base_skip = run_oracle(c, *(f(t) for f, t in zip(views, bl)), g, dtype=c.dtype, masked="skip")
        results = [check_nonfinite("out", out, strict, skip, base_skip, c.dtype)]
    if c.grad and ref.numel():
        dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(SEED + c.idx), dtype=torch.float64)
        kw = dict(allow_unused=True)
        grads = torch.autograd.grad(out, fl, dout.to(c.dtype), **kw)
        ref_grads = torch.autograd.grad(ref, rl, dout, **kw)
        base_grads = torch.autograd.grad(base, bl, dout.to(c.dtype), **kw)
        # dq and dk cancel to exactly 0 for a row with one visible key: bound them by the largest gradient.
        mag = max((float(r.abs().max()) for r in ref_grads if r is not None and r.numel()), default=0.0)
        # fp32 too: near one-hot rows make delta = rowsum(dO * O) cancel (tolerance.py's docstring)
        inherent = delta_error(lambda q, k, v: run_oracle(c, q, k, v, g), leaves[0], leaves[1], views[0], views[1],
                               dout.to(c.dtype), out, ref, g["scale"]) + (0.0,)
        for name, a, r, b, leaf, e in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads, leaves, inherent):
            z = torch.zeros_like(leaf, dtype=torch.float64)
            results.append(check_rule(name, z if a is None else a, z if r is None else r, z if b is None else b,
                                      c.dtype, magnitude=mag, inherent=e,
                                      factor=base_factor(c.backend, "cpu", c.dtype, name),
                                      fp32_rel=base_fp32_rel(c.backend, "cpu", name)))
    bad = [m for ok, m in results if not ok]
    for _, m in results:
        print(m)
    assert not bad, f"{c.describe()}\nreplay: FASTATTN_FUZZ_SEED={SEED} pytest tests/test_fuzz.py -k 'case{c.idx}-'" \
                    f"\n" + "\n".join(bad)
