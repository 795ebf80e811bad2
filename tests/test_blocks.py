"""The block contract (fastattn/blocks.py, csrc/ops.cpp): one call split into block pairs with global offsets and
merged equals the unsplit call and the float64 oracle, forward and gradients, on every backend that declares
"block"; the merge is safe for empty rows and large logits; bad input is refused clearly."""
import math
import random

import pytest
import torch

import fastattn
from fastattn.blocks import block_backward, block_forward, dropout_rng, merge_, merge_many
from tests.support.blocks import blockwise_backward, blockwise_forward, bounds
from tests.support.oracle import assert_rule, fwd_bwd_inherent, oracle_attention

BLOCK_BACKENDS = [n for n, b in fastattn.BACKENDS.items()
                  if "block" in b.features and "cpu" in b.devices and not b.unavailable()]
# The Triton interpreter is slow: a reduced set there (tests/test_blocks_triton.py has its own, if present).
_FEW = {"triton"}


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------------ merge
def _lse_cat(ls):
    x = torch.stack([torch.where(l == math.inf, -math.inf, l) for l in ls]).double()
    r = torch.logsumexp(x, 0)
    return torch.where(torch.isneginf(r), math.inf, r)


def test_merge_equals_logsumexp_of_the_concatenation():
    n, shape = 4, (2, 3, 50)
    lses = [_rand(*shape, scale=30.0) for _ in range(n)]
    lses[1][0, 0, :5] = math.inf  # rows empty in one block
    for l in lses:
        l[1, 2, 7] = math.inf  # a row empty everywhere
    outs = [_rand(*shape, 8) for _ in range(n)]
    for o, l in zip(outs, lses):
        o[l == math.inf] = 0.0  # the kernels' convention for empty rows
    want_l = _lse_cat(lses)
    w = [torch.exp(l.double() - want_l).nan_to_num(0.0) for l in lses]
    want_o = sum(wi.unsqueeze(-1) * o.double() for wi, o in zip(w, outs))
    acc_o, acc_l = torch.zeros(*shape, 8), torch.full(shape, math.inf)
    for o, l in zip(outs, lses):
        merge_(acc_o, acc_l, o, l)
    many_o, many_l = merge_many(outs, lses)
    for o, l in ((acc_o, acc_l), (many_o, many_l)):
        assert torch.isfinite(o).all()
        assert (l[1, 2, 7] == math.inf) and (o[1, 2, 7] == 0).all()
        fin = torch.isfinite(want_l)
        assert torch.allclose(l[fin].double(), want_l[fin], rtol=0, atol=2e-5 * 30)
        assert torch.allclose(o.double(), want_o, rtol=0, atol=1e-5)


def test_merge_sentinels_large_logits_and_order():
    shape = (1, 1, 6)
    # Columns: acc empty; block empty; both empty; +-1e3 without overflow; equal; -1e3 vs 1e3.
    la = torch.tensor([[[math.inf, 1.0, math.inf, 1e3, 2.0, -1e3]]])
    lb = torch.tensor([[[0.5, math.inf, math.inf, 1e3 - 1, 2.0, 1e3]]])
    oa, ob = torch.ones(*shape, 2), torch.full((*shape, 2), 3.0)
    oa[la == math.inf], ob[lb == math.inf] = 0.0, 0.0
    acc_o, acc_l = oa.clone(), la.clone()
    merge_(acc_o, acc_l, ob, lb)
    assert not torch.isnan(acc_o).any() and not torch.isnan(acc_l).any()
    assert acc_l[0, 0, 2] == math.inf and (acc_o[0, 0, 2] == 0).all()
    assert acc_o[0, 0, 0, 0] == 3.0 and acc_l[0, 0, 0] == 0.5  # empty accumulator takes the block as is
    assert acc_o[0, 0, 1, 0] == 1.0 and acc_l[0, 0, 1] == 1.0  # an empty block changes nothing
    assert torch.isclose(acc_l[0, 0, 3], torch.tensor(1e3 + math.log1p(math.exp(-1))))
    assert torch.isclose(acc_o[0, 0, 4, 0], torch.tensor(2.0)) and torch.isclose(acc_l[0, 0, 4], torch.tensor(2 + math.log(2)))
    assert acc_o[0, 0, 5, 0] == 3.0 and acc_l[0, 0, 5] == 1e3
    # Commutative and associative within fp32 rounding.
    ls = [_rand(2, 2, 40, scale=20.0) for _ in range(3)]
    os_ = [_rand(2, 2, 40, 4) for _ in range(3)]
    r = []
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        o, l = torch.zeros(2, 2, 40, 4), torch.full((2, 2, 40), math.inf)
        for i in order:
            merge_(o, l, os_[i], ls[i])
        r.append((o, l))
    for o, l in r[1:]:
        assert torch.allclose(o, r[0][0], atol=1e-6) and torch.allclose(l, r[0][1], atol=1e-5)


