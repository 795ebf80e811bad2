"""Public surfaces: SDPA compatibility, bad input, dispatch and explain, empty and fully masked inputs, kvcache."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.dispatch import BackendUnavailableError

from support.oracle import assert_rule, oracle_attention


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------- SDPA surface matches torch's own function
@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa"])
@pytest.mark.parametrize("kind", ["none", "causal", "bool2d", "float4d", "bool_kpad", "gqa", "3d"])
def test_sdpa_surface_matches_torch(backend, kind):
    B, H, Sq, Sk, D = 2, 4, 17, 33, 40
    q, k, v = rnd(B, H, Sq, D), rnd(B, H, Sk, D), rnd(B, H, Sk, D)
    kw = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool2d":
        kw["attn_mask"] = torch.rand(Sq, Sk) > 0.2
        kw["attn_mask"][:, 0] = True  # torch's result for all-masked rows differs by version; keep rows non-empty
    elif kind == "float4d":
        kw["attn_mask"] = rnd(B, H, Sq, Sk)
    elif kind == "bool_kpad":
        m = torch.ones(B, 1, 1, Sk, dtype=torch.bool)
        m[0, ..., 20:] = False
        kw["attn_mask"] = m
    elif kind == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = True
    elif kind == "3d":
        q, k, v = q[0], k[0], v[0]
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    got = fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero_output_and_grad():
    B, H, Sq, Sk, D = 1, 2, 5, 7, 16
    for backend in ("reference", "sdpa", "auto"):
        q, k, v = (rnd(B, H, S, D).requires_grad_() for S in (Sq, Sk, Sk))
        m = torch.ones(B, H, Sq, Sk, dtype=torch.bool)
        m[:, :, 2] = False  # query row 2 sees nothing
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m, backend=backend)
        assert torch.isfinite(out).all() and (out[:, :, 2] == 0).all(), backend
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all(), backend
        assert (q.grad[:, :, 2] == 0).all(), backend


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_zero_length_sequences(backend):
    q, k, v = rnd(2, 3, 0, 16), rnd(2, 3, 5, 16), rnd(2, 3, 5, 8)
    assert fastattn.scaled_dot_product_attention(q, k, v, backend=backend).shape == (2, 3, 0, 8)
    q, k, v = rnd(2, 3, 4, 16).requires_grad_(), rnd(2, 3, 0, 16), rnd(2, 3, 0, 8)
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, 4, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    out = fastattn.flash_attn_func(rnd(1, 0, 2, 16), rnd(1, 3, 2, 16), rnd(1, 3, 2, 16), backend=backend)
    assert out.shape == (1, 0, 2, 16)


# ---------------------------------------------------------------- bad input: clear errors naming the argument
BAD = [
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4), rnd(2, 3, 4, 5)[0, 0], rnd(2, 3, 4)), ValueError, "key"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(3, 3, 4, 8), rnd(3, 3, 4, 8)), ValueError, "batch"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 7), rnd(2, 3, 4, 8)), ValueError, "head dim"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 2, 4, 8), rnd(2, 2, 4, 8), enable_gqa=True), ValueError, "multiple"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 4, 4, 8), rnd(2, 2, 4, 8), rnd(2, 2, 4, 8)), ValueError, "enable_gqa"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 5, 8), rnd(2, 3, 6, 8)), ValueError, "sequence length"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 8, dtype=torch.float16), rnd(2, 3, 4, 8)), TypeError, "dtype"),
    (lambda: fastattn.scaled_dot_product_attention(torch.ones(2, 3, 4, 8, dtype=torch.int64), rnd(2, 3, 4, 8), rnd(2, 3, 4, 8)), TypeError, "floating"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), attn_mask=torch.ones(3, 5, 4, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), attn_mask=torch.ones(4, 4, dtype=torch.int32)), TypeError, "attn_mask"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), dropout_p=-0.1), ValueError, "dropout_p"),
    (lambda: fastattn.scaled_dot_product_attention([1], rnd(2, 3, 4, 8), rnd(2, 3, 4, 8)), TypeError, "query"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), rnd(2, 3, 4, 8), backend="nope"), ValueError, "unknown backend"),
    (lambda: fastattn.flash_attn_func(rnd(2, 4, 3, 8), rnd(2, 4, 2, 8), rnd(2, 4, 2, 8)), ValueError, "multiple"),
    (lambda: fastattn.flash_attn_func(rnd(2, 4, 3, 8), rnd(2, 4, 3, 8), rnd(2, 4, 3, 8), window_size=(-2, 0)), ValueError, "window_size"),
    (lambda: fastattn.flash_attn_func(rnd(2, 4, 3, 8), rnd(2, 4, 3, 8), rnd(2, 4, 3, 8), alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes"),
    (lambda: fastattn.flash_attn_varlen_func(rnd(10, 2, 8), rnd(10, 2, 8), rnd(10, 2, 8), torch.tensor([0, 4, 10]), torch.tensor([0, 4, 10], dtype=torch.int32), 6, 6), ValueError, "cu_seqlens_q"),
    (lambda: fastattn.flash_attn_varlen_func(rnd(10, 2, 8), rnd(10, 2, 8), rnd(10, 2, 8), torch.tensor([0, 4, 11], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32), 6, 6), ValueError, "cu_seqlens_q"),
    (lambda: fastattn.flash_attn_varlen_func(rnd(10, 2, 8), rnd(10, 2, 8), rnd(10, 2, 8), torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 5, 10], dtype=torch.int32), 6, 6), ValueError, "non-decreasing"),
    (lambda: fastattn.flash_attn_varlen_func(rnd(10, 2, 8), rnd(10, 2, 8), rnd(10, 2, 8), torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32), 3, 6), ValueError, "max_seqlen"),
    (lambda: fastattn.flash_attn_with_kvcache(rnd(2, 1, 2, 8), rnd(2, 4, 2, 8), rnd(2, 4, 2, 8), k=rnd(2, 1, 2, 8), v=rnd(2, 1, 2, 8), cache_seqlens=torch.tensor([4, 1], dtype=torch.int32)), ValueError, "capacity"),
    (lambda: fastattn.flash_attn_with_kvcache(rnd(2, 1, 2, 8), rnd(3, 4, 2, 8), rnd(3, 4, 2, 8), cache_seqlens=torch.tensor([1, 1], dtype=torch.int32), cache_batch_idx=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cache_batch_idx"),
    (lambda: fastattn.flash_attn_with_kvcache(rnd(2, 1, 2, 8), rnd(4, 2, 2, 8), rnd(4, 2, 2, 8), cache_seqlens=1, block_table=torch.tensor([[0, 5], [1, 2]], dtype=torch.int32)), ValueError, "block_table"),
    # issue 16: named errors instead of schema errors, bare TypeErrors, silent truncation or one backend refusing
    (lambda: fastattn.flash_attn_func(rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), softcap=float("nan")), ValueError, "softcap"),
    (lambda: fastattn.flash_attn_func(rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), softcap="1"), TypeError, "softcap"),
    (lambda: fastattn.flash_attn_func(rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), window_size=(2 ** 63, 0)), ValueError, "window_size"),
    (lambda: fastattn.flash_attn_func(rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), rnd(1, 4, 2, 8), window_size=(2.5, 0)), TypeError, "window_size"),
    (lambda: fastattn.flash_attn_varlen_func(rnd(10, 2, 8), rnd(10, 2, 8), rnd(10, 2, 8), torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32), 6.5, 6), TypeError, "max_seqlen_q"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), dropout_p=1 - 1e-9, backend="reference"), ValueError, "rounds to 1"),
    # sparse / mkldnn inputs: named, not a RuntimeError from deep inside ("unsupported memory format option")
    (lambda: fastattn.scaled_dot_product_attention(rnd(1, 2, 4, 8).to_sparse(), rnd(1, 2, 4, 8), rnd(1, 2, 4, 8)), TypeError, "query must be a dense"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), rnd(1, 2, 4, 8).to_mkldnn()), TypeError, "value must be a dense"),
    (lambda: fastattn.flash_attn_func(rnd(1, 4, 2, 8), rnd(1, 4, 2, 8).to_sparse(), rnd(1, 4, 2, 8)), TypeError, "k must be a dense"),
    # named before any value is read or any tensor is built from it
    (lambda: fastattn.flash_attn_varlen_func(rnd(10, 2, 8), rnd(10, 2, 8), rnd(10, 2, 8), torch.tensor([0, 4, 10], dtype=torch.int32, device="meta"), torch.tensor([0, 4, 10], dtype=torch.int32), 6, 6), ValueError, "cu_seqlens_q must be on q's device cpu"),
    (lambda: fastattn.flash_attn_with_kvcache(rnd(2, 1, 2, 8), rnd(2, 4, 2, 8), rnd(2, 4, 2, 8), cache_seqlens=2 ** 31), ValueError, "cache_seqlens=2147483648"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), scale="0.3"), TypeError, "scale must be a real number"),
    (lambda: fastattn.scaled_dot_product_attention(rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), rnd(1, 2, 4, 8), scale=float("inf")), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("n", range(len(BAD)))
def test_bad_input_errors(n):
    fn, exc, needle = BAD[n]
    with pytest.raises(exc) as ei:
        fn()
    assert needle in str(ei.value), str(ei.value)


def test_numpy_scalars_are_numbers():
    """scale and dropout_p as NumPy scalars, as PyTorch's function takes them."""
    np = pytest.importorskip("numpy")
    q = rnd(1, 2, 5, 8)
    want = fastattn.scaled_dot_product_attention(q, q, q, scale=float(np.float32(0.3)))
    assert torch.equal(fastattn.scaled_dot_product_attention(q, q, q, scale=np.float32(0.3)), want)
    assert fastattn.scaled_dot_product_attention(q, q, q, dropout_p=np.float64(0.1)).shape == q.shape


