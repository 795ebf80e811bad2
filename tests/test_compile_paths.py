"""torch.compile(fullgraph=True) on paths that had broken the graph or recompiled on every length: attention dropout
on the fused CPU ops (the seed a SymInt), masks whose values the model code read (transformers' mask function and
the reference BERT), reason texts that printed a symbolic query length (one graph per length, then the recompile
limit), and torch.func.grad with a mask (the fused ops' autograd cannot run under functorch: sdpa takes it), eager
and, for grad, vmap(grad) and jacrev, in a graph traced inside the transform.
aot_eager: the tracing is what is tested; inductor's code generation is test_compile.py's."""
import pytest
import torch
import torch._dynamo.testing

import fastattn
from support.oracle import assert_rule

pytestmark = pytest.mark.usefixtures("one_thread")


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.skipif(bool(fastattn.get_backend("cpu").unavailable()), reason="the cpu backend is not built")
def test_dropout_on_the_fused_ops():
    q, k, v = (torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(3))
    out = _compiled(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.25,
                                                                          backend="cpu"))(q, k, v)
    out.sum().backward()
    ref = fastattn.scaled_dot_product_attention(q, k, v)
    kept = (out != 0).float().mean().item()  # v's rows are random: a dropped probability zeroes nothing by itself
    assert out.shape == ref.shape and torch.isfinite(out).all() and q.grad is not None
    assert 0.5 < (out.abs().mean() / ref.abs().mean()).item() < 2.0 and kept > 0.9


def test_reference_bert_with_a_mask():
    """(Also: outside any context_parallel block the models do not read the CP ContextVar, which dynamo in torch
    2.11 cannot trace.)"""
    from fastattn.models import Bert, BertConfig
    model = Bert(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=32, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        got = _compiled(lambda i, m: model(i, attention_mask=m))(ids, mask)
    want, got = (x[0] if isinstance(x, tuple) else x for x in (want, got))
    assert_rule("bert", got[mask.bool()], want[mask.bool()], None, torch.float32)


def test_transformers_model_with_a_mask():
    transformers = pytest.importorskip("transformers", reason="HuggingFace transformers is not installed")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("fastattn's transformers integration needs transformers >= 5")
    import fastattn.integrations.transformers  # noqa: F401  (registers "fastattn")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="fastattn").eval()
    ids = torch.randint(0, 50, (3, 9))
    for mask in (torch.ones(3, 9, dtype=torch.long), torch.tensor([[1] * 9, [0] * 3 + [1] * 6, [0] * 7 + [1] * 2])):
        with torch.no_grad():
            want = model(ids, attention_mask=mask).logits
            got = _compiled(lambda i, m: model(i, attention_mask=m).logits)(ids, mask)
        assert_rule("gpt2 logits", got[mask.bool()], want[mask.bool()], None, torch.float32)


def test_query_lengths_share_graphs():
    """GQA 8/2, 1..11 query tokens against 40 keys (chunked prefill, speculative steps): at most four graphs (the
    static first length, then one per short-query class: the decode route keeps its speed under torch.compile)."""
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                      fullgraph=True, backend=cnt)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    for sq in range(1, 12):
        f(torch.randn(1, 8, sq, 16), k, v)
    assert cnt.frame_count <= 4, cnt.frame_count


def test_func_grad_with_a_mask():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    m = torch.rand(2, 1, 9, 12) > 0.3
    m[..., 0] = True
    got = torch.func.grad(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m).square().sum(),
                          argnums=(0, 1, 2))(q, k, v)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=m).square()
                               .sum(), (qd, kd, vd))
    for name, a, b in zip("qkv", got, want):
        assert_rule(f"d{name}", a, b, None, torch.float32)