def test_merge_refuses_what_would_be_silently_wrong():
    """bf16 accumulators (every merge rounded) and broadcasting (a one-head block into every head)."""
    o, l = torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), math.inf)
    with pytest.raises(fastattn.InputValueError, match="accumulates in float32"):
        merge_(o.bfloat16(), l.bfloat16(), torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3))
    with pytest.raises(fastattn.InputValueError, match=r"out_b \(1, 1, 3, 4\) == out_acc \(1, 2, 3, 4\)"):
        merge_(o, l, torch.ones(1, 1, 3, 4), torch.zeros(1, 1, 3))


def test_merge_propagates_nan():
    o, l = torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), math.inf)
    merge_(o, l, torch.ones(1, 1, 2, 3), torch.tensor([[[float("nan"), 0.0]]]))
    assert torch.isnan(o[0, 0, 0]).all() and torch.isfinite(o[0, 0, 1]).all()


# -------------------------------------------------------------------------------------------- decomposition
CASES = [
    dict(name="full"),
    dict(name="causal", causal=True),
    dict(name="causal_sq_lt_sk", causal=True, sq=23, sk=61),
    dict(name="window", window_size=(9, 4)),
    dict(name="window_causal_gqa", window_size=(13, -1), causal=True, hkv=1),
    dict(name="alibi_softcap", alibi=True, softcap=8.0, causal=True),
    dict(name="key_padding", pad=True),
    dict(name="gqa_dv", hkv=2, dv=24),
]
DTYPES = [torch.float32, torch.bfloat16]


def _cells():
    for be in BLOCK_BACKENDS:
        for c in CASES:
            for dt in DTYPES:
                if be in _FEW and (dt != torch.float32 or c["name"] not in ("causal", "window")):
                    continue
                if dt not in fastattn.get_backend(be).dtypes:
                    continue
                yield pytest.param(be, c, dt, id=f"{be}-{c['name']}-{str(dt)[6:]}")


def _call(case, dtype, seed):
    rnd = random.Random(seed)
    B, H, D = 2, 4, 32
    hkv, dv = case.get("hkv", H), case.get("dv", D)
    sq, sk = case.get("sq", 47), case.get("sk", 47)
    q, k, v = _rand(B, H, sq, D, dtype=dtype), _rand(B, hkv, sk, D, dtype=dtype), _rand(B, hkv, sk, dv, dtype=dtype)
    kw = dict(scale=D ** -0.5, causal=case.get("causal", False), window_size=case.get("window_size", (-1, -1)),
              softcap=case.get("softcap", 0.0))
    if case.get("alibi"):
        kw["alibi_slopes"] = torch.rand(H) * 0.3
    if case.get("pad"):
        keep = torch.ones(B, sk, dtype=torch.bool)
        keep[0, 30:] = False
        keep[1, :9] = False
        kw["attn_bias"] = torch.zeros(B, 1, 1, sk, dtype=dtype).masked_fill(~keep[:, None, None], -math.inf) \
            .expand(B, H, sq, sk)
    return q, k, v, kw, bounds(sq, rnd.randint(2, 5), rnd), bounds(sk, rnd.randint(2, 5), rnd)


def _oracle(q, k, v, kw, dtype):
    wl, wr = kw["window_size"]
    if kw["causal"]:
        wr = 0
    return oracle_attention(q, k, v, scale=kw["scale"], mask=kw.get("attn_bias"), window=(wl, wr),
                            bottom_right=True, softcap=kw["softcap"], alibi_slopes=kw.get("alibi_slopes"),
                            dtype=dtype)


