"""attn_implementation="fastattn" for models whose attention is more than SDPA's: attention sinks (GPT-OSS's
`s_aux`), logit soft-capping (Gemma 2's `softcap`), T5's `position_bias`, chunked prefill against a cache
(causality bottom-right against the cache), and the keywords no kernel implements (refused, never dropped). Also
fastattn.functional.attention, the call these go through, against the float64 oracle.

Tiny random configs on CPU, no downloads. Models: the eager model in float64 against fastattn in float32 on the same
weights under the fp32 rule (1e-5 relative to the largest reference value), forward and every parameter's gradient.
The forward tests also check that dropping the feature would fail that rule (the test can fail)."""
import copy

import pytest
import torch

from support.hf import require_transformers_5

transformers = require_transformers_5()

import fastattn.integrations.transformers as fa_hf  # noqa: E402
from fastattn import functional  # noqa: E402
from support.oracle import assert_param_grads, assert_rule, check_rule, lse_reference, oracle_attention  # noqa: E402

V = 97
pytestmark = pytest.mark.usefixtures("one_thread")


def gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    # Two experts, both taken: no discrete routing choice that float32 and float64 could make differently.
    cfg = GptOssConfig(vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=2,
                       sliding_window=4, max_position_embeddings=64,
                       layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, experts_implementation="eager")  # grouped_mm: no float64
    return GptOssForCausalLM, cfg


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    # A cap of 0.5 on scores of size ~1: tanh far from linear (Gemma 2's own 50 would hardly bend these).
    cfg = Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=64,
                       attn_logit_softcapping=0.5, final_logit_softcapping=None, query_pre_attn_scalar=1,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM, cfg


MODELS = {"gpt_oss": gpt_oss, "gemma2": gemma2}


def pair(which, dtype=torch.float32, seed=0):
    """(eager float64 reference, fastattn model) with identical weights; sinks drawn large enough to matter."""
    cls, cfg = MODELS[which]()
    torch.manual_seed(seed)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 2.0)
    fast = cls._from_config(copy.deepcopy(cfg), attn_implementation="fastattn")
    fast.load_state_dict(ref.state_dict())
    return ref.double().eval(), fast.to(dtype).eval()


