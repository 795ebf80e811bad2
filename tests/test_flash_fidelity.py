"""Calls flash-attn accepts and answers one way, answered the same way by fastattn.compat.flash_attn: padded varlen
batches, a cache allocated for a larger batch, a window as wide as the cache under rotary, the S_dmask slot,
bert_padding's concatenated-sequence helpers and autograd.Function forms, RuntimeError for bad kvcache input, and
the reference backend's fp16 scores (computed in fp32, as flash-attn and PyTorch's math SDPA do)."""
import math

import pytest
import torch

import fastattn
from fastattn.compat import flash_attn as fa
from fastattn.compat.flash_attn import bert_padding

from support.oracle import assert_rule, oracle_attention


def _varlen_oracle(q, k, v, cu_q, cu_k, dtype, causal):
    """Each sequence of packed (total, H, D) q/k/v through the oracle -> (total_q, H, Dv), zeros past cu_q[-1]."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=dtype)
    for n in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[n]), int(cu_q[n + 1]), int(cu_k[n]), int(cu_k[n + 1])
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[a:b], k[c:d], v[c:d]))  # (L, H, D) -> (1, H, L, D)
        o = oracle_attention(qs, ks, vs, scale=q.shape[-1] ** -0.5, window=(-1, 0) if causal else (-1, -1),
                             bottom_right=True, dtype=dtype)
        out[a:b] = o[0].transpose(0, 1)  # (1, H, L, Dv) -> (L, H, Dv)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_rows_past_the_last_sequence_take_no_part(dtype):
    """q/k packed into buffers longer than their sequences (a static-shape batch): flash-attn reads only rows up to
    cu_seqlens[-1]; fastattn returns zeros there, lse +inf, and no gradient flows into those rows."""
    g = torch.Generator().manual_seed(3)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32)
    q = torch.randn(10, 2, 16, generator=g).to(dtype).requires_grad_()  # 3 rows past cu_q[-1] = 7
    k = torch.randn(14, 2, 16, generator=g).to(dtype).requires_grad_()  # 3 rows past cu_k[-1] = 11
    v = torch.randn(14, 2, 16, generator=g).to(dtype).requires_grad_()
    out, lse, s_dmask = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 6, causal=True, return_attn_probs=True)
    ref = _varlen_oracle(q.detach(), k.detach(), v.detach(), cu_q, cu_k, torch.float64, True)
    base = _varlen_oracle(q.detach(), k.detach(), v.detach(), cu_q, cu_k, dtype, True)
    assert out.shape == (10, 2, 16) and lse.shape == (2, 10) and s_dmask.numel() == 0
    assert_rule("out", out, ref, base, dtype)
    assert torch.equal(out[7:], torch.zeros_like(out[7:])) and torch.isinf(lse[:, 7:]).all()
    assert torch.isfinite(lse[:, :7]).all()
    out.float().square().sum().backward()
    assert torch.equal(q.grad[7:], torch.zeros_like(q.grad[7:]))
    assert torch.equal(k.grad[11:], torch.zeros_like(k.grad[11:]))
    assert q.grad[:7].abs().sum() > 0 and v.grad[:11].abs().sum() > 0


def test_varlen_totals_past_the_rows_still_refused():
    q = torch.randn(6, 2, 16)
    with pytest.raises(RuntimeError, match="must equal the packed length"):
        fa.flash_attn_varlen_func(q, q, q, torch.tensor([0, 3, 9], dtype=torch.int32),
                                  torch.tensor([0, 3, 6], dtype=torch.int32), 6, 3)


def test_kvcache_reads_the_first_rows_of_a_larger_cache():
    """A cache allocated for 4 rows with a batch of 2 and no cache_batch_idx: rows 0 and 1, appended in place (the
    other rows untouched), twice (the second call must not take a route learned for the views)."""
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(4, 32, 2, 16, generator=g) for _ in range(2))
    for step in range(2):
        q = torch.randn(2, 1, 4, 16, generator=g)
        kn, vn = (torch.randn(2, 1, 2, 16, generator=g) for _ in range(2))
        lens = torch.tensor([5 + step, 9 + step], dtype=torch.int32)
        kr, vr, rest = kc[:2].clone(), vc[:2].clone(), (kc[2:].clone(), vc[2:].clone())
        out = fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)
        ref = fa.flash_attn_with_kvcache(q, kr, vr, kn, vn, cache_seqlens=lens, causal=True)
        assert torch.equal(out, ref) and torch.equal(kc[:2], kr) and torch.equal(vc[:2], vr)
        assert torch.equal(kc[2:], rest[0]) and torch.equal(vc[2:], rest[1])


def test_kvcache_window_as_wide_as_the_cache_is_no_window_for_rotary():
    """flash-attn turns a window entry >= the cache's capacity into -1, so such a non-causal call is not local and
    rotary places every query at cache_seqlens: the same output as window_size=(-1, -1)."""
    g = torch.Generator().manual_seed(1)
    B, Sq, H, D, cap = 1, 3, 1, 16, 8
    q = torch.randn(B, Sq, H, D, generator=g)
    kc, vc, k, v = (torch.randn(B, n, H, D, generator=g) for n in (cap, cap, Sq, Sq))
    ang = torch.rand(cap + Sq, D // 2, generator=g) * 2 * math.pi
    lens = torch.tensor([2], dtype=torch.int32)

    def call(window):
        return fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, ang.cos(), ang.sin(), lens,
                                          window_size=window)
    assert torch.equal(call((cap, -1)), call((-1, -1))) and torch.equal(call((-1, cap)), call((-1, -1)))
    assert not torch.allclose(call((cap - 1, -1)), call((-1, -1)))  # narrower: local, q rotated at lens + i


@pytest.mark.parametrize("fn", ["dense", "varlen", "qkvpacked"])
def test_return_attn_probs_gives_an_empty_s_dmask(fn):
    q = torch.randn(1, 5, 2, 8)
    if fn == "dense":
        res = fa.flash_attn_func(q, q, q, return_attn_probs=True)
    elif fn == "qkvpacked":
        res = fa.flash_attn_qkvpacked_func(torch.stack([q, q, q], dim=2), return_attn_probs=True)
    else:
        cu = torch.tensor([0, 5], dtype=torch.int32)
        res = fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 5, 5, return_attn_probs=True)
    assert len(res) == 3 and isinstance(res[2], torch.Tensor) and res[2].numel() == 0


def test_unpad_concatenated_sequences_matches_attention_per_piece():
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 2, 8, generator=g, dtype=torch.float64)
    xu, idx, cu, max_len = bert_padding.unpad_input_for_concatenated_sequences(x, lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 8, 10, 16, 17] and max_len == 6
    assert idx.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18]
    out = bert_padding.pad_input(fa.flash_attn_varlen_func(xu, xu, xu, cu, cu, max_len, max_len, causal=True,
                                                           backend="reference"), idx, 4, 6)
    ref = torch.zeros_like(x)
    for b in range(4):
        start = 0
        for n in [int(n) for n in lengths[b] if n]:
            piece = x[b, start:start + n].transpose(0, 1).unsqueeze(0)  # (n, H, D) -> (1, H, n, D)
            o = oracle_attention(piece, piece, piece, scale=8 ** -0.5, window=(-1, 0))
            ref[b, start:start + n] = o[0].transpose(0, 1)
            start += n
    assert (out - ref).abs().max() < 1e-12
    with pytest.raises(ValueError, match="summing to at most the row length 6"):
        bert_padding.unpad_input_for_concatenated_sequences(x, torch.tensor([[7, 0, 0, 0, 0, 0]] * 4))


def test_index_functions_in_autograd_function_form():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 4, 5, 11])
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    (bert_padding.IndexFirstAxis.apply(x, idx) * w).sum().backward()
    expect = torch.zeros(12, 3, dtype=torch.float64)
    expect[idx] = w
    assert torch.equal(x.grad, expect)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    put = bert_padding.IndexPutFirstAxis.apply(v, idx, 12)
    others = torch.ones(12, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(put[idx], v.detach()) and torch.equal(put[others], torch.zeros(8, 3, dtype=torch.float64))
    put.mul(torch.arange(12.0, dtype=torch.float64).unsqueeze(1)).sum().backward()
    assert torch.equal(v.grad, idx.double().unsqueeze(1).expand(4, 3))
    x.grad = None
    picked, residual = bert_padding.index_first_axis_residual(x, idx)
    (picked.sum() + 2 * residual.sum()).backward()
    expect = torch.full((12, 3), 2.0, dtype=torch.float64)
    expect[idx] += 1
    assert torch.equal(x.grad, expect)


def test_compat_version_and_names():
    assert fa.__version__.startswith("2.")
    for name in ("unpad_input_for_concatenated_sequences", "IndexFirstAxis", "IndexPutFirstAxis",
                 "index_first_axis_residual"):
        assert name in bert_padding.__all__ and callable(getattr(bert_padding, name))


@pytest.mark.parametrize("case", ["int64 seqlens", "int64 batch_idx", "k without v", "new k dtype", "rotary dim"])
def test_kvcache_errors_are_runtime_errors(case):
    """flash-attn's checks raise RuntimeError (TORCH_CHECK): code catching it catches fastattn's too."""
    q, kc = torch.randn(2, 1, 2, 16), torch.randn(2, 8, 2, 16)
    kn = torch.randn(2, 1, 2, 16)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    calls = {"int64 seqlens": lambda: fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens.long()),
             "int64 batch_idx": lambda: fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens,
                                                                   cache_batch_idx=torch.tensor([0, 1])),
             "k without v": lambda: fa.flash_attn_with_kvcache(q, kc, kc, kn, cache_seqlens=lens),
             "new k dtype": lambda: fa.flash_attn_with_kvcache(q, kc, kc, kn.double(), kn.double(),
                                                               cache_seqlens=lens),
             "rotary dim": lambda: fa.flash_attn_with_kvcache(q, kc, kc, kn, kn, torch.ones(16, 9),
                                                              torch.ones(16, 9), lens)}
    with pytest.raises(RuntimeError, match="fastattn: "):
        calls[case]()


def test_reference_fp16_scores_do_not_overflow():
    """|q . k| past fp16's 65504: the naive backend computes its scores in fp32 (flash-attn accumulates them in
    fp32, PyTorch's math SDPA widens fp16), so the rows stay finite and within the rule; in fp16 they were NaN."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 16, 64, generator=g) * 40).half()
    k = (torch.randn(1, 2, 16, 64, generator=g) * 40).half()
    v = torch.randn(1, 2, 16, 64, generator=g).half()
    q[:, :, 3], k[:, :, 5] = 40.0, 40.0  # q_3 . k_5 = 64 * 1600 = 102400
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    scale = 64 ** -0.5
    for softcap in (0.0, 30.0):
        out = fastattn.functional.attention(q, k, v, softcap=softcap, backend="reference")
        ref = oracle_attention(q, k, v, scale=scale, softcap=softcap)
        assert torch.isfinite(out).all()
        assert_rule("out", out, ref, oracle_attention(q, k, v, scale=scale, softcap=softcap, dtype=torch.float32),
                    torch.float16)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu"])
def test_outputs_are_contiguous_as_flash_attns(backend):
    """flash-attn returns contiguous (B, S, H, D) / (total, H, D) outputs and callers .view() them; the reference and
    sdpa backends compute (B, H, S, D), whose transpose was a non-contiguous view."""
    if backend not in fastattn.available_backends("cpu"):
        pytest.skip(f"{backend} backend not available here")
    q = torch.randn(2, 5, 3, 8)
    out = fa.flash_attn_func(q, q, q, causal=True, backend=backend)
    assert out.is_contiguous() and out.view(2, 5, 24).shape == (2, 5, 24)
    if backend == "sdpa":
        return  # no varlen there
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 3, 3, backend=backend)
    assert out.is_contiguous() and out.view(5, 24).shape == (5, 24)
