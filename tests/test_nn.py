"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention, and fastattn.patch / unpatch.

The reference is PyTorch's own module run in float64 on the same weights; ours runs in float32 and must meet the
fp32 rule (1e-5 relative, tests/support/oracle.py). Masks are random but leave every query at least one key (PyTorch
gives NaN for rows with none; we give 0, tested separately)."""
import copy
import warnings

import pytest
import torch

import fastattn
from fastattn.nn import MultiheadAttention
from support.oracle import assert_rule

E, H = 48, 4  # head_dim 12
CONFIGS = {
    "default": dict(),
    "batch_first": dict(batch_first=True),
    "kdim_vdim": dict(kdim=20, vdim=36, batch_first=True),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "no_bias": dict(bias=False, batch_first=True),
}


def _pair(cfg, dtype=torch.float32):
    ref = torch.nn.MultiheadAttention(E, H, **cfg).double()
    ours = MultiheadAttention(E, H, **cfg).to(dtype)
    ours.load_state_dict(ref.state_dict())  # a torch checkpoint loads unchanged
    return ours, ref


def _inputs(cfg, N, L, S, self_attn=False):
    def t(n, s, e):
        x = torch.randn(n, s, e, dtype=torch.float64)
        return x if cfg.get("batch_first") else x.transpose(0, 1)  # (N, S, E) -> (S, N, E)
    q = t(N, L, E)
    if self_attn:
        return q, q, q
    return q, t(N, S, cfg.get("kdim", E)), t(N, S, cfg.get("vdim", E))


def _mask(kind, N, L, S):
    """PyTorch convention: bool True = NOT allowed; float added. Column 0 always allowed (no empty rows)."""
    if kind is None:
        return None
    shape = {"kpm": (N, S), "2d": (L, S), "3d": (N * H, L, S)}[kind[0]]
    blocked = torch.rand(shape) < 0.35
    blocked[..., 0] = False
    if kind[1] == "bool":
        return blocked
    return torch.randn(shape, dtype=torch.float64).masked_fill(blocked, float("-inf"))


def _run(m, args, kw, dtype):
    args = [a.to(dtype) for a in args]
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    return m(*args, **kw)


MASKS = [dict(), dict(key_padding_mask=("kpm", "bool")), dict(key_padding_mask=("kpm", "float")),
         dict(attn_mask=("2d", "bool")), dict(attn_mask=("2d", "float")), dict(attn_mask=("3d", "bool")),
         dict(attn_mask=("3d", "float")), dict(key_padding_mask=("kpm", "bool"), attn_mask=("2d", "bool")),
         dict(key_padding_mask=("kpm", "float"), attn_mask=("3d", "float"))]


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("masks", MASKS,
                         ids=lambda m: "+".join(f"{k[:3]}:{v[0]}-{v[1]}" for k, v in m.items()) or "none")
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_torch(cfg_name, masks, need_weights):
    cfg = CONFIGS[cfg_name]
    ours, ref = _pair(cfg)
    N, L, S = 3, 17, 11
    args = _inputs(cfg, N, L, S)
    kw = {k: _mask(v, N, L, S) for k, v in masks.items()}
    kw["need_weights"] = need_weights
    out_ref, w_ref = _run(ref, args, kw, torch.float64)
    out, w = _run(ours, args, kw, torch.float32)
    assert out.dtype == torch.float32 and out.shape == out_ref.shape
    assert_rule("out", out, out_ref, None, torch.float32)
    if need_weights:
        assert_rule("weights", w, w_ref, None, torch.float32)
    else:
        assert w is None and w_ref is None


@pytest.mark.parametrize("average", [True, False])
def test_weights_per_head_unbatched(average):
    ours, ref = _pair(CONFIGS["default"])
    q = torch.randn(7, E, dtype=torch.float64)  # unbatched (L, E)
    kpm = torch.tensor([False, True, False, False, True])
    kv = torch.randn(5, E, dtype=torch.float64)
    o_ref, w_ref = ref(q, kv, kv, key_padding_mask=kpm, average_attn_weights=average)
    o, w = ours(q.float(), kv.float(), kv.float(), key_padding_mask=kpm, average_attn_weights=average)
    assert w.shape == w_ref.shape == ((7, 5) if average else (H, 7, 5))
    assert_rule("out", o, o_ref, None, torch.float32)
    assert_rule("weights", w, w_ref, None, torch.float32)


@pytest.mark.parametrize("with_kpm", [False, True])
def test_is_causal_hint(with_kpm):
    ours, ref = _pair(CONFIGS["batch_first"])
    N, L = 2, 19
    x = torch.randn(N, L, E, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, 12:] = True  # right padding
    o_ref, _ = ref(x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=False)
    o, _ = ours(x.float(), x.float(), x.float(), attn_mask=causal.float(), key_padding_mask=kpm, is_causal=True,
                need_weights=False)
    assert_rule("out", o, o_ref, None, torch.float32)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x.float(), x.float(), x.float(), is_causal=True)


def test_gradients_match_torch():
    cfg = CONFIGS["kdim_vdim"]
    ours, ref = _pair(cfg)
    N, L, S = 2, 13, 9
    q, k, v = (t.requires_grad_() for t in _inputs(cfg, N, L, S))
    kpm = _mask(("kpm", "bool"), N, L, S)
    am = _mask(("2d", "float"), N, L, S)
    o_ref, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    g = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, [q, k, v, *ref.parameters()], g)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o, _ = ours(q32, k32, v32, key_padding_mask=kpm, attn_mask=am.float(), need_weights=False)
    grads = torch.autograd.grad(o, [q32, k32, v32, *ours.parameters()], g.float())
    names = ["dq", "dk", "dv"] + [f"d{n}" for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref):
        assert_rule(name, a, b, None, torch.float32)


def test_state_dict_keys_match_torch():
    for cfg in CONFIGS.values():
        ours, ref = _pair(cfg)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for key, val in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key].double(), val)
    assert "q_proj_weight" in _pair(CONFIGS["kdim_vdim"])[0].state_dict()
    assert "in_proj_weight" in _pair(CONFIGS["default"])[0].state_dict()


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 9, E)
    m.eval()
    a, _ = m(x, x, x, need_weights=False)
    b, _ = m(x, x, x, need_weights=False)
    assert torch.equal(a, b)
    m.train()
    c, _ = m(x, x, x, need_weights=False)
    d, _ = m(x, x, x, need_weights=False)
    assert torch.isfinite(c).all() and not torch.equal(c, a) and not torch.equal(c, d)


def test_fully_masked_rows_give_zero():
    m = MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(2, 6, E)
    am = torch.zeros(6, 6, dtype=torch.bool)
    am[2] = True  # query 2 may see nothing
    for nw in (False, True):
        out, w = m(x, x, x, attn_mask=am, need_weights=nw)
        assert torch.isfinite(out).all()
        assert out[:, 2].abs().max() == 0  # no bias: the empty row's attention output 0 projects to 0
        if nw:
            assert w[:, 2].abs().max() == 0


def test_bad_inputs_raise_clearly():
    m = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 6, E)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="feature sizes"):
        m(x, torch.randn(2, 6, E + 1), x)
    # integer masks: torch refuses them; read as additive they would add +1 where they mean "pad"
    with pytest.raises(TypeError, match="key_padding_mask must be bool .* torch.int64"):
        m(x, x, x, key_padding_mask=torch.tensor([[0, 0, 0, 0, 1, 1]] * 2))
    with pytest.raises(TypeError, match="attn_mask must be bool .* torch.uint8"):
        m(x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.uint8).triu(1))


def _encoder(batch_first=True):
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


def test_patch_transformer_encoder_round_trip(monkeypatch):
    model = _encoder().eval()
    sd = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 10, E)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, 6:] = True  # right padding: PyTorch's nested-tensor fast path would take this call
    real = ~kpm
    with torch.no_grad():
        before = model(x, src_key_padding_mask=kpm)
        names = fastattn.patch(model)
        assert names == ["layers.0.self_attn", "layers.1.self_attn"]
        assert all(type(layer.self_attn) is MultiheadAttention for layer in model.layers)
        assert model.use_nested_tensor  # its nested path runs our forward (padded rows 0, as PyTorch's)
        calls = []
        real_sdpa = fastattn.functional.scaled_dot_product_attention
        monkeypatch.setattr(fastattn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
        after = model(x, src_key_padding_mask=kpm)
        assert len(calls) == 2, "the patched encoder did not run fastattn (PyTorch's fast path bypassed it?)"
        causal = torch.nn.Transformer.generate_square_subsequent_mask(10)
        after_causal = model(x, mask=causal, is_causal=True)
        monkeypatch.undo()
        assert {k: v for k, v in model.state_dict().items()}.keys() == sd.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
        restored = fastattn.unpatch(model)
        assert restored == names and type(model.layers[0].self_attn) is torch.nn.MultiheadAttention
        assert model.use_nested_tensor and not model.layers[0].self_attn._forward_pre_hooks
        again = model(x, src_key_padding_mask=kpm)
        ref_causal = model(x, mask=causal, is_causal=True)
    assert_rule("patched", after, before, None, torch.float32)
    assert torch.equal(after[~real], torch.zeros_like(after[~real]))
    assert_rule("unpatched", again[real], before[real], None, torch.float32)
    assert_rule("patched causal", after_causal, ref_causal, None, torch.float32)


def test_layer_patched_before_its_encoder():
    """A layer patched (or built with fastattn) before nn.TransformerEncoder copies it: the encoder, in eval and
    no_grad with a padding mask, passes our module nested tensors. Same output as PyTorch's, padded rows 0; other
    nested calls are refused with the reason."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    ref = torch.nn.TransformerEncoder(copy.deepcopy(layer), num_layers=2, enable_nested_tensor=True).eval()
    fastattn.patch(layer)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, E)
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    kpm[2, 1:] = True
    with torch.no_grad():
        out, expected = model(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm)
        assert_rule("nested", out, expected, None, torch.float32)
        assert torch.equal(out[kpm], torch.zeros_like(out[kpm]))
        nested = torch.nested.nested_tensor([x[0, :5], x[1]])
        with pytest.raises(ValueError, match="NestedTensor inputs are supported only as nn.TransformerEncoder"):
            model.layers[0].self_attn(nested, nested, nested)  # need_weights defaults to True: torch refuses too


