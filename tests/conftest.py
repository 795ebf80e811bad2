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


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models, or W simulated ranks as threads: OpenMP start-up and spinning
    cost more than they save, 10x slower on a busy 2-core machine). Use: pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
