"""attn_implementation="fastattn" where it had parted from "sdpa" (an audit of transformers 5 models, 2026-12-05):
mixed precision under torch.autocast, a 4-D mask that is not fastattn's own key mask, a mask shorter than the keys,
and models whose attention never reaches AttentionInterface. Also the SDPA function's autocast rule itself.
Tiny random configs on CPU, no downloads; each test fails on the code before its fix."""
import copy

import pytest
import torch

import fastattn
from support.hf import require_transformers_5
from support.oracle import assert_rule

transformers = require_transformers_5()

import fastattn.integrations.transformers as fa_hf  # noqa: E402

V = 97
pytestmark = pytest.mark.usefixtures("one_thread")


def llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **kw)
    return LlamaForCausalLM, cfg


def models(cls, cfg, names):
    torch.manual_seed(0)
    first = cls._from_config(copy.deepcopy(cfg), attn_implementation=names[0]).eval()
    out = {names[0]: first}
    for n in names[1:]:
        out[n] = cls._from_config(copy.deepcopy(cfg), attn_implementation=n).eval()
        out[n].load_state_dict(first.state_dict())
    return out


def batch(B=3, S=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


def test_sdpa_autocast_casts_as_pytorch():
    """Inside torch.autocast the SDPA function casts fp32/fp16/bf16 inputs and a float mask to the autocast dtype, as
    PyTorch's own SDPA (mixed q/k/v dtypes included); fp64 stays fp64."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 4, 9, 16, generator=g).bfloat16()
    mask = torch.randn(9, 9, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert fastattn.explain(q, k, v, attn_mask=mask).chosen  # explain takes the same cast
        wide = fastattn.scaled_dot_product_attention(q.double(), k.double(), v.double())
        meta = q.to("meta")  # a device without autocast state: left as it is
        assert fastattn.scaled_dot_product_attention(meta, meta, meta).dtype == torch.float32
    assert got.dtype == want.dtype == torch.bfloat16 and wide.dtype == torch.float64
    plain = fastattn.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v, attn_mask=mask.bfloat16())
    assert torch.equal(got, plain)
    compiled = torch.compile(lambda *a: fastattn.scaled_dot_product_attention(*a, is_causal=True), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traced = compiled(q, k, v)
    assert traced.dtype == torch.bfloat16
    # against the same compiled function on inputs cast by hand: eager calls may take another route (auto's bf16 rules
    # on AMX read the thread count and tiny sizes only outside a graph), whose bits differ
    assert torch.equal(traced, compiled(q.bfloat16(), k.bfloat16(), v))


def test_rope_model_under_autocast():
    """A rotary model under bf16 autocast: its rotary step returns fp32 q and k beside a bf16 v; the call was refused
    for mixed dtypes. Now the logits match sdpa's under the same autocast (bf16: compared at bf16's resolution)."""
    ms = models(*llama(), ("sdpa", "fastattn"))
    ids, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = {n: m(ids, attention_mask=mask).logits.float() for n, m in ms.items()}
    real = mask.bool()
    err = (out["fastattn"][real] - out["sdpa"][real]).abs().max().item()
    assert err <= 0.05 * out["sdpa"][real].abs().max().item(), err


def test_a_mask_not_its_own_is_read_as_sdpa_reads_it():
    """A (B, 1, 1, S) bool mask handed to a causal model (a user's, or a bidirectional mask function's) is complete
    as given, as SDPA reads it: fastattn had made it causal from the layer's flag. fastattn's own key masks still
    carry causality, and survive the .contiguous() generate() applies to masks for static caches."""
    ms = models(*llama(), ("sdpa", "fastattn"))
    ids, mask = batch()
    m4 = mask.bool()[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    with torch.no_grad():
        got = ms["fastattn"](ids, attention_mask=m4).logits
        want = ms["sdpa"].double()(ids, attention_mask=m4).logits
    real = mask.bool()
    assert_rule("user mask", got[real], want[real], None, torch.float32)
    own = fa_hf.fastattn_mask(3, q_length=5, q_offset=0, kv_length=8, kv_offset=0,
                              attention_mask=mask[:, :8], mask_function=transformers.masking_utils.causal_mask_function)
    assert fa_hf._is_key_mask(own) and fa_hf._is_key_mask(own.contiguous()) and own.shape == (3, 1, 1, 5)
    assert not fa_hf._is_key_mask(m4)


def test_dense_mask_must_cover_the_keys():
    """A dense mask over fewer keys than the layer has: PyTorch's SDPA and eager raise; fastattn had silently dropped
    the keys past it."""
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 3, 16)
    k = v = torch.randn(2, 2, 8, 16)
    short = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"attention mask \(2, 1, 3, 3\) does not cover the layer's 8 keys"):
        fa_hf.fastattn_attention_forward(module, q, k, v, short, scaling=0.25)


def test_models_without_the_interface_are_refused():
    """Bloom computes attention in its own code: with "fastattn" it never called fastattn and added the compact
    masks to its scores as numbers (a later token moved earlier logits). Refused with the reason, naming the model's
    module; Llama, which reaches AttentionInterface, runs."""
    from transformers import BloomConfig, BloomForCausalLM
    cfg = BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    model = BloomForCausalLM._from_config(cfg, attn_implementation="fastattn").eval()
    ids, mask = batch()
    with torch.no_grad(), pytest.raises(ValueError, match="modeling_bloom computes attention in its own code"):
        model(ids, attention_mask=mask)
    ms = models(*llama(), ("fastattn",))
    with torch.no_grad():
        ms["fastattn"](ids, attention_mask=mask)
