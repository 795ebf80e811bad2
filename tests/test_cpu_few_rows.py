"""Calls of at most 2 query rows per KV head (Hq / Hkv x Sq) at head dims from 48, and of 3-4 against 512 keys or more
at head dims from 64, run the fwd op on the split-KV decode kernel (csrc/cpu/register.cpp, few_rows_on_decode), also
when they record a gradient; their backward and that of more calls (few_rows_in_one_pass: up to 2 rows from head dim
32, 3 from 48, 4 from 64, in fp32 on AVX-512 6 from 64 and 8 from 128 (with groups of query heads 8 and 12), one token
per query head in groups of up to 8 from 32) runs in one pass over the keys (csrc/cpu/bwd_rows.cpp).
FASTATTN_CPU_FEW_ROWS=prefill keeps both on the tile kernels, =decode puts both on the few-rows kernels at any row
count (read per call). Both against the float64 oracle, forward and every gradient; the op's bits are the decode op's;
what the decode kernel cannot take stays on the prefill kernel; the one-pass backward in strided layouts, over skipped
key padding, with the same bits for any thread count, NaN where the tile backward has it, and a planted bug that the
checks catch."""
import math

import pytest
import torch

import fastattn
from fastattn import ops
from support import fwd_args
from support.checks import run_planted
from support.oracle import assert_fwd_bwd, assert_rule, oracle_attention

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
# B, Hq, Hkv, Sq, Sk, D, Dv: one token, two tokens against few keys, three and four tokens and grouped-query heads of
# one and two tokens (4 rows) against 512 keys or more
SHAPES = [(2, 3, 3, 1, 300, 64, 64), (1, 2, 2, 2, 77, 48, 80), (1, 2, 2, 4, 517, 96, 64), (2, 8, 2, 1, 600, 64, 64),
          (1, 4, 2, 2, 513, 64, 72), (1, 1, 1, 3, 530, 80, 64)]
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
         "four rows, head dim 48": (4, 600, 48), "one row, head dim 32": (1, 600, 32), "dropout": (2, 40, 64),
         "eight rows, 511 keys, head dim 128": (8, 511, 128), "six rows, head dim 96": (6, 600, 96),
         "eight rows, head dim 256": (8, 600, 256), "nine rows, head dim 128": (9, 600, 128)}


@pytest.mark.parametrize("case", list(CASES))
def test_calls_the_decode_kernel_cannot_take_stay_on_the_prefill_kernel(case, monkeypatch):
    """Top-left windows of Sq != Sk (the decode kernel aligns bottom-right), dropout, and where the prefill kernel
    timed faster (3-4 rows against fewer than 512 keys or at head dims below 64; 5-8 rows outside head dims 128-160
    or below 512 keys; more than 8 rows; any call at head dims below 48): the prefill kernel's bits, whatever the
    switch says."""
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


def _bwd(dout, q, k, v, out, lse, op, bottom_right=True):
    a = fwd_args(q, k, v, br=bottom_right, **op)
    return torch.ops.fastattn.bwd(dout, *a[:3], out, lse, *a[3:])


def _fwd_bwd(q, k, v, op, dout, bottom_right=True):
    out, lse = _fwd(q, k, v, op, bottom_right)
    return (out, *_bwd(dout, q, k, v, out, lse, op, bottom_right))


