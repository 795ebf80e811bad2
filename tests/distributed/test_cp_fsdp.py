"""Tier 1: context parallelism composed with FSDP2 (design row 17): the reference GPT-2 wrapped with
torch.distributed.fsdp.fully_shard on the flattened dp x cp mesh of 4 gloo processes (dp2 x cp2), ring attention over
the cp dim. Logits and every parameter gradient must meet the fp32 rule against the transformers eager model in
float64 on the whole batch (tests/distributed/test_cp_models.py's bounds); the loss is cp_cross_entropy with
grad_average_world=cp.world_size, which undoes the part of FSDP's gradient average that runs over the cp ranks."""
import copy
import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers builds the float64 eager reference model")

from test_cp_models import V, check_grads, grads_of, hf_gpt2  # noqa: E402
from fastattn.distributed import unshard_list  # noqa: E402
from fastattn.models import GPT2  # noqa: E402
from fastattn.models.gpt2 import CONV1D_WEIGHTS  # noqa: E402
from support.oracle import assert_rule  # noqa: E402

pytestmark = pytest.mark.distributed
TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")
B, S = 4, 24  # two sequences per dp group, 12 tokens per cp rank


def _run(gloo_pool, grad_average_world: bool):
    hf = hf_gpt2()
    ids = torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(0))
    model = GPT2.from_transformers(hf)
    cfg = {k: getattr(model.config, k) for k in model.config.__dataclass_fields__}
    per_rank = gloo_pool(4).run(TASKS, "fsdp_gpt2_cp", cfg, model.state_dict(), ids, grad_average_world)
    return hf, ids, per_rank


def _references(hf, ids):
    ref = copy.deepcopy(hf).double()
    out = ref(ids, labels=ids)  # mean CE over B * (S - 1) predictions = the mean of the two dp groups' means
    out.loss.backward()
    base = GPT2.from_transformers(hf)  # single-process fp32: the baseline of the gradient bound
    torch.nn.functional.cross_entropy(base(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    per_dp = [copy.deepcopy(hf).double()(rows, labels=rows).loss for rows in ids.chunk(2)]
    return out, grads_of(ref, CONV1D_WEIGHTS), grads_of(base), per_dp


def test_fsdp2_dp_x_cp_equals_single_process(gloo_pool):
    hf, ids, per_rank = _run(gloo_pool, True)
    out, ref_grads, base_grads, per_dp = _references(hf, ids)
    assert sorted((d, r) for d, r, *_ in per_rank) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    logits = torch.cat([unshard_list([lg for d, r, lg, *_ in sorted(per_rank) if d == dp], 1, "zigzag")
                        for dp in (0, 1)])  # each dp group's rows, its cp shards in cp-rank order
    assert_rule("logits", logits, out.logits, None, torch.float32)
    for d, _, _, logged, _ in per_rank:  # the logged loss is the dp group's mean, not cp x it
        torch.testing.assert_close(logged.double(), per_dp[d].detach().double(), rtol=1e-5, atol=1e-6)
    grads = [g for *_, g in per_rank]
    for g in grads[1:]:  # full_tensor(): every rank holds the same full gradients
        assert all(torch.equal(g[n], grads[0][n]) for n in g)
    check_grads(grads[0], ref_grads, base_grads)


def test_fsdp2_without_the_cp_factor_fails_the_check(gloo_pool):
    """The planted bug: cp_cross_entropy without grad_average_world, so FSDP's average over the dp x cp ranks
    halves every gradient (the cp group's contributions are averaged instead of summed). The check must catch it."""
    hf, ids, per_rank = _run(gloo_pool, False)
    _, ref_grads, base_grads, _ = _references(hf, ids)
    with pytest.raises(AssertionError, match="max_err"):
        check_grads(per_rank[0][-1], ref_grads, base_grads)
