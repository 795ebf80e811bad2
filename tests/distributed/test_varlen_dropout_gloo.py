"""Tier 1: dropout for packed documents under Ulysses on real gloo process groups (W = 2, 4): with one fixed rng
every rank's varlen kernel call (its heads, head_start = its first global query head) drops exactly what the
single-process varlen block call drops. Same checks as the simulated test_varlen_dropout.py: the CP acceptance rule
against the float64 per-document oracle with the Philox keep mask, and fp32 out/lse equal to the single-process call
bit for bit. Planted: the ranks' kernel calls without their head offset fail it."""
import os

import pytest
import torch

from test_varlen_dropout import BACKENDS, P, RNG, C, reference_dropout
from tests.support.cp_cases import VarlenCase, check_acceptance, errors, gather_varlen, single_block_varlen

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not BACKENDS, reason="no backend takes varlen block calls with dropout here (the "
                                 "C++ cpu kernels, fastattn._C, are not built; the reference uses torch's RNG)")]
TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")

CASES = [
    C("ulysses", 2, "stream", H=4, Hkv=1),      # MQA: K/V replicated 2x; documents cross the shard boundary
    C("ulysses", 4, "per_doc", H=8, Hkv=2),     # K/V replicated 2x, 2 heads per rank
]


def check_gloo(gloo_pool, c: VarlenCase, plant: str = ""):
    got = gather_varlen(c, gloo_pool(c.W).run(TASKS, "varlen_case", c, RNG, P, plant))
    one, ref = single_block_varlen(c, rng=RNG, dropout_p=P), reference_dropout(c)
    assert errors(one, ref)[0] < 0.1, "the oracle's Philox mask is not the kernels' (a wrong mask errs by O(1))"
    check_acceptance(c, got, one, ref)
    assert c.dtype != torch.float32 or (torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])), \
        "Ulysses out/lse on gloo differ from the single-process varlen block call"


@pytest.mark.parametrize("c", CASES, ids=VarlenCase.id)
def test_gloo_ulysses_dropout_equals_single_process(gloo_pool, c):
    check_gloo(gloo_pool, c)


def test_gloo_planted_without_head_start_fails(gloo_pool):
    with pytest.raises(AssertionError, match="acceptance rule"):
        check_gloo(gloo_pool, CASES[1], plant="no_head_start")
