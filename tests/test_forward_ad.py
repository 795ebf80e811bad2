"""Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): the fused kernels have no forward-mode rule and
gave a zero tangent, silently. Under forward AD `auto` now takes a backend built from differentiable torch ops
(`reference`), the lean paths stand aside, and a fused backend requested by name refuses with the reason.

Tangents are checked against the float64 oracle's own jvp, under the fp32 rule."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastattn
from support.oracle import assert_rule, oracle_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(B=2, H=2, Sq=5, Sk=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for S in (Sq, Sk, Sk))
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    mask = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
    return (q, k, v), (tq, tk, tv), mask


def _oracle_jvp(primals, tangents, **kw):
    f = lambda q, k, v: oracle_attention(q, k, v, **kw)  # noqa: E731 (float64 inside)
    return torch.func.jvp(f, tuple(t.double() for t in primals), tuple(t.double() for t in tangents))[1]


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_jvp(masked):
    primals, tangents, mask = _inputs()
    mask = mask if masked else None
    fastattn.scaled_dot_product_attention(*primals, attn_mask=mask)  # the lean path learns this call's route
    f = lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    _, got = torch.func.jvp(f, primals, tangents)
    want = _oracle_jvp(primals, tangents, scale=8 ** -0.5, mask=mask)
    assert got.abs().sum() > 0, "zero tangent: a fused kernel ran under forward AD"
    assert_rule("sdpa tangent", got, want, None, torch.float32)


def test_flash_dual_level_and_explain():
    (q, k, v), (tq, tk, tv), _ = _inputs(Sq=6, Sk=9)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) -> (B, S, H, D) views
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d.transpose(1, 2)) for t, d in ((qb, tq), (kb, tk), (vb, tv))]
        out = fastattn.flash_attn_func(*duals, causal=True)
        got = fwAD.unpack_dual(out).tangent
        ex = fastattn.explain(*[d.transpose(1, 2) for d in duals], is_causal=True)
        assert ex.chosen == "reference"
        assert any("forward ad" in " ".join(r) for r in ex.refused.values()), str(ex)
    want = _oracle_jvp((q, k, v), (tq, tk, tv), scale=8 ** -0.5, window=(-1, 0), bottom_right=True)
    assert got is not None
    assert_rule("flash tangent", got.transpose(1, 2), want, None, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
def test_requested_fused_backend_refuses(backend):
    if fastattn.get_backend(backend).unavailable():
        pytest.skip(f"{backend} is not available here: {fastattn.get_backend(backend).unavailable()}")
    primals, tangents, _ = _inputs()
    f = lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, backend=backend)  # noqa: E731
    with pytest.raises(fastattn.BackendUnavailableError, match="forward ad"):
        torch.func.jvp(f, primals, tangents)


def test_kvcache_jvp():
    """A decode step (one query against a dense cache): no split-KV kernel under forward AD."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 2, 8, generator=g)  # (B, Sq, H, D)
    kc, vc = (torch.randn(2, 10, 2, 8, generator=g) for _ in range(2))
    lens = torch.tensor([4, 10], dtype=torch.int32)
    tq = torch.randn_like(q)
    fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)  # the lean path learns the route
    f = lambda q: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)  # noqa: E731
    _, got = torch.func.jvp(f, (q,), (tq,))
    vis = torch.arange(10).view(1, 1, 1, 10) < lens.view(2, 1, 1, 1)  # (B, 1, 1, Sk) valid keys
    want = _oracle_jvp((q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)),
                       (tq.transpose(1, 2), torch.zeros_like(kc).transpose(1, 2), torch.zeros_like(vc).transpose(1, 2)),
                       scale=8 ** -0.5, mask=vis)
    assert got.abs().sum() > 0
    assert_rule("kvcache tangent", got.transpose(1, 2), want, None, torch.float32)


FWD_AD = [n for n, b in fastattn.BACKENDS.items() if "forward_ad" in b.features and "cpu" in b.devices]


@pytest.mark.parametrize("backend", FWD_AD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_declared_backends_jvp(backend, dtype):
    """The forward_ad declaration (README feature table): the tangent matches the oracle's on each backend that
    declares it, with causality bottom-right, a window and GQA."""
    if fastattn.get_backend(backend).unavailable():
        pytest.skip(f"{backend} is not available here: {fastattn.get_backend(backend).unavailable()}")
    (q, k, v), (tq, tk, tv), _ = _inputs(Sq=6, Sk=11)
    k, v, tk, tv = (t[:, :1] for t in (k, v, tk, tv))  # one kv head: GQA
    primals, tangents = (tuple(t.to(dtype) for t in ts) for ts in ((q, k, v), (tq, tk, tv)))
    b = lambda t: t.transpose(1, 2)  # noqa: E731  (B, H, S, D) <-> (B, S, H, D) views
    f = lambda q, k, v: b(fastattn.flash_attn_func(b(q), b(k), b(v), causal=True, window_size=(3, 0),  # noqa: E731
                                                   backend=backend))
    _, got = torch.func.jvp(f, primals, tangents)
    kw = dict(scale=8 ** -0.5, window=(3, 0), bottom_right=True)
    rep = lambda t: t.expand(-1, 2, -1, -1)  # noqa: E731  (B, 1, S, D) -> (B, 2, S, D)
    want = _oracle_jvp((q, rep(k), rep(v)), (tq, rep(tk), rep(tv)), **kw)
    # the same jvp computed naively in the inputs' dtype: the rule's baseline
    base = torch.func.jvp(lambda q, k, v: oracle_attention(q, rep(k), rep(v), dtype=dtype, **kw), primals,
                          tangents)[1]
    assert_rule(f"{backend} tangent", got, want, base, dtype)