@pytest.mark.parametrize("feature", FEATURES + ["key_padding"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"Hq{s[1]}-Hkv{s[2]}-Sq{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bwd_op_in_one_pass_follows_the_rule(dtype, shape, feature, monkeypatch):
    """The bwd op of each feature the fwd op's rule takes (and a key-padding mask whose padding the kernels skip):
    every gradient against the oracle, and in fp32 not the tile backward's bits (so the one-pass kernel ran)."""
    monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
    q, k, v, op, ref = _inputs(shape, dtype, "plain" if feature == "key_padding" else feature)
    if feature == "key_padding":  # the last 40% of each batch's keys hidden: keys past key_end get zero gradients
        B, Sk = q.shape[0], k.shape[2]
        pad = torch.zeros(B, 1, 1, Sk)
        pad[..., Sk - 2 * Sk // 5:] = float("-inf")
        op["bias"] = pad.to(dtype).expand(B, q.shape[1], q.shape[2], Sk)
        ref["mask"] = op["bias"]
    br = feature != "alibi_softcap"
    dout = torch.randn(*q.shape[:3], v.shape[-1]).to(dtype)
    got = _fwd_bwd(q, k, v, op, dout, br)
    assert_fwd_bwd(f"{shape} {feature}", got, q, k, v, dout, dtype, **ref)
    if feature == "key_padding":
        assert not got[2][:, :, -(2 * k.shape[2] // 5):].any() and not got[3][:, :, -(2 * k.shape[2] // 5):].any()
    if dtype == torch.float32:  # (fp16/bf16 gradients may round to the same bits)
        monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
        tile = _bwd(dout, q, k, v, got[0], _fwd(q, k, v, op, br)[1], op, br)
        assert not all(torch.equal(a, b) for a, b in zip(got[1:], tile))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bwd_op_in_one_pass_takes_strided_layouts(dtype):
    """q, k, v in (B, S, H, D) memory and a dout with a gap between rows: the gradients keep the inputs'
    strides (fp32 dK, dV written in place, the others row by row) and match the contiguous call's bits."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 1, 700, 64
    q, k, v = (torch.randn(B, S, H, D).to(dtype).transpose(1, 2) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv)))
    dout = torch.randn(B, Hq, Sq, D + 8).to(dtype)[..., :D]
    op = dict(bias=None, wl=-1, wr=0, softcap=0.0, alibi=None)
    got = _fwd_bwd(q, k, v, op, dout)
    assert got[2].stride() == k.stride() and got[3].stride() == v.stride()
    dense = _fwd_bwd(q.contiguous(), k.contiguous(), v.contiguous(), op, dout.contiguous())
    for a, b in zip(got, dense):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bwd_op_in_one_pass_has_the_same_bits_for_any_thread_count(dtype):
    """One (sequence, kv head) cut into key chunks (fewer pairs than 8), and many pairs: the same bits on 1, 2 and 3
    threads."""
    prev = torch.get_num_threads()
    try:
        for B, H, Sk in ((1, 1, 1500), (3, 5, 300)):
            q, k, v = torch.randn(B, H, 1, 64).to(dtype), *(torch.randn(B, H, Sk, 64).to(dtype) for _ in range(2))
            dout = torch.randn_like(q)
            op = dict(bias=None, wl=-1, wr=-1, softcap=0.0, alibi=None)
            runs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                runs.append(_fwd_bwd(q, k, v, op, dout))
            for run in runs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bwd_op_in_one_pass_reads_alike_under_every_read_policy(dtype, monkeypatch):
    """Rows fetched ahead and a lone row streamed (what calls of 8 MB of K and V or more take; the switches force it at
    any size) give the plain reads' bits: one row at head dim 64 (the lone-row loops), 2 and 4 rows of a KV head; K and
    V with different strides between keys."""
    op = dict(bias=None, wl=-1, wr=0, softcap=0.0, alibi=None)
    for B, Hq, Hkv, Sq, D in ((2, 2, 2, 1, 64), (1, 4, 2, 1, 96), (1, 2, 2, 4, 128)):
        q, k = torch.randn(B, Hq, Sq, D).to(dtype), torch.randn(B, Hkv, 700, D).to(dtype)
        v = torch.randn(B, 700, Hkv, D).to(dtype).transpose(1, 2)  # keys Hkv * D apart in v, D in k
        dout = torch.randn_like(q)
        runs = []
        for fetch, lone in (("none", "chunks"), ("stream", "stream"), ("block", "chunks")):
            monkeypatch.setenv("FASTATTN_CPU_PREFETCH", fetch)
            monkeypatch.setenv("FASTATTN_CPU_LONE_ROW", lone)
            runs.append(_fwd_bwd(q, k, v, op, dout))
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
def test_bwd_op_in_one_pass_puts_nan_where_the_tile_backward_does(where, monkeypatch):
    """A NaN in one row of q, k, v or dout: the one-pass backward's NaN in the same gradient elements as the tile
    backward's."""
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 2, 1, 300, 64
    t = dict(q=torch.randn(B, Hq, Sq, D), k=torch.randn(B, Hkv, Sk, D), v=torch.randn(B, Hkv, Sk, D))
    t["dout"] = torch.randn(B, Hq, Sq, D)
    t[where][0, 1, -1, 3] = float("nan")
    op = dict(bias=None, wl=-1, wr=-1, softcap=0.0, alibi=None)
    args = (t["q"], t["k"], t["v"], op, t["dout"])
    got = _fwd_bwd(*args)
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    tile = _fwd_bwd(*args)
    assert any(g.isnan().any() for g in got[1:])
    for a, b in zip(got[1:], tile[1:]):
        assert torch.equal(a.isnan(), b.isnan())


_PLANT = r"""
import torch
from support.oracle import assert_fwd_bwd
import test_cpu_few_rows as t
torch.manual_seed(0)
q, k, v, op, ref = t._inputs((2, 8, 2, 1, 600, 64, 64), torch.float32, "plain")
dout = torch.randn_like(q)
assert_fwd_bwd("planted", t._fwd_bwd(q, k, v, op, dout), q, k, v, dout, torch.float32, **ref)
"""


def test_a_planted_one_pass_bug_fails_the_check(monkeypatch):
    """FASTATTN_CPU_PLANT=rows_dk (bwd_rows.cpp: the last row's share of dK halved) fails the dK check above; the
    same script passes without it."""
    monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
    clean = run_planted(_PLANT)
    assert clean.returncode == 0, clean.stderr[-2000:]
    bad = run_planted(_PLANT, "rows_dk")
    assert bad.returncode != 0 and "dk" in bad.stderr, bad.stderr[-2000:]


def _wide():
    """The CPU runs AVX-512 (not held below it): the one-pass rule's fp32 rows past its table apply."""
    return ops.cpu_matmul_report().get("avx512") == "1"


def test_info_names_the_few_rows_rules_and_their_switch(monkeypatch):
    """`python -m fastattn.info` and the benchmarks' CPU line (ops.cpu_matmul) state both rules and, when
    FASTATTN_CPU_FEW_ROWS is set, which kernels it forces (read per call)."""
    monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
    fp32 = " (fp32: 6 from 64, 8 from 128; in groups 8 from 64, 12 from 128)" if _wide() else ""
    assert ("few query rows: forward on the decode kernel up to 2 query rows per KV head from head dim 48, 4 against "
            "512 keys or more from 64 (8 at head dims 128-160); backward in one pass over the keys up to 2 from 32, "
            "3 from 48, 4 from 64"
            + fp32 + ", one token per query head in groups of up to 8 from 32, two in groups of up to "
            + ("8" if _wide() else "4") + " from 64") in ops.cpu_matmul()
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    assert "few query rows: the tile kernels (FASTATTN_CPU_FEW_ROWS=prefill)" in ops.cpu_matmul()
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "decode")
    assert "at any row count (FASTATTN_CPU_FEW_ROWS=decode)" in ops.cpu_matmul()


# B, Hq, Hkv, Sq, Sk, D, Dv: 5-8 rows per KV head at head dims 128-160 against 512 keys or more (the forward's rule;
# the backward's takes some: fp32 on AVX-512, two-token groups)
MID_DIMS = [(1, 2, 2, 8, 520, 128, 128), (1, 8, 2, 2, 600, 160, 144), (2, 6, 6, 6, 530, 128, 128)]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", MID_DIMS, ids=[f"Hq{s[1]}-Hkv{s[2]}-Sq{s[3]}-D{s[5]}" for s in MID_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rows_at_mid_head_dims_run_forward_on_the_decode_kernel(dtype, shape, feature, monkeypatch):
    """The fwd op gives the decode op's bits, and forward and every gradient (the backward on whichever kernel its
    rule picks, reading the decode kernel's out and lse) the oracle's."""
    monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
    q, k, v, op, ref = _inputs(shape, dtype, feature)
    br = feature != "alibi_softcap"
    dec = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, ref["scale"], op["wl"], op["wr"], op["softcap"],
                                        op["alibi"], 1, True, op["bias"])
    assert all(torch.equal(a, b) for a, b in zip(_fwd(q, k, v, op, br), dec))
    dout = torch.randn(*q.shape[:3], v.shape[-1]).to(dtype)
    assert_fwd_bwd(f"{shape} {feature}", _fwd_bwd(q, k, v, op, dout, br), q, k, v, dout, dtype, **ref)


# B, Hq, Hkv, Sq, Sk, D, Dv and the dtypes: calls the backward rule takes and the forward rule does not (the fp32 rows
# past the table and groups of 8 on two tokens: on AVX-512 only)
BWD_ONLY = {"one row, head dim 32": ((2, 2, 2, 1, 100, 32, 40), DTYPES),
            "three rows, head dim 48": ((1, 2, 2, 3, 200, 48, 48), DTYPES),
            "four rows, 300 keys": ((1, 2, 2, 4, 300, 64, 64), DTYPES),
            "group of 8, one token, head dim 32": ((1, 8, 1, 1, 150, 32, 32), DTYPES),
            "six rows in fp32": ((1, 1, 1, 6, 200, 64, 64), [torch.float32]),
            "eight rows in fp32 at head dim 128": ((1, 2, 2, 8, 130, 128, 128), [torch.float32]),
            "eight rows of a group in fp32 at head dim 64": ((1, 4, 2, 4, 150, 64, 64), [torch.float32]),
            "twelve rows of a group in fp32 at head dim 128": ((1, 8, 2, 3, 100, 128, 128), [torch.float32]),
            "two tokens in a group of 4": ((1, 4, 1, 2, 200, 64, 64), DTYPES),
            "two tokens in a group of 8 on AVX-512": ((2, 16, 2, 2, 170, 96, 80), DTYPES)}


@pytest.mark.parametrize("feature", ["plain", "causal", "bias"])
@pytest.mark.parametrize("case", list(BWD_ONLY))
def test_bwd_rule_reaches_past_the_forward_rule(case, feature, monkeypatch):
    """Calls whose forward stays on the tile kernels (the prefill kernel's bits) and whose backward runs in one pass:
    every gradient against the oracle, and in fp32 not the tile backward's bits (held below AVX-512, the fp32 rows
    past the table: the tile backward's bits)."""
    shape, dtypes = BWD_ONLY[case]
    one_pass = _wide() or not ("in fp32" in case or "on AVX-512" in case)
    for dtype in dtypes:
        monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
        q, k, v, op, ref = _inputs(shape, dtype, feature)
        dout = torch.randn(*q.shape[:3], v.shape[-1]).to(dtype)
        got = _fwd_bwd(q, k, v, op, dout)
        assert_fwd_bwd(f"{case} {dtype}", got, q, k, v, dout, dtype, **ref)
        monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
        out, lse = _fwd(q, k, v, op)
        assert torch.equal(got[0], out)  # (the forward: the tile kernels either way)
        if dtype == torch.float32:
            tile = _bwd(dout, q, k, v, out, lse, op)
            assert all(torch.equal(a, b) for a, b in zip(got[1:], tile)) != one_pass


# calls the backward rule leaves to the tile backward
TILE_BWD = {"two rows, head dim 16": ((1, 2, 2, 2, 200, 16, 16), torch.float32),
            "three rows, head dim 32": ((1, 2, 2, 3, 200, 32, 32), torch.float32),
            "six rows in bf16": ((1, 1, 1, 6, 200, 64, 64), torch.bfloat16),
            "two tokens in a group of 4 at head dim 48": ((1, 4, 1, 2, 200, 48, 48), torch.bfloat16),
            "two tokens in a group of 8 at head dim 48": ((1, 8, 1, 2, 200, 48, 48), torch.float32),
            "three tokens in a group of 4": ((1, 4, 1, 3, 200, 64, 64), torch.bfloat16),
            "one token in a group of 16": ((1, 16, 1, 1, 200, 64, 64), torch.float32),
            "twelve rows in fp32": ((1, 1, 1, 12, 200, 128, 128), torch.float32),
            "twelve rows of a group in fp32 at head dim 64": ((1, 4, 2, 6, 150, 64, 64), torch.float32)}


@pytest.mark.parametrize("case", list(TILE_BWD))
def test_calls_past_the_bwd_rule_keep_the_tile_backward(case, monkeypatch):
    """Rows past the bound of their head dim and dtype: the tile backward's bits, whatever the switch says, unless
    it says decode (then one pass, against the oracle)."""
    shape, dtype = TILE_BWD[case]
    monkeypatch.delenv("FASTATTN_CPU_FEW_ROWS", raising=False)
    q, k, v, op, ref = _inputs(shape, dtype, "causal")
    dout = torch.randn(*q.shape[:3], v.shape[-1]).to(dtype)
    got = _fwd_bwd(q, k, v, op, dout)
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    assert all(torch.equal(a, b) for a, b in zip(got, _fwd_bwd(q, k, v, op, dout)))
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "decode")
    forced = _fwd_bwd(q, k, v, op, dout)
    assert_fwd_bwd(f"{case} forced", forced, q, k, v, dout, dtype, **ref)
    if dtype == torch.float32:
        assert not all(torch.equal(a, b) for a, b in zip(got[1:], forced[1:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_decode_switch_takes_any_row_count(dtype, monkeypatch):
    """FASTATTN_CPU_FEW_ROWS=decode (the benchmarks' measure of both rules): 16 rows and a group of 4 on 3 tokens, the
    forward the decode op's bits, and forward and every gradient against the oracle."""
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "decode")
    for shape in ((1, 2, 2, 16, 90, 32, 32), (2, 8, 2, 3, 140, 64, 48)):
        q, k, v, op, ref = _inputs(shape, dtype, "bias")
        dout = torch.randn(*q.shape[:3], v.shape[-1]).to(dtype)
        got = _fwd_bwd(q, k, v, op, dout)
        dec = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, ref["scale"], -1, -1, 0.0, None, 1, True,
                                            op["bias"])
        assert torch.equal(got[0], dec[0])
        assert_fwd_bwd(f"{shape} forced", got, q, k, v, dout, dtype, **ref)
