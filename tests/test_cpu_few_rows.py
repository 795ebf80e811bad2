"""Calls of at most 2 query rows per KV head (Hq / Hkv x Sq) at head dims from 48, and of 3-4 against 512 keys or more
at head dims from 64, run the fwd op on the split-KV decode kernel (csrc/cpu/register.cpp, few_rows_on_decode), also
when they record a gradient; FASTATTN_CPU_FEW_ROWS=prefill keeps
them on the prefill kernel (read per call). Both against the float64 oracle, forward and every gradient; the op's
bits are the decode op's; what the decode kernel cannot take stays on the prefill kernel."""
import math

import pytest
import torch

import fastattn
from fastattn import ops
from support import fwd_args
from support.oracle import assert_fwd_bwd, assert_rule, oracle_attention

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
# B, Hq, Hkv, Sq, Sk, D, Dv: one token, two tokens against few keys, four tokens and grouped-query heads of one and
# two tokens (4 rows) against 512 keys or more
SHAPES = [(2, 3, 3, 1, 300, 64, 64), (1, 2, 2, 2, 77, 48, 80), (1, 2, 2, 4, 517, 96, 64), (2, 8, 2, 1, 600, 64, 64),
          (1, 4, 2, 2, 513, 64, 72)]
FEATURES = ["plain", "causal", "window", "bias", "alibi_softcap"]


def _inputs(shape, dtype, feature, grad=False):
    B, Hq, Hkv, Sq, Sk, D, Dv = shape
    q = torch.randn(B, Hq, Sq, D).to(dtype).requires_grad_(grad)
    k = torch.randn(B, Hkv, Sk, D).to(dtype).requires_grad_(grad)
    v = torch.randn(B, Hkv, Sk, Dv).to(dtype).requires_grad_(grad)
    op = dict(bias=None, wl=-1, wr=-1, softcap=0.0, alibi=None)  # the fwd op's arguments (support.fwd_args)
    ref = dict(scale=D ** -0.5)  # oracle_attention's
    if feature == "causal":
        op.update(wr=0)
        ref.update(window=(-1, 0), bottom_right=True)
    elif feature == "window":
        op.update(wl=37, wr=0)
        ref.update(window=(37, 0), bottom_right=True)
    elif feature == "bias":
        op["bias"] = torch.randn(B, 1, Sq, Sk).to(dtype).expand(B, Hq, Sq, Sk)
        ref["mask"] = op["bias"]
    elif feature == "alibi_softcap":
        op.update(alibi=torch.rand(Hq) * 0.1, softcap=5.0)
        ref.update(alibi_slopes=op["alibi"], softcap=5.0, bottom_right=True)
    return q, k, v, op, ref


def _fwd(q, k, v, op, bottom_right=True, dropout_p=0.0):
    return torch.ops.fastattn.fwd(*fwd_args(q, k, v, br=bottom_right, dropout_p=dropout_p, **op))


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"Hq{s[1]}-Hkv{s[2]}-Sq{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_fwd_op_is_the_decode_kernel_and_the_oracle(dtype, shape, feature, monkeypatch):
    """The fwd op gives the decode op's bits (one key split), and both paths the oracle's output and lse."""
    q, k, v, op, ref = _inputs(shape, dtype, feature)
    monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
    br = feature != "alibi_softcap"  # ALiBi aligns bottom-right either way: top-left without a window goes too
    out, lse = _fwd(q, k, v, op, br)
    dec = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, 1.0 / math.sqrt(q.shape[-1]), op["wl"], op["wr"],
                                        op["softcap"], op["alibi"], 1, True, op["bias"])
    assert torch.equal(out, dec[0]) and torch.equal(lse, dec[1])
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    out_p, lse_p = _fwd(q, k, v, op, br)
    expect = oracle_attention(q, k, v, **ref)
    base = oracle_attention(q, k, v, dtype=dtype, **ref)
    for name, got in (("decode out", out), ("prefill out", out_p)):
        assert_rule(name, got, expect, base, dtype)
    torch.testing.assert_close(lse, lse_p, rtol=1e-5, atol=1e-5)


def test_the_two_paths_differ_in_rounding(monkeypatch):
    """The bit checks above can tell the paths apart: on this fp32 call their outputs differ in the last bits."""
    q, k, v, op, _ = _inputs(SHAPES[0], torch.float32, "plain")
    out = _fwd(q, k, v, op)[0]
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    assert not torch.equal(out, _fwd(q, k, v, op)[0])


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_training_calls_on_either_path_follow_the_rule(dtype, feature, mode, monkeypatch):
    """A training call through the SDPA surface (the C++ autograd node): output and every gradient against the
    oracle, the forward on either kernel (the backward reads its out and lse)."""
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", mode)
    for shape in SHAPES:
        q, k, v, op, ref = _inputs(shape, dtype, feature, grad=True)
        if feature in ("window", "alibi_softcap"):
            continue  # (SDPA has neither: the op test above covers them)
        mask = op["bias"]
        if feature == "causal":  # bottom-right, as transformers' masks for a step's tokens
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
            ref = dict(scale=ref["scale"], mask=torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="cpu")
        dout = torch.randn_like(out)
        got = (out, *torch.autograd.grad(out, (q, k, v), dout))
        assert_fwd_bwd(f"{shape}", got, q, k, v, dout, dtype, **ref)


CASES = {"top-left window": (2, 40, 64), "five rows": (5, 600, 64), "four rows, 511 keys": (4, 511, 64),
         "four rows, head dim 48": (4, 600, 48), "one row, head dim 32": (1, 600, 32), "dropout": (2, 40, 64)}


@pytest.mark.parametrize("case", list(CASES))
def test_calls_the_decode_kernel_cannot_take_stay_on_the_prefill_kernel(case, monkeypatch):
    """Top-left windows of Sq != Sk (the decode kernel aligns bottom-right), more than 4 rows per KV head, dropout,
    and where the prefill kernel timed faster (3-4 rows against fewer than 512 keys or at head dims below 64; any
    call at head dims below 48): the prefill kernel's bits, whatever the switch says."""
    Sq, Sk, D = CASES[case]
    shape = (1, 2, 2, Sq, Sk, D, D)
    q, k, v, op, ref = _inputs(shape, torch.float32, "causal" if case == "top-left window" else "plain")
    br, p = case != "top-left window", 0.3 if case == "dropout" else 0.0
    out = _fwd(q, k, v, op, br, p)
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    assert torch.equal(out[0], _fwd(q, k, v, op, br, p)[0])
    if case == "top-left window":
        assert_rule("top-left causal", out[0], oracle_attention(q, k, v, scale=ref["scale"], window=(-1, 0)), None,
                    torch.float32)
