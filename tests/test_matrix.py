"""The generated correctness matrix: every backend × every case it declares × every dtype it declares.

Forward and gradients against the float64 oracle under the tolerance rule (tests/support/oracle.py)."""
import pytest
import torch

from support.cases import cell_id, matrix, run_case
from support.checks import check_mask_grad

import fastattn

MATRIX = matrix()


@pytest.mark.parametrize("cell", MATRIX, ids=[cell_id(x) for x in MATRIX])
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


def _mask_grad_cells():
    """Every available backend declaring mask_grad, on CPU, in each float dtype it declares below fp64."""
    out = []
    for name, b in fastattn.BACKENDS.items():
        if "mask_grad" in b.features and not b.unavailable() and "cpu" in b.devices:
            for dt in (torch.float32, torch.bfloat16):
                if dt in b.dtypes:
                    out.append(pytest.param(name, dt, id=f"{name}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("mask_shape,causal", [((2, 3, 13, 21), False), ((1, 1, 13, 21), True), ((2, 1, 1, 21), False)],
                         ids=["full", "broadcast-causal", "key-padding"])
@pytest.mark.parametrize("backend,dtype", _mask_grad_cells())
def test_mask_grad(backend, dtype, mask_shape, causal):
    """The mask_grad declaration (README feature table): d(attn_mask) matches the oracle, broadcast masks included
    (their gradient is summed over the broadcast dims)."""
    check_mask_grad(backend, "cpu", dtype, mask_shape, causal)


def test_mask_grad_cells_exist():
    declared = {n for n, b in fastattn.BACKENDS.items() if "mask_grad" in b.features}
    assert declared and {c.values[0] for c in _mask_grad_cells()} == {
        n for n in declared if not fastattn.BACKENDS[n].unavailable() and "cpu" in fastattn.BACKENDS[n].devices}