def _grads(q, k, v, dout, kw, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = _oracle(*leaves, kw, dtype)
    out.backward(dout.to(dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend,case,dtype", list(_cells()))
def test_blocks_equal_the_unsplit_call(backend, case, dtype):
    seed = torch.initial_seed()
    q, k, v, kw, qb, kb = _call(case, dtype, seed)
    print("q bounds", qb, "k bounds", kb)
    out, lse = blockwise_forward(q, k, v, qb, kb, backend=backend, **dict(kw))
    whole_o, whole_l = block_forward(q, k, v, q_start=k.shape[2] - q.shape[2], k_start=0, backend=backend,
                                     **dict(kw))
    dout = _rand(*out.shape, dtype=dtype)
    ref_o, ref_g = _grads(q, k, v, dout, kw, torch.float64)
    base_o, base_g = _grads(q, k, v, dout, kw, dtype)
    assert_rule("out (blocks)", out, ref_o, base_o, dtype)
    assert_rule("out (unsplit)", whole_o, ref_o, base_o, dtype)
    assert_rule("lse blocks vs unsplit", lse, whole_l, None, torch.float32)
    # Backward: every pair against the merged output (rounded once) and lse.
    grads = blockwise_backward(dout, q, k, v, out.to(dtype), lse, qb, kb, backend=backend, **dict(kw))
    attend = lambda q_, k_, v_: _oracle(q_, k_, v_, kw, torch.float64)  # noqa: E731
    inherent = fwd_bwd_inherent(attend, q, k, dout, out.to(dtype), ref_o, kw["scale"])[1:]
    for name, g, r, b, e in zip(("dq", "dk", "dv"), grads, ref_g, base_g, inherent):
        assert_rule(name, g, r, b, dtype, inherent=e)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_backward_adds_into_the_accumulators(backend):
    q, k, v, kw, qb, kb = _call(dict(causal=True), torch.float32, 0)
    out, lse = blockwise_forward(q, k, v, qb, kb, backend=backend, **dict(kw))
    dout = _rand(*out.shape)
    fresh = blockwise_backward(dout, q, k, v, out, lse, qb, kb, backend=backend, **dict(kw))
    init = tuple(torch.randn_like(g) for g in fresh)
    added = blockwise_backward(dout, q, k, v, out, lse, qb, kb, backend=backend,
                               init=tuple(t.clone() for t in init), **dict(kw))
    for g, i, a in zip(fresh, init, added):
        assert torch.allclose(a, g + i, atol=1e-5)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_rows_that_see_no_key(backend):
    """A window far from the block (|off| much larger than the lengths) leaves every row empty: out 0, lse +inf,
    zero gradients — the window must not be clamped as 'wider than the call'."""
    q, k, v = _rand(1, 2, 8, 16), _rand(1, 2, 8, 16), _rand(1, 2, 8, 16)
    o, l = block_forward(q, k, v, q_start=1000, k_start=0, window_size=(100, 0), backend=backend)
    assert (o == 0).all() and (l == math.inf).all()
    dq, dk, dv = block_backward(torch.ones_like(q), q, k, v, torch.zeros_like(q), l, q_start=1000, k_start=0,
                                window_size=(100, 0), backend=backend)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
    # Causal with the block entirely in the past of the queries: fully visible, same as no mask.
    o2, l2 = block_forward(q, k, v, q_start=1000, k_start=0, causal=True, backend=backend)
    o3, l3 = block_forward(q, k, v, q_start=0, k_start=0, backend=backend)
    assert torch.allclose(o2, o3, atol=1e-6) and torch.allclose(l2, l3, atol=1e-6)
    # ... and entirely in the future: every row empty.
    o4, l4 = block_forward(q, k, v, q_start=0, k_start=8, causal=True, backend=backend)
    assert (o4 == 0).all() and (l4 == math.inf).all()


def test_planted_k_start_off_by_one_is_caught():
    """The decomposition check fails when one block's k_start is off by one (the bug class it exists for)."""
    q, k, v, kw, _, _ = _call(dict(causal=True), torch.float64, 0)
    qb, kb = [0, 20, 47], [0, 25, 47]
    good, _ = blockwise_forward(q, k, v, qb, kb, backend="reference", **dict(kw))
    ref = _oracle(q, k, v, kw, torch.float64)
    assert torch.allclose(good.double(), ref, atol=1e-6)
    bad_o = torch.zeros_like(good)
    bad_l = torch.full(good.shape[:3], math.inf)
    for a in range(2):
        rows = slice(qb[a], qb[a + 1])
        for b in range(2):
            cols = slice(kb[b], kb[b + 1])
            o, l = block_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], q_start=qb[a],
                                 k_start=kb[b] + (b == 1), backend="reference", **dict(kw))
            merge_(bad_o[:, :, rows], bad_l[:, :, rows], o, l)
    assert not torch.allclose(bad_o.double(), ref, atol=1e-3)


# ----------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend", [b for b in BLOCK_BACKENDS if "dropout" in fastattn.get_backend(b).features
                                     and b != "reference"])
