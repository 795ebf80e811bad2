"""flash-attn users switch by changing an import: the packed entry points and the bert_padding helpers, against the
float64 oracle (outputs and gradients), and the fastattn.compat.flash_attn layout."""
import inspect

import pytest
import torch

import fastattn
from fastattn.compat import flash_attn as fa
from fastattn.compat.flash_attn import bert_padding

from support.oracle import assert_fwd_bwd, assert_rule, fwd_bwd_inherent, oracle_attention, oracle_fwd_bwd

DTYPES = [torch.float32, torch.bfloat16]


def _backends():
    # cpu when the extension is built (the default on CPU), reference always: both take varlen and GQA.
    return [b for b in ("cpu", "reference") if b in fastattn.available_backends("cpu")]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_qkvpacked(backend, dtype):
    B, S, H, D = 2, 37, 3, 40
    qkv = torch.randn(B, S, 3, H, D).to(dtype).requires_grad_()
    out, lse, probs = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(20, -1), return_attn_probs=True,
                                                   backend=backend)
    assert out.shape == (B, S, H, D) and lse.shape == (B, H, S) and probs.numel() == 0  # flash-attn: empty
    g = torch.randn_like(out)
    out.backward(g)
    assert qkv.grad.shape == qkv.shape
    q, k, v = (qkv.detach()[:, :, i].transpose(1, 2) for i in range(3))  # (B, S, H, D) -> (B, H, S, D)
    grads = [qkv.grad[:, :, i].transpose(1, 2) for i in range(3)]
    assert_fwd_bwd("qkvpacked", (out.transpose(1, 2), *grads), q, k, v, g.transpose(1, 2), dtype, scale=D ** -0.5,
                   window=(20, 0), bottom_right=True)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_kvpacked_gqa_bottom_right(backend, dtype):
    B, Sq, Sk, Hq, Hkv, D = 2, 9, 31, 4, 2, 32  # Sq < Sk: causal aligns bottom-right
    q = torch.randn(B, Sq, Hq, D).to(dtype).requires_grad_()
    kv = torch.randn(B, Sk, 2, Hkv, D).to(dtype).requires_grad_()
    out = fa.flash_attn_kvpacked_func(q, kv, causal=True, softmax_scale=0.3, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    k, v = (kv.detach()[:, :, i].transpose(1, 2) for i in range(2))
    grads = [q.grad.transpose(1, 2)] + [kv.grad[:, :, i].transpose(1, 2) for i in range(2)]
    assert_fwd_bwd("kvpacked", (out.transpose(1, 2), *grads), q.detach().transpose(1, 2), k, v, g.transpose(1, 2),
                   dtype, scale=0.3, window=(-1, 0), bottom_right=True)


def _per_sequence(out_packed, grads_packed, q, k, v, g, cu_q, cu_k, dtype, name, **kw):
    """Varlen check: the oracle run one sequence at a time, its results packed like fastattn's (total, H, D), then
    the rule applied to each whole packed tensor (as the matrix does: one scale per output, not per sequence), dQ and
    dK with the largest of the sequences' delta_error terms."""
    bhsd = lambda t: t.transpose(0, 1).unsqueeze(0)  # (L, H, D) -> (1, H, L, D)
    thd = lambda t: t[0].transpose(0, 1)  # (1, H, L, D) -> (L, H, D)
    refs, bases = [[], [], [], []], [[], [], [], []]  # out, dq, dk, dv pieces in packed order
    inherent = [0.0] * 4
    attend = lambda q_, k_, v_: oracle_attention(q_, k_, v_, **kw)  # noqa: E731 (float64)
    for n in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        args = (bhsd(q[sq]), bhsd(k[sk]), bhsd(v[sk]), bhsd(g[sq]))
        for acc, dt in ((refs, torch.float64), (bases, dtype)):
            for i, t in enumerate(oracle_fwd_bwd(*args, dt, **kw)):
                acc[i].append(thd(t))
        terms = fwd_bwd_inherent(attend, *args[:2], args[3], bhsd(out_packed[sq]), bhsd(refs[0][-1]), kw["scale"])
        inherent = [max(a, b) for a, b in zip(inherent, terms)]
    fast = (out_packed, *grads_packed)
    for i, label in enumerate(("out", "dq", "dk", "dv")):
        assert_rule(f"{name} {label}", fast[i], torch.cat(refs[i]), torch.cat(bases[i]), dtype, inherent=inherent[i])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_qkvpacked(backend, dtype):
    lens, H, D = [5, 1, 23, 12], 2, 24
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, H, D).to(dtype).requires_grad_()
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True, backend=backend)
    assert out.shape == (int(cu[-1]), H, D)
    g = torch.randn_like(out)
    out.backward(g)
    q, k, v = qkv.detach().unbind(1)
    c = cu.tolist()
    _per_sequence(out, qkv.grad.unbind(1), q, k, v, g, c, c, dtype, "varlen_qkvpacked", scale=D ** -0.5,
                  window=(-1, 0), bottom_right=True)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_kvpacked_gqa(backend, dtype):
    lq, lk, Hq, Hkv, D = [3, 8, 1], [7, 8, 20], 4, 1, 16
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), Hq, D).to(dtype).requires_grad_()
    kv = torch.randn(int(cu_k[-1]), 2, Hkv, D).to(dtype).requires_grad_()
    out, lse, _ = fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk), causal=True,
                                                     return_attn_probs=True, backend=backend)
    assert lse.shape == (Hq, int(cu_q[-1]))
    g = torch.randn_like(out)
    out.backward(g)
    k, v = kv.detach().unbind(1)
    _per_sequence(out, (q.grad, *kv.grad.unbind(1)), q.detach(), k, v, g, cu_q.tolist(), cu_k.tolist(), dtype,
                  "varlen_kvpacked", scale=D ** -0.5, window=(-1, 0), bottom_right=True)