def test_kvcache_rotary_rows_past_cos_refused():
    """A causal call with more query rows than new keys rotates q at positions up to cache_seqlens + Sq - 1: past
    rotary_cos's rows they are refused by name (it was a bare IndexError), the cache untouched."""
    kc, vc = rnd(1, 8, 2, 8), rnd(1, 8, 2, 8)
    kc0 = kc.clone()
    with pytest.raises(ValueError, match="past rotary_cos/rotary_sin's 8 positions"):
        fastattn.flash_attn_with_kvcache(rnd(1, 2, 2, 8), kc, vc, k=rnd(1, 1, 2, 8), v=rnd(1, 1, 2, 8),
                                         rotary_cos=torch.ones(8, 4), rotary_sin=torch.zeros(8, 4),
                                         cache_seqlens=torch.tensor([7], dtype=torch.int32), causal=True)
    assert torch.equal(kc, kc0)


def test_strided_cu_seqlens_and_alibi_are_accepted():
    """Non-contiguous cu_seqlens and alibi_slopes (views) are copied by the Python layer, not refused by the ops."""
    q, k, v = rnd(10, 2, 16), rnd(10, 2, 16), rnd(10, 2, 16)
    cu = torch.tensor([0, 0, 4, 4, 10, 10], dtype=torch.int32)[::2]  # (3,) view with stride 2: [0, 4, 10]
    slopes = torch.tensor([0.5, 9.0, 0.25, 9.0])[::2]  # (2,) view with stride 2
    assert not cu.is_contiguous() and not slopes.is_contiguous()
    want = fastattn.flash_attn_varlen_func(q, k, v, cu.contiguous(), cu.contiguous(), 6, 6, causal=True,
                                           alibi_slopes=slopes.contiguous(), backend="reference")
    for backend in [b for b in ("cpu", "reference") if not fastattn.BACKENDS[b].unavailable()]:
        got = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True, alibi_slopes=slopes, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dispatch: explicit, context, env, explain
