"""Tier 0: attn_implementation="fastattn_cp" (transformers >= 5) on simulated ranks: tiny random GPT-2 / BERT from
transformers, sharded with shard_batch inside context_parallel; the gathered logits and the summed parameter
gradients meet the fp32 rule against the eager model in float64 on the whole sequence (tests/test_transformers.py's
rule). Refusals happen on every rank alike, and outside context_parallel."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="HuggingFace transformers is not installed")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"fastattn's transformers integration needs transformers >= 5, found {transformers.__version__}",
                allow_module_level=True)

import fastattn.integrations.cp_transformers as cp_hf  # noqa: E402
import fastattn.integrations.transformers as fa_hf  # noqa: E402
from fastattn.distributed import (CPConfig, context_parallel, run_local, shard_batch,  # noqa: E402
                                  unshard_list)
from support.hf_cp import cp_lm_step, next_token_labels  # noqa: E402
from support.oracle import assert_param_grads, assert_rule  # noqa: E402
from transformers import AttentionInterface, BertModel, GPT2LMHeadModel  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

V, B, S = 97, 2, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_config():
    return transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True,
                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def bert_config():
    return transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, pad_token_id=0)


def pair(cls, config):
    """(eager float64 reference, fastattn_cp fp32 model), identical weights."""
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="eager")
    fast = cls._from_config(copy.deepcopy(config), attn_implementation=fa_hf.CP_NAME)
    fast.load_state_dict(ref.state_dict())
    assert fast.config._attn_implementation == "fastattn_cp"
    return ref.double(), fast


def tokens(seed=0):
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(seed))


def test_registered_in_both_interfaces():
    assert AttentionInterface._global_mapping["fastattn_cp"] is fa_hf.fastattn_cp_attention_forward
    assert AttentionMaskInterface._global_mapping["fastattn_cp"] is fa_hf.fastattn_cp_mask


# use_cache=False: with no cache transformers reads the zigzag position_ids' jump as "packed sequences" and builds a
# segment mask, which fastattn_cp must recognise as the layout's own (with a cache it passes the plain function).
# padding: row 0 left-padded, row 1 right-padded; the key mask travels with its keys. Logits are compared on real
# tokens and the loss reads only real tokens predicting real tokens (a pad query sees no real key: fastattn gives 0
# where eager averages the masked values, which real tokens never see).
@pytest.mark.parametrize("W,strategy,balance,use_cache,padding", [
    (2, "ring", "zigzag", False, False), (3, "ring", "zigzag", True, False), (4, "ulysses", "contiguous", False, False),
    (2, "ring", "zigzag", False, True), (4, "allgather", "zigzag", True, True)])
def test_gpt2_logits_and_grads_equal_eager(W, strategy, balance, use_cache, padding):
    ref, fast = pair(GPT2LMHeadModel, gpt2_config())
    ids = tokens()
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :7] = 0
        mask[1, S - 10:] = 0
    labels = next_token_labels(ids, mask)
    out = ref(input_ids=ids, attention_mask=mask)
    F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1)).backward()  # (B*S, V)
    calls = []
    logits, grads = cp_lm_step(fast, ids, labels, mask if padding else None, W, strategy, balance, use_cache,
                               lambda module, kw: calls.append(1))
    assert len(calls) == W * 2  # every layer of every rank went through fastattn_cp
    real = mask.bool()
    assert_rule("logits", logits[real], out.logits[real], None, torch.float32)
    assert_param_grads(ref, grads)


@pytest.mark.parametrize("padding", [False, True])
def test_bert_hidden_equal_eager(padding):
    ref, fast = pair(BertModel, bert_config())
    ids = tokens(1)
    mask = torch.ones_like(ids)
    if padding:
        mask[0, 14:17] = 0  # only in rank 1's shard (contiguous, W=2): rank 0 must pass its (all-true) mask too
        mask[1, 20:] = 0
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state

    def rank(comm):
        cp = CPConfig(comm, strategy="ring", balance="contiguous")
        local = shard_batch({"input_ids": ids, "attention_mask": mask}, cp)
        with context_parallel(cp), torch.no_grad():
            return fast(**local).last_hidden_state
    real = mask.bool()
    got = unshard_list(run_local(2, rank), 1, "contiguous")
    assert_rule("hidden", got[real], want[real], None, torch.float32)


def test_encoder_under_cp_warns_about_poolers(monkeypatch):
    """A bidirectional layer under fastattn_cp warns (once per process) that transformers' poolers and classification
    heads read this rank's row 0, the [CLS] token only on the rank holding global position 0."""
    monkeypatch.setattr(cp_hf, "_WARNED_POOLING", False)
    _, fast = pair(BertModel, bert_config())
    ids = tokens(1)

    def rank(comm):
        cp = CPConfig(comm, strategy="ring", balance="contiguous")
        with context_parallel(cp), torch.no_grad():
            return fast(**shard_batch({"input_ids": ids}, cp)).last_hidden_state
    with pytest.warns(UserWarning, match="pooler or classification head"):
        run_local(2, rank)


