"""Tier 1: the same CP code on real gloo process groups of 2, 3 and 4 processes (conftest.GlooPool)."""
import os

import pytest
import torch

from tests.support.cp_cases import (Case, check_acceptance, gather_results, reference, single_block,
                                    single_process)

pytestmark = pytest.mark.distributed
TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")

CASES = [
    Case(W=2, causal=True),
    Case(W=2, balance="contiguous", window=(5, 3), alibi=True),
    Case(W=2, strategy="allgather", causal=True),
    Case(W=3, causal=True, S=2 * 3 * 37),
    Case(W=3, balance="contiguous", causal=True, inputs="staircase"),
    Case(W=4, causal=True, H=4, Hkv=2, dtype=torch.bfloat16, S=64),
    Case(W=4, strategy="ulysses", causal=True, H=4, Hkv=1),
    Case(W=4, strategy="allgather", window=(6, -1), causal=True, layout="bhsd"),
]


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_gloo_matches_single_process(gloo_pool, case):
    per_rank = gloo_pool(case.W).run(TASKS, "cp_case", case)
    check_acceptance(case, gather_results(case, per_rank), single_process(case), reference(case), single_block(case))


def test_gloo_workers_take_the_parents_fp32_engine(gloo_pool):
    """Every worker multiplies fp32 on the test process's engine (tests/support/gloo.py), so its results can be
    compared bitwise with the single-process reference."""
    from tests.support.gloo import parent_fp32_engine
    engine = parent_fp32_engine()
    if engine is None:
        pytest.skip("no C++ extension: no fp32 engine to share")
    assert gloo_pool(2).run(TASKS, "fp32_engine") == [(engine, engine)] * 2


def test_gloo_comm_counts(gloo_pool):
    W = 4
    for fwd, bwd in gloo_pool(W).run(TASKS, "comm_counts", Case(W=W, causal=True)):
        assert fwd == {"ring_hop": W - 1} and bwd == {"ring_hop": 2 * W - 1}
    for fwd, bwd in gloo_pool(W).run(TASKS, "comm_counts", Case(W=W, strategy="ulysses", causal=True)):
        assert fwd == {"all_to_all": 4} and bwd == {"all_to_all": 4}


def test_gloo_shape_mismatch_is_a_clear_error(gloo_pool):
    msgs = gloo_pool(2).run(TASKS, "shape_mismatch", True)
    assert all(m is not None and "differ across the CP ranks" in m for m in msgs), msgs


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_gloo_torch_compile_fullgraph(gloo_pool, strategy):
    op = "cp_ulysses" if strategy == "ulysses" else "cp_attn"
    for same, counts in gloo_pool(2).run(TASKS, "compiled_vs_eager", strategy):
        assert same, "compiled CP attention differs from eager"
        # each graph holds the CP attention as one op
        assert counts == {"fwd": [f"fastattn.{op}_fwd.default"], "bwd": [f"fastattn.{op}_bwd.default"]}, counts


def test_gloo_cp_on_a_device_mesh_dim(gloo_pool):
    case = Case(W=2, causal=True, H=4, Hkv=2)
    got = gloo_pool(4).run(TASKS, "mesh_cp", case)
    ref, one, blk = reference(case), single_process(case), single_block(case)
    for dp in (0, 1):
        group = sorted((cp_rank, res) for d, cp_rank, res in got if d == dp)
        assert [r for r, _ in group] == [0, 1]
        check_acceptance(case, gather_results(case, [res for _, res in group]), one, ref, blk)
