"""fastattn.scaled_dot_product_attention as a drop-in for torch.nn.functional.scaled_dot_product_attention: CausalBias
masks, PyTorch's broadcasting, zero-size heads/dims, more than one batch dim, the global swap, error classes, and
the sdpa backend's causal call with scale <= 0. Each case is compared with PyTorch's own function on CPU (float64
as the reference, outputs and gradients) and, where the shapes allow, with the float64 oracle."""
import ast
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn
from fastattn import params
from fastattn.backends.sdpa import TORCH_SDPA

from support import torch_older_than
from support.oracle import assert_rule, delta_error, oracle_attention

BACKENDS = ["auto", "reference", "sdpa"] + ([] if fastattn.get_backend("triton").unavailable() else ["triton"])


def rnd(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def mask_in(kw, dtype):
    """kw with a float attn_mask in `dtype` (torch wants it in the inputs' dtype)."""
    m = kw.get("attn_mask")
    return {**kw, "attn_mask": m.to(dtype)} if type(m) is torch.Tensor and m.is_floating_point() else kw


def check_like_torch(name, qkv, backend, dtype=torch.float32, **kw):
    """fastattn in `dtype` against PyTorch's function in float64 (the reference) and in `dtype` (the base):
    shape, type, output and every input gradient (dQ and dK with the delta term of the rounded O, delta_error)."""
    ins = [t.detach().to(dtype).requires_grad_() for t in qkv]
    ref_ins = [t.detach().double().requires_grad_() for t in qkv]
    base_ins = [t.detach().to(dtype).requires_grad_() for t in qkv]
    ref = TORCH_SDPA(*ref_ins, **mask_in(kw, torch.float64))
    base = TORCH_SDPA(*base_ins, **mask_in(kw, dtype))
    kw = mask_in(kw, dtype)
    got = fastattn.scaled_dot_product_attention(*ins, backend=backend, **kw)
    assert type(got) is torch.Tensor, type(got)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert_rule(f"{name} out", got, ref, base, dtype)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    D = qkv[0].shape[-1]
    scale = kw["scale"] if kw.get("scale") is not None else (D ** -0.5 if D else 1.0)  # D = 0: no scores to scale
    attend = lambda q_, k_, v_: TORCH_SDPA(q_, k_, v_, **mask_in(kw, torch.float64))  # noqa: E731
    like_out = lambda q_: q_.expand(*got.shape[:-1], D)  # noqa: E731 (q broadcast over batch or heads, as out is)
    inherent = (*delta_error(attend, qkv[0], qkv[1], like_out, lambda k_: k_, dout.to(dtype), got, ref, scale), 0.0)
    for n, g, r, b, e in zip("qkv", grads(got, ins, dout.to(dtype)), grads(ref, ref_ins, dout),
                             grads(base, base_ins, dout.to(dtype)), inherent):
        assert g is not None and g.shape == r.shape, (n, None if g is None else g.shape, r.shape)
        assert_rule(f"{name} d{n}", g, r, b, dtype, inherent=e)
    return got


# ---------------------------------------------------------------- CausalBias: a causal alignment, never storage
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("Sq,Sk", [(9, 9), (5, 19), (19, 5)])
def test_causal_bias_is_causal_attention_in_its_alignment(backend, variant, Sq, Sk):
    B, H, D = 2, 3, 24
    q, k, v = rnd(B, H, Sq, D), rnd(B, H, Sk, D), rnd(B, H, Sk, D)
    make = causal_lower_right if variant == "lower_right" else causal_upper_left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that lower-right with Sq > Sk "produces NaNs" (it gives 0 now)
        bias = make(Sq, Sk)
    out = check_like_torch(f"{variant} {Sq}x{Sk}", (q, k, v), backend, attn_mask=bias)
    ref = oracle_attention(q, k, v, scale=D ** -0.5, window=(-1, 0), bottom_right=variant == "lower_right")
    assert_rule("oracle", out, ref, None, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_bias_with_more_batch_dims_and_gqa(backend):
    q, k, v = rnd(2, 2, 4, 7, 16), rnd(2, 2, 2, 11, 16), rnd(2, 2, 2, 11, 16)
    check_like_torch("lower_right 5-D gqa", (q, k, v), backend, attn_mask=causal_lower_right(7, 11), enable_gqa=True)


def test_causal_bias_refusals():
    q, k, v = rnd(1, 2, 4, 8), rnd(1, 2, 6, 8), rnd(1, 2, 6, 8)
    with pytest.raises(ValueError, match="is_causal"):  # PyTorch raises ValueError here too
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(4, 6), is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias for \(Sq, Sk\) = \(4, 4\)"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(4, 4))

    class Scaled(torch.Tensor):  # any other mask object that gives torch functions its own meaning
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    odd = torch.zeros(4, 6).as_subclass(Scaled)
    with pytest.raises(TypeError, match="Scaled is not supported"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=odd)
    # A Parameter (a learnt additive bias) is a plain dense mask.
    bias = torch.nn.Parameter(torch.randn(4, 6))
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


# ---------------------------------------------------------------- broadcasting and batch dims, as PyTorch
SHAPES = {  # q, k, v, kwargs
    "k_v_batch_1": ((3, 4, 9, 16), (1, 4, 13, 16), (1, 4, 13, 16), {}),
    "q_batch_1": ((1, 4, 9, 16), (3, 4, 13, 16), (3, 4, 13, 16), {}),
    "k_v_head_1": ((2, 4, 9, 16), (2, 1, 13, 16), (2, 1, 13, 16), {}),
    "q_head_1": ((2, 1, 9, 16), (2, 4, 13, 16), (2, 4, 13, 24), {}),
    "k_head_1_v_head_4": ((2, 4, 9, 16), (2, 1, 13, 16), (2, 4, 13, 16), {}),
    "k_batch_1_head_1_mask": ((3, 4, 9, 16), (1, 1, 13, 16), (1, 1, 13, 16),
                              {"attn_mask": "bool"}),
    "gqa_k_2_v_4_heads": ((2, 8, 9, 16), (2, 2, 13, 16), (2, 4, 13, 16), {"enable_gqa": True}),
    "3d_kv_4d_q": ((2, 4, 9, 16), (4, 13, 16), (4, 13, 16), {}),
    "5d": ((2, 3, 4, 9, 16), (2, 3, 4, 13, 16), (2, 3, 4, 13, 24), {"is_causal": True}),
    "5d_broadcast": ((2, 3, 4, 9, 16), (1, 3, 1, 13, 16), (2, 1, 4, 13, 16), {"attn_mask": "float"}),
    "6d_broadcast_gqa": ((2, 1, 3, 4, 9, 16), (1, 2, 3, 2, 13, 16), (2, 2, 1, 2, 13, 16), {"enable_gqa": True}),
    "decode_k_v_batch_1_v_head_1": ((3, 4, 1, 16), (1, 4, 13, 16), (1, 1, 13, 16), {}),  # split-KV decode route
    "decode_q_batch_1_head_1": ((1, 1, 1, 16), (3, 4, 13, 16), (3, 4, 13, 16), {}),
    "2d": ((9, 16), (13, 16), (13, 16), {"is_causal": True}),
    "2d_q_3d_kv": ((9, 16), (3, 13, 16), (3, 13, 16), {}),
}


@pytest.mark.parametrize("backend,dtype", [pytest.param(b, torch.float32, id=f"{b}-fp32") for b in BACKENDS]
                         + [pytest.param("auto", torch.bfloat16, id="auto-bf16")])
@pytest.mark.parametrize("case", list(SHAPES))
def test_broadcasting_and_batch_dims_match_torch(backend, dtype, case):
    qs, ks, vs, kw = SHAPES[case]
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        m = torch.rand(3, 1, 9, 13) > 0.3
        m[..., 0] = True  # rows stay non-empty (torch's all-masked rows differ by version)
        kw["attn_mask"] = m
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(3, 1, 9, 13)
    check_like_torch(case, (rnd(*qs), rnd(*ks), rnd(*vs)), backend, dtype, **kw)


def test_broadcast_dims_reach_the_kernels_without_copies(monkeypatch):
    seen = []
    real = fastattn.dispatch.run
    monkeypatch.setattr(fastattn.dispatch, "run", lambda p, b=None: seen.append(p) or real(p, b))
    q = rnd(3, 4, 9, 16)
    k, v = rnd(1, 4, 13, 16), rnd(1, 1, 13, 16)  # batch 1 for both, one value head
    fastattn.scaled_dot_product_attention(q, k, v)
    p = seen[-1]
    assert p.k.shape == (3, 4, 13, 16) and p.k.stride(0) == 0 and p.k.data_ptr() == k.data_ptr()
    assert p.v.shape == (3, 4, 13, 16) and p.v.stride(0) == 0 and p.v.stride(1) == 0
    fastattn.scaled_dot_product_attention(q, rnd(3, 1, 13, 16), rnd(3, 1, 13, 16))
    assert seen[-1].k.shape[1] == 1  # a single k/v head serves all query heads as GQA, not expanded
    fastattn.scaled_dot_product_attention(rnd(2, 3, 4, 9, 16), rnd(2, 3, 4, 13, 16), rnd(2, 3, 4, 13, 16))
    assert seen[-1].q.shape == (6, 4, 9, 16)  # batch dims flattened


def test_bad_broadcasts_are_refused_like_torch():
    bad = [((2, 4, 9, 16), (3, 4, 13, 16), (3, 4, 13, 16), {}, "batch"),
           ((2, 4, 9, 16), (2, 3, 13, 16), (2, 3, 13, 16), {}, "heads"),
           ((2, 4, 9, 16), (2, 2, 13, 16), (2, 2, 13, 16), {}, "enable_gqa"),
           ((2, 4, 9, 16), (2, 3, 13, 16), (2, 3, 13, 16), {"enable_gqa": True}, "multiple"),
           ((9, ), (13, 16), (13, 16), {}, "at least 2 dims"),
           ((2, 4, 9, 16), (2, 4, 13, 16), (2, 4, 13, 16), {"attn_mask": torch.ones(2, 2, 9, 13)}, "attn_mask")]
    for qs, ks, vs, kw, needle in bad:
        args = rnd(*qs), rnd(*ks), rnd(*vs)
        with pytest.raises(RuntimeError):  # PyTorch refuses each as well
            TORCH_SDPA(*args, **kw)
        with pytest.raises(RuntimeError, match=needle) as ei:
            fastattn.scaled_dot_product_attention(*args, **kw)
        assert isinstance(ei.value, ValueError)


# ---------------------------------------------------------------- zero heads, zero head dim, zero value head dim
ZERO = {
    "no_heads": ((2, 0, 5, 8), (2, 0, 7, 8), (2, 0, 7, 8), {}),
    "no_query_heads_gqa": ((2, 0, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), {"enable_gqa": True}),
    "head_dim_0": ((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 6), {}),
    "head_dim_0_causal_mask": ((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 6), {"is_causal": True}),
    "head_dim_0_float_mask": ((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 6), {"attn_mask": "float"}),
    "value_head_dim_0": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 0), {}),
    "both_dims_0": ((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 0), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ZERO))
