"""The context-parallel GPT-2 example trains with the same losses and gradients as one process: simulated ranks (tier 0) and
two gloo processes (tier 1)."""
import importlib.util
import os

import pytest

from fastattn.distributed import run_local

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "context_parallel.py")
TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")


def _example():
    spec = importlib.util.spec_from_file_location("cp_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_equal_losses(history):
    print(history)
    assert len(history) == 3
    for cp_loss, ref_loss, _ in history:
        assert abs(cp_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert history[0][2] <= 1e-5  # the gradients summed over the ranks against one process's (same weights)
    assert history[-1][1] < history[0][1]  # it trains


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_example_simulated(strategy):
    ex = _example()
    _assert_equal_losses(run_local(2, lambda c: ex.train(c, steps=3, reference=c.rank == 0, strategy=strategy))[0])


@pytest.mark.distributed
def test_example_gloo(gloo_pool):
    _assert_equal_losses(gloo_pool(2).run(TASKS, "train_example", 3)[0])
