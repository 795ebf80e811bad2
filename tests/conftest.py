"""Test-wide settings. Must run before fastattn or triton are imported."""
import os

os.environ.setdefault("FASTATTN_POISON_OUTPUTS", "1")  # fresh kernel outputs start as NaN: unwritten elements show

import torch  # noqa: E402

if not torch.cuda.is_available():
    # No GPU: Triton kernels run through the interpreter on CPU tensors (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, but print the seed so a failure can be replayed with FASTATTN_TEST_SEED.
    seed = int(os.environ.get("FASTATTN_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    print(f"[seed {seed}]")
    yield
