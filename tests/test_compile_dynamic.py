"""torch.compile(fullgraph=True) with dynamic sizes: lengths and batch marked dynamic or made dynamic automatically
(the second distinct size), varlen max_seqlen, a decode loop, and torch.export with a dynamic batch, a dynamic query
length (below: the short-query classes) and unbounded Dims.

Every test counts compilations (torch._dynamo.testing.CompileCounterWithBackend): a per-call Python detail that
specialises on a size (int(), a Python comparison, a counter incremented in traced code) shows as a recompile."""
import pytest
import torch
import torch._dynamo.testing

import fastattn
from fastattn.params import AttnParams

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


# ------------------------------------------------------------------------------------ a dynamic query length
# The dispatcher's query-length classes (the short-query route to a decode kernel at <= 8 tokens, the CPU decode
# kernel's 4-row rule, auto's step rules) compared the symbolic length: export refused the guard that narrowed S
# ("Constraints violated (S)! ... 9 <= L['q'].size()[2] <= 64"), compile made one graph per class. A symbolic
# length now takes the general prefill route, and each test here failed before.
_LENGTHS = (2, 3, 4, 5, 8, 9, 16, 17, 40, 64)  # both sides of the old class bounds (4 rows, 8 tokens)


class _Attention(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


def _sdpa(**kw):
    return lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, **kw)


def _flash_causal(q, k, v):
    return fastattn.flash_attn_func(q, k, v, causal=True)  # (B, S, H, D): the length is dim 1


_CASES = {  # name: (function, query length's dim, whether k/v share it, dtype)
    "query only": (_sdpa(), 2, False, torch.float32),
    "self-attention": (_sdpa(), 2, True, torch.float32),
    "self-attention causal": (_sdpa(is_causal=True), 2, True, torch.float32),
    "gqa causal": (_sdpa(is_causal=True, enable_gqa=True), 2, True, torch.float32),
    "query only causal, fp64 (sdpa)": (_sdpa(is_causal=True), 2, False, torch.float64),
    "flash_attn_func causal, query only": (_flash_causal, 1, False, torch.float32),
}


def _qkv(case, S, B=2):
    _, dim, shared, dtype = _CASES[case]
    Sk = S if shared else 16
    shapes = [[B, 4, S, 16], [B, 2 if case == "gqa causal" else 4, Sk, 16]]
    if dim == 1:
        shapes = [[s[0], s[2], s[1], s[3]] for s in shapes]  # (B, H, S, D) -> (B, S, H, D)
    return rnd(*shapes[0]).to(dtype), rnd(*shapes[1]).to(dtype), rnd(*shapes[1]).to(dtype)


@pytest.mark.parametrize("example", [3, 9, 40])
@pytest.mark.parametrize("case", list(_CASES))
def test_export_with_dynamic_query_length(case, example):
    fn, dim, shared, _ = _CASES[case]
    S = torch.export.Dim("S", min=2, max=64)
    dyn = ({dim: S}, {dim: S} if shared else None, {dim: S} if shared else None)
    ep = torch.export.export(_Attention(fn), _qkv(case, example), dynamic_shapes=dyn)
    for L in _LENGTHS:
        a = _qkv(case, L)
        _close(ep.module()(*a), fn(*a))


def test_export_model_with_dynamic_batch_and_length():
    """GPT-2 (fastattn.models, flash_attn_func inside) exported for inference with a dynamic batch and length."""
    from fastattn.models import GPT2, GPT2Config
    model = GPT2(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)).to(DEV).eval()
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=64)
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randint(0, 64, (2, 9), device=DEV),),
                                 dynamic_shapes=({0: batch, 1: seq},))
        for B, T in ((1, 2), (3, 4), (2, 8), (5, 9), (2, 40)):
            ids = torch.randint(0, 64, (B, T), device=DEV)
            torch.testing.assert_close(ep.module()(ids), model(ids), rtol=1e-4, atol=1e-4)


