"""Every surface runs on fake tensors (torch's FakeTensorMode), as shape and memory estimators run models: fake
tensors carry shapes and no values, so a check or shortcut that reads values (a dropout seed, a mask that is all
True, cu_seqlens, cache lengths) must step aside, as it does while torch.compile traces. PyTorch's SDPA runs there;
each of these raised DataDependentOutputException before."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fastattn
from fastattn.models import Bert, BertConfig


def _fake(t, shape):
    assert isinstance(t, FakeTensor) and tuple(t.shape) == shape, (type(t), t.shape)


def test_sdpa_surface_dropout_and_float_mask():
    with FakeTensorMode():
        q = torch.randn(2, 4, 16, 32)
        _fake(fastattn.scaled_dot_product_attention(q, q, q, dropout_p=0.1), (2, 4, 16, 32))
        _fake(fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(2, 4, 16, 16), backend="sdpa"),
              (2, 4, 16, 32))


def test_flash_surfaces_varlen_and_kvcache():
    with FakeTensorMode():
        q = torch.randn(20, 4, 16)
        cu = torch.tensor([0, 8, 20], dtype=torch.int32)
        _fake(fastattn.flash_attn_varlen_func(q, q, q, cu, cu, 12, 12, causal=True), (20, 4, 16))
        kc, vc = torch.randn(2, 32, 4, 16), torch.randn(2, 32, 4, 16)
        _fake(fastattn.flash_attn_with_kvcache(torch.randn(2, 1, 4, 16), kc, vc, cache_seqlens=5), (2, 1, 4, 16))
        new = torch.randn(2, 1, 4, 16)
        _fake(fastattn.flash_attn_with_kvcache(new, kc, vc, k=new, v=new, cache_seqlens=torch.tensor(
            [3, 5], dtype=torch.int32)), (2, 1, 4, 16))


def test_reference_bert_with_a_mask():
    model = Bert(BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                            intermediate_size=64)).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        hidden, pooled = model(torch.randint(0, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    _fake(hidden, (2, 8, 32))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_transformers_models_with_an_attention_mask(arch):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'transformers>=5')")
    import fastattn.integrations.transformers  # noqa: F401  (registers attn_implementation="fastattn")
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=32)
        model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="fastattn").eval()
    else:
        cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                      intermediate_size=64, vocab_size=50)
        model = transformers.BertModel._from_config(cfg, attn_implementation="fastattn").eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = model(torch.randint(0, 50, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long))
    assert isinstance(out[0], FakeTensor) and out[0].shape[:2] == (2, 8)