def test_zero_size_heads_and_dims_match_torch(backend, case):
    qs, ks, vs, kw = ZERO[case]
    if ks[1] == 0 and torch_older_than(2, 14):
        pytest.skip("torch < 2.14's own SDPA, the reference here, dies of SIGFPE on zero key heads (seen on 2.11); "
                    "fastattn answers zero heads itself and never hands them to it")
    if backend == "triton" and qs[-1] == 0:
        pytest.skip("head dim 0 runs as head dim 1, below triton's 16 (auto then picks another backend)")
    if kw.get("attn_mask") == "float":
        kw = {"attn_mask": torch.randn(5, 7)}
    got = check_like_torch(case, (rnd(*qs), rnd(*ks), rnd(*vs)), backend, **kw)
    if qs[-1] == 0 and vs[-1]:  # no features: every score is 0, so the output is softmax(mask) @ v, not 0
        assert got.abs().sum() > 0


def test_zero_head_dim_against_oracle():
    q, k, v = rnd(2, 3, 5, 0), rnd(2, 3, 7, 0), rnd(2, 3, 7, 6)
    for backend in ("auto", "reference", "sdpa"):  # not triton: head dims from 16
        got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        # scale is irrelevant with no features (PyTorch's default 1/sqrt(0) would make the oracle's 0 * inf = NaN)
        assert_rule(backend, got, oracle_attention(q, k, v, scale=1.0, window=(-1, 0)), None, torch.float32)


