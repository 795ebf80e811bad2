"""Full masks read as the causal band (csrc/cpu/mask_band.cpp): which (B, 1, Sq, Sk) masks the CPU kernels read as a
causal band with a key-padding row and which they leave alone (from the values alone: fastattn._C.cpu_mask_band);
that a call so read equals the explicit causal call with its key-padding row bitwise; forward and gradients against
the float64 oracle; NaN and Inf where the mask hides them reach the output as before; a planted bug caught."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _C
from support.oracle import assert_rule, oracle_attention

pytestmark = pytest.mark.skipif(fastattn.get_backend("cpu").unavailable() != [],
                                reason="fastattn._C without CPU kernels (extension not built)")

NEG_INF = float("-inf")


def keep_mask(B, Sq, Sk, band, pad="right"):
    """Bool (B, 1, Sq, Sk), True = attend: `band` ("causal", "causal bottom-right", "key padding") and key padding
    (`pad`: "right" or "left", a quarter of batch 1's keys; "none")."""
    i, j = torch.arange(Sq).view(Sq, 1), torch.arange(Sk).view(1, Sk)
    off = {"causal": 0, "causal bottom-right": Sk - Sq, "key padding": None}[band]
    visible = torch.ones(Sq, Sk, dtype=torch.bool) if off is None else j <= i + off  # (Sq, Sk)
    real = torch.ones(B, Sk, dtype=torch.bool)
    if pad != "none" and B > 1:
        cut = Sk // 4
        real[1, Sk - cut:] = False
        if pad == "left":
            real[1] = real[1].flip(0)
    return (visible.unsqueeze(0) & real.view(B, 1, Sk)).unsqueeze(1)  # (B, 1, Sq, Sk)


def as_bias(keep, dtype):
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, NEG_INF)


def band_of(mask, H=3):
    B, _, Sq, Sk = mask.shape
    return _C.cpu_mask_band(mask.expand(B, H, Sq, Sk))  # (B, 1, Sq, Sk) -> (B, H, Sq, Sk), stride 0 over heads


@pytest.mark.parametrize("band,Sq,Sk", [("causal", 70, 70), ("causal", 30, 70), ("causal", 70, 30),
                                        ("causal bottom-right", 30, 70), ("causal bottom-right", 70, 30),
                                        ("key padding", 40, 70)])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_bands_found(band, Sq, Sk, pad):
    assert band_of(as_bias(keep_mask(2, Sq, Sk, band, pad), torch.float32)) == band
    assert band_of(as_bias(keep_mask(2, Sq, Sk, band, pad), torch.bfloat16)) == band


def test_masks_that_are_no_band():
    causal = keep_mask(2, 50, 50, "causal")
    holes = causal.clone()
    holes[1, 0, 30, 3] = False  # one row misses a key the others see
    window = causal & (torch.arange(50).view(1, 50) >= torch.arange(50).view(50, 1) - 8)  # causal, 8 keys back
    finite = torch.zeros(2, 1, 50, 50).masked_fill(~causal, -1e4)  # a large finite negative is not -inf
    nan = as_bias(causal, torch.float32)
    nan[0, 0, 3, 40] = float("nan")
    scaled = as_bias(causal, torch.float32)
    scaled[0, 0, 10, 2] = 0.5
    for name, mask in [("holes", as_bias(holes, torch.float32)), ("window", as_bias(window, torch.float32)),
                       ("finite", finite), ("nan", nan), ("a value", scaled),
                       ("random", torch.randn(2, 1, 50, 50))]:
        assert band_of(mask) == "", name
    per_head = as_bias(causal, torch.float32).expand(2, 3, 50, 50).contiguous()  # one copy per head: not read
    assert _C.cpu_mask_band(per_head) == ""
    assert band_of(as_bias(causal[:1], torch.float32).expand(2, 1, 50, 50)) == "causal"  # broadcast over batch


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype):
    return (torch.randn(B, Hq, Sq, D).to(dtype), torch.randn(B, Hkv, Sk, D).to(dtype),
            torch.randn(B, Hkv, Sk, D).to(dtype))


def _fwd(q, k, v, bias, wr=-1, br=False):
    return torch.ops.fastattn.fwd(q, k, v, bias, None, None, 0, 0, 1.0 / math.sqrt(q.shape[-1]), -1, wr, br, 0.0,
                                  None, 0.0, 0, 0, False)


def _bwd(dout, q, k, v, out, lse, bias, wr=-1, br=False):
    return torch.ops.fastattn.bwd(dout, q, k, v, out, lse, bias, None, None, 0, 0, 1.0 / math.sqrt(q.shape[-1]), -1,
                                  wr, br, 0.0, None, 0.0, 0, 0, True)