def test_patch_full_transformer_training_and_backend():
    torch.manual_seed(0)
    model = torch.nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                                 batch_first=False)
    ref = copy.deepcopy(model).double()
    names = fastattn.patch(model, backend="reference")
    assert sorted(names) == sorted(["encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                                    "decoder.layers.0.multihead_attn"])
    assert all(m.backend == "reference" for m in model.modules() if isinstance(m, MultiheadAttention))
    src, tgt = torch.randn(9, 2, E, dtype=torch.float64), torch.randn(7, 2, E, dtype=torch.float64)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    out = model(src.float(), tgt.float(), tgt_mask=tgt_mask.float(), tgt_is_causal=True)
    out_ref = ref(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    assert_rule("transformer", out, out_ref, None, torch.float32)
    out.sum().backward()  # training mode: gradients flow through fastattn
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown backend"):
        fastattn.patch(model, backend="nope")


def test_patch_leaves_subclasses_alone():
    class Custom(torch.nn.MultiheadAttention):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(E, E))
    model.add_module("attn", Custom(E, H))
    with pytest.warns(UserWarning, match=r"nothing was replaced \(1 subclass\(es\) of it, left alone\)"):
        assert fastattn.patch(model) == [] and type(model.attn) is Custom
    assert fastattn.unpatch(model) == []


def test_patch_on_a_model_without_multihead_attention_says_so():
    """A silent no-op left users believing a transformers model ran on fastattn."""
    transformers = pytest.importorskip("transformers", reason="needs transformers to build a model without MHA")
    cfg = transformers.BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8)
    with pytest.warns(UserWarning, match='attn_implementation="fastattn"'):
        assert fastattn.patch(transformers.BertModel(cfg)) == []
    model = torch.nn.TransformerEncoderLayer(E, H, batch_first=True)
    fastattn.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patched already: nothing new to replace, and no warning
        assert fastattn.patch(model) == []


@pytest.mark.parametrize("batch_first", [False, True])
def test_output_contiguous_and_self_attention_one_projection(batch_first, monkeypatch):
    """The output is contiguous in the caller's layout (PyTorch's is: callers .view() it), and self-attention
    projects q, k, v in one GEMM in either layout (the batch-first transposes make new tensors: `query is key` is
    read before them)."""
    m = MultiheadAttention(E, H, batch_first=batch_first).eval()
    x = torch.randn(5, 3, E)
    shapes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, w, b=None: shapes.append(tuple(w.shape)) or
                        linear(a, w, b))
    out, _ = m(x, x, x, need_weights=False)
    monkeypatch.undo()
    assert out.shape == x.shape and out.is_contiguous()
    assert shapes == [(3 * E, E), (E, E)]
    ref = torch.nn.MultiheadAttention(E, H, batch_first=batch_first).eval().requires_grad_(False)
    ref.load_state_dict(m.state_dict())
    assert_rule("layout", out, ref(x, x, x, need_weights=False)[0], None, torch.float32)


def test_patch_is_the_function_after_any_import():
    """fastattn.patch is the function whatever is imported: a module fastattn/patch.py had rebound the name on
    `import fastattn.patch` (after which fastattn.patch(model) raised 'module' object is not callable)."""
    import importlib
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fastattn.patch")
    assert callable(fastattn.patch) and fastattn.patch is fastattn.nn.patch