# ---------------------------------------------------------------- the global swap
def test_global_swap_runs_fastattn_without_recursion(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fastattn.scaled_dot_product_attention(*args, **kwargs)

    q, k, v = (rnd(2, 4, 9, 16, dtype=torch.float64) for _ in range(3))
    want = TORCH_SDPA(q, k, v, is_causal=True)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).train()  # train: torch's functional path
    x = torch.randn(2, 9, 32)
    want_mha, _ = mha(x, x, x, need_weights=False)
    monkeypatch.setattr(F, "scaled_dot_product_attention", fastattn.scaled_dot_product_attention)
    # float64 routes to fastattn's `sdpa` backend, which must call PyTorch's own function, not the patched name
    got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert fastattn.explain(q, k, v, is_causal=True).chosen == "sdpa"
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    got_mha, _ = mha(x, x, x, need_weights=False)
    assert calls, "nn.MultiheadAttention did not go through the swapped function"
    torch.testing.assert_close(got_mha, want_mha, rtol=1e-5, atol=1e-5)
    lr = causal_lower_right(9, 9)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=lr), want)


# ---------------------------------------------------------------- error classes PyTorch users catch
def test_bad_input_errors_are_runtime_errors_too():
    q = rnd(2, 3, 4, 8)
    cases = [
        (lambda: fastattn.scaled_dot_product_attention(q, rnd(2, 3, 4, 8, dtype=torch.float64), rnd(2, 3, 4, 8)),
         fastattn.InputTypeError, TypeError),
        (lambda: fastattn.scaled_dot_product_attention(q, rnd(2, 3, 4, 7), rnd(2, 3, 4, 8)),
         fastattn.InputValueError, ValueError),
        (lambda: fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.int32)),
         fastattn.InputTypeError, TypeError),
        (lambda: fastattn.scaled_dot_product_attention(q, q, q, dropout_p=1.5), fastattn.InputValueError, ValueError),
        (lambda: fastattn.flash_attn_func(rnd(2, 4, 3, 8), rnd(2, 4, 2, 8), rnd(2, 4, 2, 8)),
         fastattn.InputValueError, ValueError),
    ]
    for fn, cls, py in cases:
        with pytest.raises(RuntimeError) as ei:
            fn()
        assert type(ei.value) is cls and isinstance(ei.value, py), repr(ei.value)