@pytest.mark.parametrize("band,Sq,Sk", [("causal", 150, 150), ("causal bottom-right", 90, 200),
                                        ("key padding", 90, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_read_band_equals_the_explicit_call(band, Sq, Sk, dtype):
    """The op on the full mask equals, bitwise, the op told the band (window_right = 0, bottom_right) with the last
    mask row as a key-padding row: forward, lse and the three gradients. With the reading off, the same call takes
    the full mask (whose results need not be bitwise the same: the check is then against each other's rule)."""
    torch.manual_seed(5)
    B, Hq, Hkv = 2, 4, 2
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, 64, dtype)
    bias = as_bias(keep_mask(B, Sq, Sk, band, "right"), dtype).expand(B, Hq, Sq, Sk)
    row = bias[:, :, -1:, :].expand(B, Hq, Sq, Sk)  # the key-padding row, broadcast over query rows
    wr, br = (-1, False) if band == "key padding" else (0, band == "causal bottom-right")
    out, lse = _fwd(q, k, v, bias)
    out_e, lse_e = _fwd(q, k, v, row, wr, br)
    assert torch.equal(out, out_e) and torch.equal(lse, lse_e)
    dout = torch.randn_like(out)
    for g, g_e in zip(_bwd(dout, q, k, v, out, lse, bias), _bwd(dout, q, k, v, out_e, lse_e, row, wr, br)):
        assert torch.equal(g, g_e)


def _assert_fwd_bwd_rule(q, k, v, mask, dtype):
    """fastattn's SDPA (cpu backend) on `mask` against the float64 oracle: out and the three gradients."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fastattn.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True, backend="cpu")
    dout = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, leaves, dout))
    scale = q.shape[-1] ** -0.5
    refs = {}
    for prec in (torch.float64, dtype):
        x = [t.detach().to(prec).requires_grad_() for t in (q, k, v)]
        o = oracle_attention(*x, scale=scale, mask=mask, dtype=prec)
        refs[prec] = (o, *torch.autograd.grad(o, x, dout.to(prec)))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_rule(name, got[i], refs[torch.float64][i], refs[dtype][i], dtype)


@pytest.mark.parametrize("band,Sq,Sk", [("causal", 77, 77), ("causal", 45, 133), ("causal bottom-right", 45, 133),
                                        ("causal bottom-right", 133, 45), ("key padding", 61, 100)])
@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_banded_masks_hold_the_rule(band, Sq, Sk, pad, kind, dtype):
    """Masks read as a band (left padding leaves some causal rows no key: they give 0, as the oracle's) on odd sizes
    with grouped heads: forward and gradients against the float64 oracle."""
    torch.manual_seed(Sq * 7 + Sk)
    q, k, v = _qkv(2, 4, 2, Sq, Sk, 40, dtype)
    keep = keep_mask(2, Sq, Sk, band, pad)
    assert band_of(as_bias(keep, dtype)) == band
    _assert_fwd_bwd_rule(q, k, v, keep if kind == "bool" else as_bias(keep, dtype), dtype)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_and_inf_hidden_by_the_mask_still_reach_the_output(where):
    """A NaN in q or k, or an Inf in v, at a key or row the causal mask hides from some rows: the bounds refuse the
    band and the full mask gives what it gave before (PyTorch adds -inf to a NaN score: NaN), bitwise, NaN where
    NaN."""
    torch.manual_seed(2)
    q, k, v = _qkv(2, 2, 2, 64, 64, 32, torch.float32)
    {"q": q, "k": k, "v": v}[where][1, 0, 50, 3] = float("nan") if where != "v" else float("inf")
    mask = keep_mask(2, 64, 64, "causal", "right")
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    _C.cpu_mask_band_enable(False)
    try:
        full = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    finally:
        _C.cpu_mask_band_enable(True)
    torch.testing.assert_close(out, full, rtol=0, atol=0, equal_nan=True)
    if where == "q":  # row 50's own NaN
        assert out[1, 0, 50].isnan().all() and not out[1, 0, :50].isnan().any()
    else:  # rows that do not see key 50 still NaN: the band was not read
        assert out[1, 0, :50, 3].isnan().all()


_PLANT = r"""
import sys, torch
sys.path.insert(0, "tests")
from test_mask_band import _assert_fwd_bwd_rule, _qkv, as_bias, band_of, keep_mask
keep = keep_mask(2, 96, 96, "causal", "none")
keep[1, 0, 60, 5:9] = False  # holes in one row
print("read as", repr(band_of(as_bias(keep, torch.float32))))
q, k, v = _qkv(2, 2, 2, 96, 96, 32, torch.float32)
try:
    _assert_fwd_bwd_rule(q, k, v, keep, torch.float32)
    print("rule held")
except AssertionError as e:
    print("rule failed:", str(e)[:200])
"""


@pytest.mark.parametrize("plant", ["", "band_rows"])
def test_planted_band_bug_fails_the_rule(plant):
    """FASTATTN_CPU_PLANT=band_rows compares rows on their -inf tails only: a causal mask with holes is then read as
    plain causal, and the oracle check must fail; without the plant the same mask is no band and holds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTATTN_CPU_PLANT=plant)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PLANT], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    if plant:
        assert "read as 'causal'" in r.stdout and "rule failed" in r.stdout, r.stdout
    else:
        assert "read as ''" in r.stdout and "rule held" in r.stdout, r.stdout
