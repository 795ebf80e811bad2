"""attn_implementation="fastattn" in HuggingFace transformers (>= 5): BERT and GPT-2 against "eager".

Tiny random configs on CPU, no downloads. The reference is the eager model in float64 on the same weights; the
fastattn model runs in float32 and must meet the fp32 rule (1e-5 relative to the largest reference value) on real
(non-padding) tokens. Tiny 2-layer models do not amplify rounding beyond that (measured ~5e-7). Greedy generation
compares tokens in float64 on both sides so that near-ties in the argmax cannot flip a token."""
import copy

import pytest
import torch

from support.hf import require_transformers_5

transformers = require_transformers_5()

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fa_hf  # noqa: E402
from support.oracle import assert_rule  # noqa: E402
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, BertForSequenceClassification,  # noqa: E402
                          BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model)

V = 97
# None = what users get (FASTATTN_BACKEND or auto: the cpu backend once built, else sdpa); "reference" pins the
# naive semantics.
BACKENDS = [None, "reference"]


def bert_config(**kw):
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                pad_token_id=0)
    return BertConfig(**{**base, **kw})


def gpt2_config(**kw):
    # scale_attn_by_inverse_layer_idx: GPT-2 divides `scaling` by layer_idx + 1; we must use the value passed.
    base = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True, initializer_range=0.2, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    return GPT2Config(**{**base, **kw})


def pair(cls, config, dtype=torch.float32):
    """(eager float64 reference, fastattn model) with identical weights; configs deep-copied per model."""
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    fast = cls._from_config(copy.deepcopy(config), attn_implementation="fastattn").eval()
    fast.load_state_dict(ref.state_dict())
    assert fast.config._attn_implementation == "fastattn" and ref.config._attn_implementation == "eager"
    return ref.double(), fast.to(dtype)


def batch(padding, B=3, S=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padding == "right":
        mask[1, 15:] = 0
        mask[2, 5:] = 0
    elif padding == "left":
        mask[1, :8] = 0
        mask[2, :S - 4] = 0
    return ids.masked_fill(mask == 0, 0), mask


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def count_calls(monkeypatch):
    """Counts fastattn SDPA calls made by the integration and records their dropout_p."""
    calls = []
    real = fastattn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(k.get("dropout_p", 0.0))
        return real(*a, **k)
    monkeypatch.setattr(fa_hf.functional, "scaled_dot_product_attention", spy)
    return calls


def test_registered_in_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert "fastattn" in AttentionInterface._global_mapping
    # Without the mask entry transformers passes attention_mask=None: padding and causality silently vanish.
    assert AttentionMaskInterface._global_mapping.get("fastattn") is fa_hf.fastattn_mask
    for bad in ("flash_fast", "my/impl"):
        with pytest.raises(ValueError, match="flash"):
            fa_hf.register(bad)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b or "default")
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, GPT2Model, GPT2LMHeadModel],
                         ids=lambda c: c.__name__)
def test_forward_matches_eager(cls, padding, backend, count_calls):
    config = bert_config(num_labels=3) if cls.__name__.startswith("Bert") else gpt2_config()
    ref, fast = pair(cls, config)
    ids, mask = batch(padding)
    with torch.no_grad(), fastattn.use_backend(backend):
        out_ref = ref(ids, attention_mask=mask)
        out = fast(ids, attention_mask=mask)
    assert len(count_calls) == 2, "fastattn was not called once per layer"
    name = "logits" if hasattr(out_ref, "logits") else "last_hidden_state"
    a, b = getattr(out, name), getattr(out_ref, name)
    assert torch.isfinite(a).all(), "NaN/inf (fully masked rows must give 0, not NaN)"
    if name == "last_hidden_state":
        real = mask.bool()
        a, b = a[real], b[real]
    elif cls is GPT2LMHeadModel:
        real = mask.bool()
        a, b = a[real], b[real]
    assert_rule(f"{cls.__name__} {name}", a, b, None, torch.float32)


