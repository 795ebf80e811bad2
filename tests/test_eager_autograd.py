"""The eager autograd path of the forward ops (fastattn/ops.py, eager_function and call_fwd; the cpu backend's plain calls
through the C++ route's node, cpp_attention): eager calls that record
a gradient go through an autograd.Function instead of the Python autograd kernel that torch.library.register_autograd
installs (whose forward rebuilt the op's 22 arguments from the schema, ~120 us a call). It must build the same graph:
the same outputs and gradients, bit for bit, as the op as registered, on every backend that uses it."""
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import lean, ops

BACKENDS = [name for name in ("cpu", "triton")
            if not fastattn.BACKENDS[name].unavailable() and "cpu" in fastattn.BACKENDS[name].devices]


def _registered(op, function, args):
    """call_fwd's stand-in that calls the op as registered (its Python autograd kernel)."""
    return op(*args)


def _module_of(backend):
    """The module whose call_fwd the backend's forward calls (the name it imported)."""
    import fastattn.backends.triton as triton_backend
    return ops if backend == "cpu" else triton_backend


def _run(backend, q, k, v, do, **kw):
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    node = type(out.grad_fn).__name__
    out.backward(do)
    grads = tuple(t.grad for t in (q, k, v))
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads, node


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{}, {"is_causal": True, "enable_gqa": True}, {"dropout_p": 0.3}],
                         ids=["plain", "causal-gqa", "dropout"])
def test_eager_path_matches_registered_op(monkeypatch, backend, kw):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 37, 16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2 if kw.get("enable_gqa") else 4, 29, 16, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn(2, 4, 37, 16, generator=g)
    torch.manual_seed(0)  # the dropout seed comes from torch's generator
    out, grads, node = _run(backend, q, k, v, do, **kw)
    # the cpu backend's plain calls (no dropout) go through the C++ route's node (ops.cpp_attention)
    expect = "CppFunction" if backend == "cpu" and ops._ROUTES and "dropout_p" not in kw else "EagerFwdBackward"
    assert node == expect, f"{backend}: eager call with grad recorded {node}, not {expect}"
    monkeypatch.setattr(_module_of(backend), "call_fwd", _registered)
    monkeypatch.setattr(ops, "_ROUTES", False)  # cpp_attention through call_fwd, and no learnt route replayed
    monkeypatch.setattr(lean, "call", lambda *a: None)
    torch.manual_seed(0)
    ref_out, ref_grads, ref_node = _run(backend, q, k, v, do, **kw)
    assert ref_node != node, "the stand-in did not take the registered op"
    assert torch.equal(out, ref_out)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert torch.equal(a, b), f"{backend}: d{name} differs from the registered op's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_inference_and_double_backward(backend):
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        assert fastattn.scaled_dot_product_attention(q, k, v, backend=backend).grad_fn is None
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    # No double backward: an error, where the op as registered only warns (its backward op has no autograd kernel)
    # and differentiates its gradient as a constant.
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        dq.sum().backward()


_PLANT = r"""
import sys, torch
sys.path.insert(0, "tests")
from support.cases import matrix, run_case
names = ("basic", "causal_square_257", "gqa", "hd80", "varlen_causal")
cells = [c for c in matrix() if c[0] == "cpu" and c[2] == torch.float32 and c[1].name in names]
failed = sorted(c[1].name for c in cells if not all(ok for ok, _ in run_case(*c)))
print(f"{len(failed)} of {len(cells)} cells failed: {failed}")
"""


@pytest.mark.parametrize("plant", ["", "grad_swap"])
def test_planted_grad_node_bug_fails_the_matrix(plant):
    """The cpu backend's C++ autograd node (csrc/lean_routes.cpp FwdGrad) with dK and dV swapped in its backward
    (FASTATTN_CPU_PLANT=grad_swap) fails the matrix on each cell it records; the varlen cell, which the node does not
    take (eager_function's Function records it), passes."""
    if not ops._ROUTES:
        pytest.skip("the extension was built without the C++ routes")
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTATTN_CPU_PLANT=plant)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PLANT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    want = ("4 of 5 cells failed: ['basic', 'causal_square_257', 'gqa', 'hd80']" if plant
            else "0 of 5 cells failed")
    assert want in r.stdout, r.stdout


def _cpu_node_call(q, k, v):
    """A plain cpu call that records its gradient on the C++ node (asserted)."""
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    assert type(out.grad_fn).__name__ == "CppFunction", type(out.grad_fn).__name__
    return out


def test_cpu_node_keeps_autograd_contracts():
    """The C++ node honours what the Python Function did: saved-tensor hooks see its saved tensors (activation
    offloading), non-reentrant checkpointing recomputes it to the same gradients, and an in-place change of an input
    it saved makes the backward raise instead of reading the new values."""
    if not ops._ROUTES or fastattn.BACKENDS["cpu"].unavailable():
        pytest.skip("the extension was built without the C++ routes")
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 19, 16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 19, 16, generator=g)
    want = torch.autograd.grad(_cpu_node_call(q, k, v), (q, k, v), do)

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _cpu_node_call(q, k, v)
    assert len(packed) >= 5, packed  # q, k, v, out, lse
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), do), want))

    from torch.utils.checkpoint import checkpoint
    out = checkpoint(_cpu_node_call, q, k, v, use_reentrant=False)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), do), want))

    q2 = q.detach().clone().requires_grad_()
    x = q2 * 1  # a non-leaf input, changed in place after the forward saved it
    out = _cpu_node_call(x, k, v)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(do)