def batch(padding, B=3, S=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0
        mask[2, :S - 4] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def without_feature(monkeypatch):
    """Runs the fastattn model with its sinks / softcap dropped: what the integration did before it took them."""
    def apply():
        real = fa_hf.fastattn_attention_forward

        def dropped(module, q, k, v, mask, dropout=0.0, scaling=None, is_causal=None, **kw):
            kw = {n: x for n, x in kw.items() if n not in ("s_aux", "sinks", "softcap")}
            return real(module, q, k, v, mask, dropout, scaling, is_causal, **kw)
        transformers.AttentionInterface.register("fastattn", dropped)
    yield apply
    fa_hf.register()


def _logits(model, ids, mask, alone=False):
    """Logits of the real tokens (tokens, V). alone: each sequence run by itself without its padding (the eager
    reference: eager Gemma 2 turns padded rows NaN and they reach the real ones in the next layer; rotary positions
    shifted by the padding leave every score as it is)."""
    real = mask.bool()
    if alone:
        return torch.cat([model(ids[b, real[b]][None]).logits[0] for b in range(ids.shape[0])])
    return model(ids, attention_mask=mask).logits[real]


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("which", sorted(MODELS))
def test_forward_matches_eager(which, padding, without_feature):
    ref, fast = pair(which)
    ids, mask = batch(padding)
    with torch.no_grad():
        want = _logits(ref, ids, mask, alone=True)
        got = _logits(fast, ids, mask)
        assert_rule(f"{which} logits", got, want, None, torch.float32)
        without_feature()
        ok, msg = check_rule(f"{which} logits without the feature", _logits(fast, ids, mask), want, None,
                             torch.float32)
    assert not ok, f"the test cannot fail: {msg}"


@pytest.mark.parametrize("which", sorted(MODELS))
def test_grads_match_eager(which):
    """Training: the sinks go in as one more key (differentiable in the sinks too), softcap through the kernels."""
    ref, fast = pair(which)
    ids, mask = batch("left")
    for model, alone in ((ref, True), (fast, False)):
        model.train()
        out = _logits(model, ids, mask, alone)  # (tokens, V)
        (out.float() * torch.linspace(-1, 1, V)).square().sum().backward()
    grads = {n: p.grad for n, p in fast.named_parameters()}
    if which == "gpt_oss":
        assert any(n.endswith("sinks") and g.abs().max() > 0 for n, g in grads.items())
    assert_param_grads(ref, grads)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpt_oss_generate_matches_eager(cache):
    """Greedy decoding with left padding: sinks in every prefill and decode step (float64 on both sides, so a
    near-tie cannot flip a token)."""
    ids, mask = batch("left", S=7)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache == "static":
        kw["cache_implementation"] = "static"
    for seed in range(8):  # fresh weights until eager's tokens vary (a degenerate model cannot tell wrong from right)
        ref, fast = pair("gpt_oss", dtype=torch.float64, seed=seed)
        want = ref.generate(ids, **kw)
        if len(set(want[:, 7:].flatten().tolist())) > 3:
            break
    assert fast.generate(ids, **kw).tolist() == want.tolist()


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_gpt_oss_chunk_against_cache():
    """A chunk of queries after a cached prefix: the key mask with causality bottom-right against it (no dense
    fold), sinks included."""
    ref, fast = pair("gpt_oss")
    ids, mask = batch("left", S=13)
    outs = []
    for model in (ref, fast):
        with torch.no_grad():
            first = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
            cache = {"cache": first.cache} if hasattr(first, "cache") else {"past_key_values": first.past_key_values}
            outs.append(model(ids[:, 8:], attention_mask=mask, **cache).logits)
    real = mask[:, 8:].bool()
    assert_rule("chunk logits", outs[1][real], outs[0][real], None, torch.float32)


def test_t5_position_bias_matches_eager():
    """T5's relative position bias (`position_bias`, with the padding folded in) in its encoder, decoder and
    cross-attention, forward and greedy decoding (float64 on both sides)."""
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    ref = T5ForConditionalGeneration._from_config(copy.deepcopy(cfg), attn_implementation="eager").double().eval()
    fast = T5ForConditionalGeneration._from_config(copy.deepcopy(cfg), attn_implementation="fastattn").double().eval()
    fast.load_state_dict(ref.state_dict())
    ids, mask = batch("left", S=9)
    dec = torch.randint(3, V, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = fast(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert_rule("t5 logits", got, want, None, torch.float32)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert fast.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def test_unsupported_keywords_raise():
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    for name in ("indices", "block_indices"):
        with pytest.raises(ValueError, match=name):
            fa_hf.fastattn_attention_forward(module, q, q, q, None, **{name: torch.zeros(1, 3, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="s_aux"):
        fa_hf.fastattn_attention_forward(module, q, q, q, None, s_aux=torch.zeros(3))  # one per head: (2,)
    for name in ("s_aux", "sinks", "position_bias", "indices"):  # context parallel runs none of them
        with pytest.raises(ValueError, match=name):
            fa_hf.fastattn_cp_attention_forward(module, q, q, q, None, **{name: torch.zeros(2)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_attention_softcap_bottom_right_lse(backend, dtype):
    """functional.attention against the float64 oracle: softcap before a float mask, causal bottom-right with more
    keys than queries (and fewer: the first rows see nothing), GQA, and the lse."""
    g = torch.Generator().manual_seed(1)
    for Sq, Sk in ((37, 70), (70, 37)):
        q = torch.randn(2, 4, Sq, 32, generator=g).to(dtype)
        k, v = (torch.randn(2, 2, Sk, 32, generator=g).to(dtype) for _ in range(2))
        bias = torch.randn(2, 1, 1, Sk, generator=g).to(dtype)  # (B, 1, 1, Sk) float key bias
        out, lse = functional.attention(q, k, v, bias, is_causal=True, scale=0.3, enable_gqa=True, softcap=1.5,
                                        bottom_right=True, return_lse=True, backend=backend)
        kw = dict(scale=0.3, mask=bias, window=(-1, 0), bottom_right=True, softcap=1.5)
        want = oracle_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), **kw)
        base = oracle_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), dtype=dtype, **kw)
        assert_rule(f"out {Sq}x{Sk}", out, want, base, dtype)
        want_lse = lse_reference(q, k, 0.3, (-1, 0), 1.5, None, bias=bias)
        assert_rule(f"lse {Sq}x{Sk}", lse, want_lse, lse_reference(q, k, 0.3, (-1, 0), 1.5, None, dtype=dtype,
                                                                     bias=bias), torch.float32)


def test_attention_checks():
    q = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="4-D"):
        functional.attention(q, q, q)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        functional.attention(q, q, q, softcap=-1.0)