def test_export_bf16_step_rule_on_amx_cpus(monkeypatch):
    """auto's bf16 rules on CPUs with AMX (tiny calls on one thread go to sdpa, eagerly; until 2026-12-05 one-token
    and 3-4-token MHA steps too) leave a dynamic length alone (simulated here: the rule's flags set as an AMX CPU
    sets them)."""
    cpu = pytest.importorskip("fastattn.backends.cpu")
    if DEV != "cpu" or fastattn.get_backend("cpu").unavailable():
        pytest.skip("the cpu backend's rule")
    monkeypatch.setattr(cpu, "_BF16_AMX", True)
    monkeypatch.setattr(cpu, "_RULE_DTYPES", cpu._RULE_DTYPES | {torch.bfloat16})
    fn = _sdpa(is_causal=True)
    S = torch.export.Dim("S", min=2, max=64)

    def qkv(L):
        return tuple(rnd(1, 4, L, 16).bfloat16() for _ in range(3))
    ep = torch.export.export(_Attention(fn), qkv(9), dynamic_shapes=({2: S},) * 3)
    for L in (2, 3, 4, 5, 9):
        a = qkv(L)
        torch.testing.assert_close(ep.module()(*a), fn(*a), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shared", [False, True])
def test_mark_dynamic_short_queries_compile_per_class(shared):
    """Inference with lengths 2-12 marked dynamic: one graph per short-query class (2-4, 5-8 and 9+ tokens), each
    right over its range; torch.compile keeps the classes (their kernels: steps of 2-4 tokens 20-48% faster than on
    the general route), torch.export leaves them out (the export tests above)."""
    cnt = _counter()
    fn = torch.compile(_sdpa(), backend=cnt, fullgraph=True)
    with torch.no_grad():
        for S in range(2, 13):
            q, k, v = rnd(1, 4, S, 32), rnd(1, 4, S if shared else 40, 32), rnd(1, 4, S if shared else 40, 32)
            for t in (q, k, v) if shared else (q,):
                torch._dynamo.mark_dynamic(t, 2)
            _close(fn(q, k, v), fastattn.scaled_dot_product_attention(q, k, v))
    assert cnt.frame_count <= 3, cnt.frame_count


class _CacheStep(torch.nn.Module):
    """Several new query tokens against a KV cache (chunked prefill, speculative decoding)."""

    def forward(self, q, k_cache, v_cache, lens):
        return fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)


def test_kvcache_dynamic_query_length():
    """flash_attn_with_kvcache with a dynamic number of query tokens: exported (before: the decode kernels' row
    limits guarded the length and export refused), and compiled with a graph per side of the row limit."""
    kc, vc = rnd(2, 64, 4, 16), rnd(2, 64, 4, 16)
    lens = torch.tensor([20, 30], dtype=torch.int32, device=DEV)
    step = _CacheStep()
    ep = torch.export.export(step, (rnd(2, 9, 4, 16), kc, vc, lens),
                             dynamic_shapes=({1: torch.export.Dim("S", min=2, max=32)}, None, None, None))
    cnt = _counter()
    fn = torch.compile(step, backend=cnt, fullgraph=True)
    for S in (2, 3, 5, 8, 9, 16, 17, 32):
        q = rnd(2, S, 4, 16)
        want = step(q, kc, vc, lens)
        _close(ep.module()(q, kc, vc, lens), want)
        torch._dynamo.mark_dynamic(q, 1)
        _close(fn(q, kc, vc, lens), want)
    assert cnt.frame_count <= 2, cnt.frame_count


class _CudaLimits(torch.nn.Module):
    """The cuda backend's per-call limits (grid: heads, batch; lengths < 2^31) on a call traced here (no GPU needed:
    extra_reasons reads only sizes)."""

    def forward(self, q, k, v):
        return q * len(fastattn.BACKENDS["cuda"].extra_reasons(AttnParams(q, k, v, 1.0)))


def test_cuda_limits_leave_unbounded_dims_alone():
    """An export with unbounded Dims on the batch and length: comparing them with the limits guarded the graph
    (the op checks the limits itself)."""
    B, S = torch.export.Dim("B"), torch.export.Dim("S")
    ep = torch.export.export(_CudaLimits(), (rnd(2, 2, 9, 8), rnd(2, 2, 16, 8), rnd(2, 2, 16, 8)),
                             dynamic_shapes=({0: B, 2: S}, {0: B}, {0: B}))
    q = rnd(3, 2, 5, 8)
    assert torch.equal(ep.module()(q, rnd(3, 2, 16, 8), rnd(3, 2, 16, 8)), q * 0)
