"""torch.library.opcheck on the Triton ops (fastattn::triton_fwd, triton_bwd, triton_decode_fwd): schema, fake
functions against the real kernels, autograd registration and AOT dispatch. On CPU they run through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). The C++ ops are opchecked in
test_cpu_kernels.py and test_decode.py."""
import pytest
import torch

import fastattn

TRITON = fastattn.BACKENDS["triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(TRITON.unavailable()) or DEV not in TRITON.devices,
                                reason=f"triton backend unavailable here: {TRITON.unavailable()}")

# Not tested: test_aot_dispatch_dynamic re-runs every call several times through AOT tracing, which under the
# interpreter costs minutes for no extra coverage of our code (test_compile_dynamic.py traces the ops dynamically).
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


def rnd(*shape, grad=False):
    return torch.randn(*shape, device=DEV).requires_grad_(grad)


@pytest.fixture(scope="module")
def ops():
    from fastattn.backends.triton.kernels import decode, op  # noqa: F401  (registers the ops; imports triton)
    return torch.ops.fastattn


def _fwd_args(grad):
    q, k, v = rnd(1, 2, 5, 16, grad=grad), rnd(1, 1, 9, 16, grad=grad), rnd(1, 1, 9, 16, grad=grad)
    bias = torch.randn(1, 2, 5, 9, device=DEV)
    return (q, k, v, bias, None, None, 5, 9, 0.25, -1, 0, True, 0.0, None, 0.0, 0, 0, False)


def test_opcheck_triton_fwd(ops):
    torch.library.opcheck(ops.triton_fwd.default, _fwd_args(grad=True), test_utils=UTILS)


def test_opcheck_triton_fwd_varlen(ops):
    q, k, v = rnd(11, 2, 16).transpose(0, 1).unsqueeze(0), rnd(14, 2, 16), rnd(14, 2, 16)
    k, v = (t.transpose(0, 1).unsqueeze(0) for t in (k, v))  # (total, H, D) -> (1, H, total, D)
    cu_q = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32, device=DEV)
    args = (q, k, v, None, cu_q, cu_k, 7, 8, 0.25, -1, 0, True, 0.0, None, 0.0, 0, 0, False)
    torch.library.opcheck(ops.triton_fwd.default, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_triton_bwd(ops):
    fwd = _fwd_args(grad=False)
    out, lse = ops.triton_fwd(*fwd)
    q, k, v, bias = fwd[:4]
    args = (torch.randn_like(out), q, k, v, out, lse, bias, None, None, 5, 9, 0.25, -1, 0, True, 0.0, None, 0.0, 0,
            0, False)
    torch.library.opcheck(ops.triton_bwd.default, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_triton_decode_fwd(ops):
    q = rnd(2, 4, 2, 16)  # (B, Hq, Sq, D)
    kc, vc = rnd(5, 8, 2, 16), rnd(5, 8, 2, 16)  # paged (num_blocks, page, Hkv, D)
    bt = torch.tensor([[0, 3], [4, 1]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([13, 6], dtype=torch.int32, device=DEV)
    args = (q, kc, vc, lens, bt, None, 0.25, -1, 0, 0.0, None, 2)
    torch.library.opcheck(ops.triton_decode_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
