"""The generated correctness matrix: every backend × every case it declares × every dtype it declares.

Forward and gradients against the float64 oracle under the tolerance rule (tests/support/oracle.py)."""
import pytest
import torch

from support.cases import matrix, run_case

import fastattn

MATRIX = matrix()


def _id(x):
    b, case, dt, dev = x
    return f"{b}-{case.name}-{str(dt)[6:]}-{dev}"


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
