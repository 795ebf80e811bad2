"""Tier 1 harness: real gloo process groups, one spawned pool per world size (tests/support/gloo.py), started once
per test session."""
from __future__ import annotations

import pytest

from tests.support.gloo import GlooPool

POOL_SIZES = (2, 3, 4)


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts gloo process groups (tests/distributed, tier 1)")


_POOLS: dict = {}


@pytest.fixture(scope="session")
def gloo_pool():
    """gloo_pool(W) -> the session's GlooPool of W processes (started on first use, closed at session end)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")

    def get(world_size: int) -> GlooPool:
        if not _POOLS:  # start every pool at once: their torch imports overlap
            for w in POOL_SIZES:
                _POOLS[w] = GlooPool(w)
        if world_size not in _POOLS:
            _POOLS[world_size] = GlooPool(world_size)
        return _POOLS[world_size]
    yield get
    import time
    for pool in _POOLS.values():  # all pools wind down together
        pool.stop()
    deadline = time.monotonic() + 5
    for pool in _POOLS.values():
        pool.close(deadline)
    _POOLS.clear()
