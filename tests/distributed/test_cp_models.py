"""Tier 0: the reference GPT-2 and BERT (fastattn.models) under context parallelism, on simulated ranks.

Each rank runs the model on its shard (`cp=` or an active context_parallel block); the gathered logits / hidden
states and the parameter gradients summed over ranks (what an all-reduce gives) must meet the fp32 rule against the
transformers eager model in float64 on the whole sequence, as tests/test_models.py does for the single-process
models. Gradients: the relative bound is widened to twice the single-process fp32 model's own error where that is
larger (LayerNorm biases are small sums of large cancelling terms)."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers builds the float64 eager reference models")

from fastattn.distributed import (CPConfig, context_parallel, cp_cross_entropy, run_local, shard_batch,  # noqa: E402
                                  unshard_list)
from fastattn.models import GPT2, Bert  # noqa: E402
from fastattn.models.gpt2 import CONV1D_WEIGHTS  # noqa: E402
from support.oracle import assert_rule  # noqa: E402

V, B, S = 97, 2, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                                  scale_attn_by_inverse_layer_idx=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").train()


def hf_bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel._from_config(cfg, attn_implementation="eager").train()


def tokens(seed=0):
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(seed))


def grads_of(model, transpose=()):
    """{name: gradient}; names ending in `transpose` transposed (transformers' Conv1D stores (in, out))."""
    return {n: (p.grad.t() if p.grad is not None and n.endswith(transpose) else p.grad)
            for n, p in model.named_parameters()}


def check_grads(grads, ref, base):
    """grads: {name: CP gradient summed over ranks}; ref / base: the float64 reference's and the single-process
    fp32 model's gradients by the same names."""
    assert grads.keys() == ref.keys() == base.keys()
    for name, g in grads.items():
        r, b = ref[name], base[name]
        if r is None:
            assert g is None or not g.any(), f"{name}: gradient where the reference has none"
            continue
        base_rel = float((b.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        assert_rule(f"d {name}", g, r, None, torch.float32, fp32_rel=max(1e-5, 2 * base_rel))


def sum_grads(per_rank):
    return {n: sum(r[n] for r in per_rank if r[n] is not None) if any(r[n] is not None for r in per_rank)
            else None for n in per_rank[0]}


# --- GPT-2 -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("W,strategy,balance,via", [(2, "ring", "zigzag", "arg"), (3, "allgather", "zigzag", "context"),
                                                    (4, "ulysses", "contiguous", "arg")])
def test_gpt2_cp_logits_and_grads_equal_single_process(W, strategy, balance, via):
    hf = hf_gpt2()
    ids = tokens()
    ref = copy.deepcopy(hf).double()
    out = ref(ids, labels=ids)  # transformers shifts: mean CE over the B * (S - 1) next-token predictions
    out.loss.backward()
    base = GPT2.from_transformers(hf)  # the single-process fp32 model: the baseline of the gradient bound
    F.cross_entropy(base(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()  # (B*(S-1), V)
    model = GPT2.from_transformers(hf)

    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance)
        m = copy.deepcopy(model)
        local = shard_batch({"input_ids": ids, "labels": ids}, cp, shift_labels=True)
        if via == "context":  # the position_ids default to the global ones, as cp= does
            with context_parallel(cp):
                logits = m(local["input_ids"])
        else:
            logits = m(local["input_ids"], position_ids=local["position_ids"], cp=cp)
        cp_cross_entropy(logits, local["labels"], cp).backward()
        return logits.detach(), grads_of(m)
    res = run_local(W, rank)
    logits = unshard_list([r[0] for r in res], 1, balance)
    assert_rule("logits", logits, out.logits, None, torch.float32)
    check_grads(sum_grads([r[1] for r in res]), grads_of(ref, CONV1D_WEIGHTS), grads_of(base))


def test_gpt2_cp_refusals():
    model = GPT2.from_transformers(hf_gpt2()).eval()
    ids = tokens()

    def rank(comm):
        cp = CPConfig(comm)
        errs = []
        for call in (lambda: model(cp.shard(ids, 1), cache=object(), cp=cp),
                     lambda: model(torch.zeros(1, 40, dtype=torch.long), cp=cp)):
            try:
                call()
            except ValueError as e:
                errs.append(str(e))
        with context_parallel(cp):
            try:
                model.generate(ids[:, :4], max_new_tokens=2)
            except ValueError as e:
                errs.append(str(e))
        return errs
    for errs in run_local(2, rank):
        assert len(errs) == 3
        assert "a KV cache (generate) runs on one rank" in errs[0] and "80 exceed n_positions 64" in errs[1]
        assert "a KV cache (generate) runs on one rank" in errs[2]


# --- BERT --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("W,strategy,balance,padding", [
    (2, "ring", "contiguous", False), (4, "ulysses", "zigzag", False), (3, "ring", "zigzag", True),
    (2, "allgather", "contiguous", True)])
def test_bert_cp_hidden_and_grads_equal_single_process(W, strategy, balance, padding):
    """Padding: row 0 left-padded, row 1 right-padded (whole chunks of padding on some ranks); compared on real
    tokens, the loss reads real tokens only."""
    hf = hf_bert()
    ids = tokens(1)
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :5] = 0
        mask[1, S - 9:] = 0
    real = mask.bool()
    tt = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(3)) * real[..., None]  # loss: <hidden, probe>
    ref = copy.deepcopy(hf).double()
    want = ref(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    (want * probe.double()).sum().backward()
    base = Bert.from_transformers(hf)
    (base(ids, mask, tt)[0] * probe).sum().backward()
    model = Bert.from_transformers(hf)

    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance)
        m = copy.deepcopy(model)
        local = shard_batch({"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}, cp)
        hidden, pooled = m(local["input_ids"], local["attention_mask"], local["token_type_ids"],
                           local["position_ids"], cp=cp)
        assert pooled.shape == (B, 64)  # every rank's; checked in test_cp_bert_pooler.py
        (hidden * cp.shard(probe, 1)).sum().backward()
        return hidden.detach(), grads_of(m)
    res = run_local(W, rank)
    hidden = unshard_list([r[0] for r in res], 1, balance)
    assert_rule("hidden", hidden[real], want[real], None, torch.float32)
    check_grads(sum_grads([r[1] for r in res]), grads_of(ref), grads_of(base))