@pytest.mark.parametrize("call, match", [
    (lambda: fa.flash_attn_qkvpacked_func(torch.randn(2, 5, 2, 3, 8)), r"qkv must be 5-D \(B, S, 3, H, D\).*\(2, 5, 2, 3, 8\)"),
    (lambda: fa.flash_attn_kvpacked_func(torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)), r"kv must be 5-D"),
    (lambda: fa.flash_attn_varlen_qkvpacked_func(torch.randn(10, 3, 2, 8, 1), torch.tensor([0, 10], dtype=torch.int32), 10), r"qkv must be 4-D \(total, 3, H, D\)"),
    (lambda: fa.flash_attn_varlen_kvpacked_func(torch.randn(10, 2, 8), torch.randn(10, 3, 2, 8), torch.tensor([0, 10], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32), 10, 10), r"kv must be 4-D .* 2 on dim 1"),
    (lambda: fa.flash_attn_qkvpacked_func([1, 2]), r"qkv must be a torch.Tensor"),
])
def test_packed_bad_input(call, match):
    with pytest.raises((fastattn.InputValueError, fastattn.InputTypeError), match=match):  # ValueError/TypeError too
        call()


# ---------------------------------------------------------------- bert_padding
def test_unpad_pad_roundtrip_and_return_tuple():
    B, S, H, D = 3, 7, 2, 4
    x = torch.randn(B, S, H, D, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.int32)
    res = bert_padding.unpad_input(x, mask)
    assert len(res) == 5, "flash-attn >= 2.7 returns (hidden, indices, cu_seqlens, max_seqlen, seqused)"
    xu, idx, cu, max_len, used = res
    assert xu.shape == (12, H, D) and idx.dtype == torch.int64 and cu.dtype == torch.int32 and used.dtype == torch.int32
    assert cu.tolist() == [0, 3, 10, 12] and max_len == 7 and isinstance(max_len, int) and used.tolist() == [3, 7, 2]
    assert torch.equal(xu, x.detach().reshape(B * S, H, D)[mask.flatten().bool()])
    back = bert_padding.pad_input(xu, idx, B, S)
    assert back.shape == (B, S, H, D)
    assert torch.equal(back, x.detach() * mask[:, :, None, None])
    # Gradients flow back to the padded tensor: 1 where kept, 0 at padding.
    back.sum().backward()
    assert torch.equal(x.grad, mask[:, :, None, None].float().expand_as(x))


def test_unpad_unused_mask_counts_in_cu_seqlens_not_seqused():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    unused = torch.tensor([[False, False, True, False], [False, True, True, False]])
    xu, idx, cu, max_len, used = bert_padding.unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 3, 6] and used.tolist() == [2, 1] and max_len == 3 and idx.tolist() == [0, 1, 2, 4, 5, 6]


def test_pad_input_takes_int32_indices():
    """flash-attn's pad_input takes int32 indices (its index_first_axis does too)."""
    h = torch.randn(3, 2)
    idx = torch.tensor([0, 2, 3])
    assert torch.equal(bert_padding.pad_input(h, idx.int(), 2, 2), bert_padding.pad_input(h, idx, 2, 2))


