"""Full masks' structure read by the CPU kernels (csrc/cpu/mask_band.cpp). Causal bands: which (B, 1, Sq, Sk) masks
are read as a causal band with a key-padding row and which are left alone (from the values alone:
fastattn._C.cpu_mask_band); that a call so read equals the explicit causal call with its key-padding row bitwise.
-inf edges of any other full mask (sliding windows, packed documents, one mask per head): each row's range
(fastattn._C.cpu_mask_rows). Forward and gradients against the float64 oracle on both; NaN and Inf where the mask
hides them reach the output as before; a planted bug in each caught."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _C
from support import torch_threads
from support.oracle import assert_fwd_bwd

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
    """fastattn's SDPA (cpu backend) on `mask` against the float64 oracle: out and the three gradients, dQ and dK with
    the error the rounded O forces on the backward's delta = rowsum(dO * O) (assert_fwd_bwd): a row that sees two
    keys of nearly equal weight cancels there (fp16, B1 H1 Sq65 Sk9 D=16: dQ 0.00178 against the naive fp16
    backward's 2 * 0.00042 + floor, FASTATTN_TEST_SEED=1019463029)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fastattn.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True, backend="cpu")
    dout = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, leaves, dout))
    assert_fwd_bwd("", got, q, k, v, dout, dtype, scale=q.shape[-1] ** -0.5, mask=mask)


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


def _with_and_without_reading(q, k, v, mask):
    """The cpu backend's output on `mask` with the kernels reading its structure and without; asserts them bitwise
    equal, NaN where NaN (the bounds refused the reading); returns the first."""
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    _C.cpu_mask_band_enable(False)
    try:
        full = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    finally:
        _C.cpu_mask_band_enable(True)
    torch.testing.assert_close(out, full, rtol=0, atol=0, equal_nan=True)
    return out


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_and_inf_hidden_by_the_mask_still_reach_the_output(where):
    """A NaN in q or k, or an Inf in v, at a key or row the causal mask hides from some rows: the bounds refuse the
    band and the full mask gives what it gave before (PyTorch adds -inf to a NaN score: NaN), bitwise, NaN where
    NaN."""
    torch.manual_seed(2)
    q, k, v = _qkv(2, 2, 2, 64, 64, 32, torch.float32)
    {"q": q, "k": k, "v": v}[where][1, 0, 50, 3] = float("nan") if where != "v" else float("inf")
    mask = keep_mask(2, 64, 64, "causal", "right")
    out = _with_and_without_reading(q, k, v, mask)
    if where == "q":  # row 50's own NaN
        assert out[1, 0, 50].isnan().all() and not out[1, 0, :50].isnan().any()
    else:  # rows that do not see key 50 still NaN: the band was not read
        assert out[1, 0, :50, 3].isnan().all()


@pytest.mark.parametrize("band,Sq,Sk,key", [("causal", 64, 64, 1), ("causal bottom-right", 30, 70, 41),
                                            ("key padding", 64, 64, 15)])
def test_nan_at_the_first_hidden_key_still_reaches_the_output(band, Sq, Sk, key):
    """The bounds cover only the keys some row skips: above row 0's diagonal for a band, the leading padding (16 keys
    of batch 1, left) for a key-padding row. A NaN key at the edge of that range, hidden from row 0 or from every row
    of batch 1, still makes those rows NaN (an off-by-one in the range would read the mask and drop it)."""
    torch.manual_seed(3)
    q, k, v = _qkv(2, 2, 2, Sq, Sk, 32, torch.float32)
    k[1, 0, key, 0] = float("nan")
    keep = keep_mask(2, Sq, Sk, band, "left" if band == "key padding" else "none")
    mask = keep[..., -1:, :] if band == "key padding" else keep  # (B, 1, 1, Sk): a key-padding row
    out = _with_and_without_reading(q, k, v, mask)
    assert out[1, 0, 0].isnan().all() and (band != "key padding" or out[1, 0].isnan().all())


def edged_mask(kind, B, Sq, Sk):
    """Bool (B, 1, Sq, Sk) masks with -inf edges but no causal band: "window" (causal, 24 keys back, bottom-right),
    "documents" (three packed documents, causal within each; the last query rows see nothing when Sq > Sk), "prefix"
    (the first 20 keys and a causal band after them, per batch a different prefix)."""
    i, j = torch.arange(Sq).view(Sq, 1), torch.arange(Sk).view(1, Sk)
    if kind == "window":
        keep = (j <= i + Sk - Sq) & (j >= i + Sk - Sq - 24)
        return keep.expand(B, 1, Sq, Sk)
    if kind == "documents":
        doc_q, doc_k = (i * 3) // max(Sq, 1), (j * 3) // max(Sk, 1)
        keep = (doc_q == doc_k) & (j * Sq <= i * Sk + Sq)  # causal within each document, scaled to Sk
        return keep.expand(B, 1, Sq, Sk)
    keep = torch.stack([(j < 20 + 7 * b) | (j <= i) for b in range(B)])  # (B, Sq, Sk)
    return keep.unsqueeze(1)


