"""torch.compile(fullgraph=True) traces the public functions for every backend available on this device."""
import os

import pytest
import torch

import fastattn

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _compilable():
    out = []
    for name, b in fastattn.BACKENDS.items():
        if b.unavailable() or DEV not in b.devices:
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("backend", _compilable())
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    b = fastattn.get_backend(backend)
    dt = torch.float32 if torch.float32 in b.dtypes else torch.float16
    q = torch.randn(2, 17, 4, 64, device=DEV, dtype=dt, requires_grad="grad" in b.features)
    k = torch.randn(2, 33, 4, 64, device=DEV, dtype=dt, requires_grad="grad" in b.features)
    v = torch.randn(2, 33, 4, 64, device=DEV, dtype=dt, requires_grad="grad" in b.features)
    causal = "bottom_right" in b.features

    def layer(q, k, v):
        return fastattn.flash_attn_func(q, k, v, causal=causal, backend=backend).sum(-1)

    # Under Triton's interpreter the ops are opaque custom ops: trace them with aot_eager (inductor would
    # try to compile Triton code for a CPU device). On a GPU, inductor compiles the triton_op itself.
    cb = "aot_eager" if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else "inductor"
    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True, backend=cb)(q, k, v)
    tol = 1e-5 if dt == torch.float32 else 2e-3
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    if "grad" in b.features:
        ge = torch.autograd.grad(eager.sum(), (q, k, v))
        gc = torch.autograd.grad(torch.compile(layer, fullgraph=True, backend=cb)(q, k, v).sum(), (q, k, v))
        for a, c in zip(ge, gc):
            torch.testing.assert_close(c, a, rtol=tol, atol=tol)
