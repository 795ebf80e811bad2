"""Tier 0: BERT's pooler and BertForSequenceClassification under context parallelism, on simulated ranks.

The [CLS] row (global position 0) lives on one rank; cls_hidden shares it with every rank through a differentiable
all-reduce. Every rank then holds the whole batch's pooled output and logits, and the classification loss is the
same on every rank: each rank backpropagates cp_replicated_loss(loss) (1 / W) plus its token-level share. Checked
against the float64 eager transformers model on the whole sequence: pooled and logits (fp32 rule), and the parameter
gradients summed over ranks (the relative bound widened to twice the single-process fp32 model's own error where
that is larger, as tests/distributed/test_cp_models.py does)."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers builds the float64 eager reference models")

from fastattn.distributed import CPConfig, context_parallel, run_local, shard_batch  # noqa: E402
from fastattn.distributed.loss import cp_replicated_loss  # noqa: E402
from fastattn.models import BertForSequenceClassification  # noqa: E402
from fastattn.models import bert as bert_mod  # noqa: E402
from support.oracle import assert_rule  # noqa: E402

V, B, S, C, NUM_LABELS = 97, 3, 24, 64, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_classifier():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=NUM_LABELS)
    return transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager").train()


def batch(padding: bool):
    """Row 0 left-padded (its [CLS] position is padding, as in transformers, which pools it anyway), row 1
    right-padded over whole shards of some ranks, row 2 unpadded."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :5] = 0
        mask[1, S - 13:] = 0
    tt = torch.randint(0, 2, ids.shape, generator=g)
    labels = torch.randint(0, NUM_LABELS, (B,), generator=g)
    probe = torch.randn(B, S, C, generator=g) * mask[..., None]  # a token-level term: <last hidden, probe>
    return ids, mask, tt, labels, probe


def grads_of(model):
    return {n: p.grad for n, p in model.named_parameters()}


def reference(hf, ids, mask, tt, labels, probe):
    """(float64 eager outputs, their gradients, the single-process fp32 model's gradients) for the loss
    CE(logits, labels) + <last hidden, probe>."""
    ref = copy.deepcopy(hf).double()
    out = ref(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    pooled = ref.bert.pooler(out.hidden_states[-1])
    (F.cross_entropy(out.logits, labels) + (out.hidden_states[-1] * probe.double()).sum()).backward()
    base = BertForSequenceClassification.from_transformers(hf)
    hidden, _ = base.bert(ids, mask, tt)
    (F.cross_entropy(base(ids, mask, tt), labels) + (hidden * probe).sum()).backward()  # probe 0: CE alone
    return out.logits.detach(), pooled.detach(), grads_of(ref), grads_of(base)


def run_cp(model, W, strategy, balance, ids, mask, tt, labels, probe, *, via="arg", replicated=True, mesh=None):
    """Per rank: (pooled, logits, gradients) of cp_replicated_loss(CE) + <hidden rows, probe rows> (probe None: CE
    alone)."""
    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance)
        m = copy.deepcopy(model)
        local = shard_batch({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}, cp)
        args = (local["input_ids"], local["attention_mask"], local["token_type_ids"], local["position_ids"])
        if via == "context":
            with context_parallel(cp):
                hidden, pooled = m.bert(*args)
                logits = m.classifier(m.dropout(pooled))
        else:
            hidden, pooled = m.bert(*args, cp=cp)
            logits = m(*args, cp=cp)  # the classifier's own forward (runs the encoder again)
        ce = F.cross_entropy(logits, labels)
        loss = cp_replicated_loss(ce, cp) if replicated else ce
        (loss if probe is None else loss + (hidden * cp.shard(probe, 1)).sum()).backward()
        return pooled.detach(), logits.detach(), grads_of(m)
    return run_local(W, rank, mesh=mesh)


