"""Reference models (fastattn.models) load transformers checkpoints by name and match transformers' eager models.

Reference: the transformers eager model in float64 on the same weights. Ours runs in float32 and must meet the fp32
rule on real tokens (tests/support/oracle.py). Greedy generation compares tokens in float64 (no argmax near-ties)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is needed to build the reference models "
                                                          "whose checkpoints ours load (pip install transformers)")

from fastattn.models import GPT2, Bert, BertForSequenceClassification, GPT2Config, KVCache  # noqa: E402
from support.oracle import assert_rule, bias_terms  # noqa: E402

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_bert(cls=transformers.BertModel, **kw):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=64, num_labels=3, **kw)
    return cls._from_config(cfg, attn_implementation="eager").eval()


def hf_gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                                  scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2, **kw)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()


def batch(padding, B=3, S=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if padding == "right":
        mask[1, 13:] = 0
        mask[2, 3:] = 0
    elif padding == "left":
        mask[1, :6] = 0
        mask[2, :S - 3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_bert_matches_transformers(padding):
    hf = hf_bert()
    ours = Bert.from_transformers(hf)
    assert set(ours.state_dict()) == set(hf.state_dict())  # same names: a checkpoint is a key copy
    ids, mask = batch(padding)
    tt = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(ids, attention_mask=mask, token_type_ids=tt)
        hidden, pooled = ours(ids, mask, tt)
    real = mask.bool()
    assert_rule("hidden", hidden[real], ref.last_hidden_state[real], None, torch.float32)
    if padding != "left":  # pooled reads token 0, which is padding in left-padded rows
        assert_rule("pooled", pooled, ref.pooler_output, None, torch.float32)


def test_bert_classifier_and_gradients_match_transformers():
    hf = hf_bert(transformers.BertForSequenceClassification, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0).train()
    ours = BertForSequenceClassification.from_transformers(hf)
    assert ours.training
    ids, mask = batch("right")
    labels = torch.tensor([0, 2, 1])
    ref = copy.deepcopy(hf).double()
    out_ref = ref(ids, attention_mask=mask, labels=labels)
    out_ref.loss.backward()
    hf(ids, attention_mask=mask, labels=labels).loss.backward()  # transformers' own fp32 model: the baseline
    logits = ours(ids, mask)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert_rule("logits", logits, out_ref.logits, None, torch.float32)
    ref_params, base_params = dict(ref.named_parameters()), dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        # Some gradients (LayerNorm biases) are small sums of large cancelling terms, where even transformers'
        # fp32 model misses 1e-5 relative; allow twice its error there. A bias's gradient sums the per-token terms
        # its weight's gradient weighs by the inputs (sum_t dY_t against sum_t dY_t x_t^T) and may cancel where the
        # weight's does not: its terms are the weight gradient's size (seed 49588372: layer 1's value bias, max
        # 1.7e-5 against its weight's 4.3e-4, read 2.22e-10 off, transformers' fp32 model 1.05e-10).
        r, b = ref_params[name].grad, base_params[name].grad
        base_rel = float((b.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        assert_rule(f"d {name}", p.grad, r, None, torch.float32, fp32_rel=max(1e-5, 2 * base_rel),
                    magnitude=bias_terms(ref_params, name))


@pytest.mark.parametrize("padding", ["none", "right"])
def test_gpt2_matches_transformers(padding):
    hf = hf_gpt2()
    ours = GPT2.from_transformers(hf)
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(ids, attention_mask=mask).logits
        logits = ours(ids)  # right padding never reaches real tokens under causality
    real = mask.bool()
    assert_rule("logits", logits[real], ref[real], None, torch.float32)


def test_gpt2_loads_conv1d_checkpoint_keys():
    hf = hf_gpt2()
    sd = hf.state_dict()
    ours = GPT2(GPT2Config.from_transformers(hf.config))
    ours.load_hf_state_dict({k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"})
    w = sd["transformer.h.1.attn.c_attn.weight"]  # Conv1D: (in, out)
    assert torch.equal(ours.transformer.h[1].attn.c_attn.weight, w.t())
    assert ours.lm_head.weight is ours.transformer.wte.weight
    with pytest.raises(KeyError, match="missing"):
        GPT2(GPT2Config.from_transformers(hf.config)).load_hf_state_dict({"wte.weight": sd["transformer.wte.weight"]})


def test_gpt2_untied_embeddings_load_as_transformers_keeps_them():
    """tie_word_embeddings=False: wte and lm_head stay two weights (the head had overwritten the embedding); a tied
    model given an untied checkpoint refuses it."""
    hf = hf_gpt2(tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    ours = GPT2.from_transformers(hf)
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    ids, _ = batch("none")
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(ids).logits
        assert_rule("logits", ours(ids), ref, None, torch.float32)
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        GPT2(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)).load_hf_state_dict(
            hf.state_dict())


def test_gpt2_cache_matches_full_forward():
    hf = hf_gpt2()
    ours = GPT2.from_transformers(hf)
    ids, _ = batch("none", S=12)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache.empty(ours.config, 3, 16, "cpu", torch.float32)
        parts = [ours(ids[:, :7], cache=cache)]
        cache.seqlens += 7
        for t in range(7, 12):
            parts.append(ours(ids[:, t:t + 1], cache=cache))
            cache.seqlens += 1
    assert_rule("cached logits", torch.cat(parts, dim=1), full.double(), None, torch.float32)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_gpt2_generate_matches_transformers(padding):
    ids, mask = batch(padding, S=8)
    if padding == "right":  # transformers' generate wants left padding; ours takes either: compare against left
        order = torch.sort(mask, dim=1, stable=True).indices
        hf_ids, hf_mask = ids.gather(1, order), mask.gather(1, order)
    else:
        hf_ids, hf_mask = ids, mask
    # A random GPT-2 sometimes repeats one token whatever the context (~1 draw in 100): it could not tell a wrong
    # attention from a right one, so draw fresh weights (judged on transformers' model alone) until it varies.
    for _ in range(8):
        hf = hf_gpt2().double()
        want = hf.generate(hf_ids, attention_mask=hf_mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[:, 8:]
        if len(set(want.flatten().tolist())) > 3:
            break
    ours = GPT2.from_transformers(hf)
    got = ours.generate(ids, mask, max_new_tokens=10)
    assert got.tolist() == want.tolist()
    assert len(set(want.flatten().tolist())) > 3, "degenerate test: the model repeats one token"


def test_gpt2_generate_eos_and_errors():
    ours = GPT2.from_transformers(hf_gpt2())
    ids, mask = batch("none", S=5)
    first = ours.generate(ids, mask, max_new_tokens=4)
    eos = int(first[0, 1])
    out = ours.generate(ids, mask, max_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    want = first.clone()
    for row in want:  # after a row's first eos, pad_token_id
        hits = (row == eos).nonzero()
        if len(hits):
            row[int(hits[0]) + 1:] = 0
    assert out.tolist() == want.tolist()
    with pytest.raises(ValueError, match="n_positions"):
        ours.generate(ids, mask, max_new_tokens=100)
    with pytest.raises(ValueError, match="real token"):
        ours.generate(ids, torch.zeros_like(mask))


def test_bert_loader_takes_pooler_less_models_and_refuses_what_it_cannot_compute():
    """A masked-LM's BertModel has no pooler (it was refused for missing keys); decoder configs (causal, cross-
    attention) and unknown activations are refused by name instead of loading and computing something else."""
    hf = hf_bert(transformers.BertForMaskedLM).bert
    assert hf.pooler is None
    ours = Bert.from_transformers(hf)
    ids, mask = batch("right")
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(ids, attention_mask=mask).last_hidden_state
        hidden, pooled = ours(ids, mask)
    assert pooled is None
    assert_rule("hidden", hidden[mask.bool()], ref[mask.bool()], None, torch.float32)
    for kw, match in ((dict(is_decoder=True), "is_decoder"), (dict(hidden_act="gelu_10"), "gelu_10")):
        with pytest.raises(ValueError, match=match):
            Bert.from_transformers(hf_bert(**kw))
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))


def test_bert_classifier_dropout_as_transformers():
    hf = hf_bert(transformers.BertForSequenceClassification, classifier_dropout=0.5)
    assert BertForSequenceClassification.from_transformers(hf).dropout.p == hf.dropout.p == 0.5
    assert BertForSequenceClassification.from_transformers(hf_bert(transformers.BertForSequenceClassification)
                                                           ).dropout.p == 0.1


def test_gpt2_generate_under_autocast_and_edge_lengths():
    """Under autocast the projections return bf16: the cache generate allocates holds that dtype (it was fp32 and
    the kvcache call refused the mix); max_new_tokens=0 gives (B, 0); a prompt past n_positions is refused."""
    ours = GPT2.from_transformers(hf_gpt2())
    ids, mask = batch("left")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours.generate(ids, mask, max_new_tokens=4)
        logits = ours(ids[:1, -5:])
    assert got.shape == (3, 4) and logits.dtype == torch.bfloat16
    assert ours.generate(ids, mask, max_new_tokens=0).shape == (3, 0)
    with pytest.raises(ValueError, match="eos_token_id"):
        ours.generate(ids, mask, max_new_tokens=2, min_new_tokens=1)  # transformers reads eos from its config
    with pytest.raises(ValueError, match="n_positions 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    # a cache longer than the position table: tokens past it are refused by name, the cache untouched (the
    # embedding raised a bare IndexError); within it the same call runs
    cache = KVCache.empty(ours.config, 2, 80, "cpu", torch.float32)
    cache.seqlens = torch.tensor([10, 62], dtype=torch.int32)
    before = [t.clone() for t in cache.k]
    with pytest.raises(ValueError, match=r"cache.seqlens up to 62 \+ 3 new tokens = 65 positions exceed n_positions 64"):
        ours(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))
    assert ours(torch.zeros(2, 2, dtype=torch.long), cache=cache).shape == (2, 2, ours.config.vocab_size)


def test_gpt2_generate_min_new_tokens_as_transformers():
    """eos is not chosen before min_new_tokens, as transformers' rule (before, only transformers held it back): with
    eos made every step's likeliest token, both pick other tokens for the first 6 steps and eos at the 7th."""
    hf = hf_gpt2().double()
    with torch.no_grad():  # the final hidden state's dimension 0 is 50 everywhere, and only eos (id 2) reads it
        hf.transformer.ln_f.weight[0], hf.transformer.ln_f.bias[0] = 0.0, 50.0
        hf.lm_head.weight[:, 0] = 0.0  # (tied: wte's column 0 too, the same in both models)
        hf.lm_head.weight[2, 0] = 1.0
    ids, mask = batch("left", S=8)
    ours = GPT2.from_transformers(hf)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=6, do_sample=False,
                       pad_token_id=0, eos_token_id=2)[:, 8:]
    got = ours.generate(ids, mask, max_new_tokens=10, min_new_tokens=6, eos_token_id=2, pad_token_id=0)
    assert want.shape[1] == 7 and (want[:, :6] != 2).all() and (want[:, 6] == 2).all(), want
    assert got[:, :7].tolist() == want.tolist() and (got[:, 7:] == 0).all()


def test_bert_pad_token_row_gets_no_gradient_as_transformers():
    """A token-level loss over every position: transformers' [PAD] embedding row (padding_idx) gets no gradient;
    ours trained it (fine-tuning diverged from transformers')."""
    hf = hf_bert()
    ours = Bert.from_transformers(hf).train()
    ids, mask = batch("right")  # padded positions hold token 0, the pad token
    hidden, _ = ours(ids, mask)
    hidden.square().sum().backward()
    grad = ours.embeddings.word_embeddings.weight.grad
    assert grad[0].abs().max() == 0 and grad[ids[0, 0]].abs().max() > 0
