"""The generated correctness matrix: every backend × every case it declares × every dtype it declares.

Forward and gradients against the float64 oracle under the tolerance rule (tests/oracle.py)."""
import pytest
import torch

from cases import LOW, make_inputs, matrix, run_fastattn, run_oracle
from oracle import assert_rule, check_rule

import fastattn

MATRIX = matrix()


def _id(x):
    b, case, dt, dev = x
    return f"{b}-{case.name}-{str(dt)[6:]}-{dev}"


def run_case(backend, case, dtype, device):
    """Runs one matrix cell; returns a list of (ok, message) for out, lse and each gradient."""
    q, k, v, g = make_inputs(case, dtype, device)
    want_grad = case.grad and "grad" in fastattn.get_backend(backend).features
    leaves = [t.detach().clone().requires_grad_(want_grad) for t in (q, k, v)]
    out, lse = run_fastattn(case, *leaves, g, backend)

    ref_leaves = [t.detach().double().requires_grad_(want_grad) for t in (q, k, v)]
    ref, ref_lse = run_oracle(case, *ref_leaves, g)
    base_leaves = [t.detach().clone().requires_grad_(want_grad) for t in (q, k, v)]
    base, base_lse = run_oracle(case, *base_leaves, g, dtype=dtype) if dtype in LOW else (ref, ref_lse)

    results = [check_rule("out", out, ref, base, dtype)]
    if case.lse:
        results.append(check_rule("lse", lse, ref_lse, base_lse, dtype))
    if want_grad:
        dout = torch.randn_like(ref)
        grads = torch.autograd.grad(out, leaves, dout.to(dtype).to(device))
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
        base_grads = (torch.autograd.grad(base, base_leaves, dout.to(dtype)) if dtype in LOW else ref_grads)
        for name, a, r, bb in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
            results.append(check_rule(name, a, r, bb, dtype))
    return results


@pytest.mark.parametrize("cell", MATRIX, ids=[_id(x) for x in MATRIX])
def test_matrix(cell):
    backend, case, dtype, device = cell
    results = run_case(backend, case, dtype, device)
    for ok, msg in results:
        print(msg)
    bad = [m for ok, m in results if not ok]
    assert not bad, f"{backend} {case.name} {dtype}: " + " | ".join(bad)


def test_matrix_covers_every_available_backend():
    names = {b for b, *_ in MATRIX}
    for name, b in fastattn.BACKENDS.items():
        if not b.unavailable() and ("cpu" in b.devices or torch.cuda.is_available()):
            assert name in names, f"backend {name} is available but got no matrix cases"