def test_mask_forms_skip_work():
    """Padding reaches the kernels as a key mask (B, 1, 1, S), never as a dense (B, 1, S, S) mask."""
    ids, mask = batch("left")
    pad = mask.bool()
    m = fa_hf.fastattn_mask(batch_size=3, q_length=23, kv_length=23, attention_mask=pad,
                            mask_function=transformers.masking_utils.bidirectional_mask_function,
                            allow_is_bidirectional_skip=True)
    assert m.shape == (3, 1, 1, 23) and torch.equal(m[:, 0, 0], pad)
    m = fa_hf.fastattn_mask(batch_size=3, q_length=23, kv_length=23, attention_mask=pad)  # causal
    assert m.shape == (3, 1, 1, 23)
    assert fa_hf.fastattn_mask(batch_size=3, q_length=23, kv_length=23, attention_mask=torch.ones_like(pad)) is None
    # Static-cache prefill: 40 slots, 23 new tokens from position 0 -> plain causal, keys past 23 cut.
    assert fa_hf.fastattn_mask(batch_size=3, q_length=23, kv_length=40, attention_mask=None) is None
    # Earlier 5.x passes cache_position instead of q_length/q_offset.
    m2 = fa_hf.fastattn_mask(batch_size=3, cache_position=torch.arange(23), kv_length=23, attention_mask=pad)
    assert torch.equal(m, m2)
    # Decode step against a static cache of 40 slots with 30 seen tokens: full-width key mask, future slots off.
    m = fa_hf.fastattn_mask(batch_size=3, q_length=1, q_offset=30, kv_length=40, attention_mask=None,
                            allow_is_causal_skip=False)
    assert m.shape == (3, 1, 1, 40) and m[:, 0, 0, :31].all() and not m[:, 0, 0, 31:].any()
    # Anything else (here a custom mask function) gets transformers' own dense mask, used as is.
    mu = transformers.masking_utils
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, k: k != 3)
    kw = dict(batch_size=3, q_length=23, kv_length=23, attention_mask=pad, mask_function=custom)
    assert torch.equal(fa_hf.fastattn_mask(**kw), mu.sdpa_mask(**kw))


def test_set_attn_implementation_and_from_pretrained(tmp_path, count_calls):
    config = gpt2_config()
    model = GPT2LMHeadModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ids, mask = batch("left")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("fastattn")
        assert model.config._attn_implementation == "fastattn"
        out = model(ids, attention_mask=mask).logits
    assert len(count_calls) == 2
    real = mask.bool()
    assert_rule("set_attn_implementation", out[real], ref[real], None, torch.float32)

    model.save_pretrained(tmp_path / "gpt2")
    bert = BertModel._from_config(bert_config(), attn_implementation="eager").eval()
    bert.save_pretrained(tmp_path / "bert")
    for path, auto in ((tmp_path / "gpt2", AutoModelForCausalLM), (tmp_path / "bert", AutoModel)):
        loaded = auto.from_pretrained(path, attn_implementation="fastattn").eval()
        assert loaded.config._attn_implementation == "fastattn"
        with torch.no_grad():
            loaded(ids, attention_mask=mask)
    assert len(count_calls) == 6


@pytest.mark.parametrize("cls", [BertForSequenceClassification, GPT2LMHeadModel], ids=lambda c: c.__name__)
def test_dropout_only_in_training(cls, count_calls):
    config = bert_config(attention_probs_dropout_prob=0.1) if cls is BertForSequenceClassification else \
        gpt2_config(attn_pdrop=0.1)
    model = cls._from_config(copy.deepcopy(config), attn_implementation="fastattn")
    ids, mask = batch("right")
    model.train()
    a = model(ids, attention_mask=mask).logits
    b = model(ids, attention_mask=mask).logits
    assert count_calls == [0.1, 0.1, 0.1, 0.1]
    assert not torch.equal(a, b), "attention dropout had no effect in training"
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert count_calls[4:] == [0.0, 0.0]