def test_dropout_is_keyed_on_global_positions(backend):
    """Blocks drop exactly the elements the unsplit call drops: with v = identity the output row i is the dropped,
    rescaled probability row, so equal outputs mean equal keep masks."""
    sq = sk = 40
    q, k = _rand(1, 2, sq, 16), _rand(1, 2, sk, 16)
    v = torch.eye(sk).expand(1, 2, sk, sk).contiguous()
    rng = dropout_rng()
    kw = dict(causal=True, dropout_p=0.3, rng=rng)
    whole, _ = block_forward(q, k, v, q_start=0, k_start=0, backend=backend, **kw)
    qb, kb = [0, 13, 27, 40], [0, 9, 40]
    split, _ = blockwise_forward(q, k, v, qb, kb, backend=backend, **kw)
    assert torch.equal(whole == 0, split == 0)
    assert torch.allclose(whole, split, atol=1e-6)
    other, _ = block_forward(q, k, v, q_start=0, k_start=0, backend=backend, causal=True, dropout_p=0.3,
                             rng=(rng[0] + 1, rng[1]))
    assert not torch.equal(whole == 0, other == 0)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_block_arguments_are_refused():
    q = _rand(2, 2, 8, 16)
    with pytest.raises(ValueError, match="q_start must be an int or an integer tensor of shape \\(2,\\)"):
        block_forward(q, q, q, q_start=torch.zeros(3, dtype=torch.int32), k_start=0)
    with pytest.raises(ValueError, match="k_start and k_start \\+ sequence length"):
        block_forward(q, q, q, q_start=0, k_start=-1)
    with pytest.raises(ValueError, match="q_start and q_start \\+ sequence length"):
        block_forward(q, q, q, q_start=2 ** 31 - 4, k_start=0)
    with pytest.raises(ValueError, match="needs rng"):
        block_forward(q, q, q, q_start=0, k_start=0, dropout_p=0.1)
    with pytest.raises(ValueError, match="dq_acc must be float32"):
        block_backward(q, q, q, q, q, torch.zeros(2, 2, 8), q_start=0, k_start=0, dq_acc=torch.zeros(2, 2, 8, 16,
                       dtype=torch.float64))
    with pytest.raises(ValueError, match="lse must be float32"):
        block_backward(q, q, q, q, q, torch.zeros(2, 2, 7), q_start=0, k_start=0)
    with pytest.raises(TypeError, match="q_start must be an int"):
        block_forward(q, q, q, q_start=1.5, k_start=0)
    if "cpu" in fastattn.BACKENDS and fastattn.ops.loaded():  # the op checks too (compile skips Python checks)
        with pytest.raises(RuntimeError, match="q_start"):
            torch.ops.fastattn.fwd(q, q, q, None, None, None, 0, 0, 0.25, -1, -1, False, 0.0, None, 0.0, 0, 0, False,
                                   torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))


def test_bad_rng_and_start_named():
    q = torch.randn(1, 2, 4, 8)
    for rng in ((1,), "ab", (None, 0)):
        with pytest.raises(fastattn.InputTypeError, match="rng must be a"):
            block_forward(q, q, q, q_start=0, k_start=0, dropout_p=0.1, rng=rng)
    with pytest.raises(fastattn.InputValueError, match=r"q_start \+ sequence length must lie in \[0, 2\*\*31\)"):
        block_forward(q, q, q, q_start=2 ** 70, k_start=0)