def test_validation_raises_only_the_dual_classes():
    # Every input check of the public functions raises InputValueError / InputTypeError: a plain ValueError or
    # TypeError added here later (e.g. by a merge) would escape `except RuntimeError` written for PyTorch.
    pkg = pathlib.Path(fastattn.__file__).parent
    plain = []
    for name in ("params.py", "functional.py"):
        for node in ast.walk(ast.parse((pkg / name).read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):  # raise X(...)
                cls = node.exc.func
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_check_with" and node.args:
                cls = node.args[0]  # torch._check_with(X, cond, msg)
            else:
                continue
            if isinstance(cls, ast.Name) and cls.id in ("ValueError", "TypeError"):
                plain.append(f"{name}:{cls.lineno} {cls.id}")
    assert not plain, plain


# ---------------------------------------------------------------- sdpa backend: causal with scale <= 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [-0.5, 0.0, -0.0])
@pytest.mark.parametrize("Sq,Sk", [(8, 8), (5, 12)])
def test_sdpa_backend_causal_with_nonpositive_scale(dtype, scale, Sq, Sk):
    q, k, v = rnd(1, 2, Sq, 16, dtype=dtype), rnd(1, 2, Sk, 16, dtype=dtype), rnd(1, 2, Sk, 16, dtype=dtype)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, backend="sdpa")
    ref = oracle_attention(q, k, v, scale=scale, window=(-1, 0))
    assert_rule(f"scale {scale}", out, ref, None, dtype)
    dout = torch.randn_like(out)
    ref_g = grads(ref, (q, k, v), dout.double())
    for n, g, r in zip("qkv", grads(out, (q, k, v), dout), ref_g):
        assert_rule(f"d{n}", g, r, None, dtype)