def test_explicit_backend_that_cannot_run_raises_with_reasons():
    q = rnd(1, 2, 4, 8)
    with pytest.raises(BackendUnavailableError) as ei:  # sdpa declares no softcap
        fastattn.flash_attn_func(q, q, q, softcap=2.0, backend="sdpa")
    assert "softcap not supported" in str(ei.value)
    with pytest.raises(BackendUnavailableError) as ei:
        fastattn.scaled_dot_product_attention(q, q, q, backend="cuda")
    assert "cuda" in str(ei.value)


def test_use_backend_context_and_env(monkeypatch):
    q = rnd(1, 2, 4, 8)
    calls = []
    ref = fastattn.get_backend("reference")
    orig = ref.forward
    monkeypatch.setattr(ref, "forward", lambda p: calls.append(1) or orig(p))
    with fastattn.use_backend("reference"):
        fastattn.scaled_dot_product_attention(q, q, q)
    assert calls == [1]
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    fastattn.scaled_dot_product_attention(q, q, q)
    assert calls == [1, 1]
    with pytest.raises(ValueError):
        with fastattn.use_backend("bogus"):
            pass


def test_explain_lists_every_backend_with_reasons():
    q = rnd(1, 2, 4, 8)
    ex = fastattn.explain(q, q, q, is_causal=True)
    text = str(ex)
    assert ex.chosen in fastattn.BACKENDS
    for name in fastattn.BACKENDS:
        assert name in text
    assert "cuda" in ex.refused  # no GPU tensors here
    ex = fastattn.explain(q, q, q, backend="reference")
    assert ex.chosen == "reference"