@pytest.mark.parametrize("kind", ["window", "documents", "prefix"])
def test_mask_rows_are_the_edges(kind):
    """Each row's [lo, hi) is its first and one past its last key not -inf ({Sk, 0} for a row all -inf), over the
    mask's own batch and head dims; the rows' keys outside it are all -inf."""
    keep = edged_mask(kind, 2, 90, 130)
    shared = keep if kind == "prefix" else keep[:1]  # one mask for both batches: read once
    rows = _C.cpu_mask_rows(as_bias(shared, torch.bfloat16).expand(2, 3, 90, 130))
    assert rows.shape == (1 if kind != "prefix" else 2, 1, 90, 2)
    for b in range(rows.shape[0]):
        for i in range(90):
            seen = keep[b, 0, i].nonzero().flatten()
            want = [130, 0] if seen.numel() == 0 else [seen[0].item(), seen[-1].item() + 1]
            assert rows[b, 0, i].tolist() == want, (b, i)
    per_head = as_bias(keep, torch.float32).expand(2, 3, 90, 130).contiguous()  # one copy per head: read per head
    assert _C.cpu_mask_rows(per_head).shape == (2, 3, 90, 2)


def test_mask_rows_of_a_key_padding_row():
    """A bias broadcast over query rows (a key-padding mask) has one range per batch: left padding's -inf run leads."""
    keep = keep_mask(2, 1, 300, "key padding", "left")  # (2, 1, 1, 300), batch 1's first 75 keys padding
    rows = _C.cpu_mask_rows(as_bias(keep, torch.float32).expand(2, 4, 50, 300))  # stride 0 over heads and rows
    assert rows.tolist() == [[[[0, 300]]], [[[75, 300]]]]


@pytest.mark.parametrize("Sq", [1, 90, 333])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_left_padded_key_padding_holds_the_rule(Sq, causal, dtype):
    """A (B, 1, 1, Sk) key-padding mask with left padding (its leading -inf keys skipped by their range), with and
    without a causal band (bottom-right: the padded keys lead every row): forward and gradients against the oracle."""
    torch.manual_seed(Sq)
    Sk = 333
    q, k, v = _qkv(2, 4, 2, Sq, Sk, 40, dtype)
    keep = keep_mask(2, Sq, Sk, "causal bottom-right" if causal else "key padding", "left")
    _assert_fwd_bwd_rule(q, k, v, keep if causal else keep[:, :, :1], dtype)


@pytest.mark.parametrize("kind,Sq,Sk", [("window", 150, 150), ("window", 70, 300), ("documents", 200, 200),
                                        ("documents", 120, 90), ("prefix", 160, 160)])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_edged_masks_hold_the_rule(kind, Sq, Sk, per_head, dtype):
    """Masks whose -inf edges the kernels skip (the rows' ranges cover the hidden keys' 1/16 at least), shared by the
    heads or one copy per head, odd sizes, grouped heads: forward and gradients against the float64 oracle."""
    torch.manual_seed(Sq + Sk)
    q, k, v = _qkv(2, 4, 2, Sq, Sk, 40, dtype)
    keep = edged_mask(kind, 2, Sq, Sk)
    if per_head:
        keep = keep.expand(2, 4, Sq, Sk).clone()
        keep[:, 1::2] = causal = keep_mask(2, Sq, Sk, "causal bottom-right", "none").expand(2, 2, Sq, Sk)
        assert band_of(as_bias(causal[:, :1], dtype)) != ""  # odd heads: a band, but not read per head
    assert band_of(as_bias(keep[:, :1], dtype)) == ""
    _assert_fwd_bwd_rule(q, k, v, keep, dtype)


def test_nan_beyond_the_edges_still_reaches_the_output():
    """A NaN key outside some rows' range: the bounds refuse the ranges and the full mask gives what it gave
    before, NaN where NaN (rows that do not see the key are NaN too: PyTorch adds -inf to their NaN score)."""
    torch.manual_seed(6)
    q, k, v = _qkv(1, 2, 2, 96, 96, 32, torch.bfloat16)
    k[0, 1, 80, 0] = float("nan")
    keep = edged_mask("window", 1, 96, 96)
    out = _with_and_without_reading(q, k, v, keep)
    assert out[0, 1, :40].isnan().all()


