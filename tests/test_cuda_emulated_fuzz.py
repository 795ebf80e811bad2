"""Seeded fuzz of the CUDA kernels on the CPU emulator (tests/cuda_emu, as test_cuda_emulated.py runs them): random
FlashAttention-2 forward+backward calls and split-KV decode calls against the float64 oracle under the tolerance
rule. The fixed cases of test_cuda_emulated.py pin chosen corners; these draw lengths around the kernels' tile edges
(63/64/65, 127/128/129), head dims 8-256 (Dv != D too), GQA, causal in both alignments, two-sided windows, varlen
batches with empty sequences, the (B, S, H, D) layout, and for decode dense / batch-index / paged caches of 1-1025
keys with ragged lengths, windows, softcap, ALiBi and 1-64 splits on 1-132 SMs. No GPU has run these kernels yet:
every configuration checked here is one the first GPU session need not debug.

The seed is printed and in every failure message; replay with FASTATTN_EMU_FUZZ_SEED=<seed> and `-k "case17-"`.
FASTATTN_EMU_FUZZ_CASES sets the number of attention cases (decode draws twice as many)."""
from __future__ import annotations

import os
import random

import pytest
import torch

from support.cuda_emu import needs_cuda_headers
from support.oracle import check_rule, delta_error, oracle_attention
from test_cuda_emulated import _attn_inputs, _emu_fwd_bwd, _oracle_fwd_bwd, _run_decode

pytestmark = needs_cuda_headers

SEED = int(os.environ.get("FASTATTN_EMU_FUZZ_SEED", random.SystemRandom().randrange(2 ** 31)))
N_CASES = int(os.environ.get("FASTATTN_EMU_FUZZ_CASES", "40"))
LENGTHS = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 127, 128, 129, 150, 200)
print(f"[emulated fuzz seed {SEED}] replay with FASTATTN_EMU_FUZZ_SEED={SEED}")


def draw_attention(idx: int):
    """(case dict as test_cuda_emulated's ATTN, dtype)."""
    r = random.Random(SEED * 1_000_003 + idx)
    Hkv = r.choice([1, 2])
    c = dict(H=Hkv * r.choice([1, 2, 3]), Hkv=Hkv, D=r.choice([8, 16, 20, 32, 40, 64, 72, 80, 96, 128, 160, 256]))
    if r.random() < 0.2:
        c["Dv"] = r.choice([8, 16, 32, 48, 64])
    if r.random() < 0.2:
        c["seqlens"] = tuple((r.choice(LENGTHS + (0,)), r.choice(LENGTHS + (0,))) for _ in range(r.randint(1, 3)))
    else:
        c.update(B=r.choice([1, 2]), Sq=r.choice(LENGTHS), Sk=r.choice(LENGTHS))
        if r.random() < 0.3:
            c["layout"] = "bshd"
    w = r.random()
    if w < 0.35:
        c["window"] = (-1, 0)  # causal
    elif w < 0.55:
        c["window"] = (r.randint(0, 100), r.randint(-1, 50))
    c["br"] = r.random() < 0.6
    return c, r.choice([torch.float16, torch.bfloat16])


def draw_decode(idx: int):
    """(case dict as test_cuda_emulated's DECODE, num_splits, SMs); at most 8 query rows per KV head (the kernel's
    limit: wider calls go to the prefill kernels)."""
    r = random.Random(SEED * 2_000_003 + idx)
    Hkv = r.choice([1, 2, 3])
    Sq = r.choice([1, 1, 2, 3, 4, 8])
    group = r.choice([g for g in (1, 2, 4, 8) if g * Sq <= 8])
    D = r.choice([8, 16, 32, 40, 64, 80, 96, 128, 256])
    cap, B = r.choice([1, 8, 31, 64, 65, 127, 256, 300, 511, 700, 1025]), r.choice([1, 2, 3])
    c = dict(B=B, Hq=Hkv * group, Hkv=Hkv, Sq=Sq, D=D, Dv=D if r.random() < 0.8 else r.choice([8, 16, 32, 48]),
             cap=cap, lens=[r.randint(0, cap) for _ in range(B)],
             layout=r.choice(["dense", "batch_idx", "paged16", "paged32", "paged64", "paged256"]),
             dtype=r.choice([torch.float32, torch.float16, torch.bfloat16]), noncontig=r.random() < 0.2)
    w = r.random()
    if w < 0.4:
        c["window"] = (-1, 0)
    elif w < 0.6:
        c["window"] = (r.randint(0, 300), r.choice([-1, 0, r.randint(0, 10)]))
    if r.random() < 0.15:
        c["softcap"] = round(r.uniform(1.0, 10.0), 1)
    if r.random() < 0.2:
        c["alibi"] = r.choice(["per_head", "per_batch"])
    return c, r.choice([0, 1, 3, 7, 64]), r.choice([132, 16, 1])


def _oracle_out(c, q, k, v):
    """The float64 oracle's output on q, k, v as given (gradients flow: delta_error differentiates it)."""
    kw = dict(scale=c["D"] ** -0.5, window=c.get("window", (-1, -1)), bottom_right=c.get("br", True))
    if "seqlens" not in c:
        return oracle_attention(q, k, v, **kw)
    outs, oq, ok = [], 0, 0
    for sq, sk in c["seqlens"]:  # packed (1, H, total, D): sequence by sequence
        outs.append(oracle_attention(q[:, :, oq:oq + sq], k[:, :, ok:ok + sk], v[:, :, ok:ok + sk], **kw))
        oq, ok = oq + sq, ok + sk
    return torch.cat(outs, 2)


@pytest.mark.parametrize("idx", range(N_CASES), ids=lambda i: f"case{i}-")
def test_attention_fuzz(idx):
    c, dt = draw_attention(idx)
    what = f"case {idx} (seed {SEED}): {c} {str(dt)[6:]}"
    print(what)
    torch.manual_seed(SEED * 7 + idx)
    q, k, v = _attn_inputs(c, dt)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=dt)
    out, lse, grads = _emu_fwd_bwd(c, q, k, v, dout)
    ref = _oracle_fwd_bwd(c, q, k, v, dout, torch.float64)
    base = _oracle_fwd_bwd(c, q, k, v, dout, dt)
    results = [check_rule("out", out, ref[0], base[0], dt), check_rule("lse", lse, ref[1], base[1], dt)]
    # dQ / dK of a row or key with one visible partner are exactly 0 (their rounding noise is not): bound them by the
    # largest gradient; and add the error the stored O forces through delta, as tests/test_fuzz.py does
    mag = max(float(r.abs().max()) for r in ref[2] if r.numel())
    ident = lambda t: t  # noqa: E731
    inherent = delta_error(lambda *t: _oracle_out(c, *t), q, k, ident, ident, dout, out, ref[0], c["D"] ** -0.5) \
        + (0.0,) if q.numel() and k.numel() else (0.0, 0.0, 0.0)
    for name, g, r, b, e in zip(("dq", "dk", "dv"), grads, ref[2], base[2], inherent):
        results.append(check_rule(name, g, r, b, dt, magnitude=mag, inherent=e))
    bad = [m for ok, m in results if not ok]
    assert not bad, what + "\n" + "\n".join(bad)


@pytest.mark.parametrize("idx", range(2 * N_CASES), ids=lambda i: f"case{i}-")
def test_decode_fuzz(idx):
    c, num_splits, sms = draw_decode(idx)
    print(f"case {idx} (seed {SEED}): {c} num_splits={num_splits} sms={sms}")
    torch.manual_seed(SEED * 11 + idx)
    _run_decode(c, num_splits, sms)