# ---------------------------------------------------------------- the shape handling traces without graph breaks
@pytest.mark.parametrize("case", ["bool_mask", "broadcast_5d", "causal_bias"])
def test_sdpa_shape_handling_compiles_fullgraph(case):
    torch._dynamo.reset()
    if case == "bool_mask":
        args, kw = (rnd(2, 4, 9, 16), rnd(2, 4, 13, 16), rnd(2, 4, 13, 16)), {"attn_mask": torch.rand(9, 13) > 0.2}
    elif case == "broadcast_5d":
        args, kw = (rnd(2, 3, 4, 9, 16), rnd(1, 3, 1, 13, 16), rnd(2, 1, 4, 13, 16)), {}
    else:
        args, kw = (rnd(2, 4, 9, 16), rnd(2, 4, 13, 16), rnd(2, 4, 13, 16)), {"attn_mask": causal_lower_right(9, 13)}

    def f(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, **kw)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args))


# ------------------------------------------------- a row whose every score is -inf by value (not by a mask)

NEG_INF_BACKENDS = ["cpu", "reference", "sdpa"] + ([] if fastattn.get_backend("triton").unavailable() else ["triton"])


@pytest.mark.parametrize("backend", NEG_INF_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Sq", [1, 3, 40])  # 1 and 3 take the CPU decode kernel, 40 the dense one
@pytest.mark.parametrize("Sk", [7, 64])  # 64: whole key blocks, which Triton runs without bound masks
def test_row_of_neg_inf_scores_gives_zero_like_torch(backend, dtype, Sq, Sk):
    """A -inf in q meeting positive keys makes every score of that row -inf; PyTorch's SDPA (math and flash) gives 0
    there, as for a fully masked row. Found by the fuzz test in the CPU decode kernel (exp(-inf - -inf) = NaN); the
    Triton forward had it too on blocks without bound masks."""
    q, k, v = torch.randn(2, 3, Sq, 24), torch.randn(2, 3, Sk, 24).abs() + 0.1, torch.randn(2, 3, Sk, 24)
    q[1, 2, Sq - 1, 5] = float("-inf")
    ref = TORCH_SDPA(q.double(), k.double(), v.double())
    assert ref[1, 2, Sq - 1].eq(0).all() and torch.isfinite(ref).all()  # torch's behaviour, which we follow
    got = fastattn.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend)
    assert torch.isfinite(got).all(), f"{backend}: NaN/Inf at {(~torch.isfinite(got)).nonzero()[:3].tolist()}"
    assert got[1, 2, Sq - 1].eq(0).all()
    # The fused backends against torch's own kernel in dtype (stricter than the rule's naive base). `reference` IS
    # the naive computation run in dtype, the rule's base (against torch's fp32-accumulating kernel its bf16 scores
    # missed 2x on ~1 seed in 300): for it this test checks the zero row, its numbers are test_matrix's job.
    base = oracle_attention(q, k, v, scale=24 ** -0.5, dtype=dtype) if backend == "reference" else \
        TORCH_SDPA(q.to(dtype), k.to(dtype), v.to(dtype))
    assert_rule("out", got, ref, base, dtype)