def _refusal(comm, fast, ids, case):
    cp = CPConfig(comm, balance="zigzag")
    local = shard_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cp)
    if case == "local position_ids":
        del local["position_ids"]  # transformers then embeds 0..S/W-1 on every rank: wrong on both
        del local["attention_mask"]
    elif case == "packed documents":  # two documents, positions restarting: not one sequence to split
        local = shard_batch({"input_ids": ids, "position_ids": torch.arange(S).remainder(S // 2).view(1, S)}, cp)
    elif case == "cache":
        local = shard_batch({"input_ids": ids[:, :8]}, cp)
    try:
        with context_parallel(cp), torch.no_grad():
            out = fast(**local, use_cache=case == "cache")
            if case == "cache":  # the first call fills a cache; the second would attend to it: refused
                # transformers 5.24 names it cache (past_key_values: deprecated), 5.17 past_key_values only
                fast(**local, **({"cache": out.cache} if hasattr(out, "cache") else
                                 {"past_key_values": out.past_key_values}), use_cache=True)
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("case,match", [
    ("local position_ids", r"position_ids are not the global positions .* \(found on rank 0 and 1 more of 2\)"),
    ("cache", "a KV cache .* is not context parallel"),
    ("packed documents", r"position_ids are not the global positions .* \(found on rank 0 and 1 more of 2\)"),
])
def test_refused_on_every_rank(case, match):
    """The refusal reaches every rank (one rank refusing alone would leave its peers waiting in a collective)."""
    _, fast = pair(GPT2LMHeadModel, gpt2_config())
    for msg in run_local(2, _refusal, fast, tokens(), case, timeout=20):
        assert msg is not None and re.search(match, msg), msg


def test_outside_context_parallel_is_an_error():
    _, fast = pair(GPT2LMHeadModel, gpt2_config())
    with pytest.raises(RuntimeError, match=r"fastattn_cp.* runs only inside `with fastattn.distributed."
                                           r"context_parallel\(cp_config\):`"):
        fast(input_ids=tokens())


@pytest.mark.distributed
def test_gloo_gpt2_equals_eager(gloo_pool):
    """The same on two gloo processes (the model's weights travel to the workers with the task)."""
    import os
    ref, fast = pair(GPT2LMHeadModel, gpt2_config())
    ids = tokens(2)
    out = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    tasks = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")
    res = gloo_pool(2).run(tasks, "hf_gpt2_cp", gpt2_config().to_diff_dict(), fast.state_dict(), ids, "zigzag")
    assert_rule("logits", unshard_list([r[0] for r in res], 1, "zigzag"), out.logits, None, torch.float32)
    assert_param_grads(ref, {name: sum(r[1][name] for r in res) for name, _ in ref.named_parameters()})