def test_auto_prefers_fused_cpu_backend_when_built():
    q = rnd(1, 2, 80, 16)  # not a tiny call, which auto leaves to sdpa (test_dispatch.py)
    ex = fastattn.explain(q, q, q)
    if not fastattn.get_backend("cpu").unavailable():
        assert ex.chosen == "cpu", str(ex)
    else:
        assert ex.chosen == "sdpa", str(ex)


def test_info_runs_and_reports_backends():
    r = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(fastattn.__file__))})
    assert r.returncode == 0, r.stderr
    for name in fastattn.BACKENDS:
        assert name in r.stdout
    assert "torch" in r.stdout and "C++ ops" in r.stdout and "lean path" in r.stdout


# ---------------------------------------------------------------- kv cache (generic path)
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_append_and_attend(paged):
    B, Hq, Hkv, D, cap, snew = 3, 4, 2, 16, 24, 2
    lens = torch.tensor([0, 5, 17], dtype=torch.int32)
    q = rnd(B, snew, Hq, D)
    k_new, v_new = rnd(B, snew, Hkv, D), rnd(B, snew, Hkv, D)
    kc, vc = rnd(B, cap, Hkv, D), rnd(B, cap, Hkv, D)
    kc0, vc0 = kc.clone(), vc.clone()
    if paged:  # pages of 8 tokens, shuffled physical order
        page, nb = 8, cap // 8
        perm = torch.randperm(B * nb)
        block_table = perm.view(B, nb).int()
        kp = torch.empty(B * nb, page, Hkv, D)
        vp = torch.empty(B * nb, page, Hkv, D)
        kp[perm] = kc.reshape(B * nb, page, Hkv, D)  # (B, cap, H, D) -> (B*nb, page, H, D)
        vp[perm] = vc.reshape(B * nb, page, Hkv, D)
        out = fastattn.flash_attn_with_kvcache(q, kp, vp, k=k_new, v=v_new, cache_seqlens=lens, causal=True,
                                               block_table=block_table)
        kc = kp[perm].reshape(B, cap, Hkv, D)
        vc = vp[perm].reshape(B, cap, Hkv, D)
    else:
        out = fastattn.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=lens, causal=True)
    for b in range(B):
        n = int(lens[b])
        # appended rows are the new tokens; nothing else changed
        assert torch.equal(kc[b, n:n + snew], k_new[b]) and torch.equal(vc[b, n:n + snew], v_new[b])
        keep = torch.ones(cap, dtype=torch.bool)
        keep[n:n + snew] = False
        assert torch.equal(kc[b, keep], kc0[b, keep]) and torch.equal(vc[b, keep], vc0[b, keep])
        qb, kb, vb = (t[b:b + 1, :L].transpose(1, 2) for t, L in ((q, snew), (kc, n + snew), (vc, n + snew)))
        ref = oracle_attention(qb, kb, vb, scale=D ** -0.5, window=(-1, 0), bottom_right=True)
        assert_rule(f"out[{b}]", out[b:b + 1].transpose(1, 2), ref, None, torch.float32)


def test_readme_feature_table_matches_declarations():
    from fastattn.info import feature_table

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    # The devices row differs under TRITON_INTERPRET=1 (triton then also declares cpu); compare the rest.
    for row in feature_table().splitlines():
        if not row.startswith("| devices"):
            assert row in text, f"README's feature table is stale ({row!r}): paste `python -m fastattn.info --markdown`"


@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu"])
def test_huge_window_means_unlimited(backend):
    """window_size entries up to 2**63 - 1 are accepted and see everything (no int64 overflow in any backend)."""
    if fastattn.BACKENDS[backend].unavailable():
        pytest.skip(f"backend {backend} not available here")
    q, k, v = rnd(1, 6, 2, 8), rnd(1, 9, 2, 8), rnd(1, 9, 2, 8)
    want = fastattn.flash_attn_func(q, k, v, backend=backend)
    for window in ((2 ** 63 - 1, 2 ** 63 - 1), (2 ** 62, -1)):
        torch.testing.assert_close(fastattn.flash_attn_func(q, k, v, window_size=window, backend=backend), want,
                                   rtol=0, atol=0)
