"""pytest-benchmark suite (not part of `pytest tests`): `pytest benchmarks/ --benchmark-only`.

Runs a few representative cases per implementation on the current device (cuda when available, else cpu), through
the same implementations, inputs and timed steps as `python -m fastattn.benchmark`, so the two agree. Compare runs
over time with --benchmark-autosave and --benchmark-compare. FASTATTN_BENCH_DEVICE=cpu|cuda overrides the device."""
import os

import pytest
import torch


@pytest.fixture(scope="session")
def device():
    return os.environ.get("FASTATTN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
