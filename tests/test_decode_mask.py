"""The CPU split-KV decode kernel with a dense call's mask (fastattn::decode_fwd's attn_bias, csrc/cpu/decode.cpp):
the op against the float64 oracle (bool key padding, per-head float biases with -inf, rows with no visible key,
softcap, ALiBi, windows, grouped-query heads, key splits, both cache layouts), NaN and bad input, and the SDPA
surface's masked steps on the decode kernel (full path, lean path, torch.compile)."""
import pytest
import torch

import fastattn
from fastattn import ops
from support.oracle import assert_rule, lse_reference, oracle_attention

pytestmark = pytest.mark.skipif(not ops.loaded() or not ops.has_kernel("CPU", "decode_fwd"),
                                reason="C++ CPU decode kernel not built in fastattn._C")
NEG_INF = float("-inf")


def _bias(kind, B, Hq, Sq, S, dtype, g):
    """An additive bias (B, Hq, Sq, S) in dtype, stride 0 where it broadcasts: "padding" (a bool key-padding row,
    left padding in batch 1, right in batch 2, broadcast over heads and tokens), "float" (random values, a third
    of them -inf, per head and token), "per row" (one value a row, broadcast over the keys), "empty" (padding, with
    every key of batch 0 hidden)."""
    if kind == "float":
        b = torch.randn(B, Hq, Sq, S, generator=g)
        b[torch.rand(B, Hq, Sq, S, generator=g) < 0.33] = NEG_INF
        return b.to(dtype)
    if kind == "per row":  # one value per (batch, head, token), broadcast over the keys (stride 0); one row -inf
        b = torch.randn(B, Hq, Sq, 1, generator=g)
        b[0, -1, -1] = NEG_INF
        return b.to(dtype).expand(B, Hq, Sq, S)  # (B, Hq, Sq, 1) -> (B, Hq, Sq, S)
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)  # (B, 1, 1, S): True = a real key
    keep[1 % B, ..., : S // 3] = False
    keep[2 % B, ..., S - S // 4:] = False
    if kind == "empty":
        keep[0] = False
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, NEG_INF)
    return bias.expand(B, Hq, Sq, S)  # (B, 1, 1, S) -> (B, Hq, Sq, S), stride 0 over heads and tokens


CASES = {  # (B, Hq, Hkv, Sq, S, D, mask kind, window, softcap, alibi, splits, kv_bhsd)
    "mha_q1_padding": (3, 4, 4, 1, 300, 64, "padding", (-1, -1), 0.0, False, 0, True),
    "gqa_q1_padding_splits": (3, 6, 2, 1, 700, 64, "padding", (-1, -1), 0.0, False, 3, True),
    "gqa_q3_float_causal": (2, 8, 2, 3, 130, 40, "float", (-1, 0), 0.0, False, 0, True),
    "mqa_q2_float_window_softcap_alibi": (2, 4, 1, 2, 257, 64, "float", (50, 0), 4.0, True, 2, False),
    "mha_q4_empty_rows": (3, 2, 2, 4, 65, 32, "empty", (-1, -1), 0.0, False, 0, False),
    # one bias row shared by rows whose visible keys in a block differ (causal over 4 tokens, a window of 70)
    "gqa_q4_padding_window": (3, 4, 2, 4, 200, 32, "padding", (70, 0), 0.0, False, 0, True),
    "gqa_q2_per_row_splits": (2, 4, 2, 2, 300, 64, "per row", (-1, -1), 0.0, False, 2, True),
    "gqa_q1_float_splits_views": (2, 8, 4, 1, 1000, 128, "float", (-1, -1), 0.0, False, 4, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_op_with_bias_matches_oracle(case, dtype):
    B, Hq, Hkv, Sq, S, D, kind, window, softcap, alibi, splits, bhsd = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    bias = _bias(kind, B, Hq, Sq, S, dtype, g)
    slopes = torch.rand(Hq, generator=g) * 0.1 if alibi else None
    scale = D ** -0.5
    kc, vc = (k, v) if bhsd else (k.transpose(1, 2), v.transpose(1, 2))  # (B, S, Hkv, D) views: the cache layout
    out, lse = torch.ops.fastattn.decode_fwd(q, kc, vc, None, None, None, scale, window[0], window[1], softcap,
                                             slopes, splits, bhsd, bias)
    kw = dict(scale=scale, mask=bias, window=window, bottom_right=True, softcap=softcap, alibi_slopes=slopes)
    ref = oracle_attention(q, k, v, **kw)
    base = None if dtype is torch.float32 else oracle_attention(q, k, v, dtype=dtype, **kw)
    assert_rule("out", out, ref, base, dtype)
    assert_rule("lse", lse, lse_reference(q, k, scale, window, softcap, slopes, bias=bias), None, torch.float32)
    if kind == "empty":  # every key of batch 0 hidden: out 0, lse +inf (the fwd op's convention)
        assert (out[0] == 0).all() and (lse[0] == float("inf")).all()


def test_nan_in_the_bias_reaches_only_its_row():
    """A NaN bias entry makes its row NaN (PyTorch adds it to the score), whichever split holds it; other rows
    sharing the key do not see it (the bias is per row here)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 2, 32, generator=g), torch.randn(2, 2, 600, 32, generator=g), torch.randn(2, 2, 600, 32)
    bias = torch.zeros(2, 4, 2, 600)
    bias[1, 3, 1, 450] = float("nan")
    for splits in (1, 3):
        out, lse = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, 0.2, -1, -1, 0.0, None, splits, True, bias)
        assert out[1, 3, 1].isnan().all() and lse[1, 3, 1].isnan()
        out[1, 3, 1] = 0
        assert not out.isnan().any()


BAD_BIAS = {
    "shape": (lambda b: b[..., :-1], "expanded to (B, Hq, Sq, Smax)"),
    "heads": (lambda b: b[:, :1], "expanded to (B, Hq, Sq, Smax)"),
    "dtype": (lambda b: b.double(), "attn_bias must be"),
    "rank": (lambda b: b[0], "expanded to (B, Hq, Sq, Smax)"),
}


@pytest.mark.parametrize("name", list(BAD_BIAS))
def test_bad_bias_raises(name):
    """The op checks the bias itself (compile skips the Python checks): a clear error naming attn_bias."""
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16)
    bias = torch.zeros(2, 4, 1, 40)
    change, msg = BAD_BIAS[name]
    with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.fastattn.decode_fwd(q, k, k, None, None, None, 0.25, -1, -1, 0.0, None, 0, True, change(bias))


def test_bias_refused_with_a_paged_cache_or_batch_index():
    q, kc = torch.randn(2, 4, 1, 16), torch.randn(4, 16, 2, 16)  # paged: (num_blocks, page, Hkv, D)
    bias = torch.zeros(2, 4, 1, 32)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dense cache"):
        torch.ops.fastattn.decode_fwd(q, kc, kc, None, bt, None, 0.25, -1, -1, 0.0, None, 0, False, bias)
    idx = torch.tensor([1, 0], dtype=torch.int32)
    dense = torch.randn(2, 32, 2, 16)
    with pytest.raises(RuntimeError, match="dense cache"):
        torch.ops.fastattn.decode_fwd(q, dense, dense, None, None, idx, 0.25, -1, -1, 0.0, None, 0, False, bias)


def test_opcheck_with_bias():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16)
    bias = torch.zeros(2, 1, 1, 40).masked_fill(torch.rand(2, 1, 1, 40) < 0.3, NEG_INF).expand(2, 4, 1, 40)
    args = (q, k, k, None, None, None, 0.25, -1, -1, 0.0, None, 2, True, bias)
    torch.library.opcheck(torch.ops.fastattn.decode_fwd.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_masked_step_takes_the_decode_kernel(dtype, mask_kind, monkeypatch):
    """A masked one-token step through the SDPA surface (backend="cpu") runs on the decode kernel with its mask,
    matches the oracle, and its replays through the lean path give the same bits (fresh inputs each time)."""
    calls = []
    kernel = fastattn.BACKENDS["cpu"].decode
    run, lean = kernel.run, kernel.lean
    monkeypatch.setattr(kernel, "run", lambda c: calls.append(c.attn_bias is not None) or run(c))
    monkeypatch.setattr(kernel, "lean", lambda c: (lambda r: r and r._replace(
        run=lambda *t: calls.append(len(t) == 4) or r.run(*t)))(lean(c)))
    monkeypatch.setattr(fastattn.dispatch, "_CHOICES", {})
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        q = torch.randn(3, 8, 1, 64, generator=g).to(dtype)
        k, v = (torch.randn(3, 2, 200 + step, 64, generator=g).to(dtype) for _ in range(2))
        keep = torch.rand(3, 1, 1, 200 + step, generator=g) > 0.3  # (B, 1, 1, Sk)
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, NEG_INF)
        ex = fastattn.explain(q, k, v, attn_mask=mask, enable_gqa=True, backend="cpu")
        assert ex.decode is not None and ex.decode.kernel == "cpu.decode_fwd", str(ex)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="cpu")
        ref = oracle_attention(q, k, v, scale=0.125, mask=keep)
        base = None if dtype is torch.float32 else oracle_attention(q, k, v, scale=0.125, mask=keep, dtype=dtype)
        assert_rule("out", out, ref, base, dtype)
        again = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="cpu")
        assert torch.equal(out, again)
    assert calls and all(calls), calls  # every call on the decode kernel, each with its mask


def test_compiled_masked_step_matches_eager():
    """torch.compile(fullgraph=True) traces a masked step onto the decode op (its fake takes attn_bias)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 1, 32, generator=g), torch.randn(2, 4, 90, 32, generator=g), torch.randn(2, 4, 90, 32)
    mask = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    mask[1, ..., :30] = False

    def step(q, k, v, mask):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    torch.testing.assert_close(got, step(q, k, v, mask), rtol=0, atol=0)
