"""torch.compile(fullgraph=True) with dynamic sizes: lengths and batch marked dynamic or made dynamic automatically
(the second distinct size), varlen max_seqlen, a decode loop, and torch.export with a dynamic batch.

Every test counts compilations (torch._dynamo.testing.CompileCounterWithBackend): a per-call Python detail that
specialises on a size (int(), a Python comparison, a counter incremented in traced code) shows as a recompile."""
import pytest
import torch
import torch._dynamo.testing

import fastattn

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# aot_eager traces the ops' fake functions with symbolic sizes (what inductor sees) without compiling kernels.
BACKEND = "aot_eager"


def _counter():
    torch._dynamo.reset()
    return torch._dynamo.testing.CompileCounterWithBackend(BACKEND)


def rnd(*shape):
    return torch.randn(*shape, device=DEV)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["mark_dynamic", "automatic"])
def test_sdpa_dynamic_seqlen(how):
    cnt = _counter()
    fn = torch.compile(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                       backend=cnt, fullgraph=True)
    for S in (17, 23, 40, 64):
        q, k, v = rnd(2, 4, S, 32), rnd(2, 4, S, 32), rnd(2, 4, S, 32)
        if how == "mark_dynamic":
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
        _close(fn(q, k, v), fastattn.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert cnt.frame_count == (1 if how == "mark_dynamic" else 2), cnt.frame_count


def test_sdpa_dynamic_batch_with_mask():
    cnt = _counter()

    def f(q, k, v, m):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m)

    fn = torch.compile(f, backend=cnt, fullgraph=True)
    for B in (2, 3, 5):
        q, k, v = rnd(B, 4, 16, 32), rnd(B, 4, 16, 32), rnd(B, 4, 16, 32)
        m = torch.rand(B, 1, 1, 16, device=DEV) > 0.3
        for t in (q, k, v, m):
            torch._dynamo.mark_dynamic(t, 0)
        _close(fn(q, k, v, m), f(q, k, v, m))
    assert cnt.frame_count == 1, cnt.frame_count


@pytest.mark.parametrize("how", ["mark_dynamic", "automatic"])
def test_flash_attn_func_dynamic_seqlen(how):
    cnt = _counter()
    fn = torch.compile(lambda q, k, v: fastattn.flash_attn_func(q, k, v, causal=True), backend=cnt, fullgraph=True)
    for Sq, Sk in ((9, 20), (13, 31), (30, 47)):
        q, k, v = rnd(2, Sq, 4, 32), rnd(2, Sk, 2, 32), rnd(2, Sk, 2, 32)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(q, 1)
            for t in (k, v):
                torch._dynamo.mark_dynamic(t, 1)
        _close(fn(q, k, v), fastattn.flash_attn_func(q, k, v, causal=True))
    assert cnt.frame_count == (1 if how == "mark_dynamic" else 2), cnt.frame_count


def _varlen_backends():
    out = []
    for name in ("triton", "cpu", "cuda"):
        b = fastattn.BACKENDS[name]
        if b.unavailable() or DEV not in b.devices:
            continue
        # cpu/cuda: csrc/ops.cpp declares max_seqlen_q/k as SymInt (the C++ kernels keep int64_t), so a traced call
        # does not specialise on their values.
        out.append(pytest.param(name))
    return out


@pytest.mark.parametrize("backend", _varlen_backends())
def test_varlen_does_not_specialise_on_max_seqlen(backend):
    cnt = _counter()

    def f(q, k, v, cu, mx):
        return fastattn.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True, backend=backend)

    fn = torch.compile(f, backend=cnt, fullgraph=True)
    for lens in ([5, 9], [7, 12], [3, 20], [11, 17], [2, 25]):
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
        T = sum(lens)
        q, k, v = rnd(T, 4, 32), rnd(T, 4, 32), rnd(T, 4, 32)
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 0)
        _close(fn(q, k, v, cu, max(lens)), f(q, k, v, cu, max(lens)))
    assert cnt.frame_count <= 2, cnt.frame_count


def test_compiled_decode_loop_compiles_at_most_twice():
    """64 decode steps through flash_attn_with_kvcache (append + attention), the cache length a Python int."""
    cnt = _counter()
    B, H, Hkv, D, cap = 2, 4, 2, 32, 80
    kc, vc = torch.zeros(B, cap, Hkv, D, device=DEV), torch.zeros(B, cap, Hkv, D, device=DEV)
    kc_e, vc_e = kc.clone(), vc.clone()

    def step(q, kc, vc, kn, vn, n):
        return fastattn.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=n, causal=True)

    fn = torch.compile(step, backend=cnt, fullgraph=True)
    for n in range(64):
        q, kn, vn = rnd(B, 1, H, D), rnd(B, 1, Hkv, D), rnd(B, 1, Hkv, D)
        out = fn(q, kc, vc, kn, vn, n)
        want = step(q, kc_e, vc_e, kn, vn, n)
        _close(out, want)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    assert cnt.frame_count <= 2, cnt.frame_count


def test_compiled_decode_loop_tensor_seqlens_compiles_once():
    cnt = _counter()
    B, H, D, cap = 2, 4, 32, 70
    kc, vc = torch.zeros(B, cap, H, D, device=DEV), torch.zeros(B, cap, H, D, device=DEV)

    def step(q, kc, vc, kn, vn, lens):
        return fastattn.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens)

    fn = torch.compile(step, backend=cnt, fullgraph=True)
    for n in range(64):
        lens = torch.tensor([n, max(n - 3, 0)], dtype=torch.int32, device=DEV)
        fn(rnd(B, 1, H, D), kc, vc, rnd(B, 1, H, D), rnd(B, 1, H, D), lens)
    assert cnt.frame_count == 1, cnt.frame_count


class _MaskedAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_export_with_dynamic_batch_and_mask():
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (rnd(3, 4, 16, 32), rnd(3, 4, 16, 32), rnd(3, 4, 16, 32), torch.rand(3, 1, 1, 16, device=DEV) > 0.3)
    ep = torch.export.export(_MaskedAttention(), args, dynamic_shapes=({0: batch},) * 4)
    for B in (1, 5):
        a = (rnd(B, 4, 16, 32), rnd(B, 4, 16, 32), rnd(B, 4, 16, 32), torch.rand(B, 1, 1, 16, device=DEV) > 0.3)
        _close(ep.module()(*a), _MaskedAttention()(*a))


class _SelectedRows(torch.nn.Module):
    """The batch is data-dependent: the rows `keep` selects (an unbacked size while exporting)."""

    def forward(self, q, k, v, mask, keep):
        q, k, v, mask = q[keep], k[keep], v[keep], mask[keep]
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_export_with_data_dependent_batch():
    def args(B):
        return (rnd(B, 4, 16, 32), rnd(B, 4, 16, 32), rnd(B, 4, 16, 32), torch.rand(B, 1, 1, 16, device=DEV) > 0.3,
                torch.arange(B, device=DEV) % 2 == 0)
    n = torch.export.Dim("n", min=2, max=64)
    ep = torch.export.export(_SelectedRows(), args(4), dynamic_shapes=({0: n},) * 5)
    for B in (3, 6):
        a = args(B)
        _close(ep.module()(*a), _SelectedRows()(*a))