def _transformed(name, f):
    """`name` applied to f(q, k, v): "grad" of its sum with respect to q, k and v, "vmap_grad" that grad vmapped
    over a leading dim, "jacrev" its Jacobians."""
    g = torch.func.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))
    if name == "jacrev":
        return torch.func.jacrev(f, argnums=(0, 1, 2))
    return torch.func.vmap(g) if name == "vmap_grad" else g


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("transform", ["grad", "vmap_grad", "jacrev"])
def test_compiled_func_transforms(transform, masked):
    """A graph traced inside torch.func.grad / vmap(grad) / jacrev takes a backend whose autograd functorch can run
    (before: the fused ops' autograd.Function raised in dynamo). fp32 inputs, which auto gives the fused cpu backend
    outside a transform; checked against PyTorch's SDPA under the same transform in float64."""
    g = torch.Generator().manual_seed(1)
    Sq, Sk = (3, 4) if transform == "jacrev" else (9, 12)
    q, k, v = (torch.randn(2, 2, S, 8, generator=g) for S in (Sq, Sk, Sk))
    m = torch.rand(2, 1, Sq, Sk, generator=g) > 0.3 if masked else None
    if masked:
        m[..., 0] = True
    if transform == "vmap_grad":
        q, k, v = (torch.stack([t, t.flip(-1)]) for t in (q, k, v))  # (2, B, H, S, D): two calls under vmap
    got = _compiled(_transformed(transform, lambda q, k, v: fastattn.scaled_dot_product_attention(
        q, k, v, attn_mask=m)))(q, k, v)
    want = _transformed(transform, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=m))(q.double(), k.double(), v.double())
    for name, a, b in zip("qkv", got, want):
        assert_rule(f"{transform} d{name}", a, b, None, torch.float32)


@pytest.mark.skipif(bool(fastattn.get_backend("cpu").unavailable()), reason="the cpu backend is not built")
def test_compiled_func_grad_refuses_a_fused_backend_by_name():
    q, k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    f = _compiled(torch.func.grad(lambda q: fastattn.scaled_dot_product_attention(q, k, v, backend="cpu").sum()))
    with pytest.raises(Exception, match="func transform not supported"):
        f(q)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated in torch 2.14
def test_jit_trace_records_pytorchs_sdpa_and_refuses_what_it_cannot_record():
    """torch.jit.trace (TorchScript) failed with an AssertionError from a size check: the SDPA surface on auto now
    records PyTorch's SDPA (a trace that runs at other shapes, also through a patched encoder); calls whose choices
    depend on sizes refuse by name."""
    import copy
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ref = copy.deepcopy(enc)
    fastattn.patch(enc)
    traced = torch.jit.trace(enc, (torch.randn(2, 12, 32),))
    x = torch.randn(3, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), ref(x), rtol=1e-5, atol=1e-5)
    q = torch.randn(2, 10, 4, 16)
    with pytest.raises(fastattn.InputValueError, match="torch.jit.trace cannot record"):
        torch.jit.trace(lambda t: fastattn.flash_attn_func(t, t, t, causal=True), (q,))
    with pytest.raises(fastattn.InputValueError, match="backend='cpu'"):
        torch.jit.trace(lambda t: fastattn.scaled_dot_product_attention(t, t, t, backend="cpu"), (q,))