def _random_mask(rng, B, Hq, Sq, Sk, dtype):
    """A random structured mask: causal in either alignment, a causal window, packed documents, a causal prefix,
    causal with one hole; then key padding (left or right) per batch, one copy per head, bool or float."""
    i, j = torch.arange(Sq).view(Sq, 1), torch.arange(Sk).view(1, Sk)
    kind = rng.choice(["causal", "bottom-right", "window", "documents", "prefix", "holes"])
    keep = j <= i + (Sk - Sq if kind in ("bottom-right", "window") else 0)  # (Sq, Sk)
    if kind == "window":
        keep = keep & (j >= i + Sk - Sq - rng.randint(0, 300))
    elif kind == "documents":
        cuts = torch.tensor(sorted(rng.sample(range(1, Sk), min(3, Sk - 1))) or [Sk])
        doc_k = torch.bucketize(torch.arange(Sk), cuts, right=True)
        doc_q = torch.bucketize(torch.arange(Sq) * Sk // Sq, cuts, right=True)
        keep = doc_q.view(Sq, 1) == doc_k.view(1, Sk)
    elif kind == "prefix":
        keep = keep | (j < rng.randint(0, Sk))
    keep = keep.expand(B, 1, Sq, Sk).clone()
    if kind == "holes":
        keep[0, 0, rng.randrange(Sq), rng.randrange(Sk)] = False
    left = rng.random() < 0.5
    for b in range(B):
        n = rng.randint(0, Sk // 2)
        (keep[b, :, :, :n] if left else keep[b, :, :, Sk - n:]).fill_(False)
    if rng.random() < 0.3:
        keep = keep.expand(B, Hq, Sq, Sk).clone()  # one copy per head
    return keep if rng.random() < 0.5 else as_bias(keep, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_random_structured_masks_hold_the_rule(dtype):
    """Fresh random structured masks (_random_mask) on random sizes, grouped heads, one or two threads: forward and
    gradients against the float64 oracle (calls whose every row sees at most one key are drawn again: their dQ is
    exactly 0 and the rule's relative tolerance with it)."""
    import random

    rng = random.Random(torch.initial_seed())
    done = 0
    while done < 12:
        B, Hkv = rng.choice([1, 2, 3]), rng.choice([1, 2])
        Hq, Sq, Sk = Hkv * rng.choice([1, 2]), rng.choice([7, 64, 65, 130, 300]), rng.choice([9, 64, 200, 513])
        mask = _random_mask(rng, B, Hq, Sq, Sk, dtype)
        if int((mask if mask.dtype == torch.bool else mask == 0).sum(-1).max()) <= 1:
            continue
        q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, rng.choice([16, 40, 64]), dtype)
        with torch_threads(rng.choice([1, 2])):
            _assert_fwd_bwd_rule(q, k, v, mask, dtype)
        done += 1


_PLANT = r"""
import sys, torch
sys.path.insert(0, "tests")
from test_mask_band import _assert_fwd_bwd_rule, _qkv, as_bias, band_of, edged_mask, keep_mask
holes = keep_mask(2, 96, 96, "causal", "none")
holes[1, 0, 60, 5:9] = False  # holes in one row
print("read as", repr(band_of(as_bias(holes, torch.float32))))
for name, keep in (("holes", holes), ("window", edged_mask("window", 1, 1100, 1100))):  # past one key tile
    q, k, v = _qkv(keep.shape[0], 2, 2, keep.shape[2], keep.shape[3], 32, torch.float32)
    try:
        _assert_fwd_bwd_rule(q, k, v, keep, torch.float32)
        print(name, "rule held")
    except AssertionError as e:
        print(name, "rule failed:", str(e)[:200])
"""


@pytest.mark.parametrize("plant", ["", "band_rows", "mask_keys"])
def test_planted_mask_bugs_fail_the_rule(plant):
    """FASTATTN_CPU_PLANT=band_rows compares rows on their -inf tails only, so a causal mask with holes is read as
    plain causal; =mask_keys counts a -inf run ending inside a 64-key chunk to the chunk's end (rows lose visible
    keys). The oracle check must fail on the masks each plant breaks; without a plant both hold (and the mask with
    holes is no band)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTATTN_CPU_PLANT=plant)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PLANT], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("read as 'causal'" if plant == "band_rows" else "read as ''") in r.stdout, r.stdout
    # Each plant breaks both masks (band_rows reads the window, -inf past the diagonal, as plain causal too; the mask
    # with holes, no band, gets ranges, which mask_keys cuts short)
    for name in ("holes", "window"):
        assert (f"{name} rule failed" if plant else f"{name} rule held") in r.stdout, r.stdout