_PADDED = {  # what sits in the padded keys of batch 1 (the cpu kernels may skip them: csrc/cpu/key_end.cpp)
    "finite": lambda q, k, v, do: k[1, :, 40:].mul_(50.0),
    "nan_k": lambda q, k, v, do: k[1, 0, 45, 3].fill_(float("nan")),
    "inf_v": lambda q, k, v, do: v[1, 1, 60, 0].fill_(float("inf")),
    "overflow_k": lambda q, k, v, do: (q[1].abs_().add_(0.5), k[1, :, 50:].fill_(3e38)),  # finite inputs whose
    # scores overflow to Inf there: Inf + -inf = NaN in PyTorch
    "nan_q": lambda q, k, v, do: q[1, 1, 7, 2].fill_(float("nan")),
    "inf_dout": lambda q, k, v, do: do[1, 0, 3, 1].fill_(float("inf")),
    "nan_v_visible": lambda q, k, v, do: v[1, 0, 10, 0].fill_(float("nan")),  # NaN rows of O: delta = dO.O is NaN
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("what", list(_PADDED))
def test_padded_keys_propagate_nan_like_torch(what, dtype):
    """A key-padding mask whose batch 1 ends at key 40 of 96: the cpu kernels skip those keys only where every term
    touching them is finite, so a NaN or Inf there (or scores that overflow) gives the NaN pattern PyTorch gives in
    the output and every gradient, and finite padding gives PyTorch's numbers."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 33, 16), torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
    do = torch.randn(2, 2, 33, 16)
    _PADDED[what](q, k, v, do)
    mask = (torch.arange(96) < torch.tensor([96, 40]).view(2, 1)).view(2, 1, 1, 96)  # (B, Sk) -> (B, 1, 1, Sk)
    res = {}
    for name, fn in (("torch", TORCH_SDPA), ("fastattn", lambda *a, **kw: fastattn.scaled_dot_product_attention(
            *a, backend="cpu", **kw))):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*ins, attn_mask=mask)
        res[name] = (out, *torch.autograd.grad(out, ins, do.to(dtype)))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        got, want = res["fastattn"][i], res["torch"][i]
        assert torch.equal(got.isnan(), want.isnan()), (
            f"{what} {name}: NaN at {got.isnan().nonzero()[:3].tolist()}, "
            f"torch at {want.isnan().nonzero()[:3].tolist()}")
        fin = ~want.isnan()
        assert torch.equal(got[fin].isinf(), want[fin].isinf()), f"{what} {name}: Inf pattern differs from torch"
    if what == "finite":
        base = res["torch"]
        ref = [t.detach().double().requires_grad_() for t in (q.to(dtype), k.to(dtype), v.to(dtype))]
        o = TORCH_SDPA(*ref, attn_mask=mask)
        for i, (name, r) in enumerate(zip(("out", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, ref, do.double())))):
            assert_rule(name, res["fastattn"][i], r, base[i], dtype)


def _general_mask(attn_mask, q, target, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(params, "_mask_4d", lambda *a: None)
        return params.normalize_mask(attn_mask, q, target)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 1, 1, 7), (1, 3, 5, 1), (1, 1, 1, 1), (2, 3, 1, 7)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16], ids=["bool", "fp32", "bf16"])
def test_mask_fast_path_equals_the_general_one(shape, dtype, monkeypatch):
    """normalize_mask's 4-D fast path (params._mask_4d) gives the general path's bias (values, shape, dtype) and kind,
    for masks in q's dtype and bool ones; masks of another float dtype, other ranks and subclasses take the general
    path (the fast one declines them)."""
    q = torch.randn(2, 3, 5, 4, dtype=torch.bfloat16)
    target = (2, 3, 5, 7)
    g = torch.Generator().manual_seed(len(shape) + sum(shape))
    mask = torch.rand(shape, generator=g) > 0.4 if dtype is torch.bool else torch.randn(shape, generator=g).to(dtype)
    fast = params._mask_4d(mask, q, target)
    if dtype is torch.float32:  # not q's dtype: converted by the general path
        assert fast is None
        return
    want = _general_mask(mask, q, target, monkeypatch)
    assert fast is not None
    assert fast[1] == want[1] and fast[0].shape == want[0].shape and fast[0].dtype == want[0].dtype
    assert torch.equal(fast[0], want[0])
    assert params._mask_4d(mask[0], q, target) is None  # 3-D: the general path
    assert params._mask_4d(mask.as_subclass(torch.nn.Parameter), q, target) is None


@pytest.mark.parametrize("dim", range(4))
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "fp32"])
def test_mask_that_does_not_broadcast_is_refused(dim, dtype):
    """A 4-D mask with one dim neither the scores' nor 1 gets the clear error (on the fast path as on the other)."""
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    shape = [2, 3, 5, 7]
    shape[dim] += 1
    with pytest.raises(fastattn.InputValueError, match=r"attn_mask of shape .* is not broadcastable"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(shape, dtype=dtype))


def test_nested_mask_is_refused_clearly():
    """A nested-tensor mask (which has no sizes to broadcast) gets fastattn's error naming attn_mask, not an internal
    one from reading its shape (on the lean path's key as on the full path)."""
    q = torch.randn(1, 2, 4, 8)
    mask = torch.nested.nested_tensor([torch.ones(2, 4, 4, dtype=torch.bool)])
    for _ in range(2):
        with pytest.raises(fastattn.InputTypeError, match="attn_mask a nested tensor is not supported"):
            fastattn.scaled_dot_product_attention(q, q, q, attn_mask=mask)