def _generate(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None, **kw)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generate_matches_eager(cache, padding, count_calls):
    ids, mask = batch(padding, S=9)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    # A random GPT-2 sometimes settles on one token whatever the context (~1 draw in 40): such a model could not
    # tell a wrong attention from a right one, so draw fresh weights (judged on eager alone) until it varies.
    for _ in range(8):
        ref, fast = pair(GPT2LMHeadModel, gpt2_config(), dtype=torch.float64)
        want = _generate(ref, ids, mask, **kw)
        if len(set(want[:, 9:].flatten().tolist())) > 3:
            break
    count_calls.clear()
    got = _generate(fast, ids, mask, **kw)
    assert len(count_calls) >= 2 * 12  # prefill + decode steps all ran through fastattn
    assert got.tolist() == want.tolist()
    assert len(set(want[:, 9:].flatten().tolist())) > 3, "degenerate test: the model repeats one token"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_fp32_picks_eager_argmax(cache, count_calls):
    """float32 (the dtype the fused CPU/GPU kernels take): every token fastattn picks is eager's argmax, up to
    1e-4 of the logit scale (exact token equality could flip on a near-tie), checked by teacher forcing."""
    ids, mask = batch("left", S=9)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    for _ in range(8):  # fresh weights until eager's tokens vary (see test_greedy_generate_matches_eager)
        ref, fast = pair(GPT2LMHeadModel, gpt2_config())
        ref = ref.float()
        if len(set(_generate(ref, ids, mask, **kw)[:, 9:].flatten().tolist())) > 3:
            break
    got = _generate(fast, ids, mask, **kw)
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], dim=1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)  # generate()'s positions for left padding
    with torch.no_grad():
        logits = ref(got, attention_mask=full_mask, position_ids=pos).logits[:, 8:-1]  # predicts tokens 9..20
    picked = logits.gather(-1, got[:, 9:, None]).squeeze(-1)
    gap = (logits.max(-1).values - picked).max().item()
    print(f"largest eager-logit gap of a fastattn token: {gap:.3g} (logit scale {logits.abs().max().item():.3g})")
    assert gap <= 1e-4 * logits.abs().max().item()
    assert len(set(got[:, 9:].flatten().tolist())) > 3, "degenerate test: the model repeats one token"


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_decode_chunk_against_cache_matches_eager():
    """q of length > 1 against a cache holding earlier tokens, with left padding (dense fold of the diagonal)."""
    ref, fast = pair(GPT2LMHeadModel, gpt2_config())
    ids, mask = batch("left", S=15)
    outs = []
    for model in (ref, fast):
        with torch.no_grad():
            first = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
            # transformers 5.24 names the cache `cache` (past_key_values deprecated), 5.17 past_key_values only
            cache = {"cache": first.cache} if hasattr(first, "cache") else {"past_key_values": first.past_key_values}
            outs.append(model(ids[:, 10:], attention_mask=mask, **cache).logits)
    real = mask[:, 10:].bool()
    assert_rule("chunk logits", outs[1][real], outs[0][real], None, torch.float32)


def test_trainer_losses_match_eager(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    n, S = 96, 16
    ids = torch.randint(3, V, (n, S), generator=g)
    lens = torch.randint(6, S + 1, (n,), generator=g)
    mask = (torch.arange(S) < lens[:, None]).long()
    labels = (ids[:, 0] % 2)  # learnable from the first token
    data = [dict(input_ids=ids[i].masked_fill(mask[i] == 0, 0), attention_mask=mask[i], labels=labels[i])
            for i in range(n)]

    config = bert_config()
    torch.manual_seed(0)
    init = BertForSequenceClassification._from_config(copy.deepcopy(config), attn_implementation="eager").state_dict()

    def run(impl, cfg, steps):
        model = BertForSequenceClassification._from_config(copy.deepcopy(cfg), attn_implementation=impl)
        model.load_state_dict(init)
        args = TrainingArguments(output_dir=str(tmp_path / impl), per_device_train_batch_size=8, max_steps=steps,
                                 learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                                 use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    eager = run("eager", config, 36)
    fast = run("fastattn", config, 36)
    print("eager losses", [round(x, 5) for x in eager])
    print("fast  losses", [round(x, 5) for x in fast])
    assert len(eager) == len(fast) == 36
    # fp32 training: rounding differences compound through 36 Adam steps, so the per-step bound is 1e-4 relative
    # (measured ~5e-7), still far below the loss's own step-to-step change (it falls ~10x over the run).
    rel = [abs(a - b) / max(abs(b), 1e-3) for a, b in zip(fast, eager)]
    print(f"max relative loss difference {max(rel):.3g} at step {rel.index(max(rel))}")
    assert max(rel) <= 1e-4

    dropped = run("fastattn", bert_config(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1), 36)
    print("dropout losses", [round(x, 5) for x in dropped])
    assert all(torch.isfinite(torch.tensor(dropped)))
    assert sum(dropped[-6:]) / 6 < 0.8 * sum(dropped[:6]) / 6, "loss did not fall with dropout 0.1"