def test_index_first_axis_grad():
    x = torch.randn(6, 2, 3, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    y = bert_padding.index_first_axis(x, idx)
    assert torch.equal(y, x.detach()[idx])
    y.backward(torch.ones_like(y))
    assert x.grad[[0, 2, 4]].eq(1).all() and x.grad[[1, 3, 5]].eq(0).all()


@pytest.mark.parametrize("call, match", [
    (lambda: bert_padding.unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4)), r"attention_mask must be \(B, S\) = \(2, 5\)"),
    (lambda: bert_padding.index_first_axis(torch.randn(5), torch.tensor([1])), r"at least 2 dims"),
    (lambda: bert_padding.pad_input(torch.randn(3, 2), torch.tensor([[1, 2, 3]]), 2, 2), r"indices must be a 1-D"),
    (lambda: bert_padding.pad_input(torch.randn(3, 2), torch.tensor([0, 1]), 2, 2), r"nnz = len\(indices\) = 2"),
    (lambda: bert_padding.pad_input(torch.randn(2, 2), torch.tensor([0, 7]), 2, 2), r"indices must lie in \[0, 4\)"),
    (lambda: bert_padding.unpad_input(torch.randn(2, 5, 3), None), r"needs attention_mask"),
])
def test_padding_bad_input(call, match):
    with pytest.raises(fastattn.InputValueError, match=match):  # a ValueError and a RuntimeError, like torch's
        call()


@pytest.mark.parametrize("backend", _backends())
def test_bert_style_unpad_varlen_pad_matches_masked_oracle(backend):
    """The flash-attn recipe for a padded batch equals attention with a key-padding mask (valid query rows)."""
    B, S, H, D = 3, 11, 2, 16
    q, k, v = (torch.randn(B, S, H, D, requires_grad=True) for _ in range(3))
    lens = [11, 4, 7]
    mask = torch.arange(S)[None, :] < torch.tensor(lens)[:, None]  # (B, S) right padding
    qu, idx, cu, max_len, _ = bert_padding.unpad_input(q, mask)
    ku, vu = (bert_padding.unpad_input(t, mask)[0] for t in (k, v))
    out = bert_padding.pad_input(fa.flash_attn_varlen_func(qu, ku, vu, cu, cu, max_len, max_len, backend=backend),
                                 idx, B, S)
    g = torch.randn_like(out) * mask[:, :, None, None]  # padded rows carry no gradient (they are 0 in out)
    out.backward(g)
    bhsd = lambda t: t.detach().transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)
    kmask = mask[:, None, None, :]  # (B, 1, 1, Sk): keys beyond each length are padding
    ref = oracle_fwd_bwd(bhsd(q), bhsd(k), bhsd(v), bhsd(g), torch.float64, scale=D ** -0.5, mask=kmask)
    valid = mask[:, None, :, None]  # (B, 1, Sq, 1): padded query rows are 0 in out, whatever the oracle says
    assert_rule("out", bhsd(out) * valid, ref[0] * valid, None, torch.float32)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    for name, t, r in (("dq", q, ref[1]), ("dk", k, ref[2]), ("dv", v, ref[3])):
        assert_rule(name, bhsd(t.grad) * valid, r * valid, None, torch.float32)


# ---------------------------------------------------------------- the compat layout mirrors flash-attn's
FLASH_ATTN_SIGNATURES = {  # flash-attn 2.x parameter names, in order
    "flash_attn_qkvpacked_func": "qkv dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
                                 "return_attn_probs",
    "flash_attn_kvpacked_func": "q kv dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
                                "return_attn_probs",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p softmax_scale causal window_size softcap "
                                        "alibi_slopes deterministic return_attn_probs",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
                                       "softmax_scale causal window_size softcap alibi_slopes deterministic "
                                       "return_attn_probs",
    "flash_attn_func": "q k v dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
                       "return_attn_probs",
    "unpad_input": "hidden_states attention_mask unused_mask",
    "pad_input": "hidden_states indices batch seqlen",
    "index_first_axis": "input indices",
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_compat_signatures(name):
    from fastattn.compat.flash_attn import flash_attn_interface
    mod = bert_padding if hasattr(bert_padding, name) else fa
    fn = getattr(mod, name)
    assert fn is getattr(fastattn, name)
    if mod is fa:
        assert getattr(flash_attn_interface, name) is fn
    params = [p.name for p in inspect.signature(fn).parameters.values() if p.kind != p.KEYWORD_ONLY]
    assert params == FLASH_ATTN_SIGNATURES[name].split()