def check(res, want_logits, want_pooled, ref_grads, base_grads):
    for r in res:  # every rank holds the whole batch's pooled output and logits
        assert_rule("pooled", r[0], want_pooled, None, torch.float32)
        assert_rule("logits", r[1], want_logits, None, torch.float32)
    missing = [(rank, n) for rank, r in enumerate(res) for n, g in r[2].items() if g is None]
    assert not missing, f"no gradient (None) on some ranks: {missing[:3]}"  # every rank's backward ran everywhere
    grads = {n: sum(r[2][n] for r in res) for n in res[0][2]}
    for name, g in grads.items():
        r, b = ref_grads[name], base_grads[name]
        base_rel = float((b.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        assert_rule(f"d {name}", g, r, None, torch.float32, fp32_rel=max(1e-5, 2 * base_rel))


@pytest.mark.parametrize("W,strategy,balance,padding,via", [
    (2, "ring", "contiguous", False, "arg"), (2, "ulysses", "zigzag", True, "context"),
    (3, "ring", "zigzag", False, "context"), (3, "allgather", "contiguous", True, "arg")])
def test_pooled_logits_and_grads_equal_single_process(W, strategy, balance, padding, via):
    hf = hf_classifier()
    ids, mask, tt, labels, probe = batch(padding)
    want_logits, want_pooled, ref_grads, base_grads = reference(hf, ids, mask, tt, labels, probe)
    model = BertForSequenceClassification.from_transformers(hf)
    res = run_cp(model, W, strategy, balance, ids, mask, tt, labels, probe, via=via)
    check(res, want_logits, want_pooled, ref_grads, base_grads)


def test_classifier_loss_alone():
    """No token-level term: the ranks without [CLS] get their encoder gradients only through the all-reduce's
    backward (zeros on their rows), and must still run their encoder backward (its attention is a collective)."""
    hf = hf_classifier()
    ids, mask, tt, labels, probe = batch(True)
    probe = torch.zeros_like(probe)
    want_logits, want_pooled, ref_grads, base_grads = reference(hf, ids, mask, tt, labels, probe)
    model = BertForSequenceClassification.from_transformers(hf)
    res = run_cp(model, 3, "ring", "zigzag", ids, mask, tt, labels, None, via="context")
    check(res, want_logits, want_pooled, ref_grads, base_grads)


def test_hybrid_mesh_pooled_and_grads():
    """A 2-D (ulysses 2 x ring 2) group: the [CLS] row's owner is found from the layout, not assumed."""
    hf = hf_classifier()
    ids, mask, tt, labels, probe = batch(True)
    want_logits, want_pooled, ref_grads, base_grads = reference(hf, ids, mask, tt, labels, probe)
    model = BertForSequenceClassification.from_transformers(hf)
    res = run_cp(model, 4, "auto", "zigzag", ids, mask, tt, labels, probe, mesh=(2, 2))
    check(res, want_logits, want_pooled, ref_grads, base_grads)


def test_cls_owner_follows_the_layout():
    """Global position 0 is on exactly one rank, at the local row the layout puts it."""
    for W, mesh in ((2, None), (3, None), (4, (2, 2))):
        for balance in ("contiguous", "zigzag"):
            def rank(comm):
                cp = CPConfig(comm, balance=balance)
                pos = cp.global_positions(S)
                i = bert_mod._cls_local_index(cp, S // W)
                assert (i is None) == (not bool((pos == 0).any()))
                return i if i is None else int(pos[i])
            got = run_local(W, rank, mesh=mesh)
            assert sorted(g for g in got if g is not None) == [0] and len([g for g in got if g is not None]) == 1


@pytest.mark.parametrize("bug", ["row 0 of every rank", "loss not scaled by 1/W"])
def test_planted_bugs_fail(monkeypatch, bug):
    hf = hf_classifier()
    ids, mask, tt, labels, probe = batch(False)
    want_logits, want_pooled, ref_grads, base_grads = reference(hf, ids, mask, tt, labels, probe)
    model = BertForSequenceClassification.from_transformers(hf)
    if bug == "row 0 of every rank":
        monkeypatch.setattr(bert_mod, "_cls_local_index", lambda cp, n: 0)
    res = run_cp(model, 2, "ring", "zigzag", ids, mask, tt, labels, probe, replicated=bug != "loss not scaled by 1/W")
    with pytest.raises(AssertionError):
        check(res, want_logits, want_pooled, ref_grads, base_grads)


def test_single_process_unchanged():
    """cp=None pools row 0 as before."""
    hf = hf_classifier().eval()
    ids, mask, tt, _, _ = batch(False)
    model = BertForSequenceClassification.from_transformers(hf)
    with torch.no_grad():
        want = copy.deepcopy(hf).double()(ids, attention_mask=mask, token_type_ids=tt).logits
        assert_rule("logits", model(ids, mask, tt), want, None, torch.float32)


def test_cp_replicated_loss_refuses_non_scalar():
    def rank(comm):
        with pytest.raises(ValueError, match=r"cp_replicated_loss takes a scalar loss, got shape \(3,\)"):
            cp_replicated_loss(torch.ones(3), CPConfig(comm))
    run_local(2, rank)


@pytest.mark.distributed
def test_gloo_classifier_equals_single_process(gloo_pool):
    """The same on two gloo processes: the all-reduce (forward) and its adjoint (backward) on a real group."""
    import dataclasses
    import os
    hf = hf_classifier()
    ids, mask, tt, labels, _ = batch(True)
    ref = copy.deepcopy(hf).double()
    want = ref(ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    base = BertForSequenceClassification.from_transformers(hf)
    F.cross_entropy(base(ids, mask), labels).backward()
    tasks = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")
    res = gloo_pool(2).run(tasks, "bert_classifier_cp", dataclasses.asdict(base.config), base.state_dict(), ids,
                           mask, labels, "zigzag")
    for logits, _ in res:
        assert_rule("logits", logits, want.logits, None, torch.float32)
    ref_grads, base_grads = grads_of(ref), grads_of(base)
    for name in ref_grads:
        r, b = ref_grads[name], base_grads[name]
        base_rel = float((b.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
        assert_rule(f"d {name}", sum(g[1][name] for g in res), r, None, torch.float32,
                    fp32_rel=max(1e-5, 2 * base_rel))