def test_fx_symbolic_trace_keeps_each_call_as_one_node():
    """torch.fx.symbolic_trace (quantize_fx and other FX passes) refused a Proxy as query; a patched model that FX
    traced before patch() refused it too. The SDPA surface is one call_function node and the patched
    MultiheadAttention one call_module node (a leaf, as torch's own), and the graph runs fastattn."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = torch.nn.Linear(32, 2)

        def forward(self, x):
            y = self.attn(x, x, x, need_weights=False)[0]
            q = y.view(2, 7, 4, 8).transpose(1, 2)  # (B, S, E) -> (B, H, S, D)
            return self.fc(y), fastattn.scaled_dot_product_attention(q, q, q, is_causal=True)

    net = Net().eval()
    fastattn.patch(net)
    gm = torch.fx.symbolic_trace(net)
    nodes = [(n.op, n.target) for n in gm.graph.nodes]
    assert ("call_module", "attn") in nodes and ("call_function", fastattn.scaled_dot_product_attention) in nodes
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        for got, want in zip(gm(x), net(x)):
            assert torch.equal(got, want)


def test_fx_symbolic_trace_flash_surfaces_are_one_node_each():
    """The flash-attn surfaces under torch.fx.symbolic_trace: each call one call_function node of the public
    function (they read sizes and strides, which a Proxy lacks: each raised inside fastattn), return_attn_probs'
    tuple indexed in the graph, flash_attn_with_kvcache's cache writes done when the graph runs; the graph's results
    are the eager ones."""
    from fastattn import packed

    class Net(torch.nn.Module):
        def forward(self, q, qkv, kv, flat, flat_qkv, cu, kc, vc, new, lens):
            a = fastattn.flash_attn_func(q, q, q, causal=True)
            b = fastattn.flash_attn_func(q, q, q, return_attn_probs=True)[1]  # lse, through a getitem node
            c = fastattn.flash_attn_varlen_func(flat, flat, flat, cu, cu, 5, 5, causal=True)
            d = packed.flash_attn_qkvpacked_func(qkv, causal=True)
            e = packed.flash_attn_kvpacked_func(q, kv)
            f = packed.flash_attn_varlen_qkvpacked_func(flat_qkv, cu, 5)
            g = packed.flash_attn_varlen_kvpacked_func(flat, flat_qkv[:, 1:], cu, cu, 5, 5)
            h = fastattn.flash_attn_with_kvcache(q, kc, vc, k=new, v=new, cache_seqlens=lens, causal=True)
            return a, b, c, d, e, f, g, h

    gm = torch.fx.symbolic_trace(Net())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for fn in (fastattn.flash_attn_func, fastattn.flash_attn_varlen_func, packed.flash_attn_qkvpacked_func,
               packed.flash_attn_kvpacked_func, packed.flash_attn_varlen_qkvpacked_func,
               packed.flash_attn_varlen_kvpacked_func, fastattn.flash_attn_with_kvcache):
        assert fn in targets, fn
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 5, 4, 16, generator=g)
    args = [q, torch.randn(2, 5, 3, 4, 16, generator=g), torch.randn(2, 5, 2, 4, 16, generator=g),
            torch.randn(8, 4, 16, generator=g), torch.randn(8, 3, 4, 16, generator=g),
            torch.tensor([0, 3, 8], dtype=torch.int32), torch.zeros(2, 12, 4, 16), torch.zeros(2, 12, 4, 16),
            torch.randn(2, 5, 4, 16, generator=g), torch.tensor([2, 7], dtype=torch.int32)]
    eager_args = [t.clone() for t in args]
    with torch.no_grad():
        got, want = gm(*args), Net()(*eager_args)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert torch.equal(args[6], eager_args[6]) and args[6].abs().sum() > 0  # the graph wrote the new keys


def test_import_leaves_dynamo_unloaded_and_marks_as_torch_does():
    """`import fastattn` and eager calls load neither torch._dynamo nor the symbolic-shapes module (~0.9 s of a
    ~1 s import before; both load with the first trace), and params.trace_constant marks a function exactly as
    torch.compiler.assume_constant_result does (if a torch release changes that decorator, this fails)."""
    import subprocess
    import sys
    code = ("import sys, torch, fastattn; q = torch.randn(1, 2, 5, 8); fastattn.scaled_dot_product_attention(q, q, q);"
            "fastattn.flash_attn_func(q, q, q); print([m for m in ('torch._dynamo', "
            "'torch.fx.experimental.symbolic_shapes') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
    from fastattn.params import trace_constant
    ours, theirs = trace_constant(lambda: 0), torch.compiler.assume_constant_result(lambda: 0)
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}
