"""The CPU kernels take their per-thread buffers from a workspace kept across calls (csrc/cpu/workspace.h), not from
the allocator on every call: per-call buffers had, in some glibc heap states, sent an OpenMP worker through a fresh
64 MB heap per call (mmap, page faults, munmap), the short calls then 0.5-0.9x torch.

The check is a count, not a timing: with MALLOC_TRIM_THRESHOLD_=0 glibc hands every freed block back to the OS at
once, so memory allocated per call faults its pages in again on every call. Repeated calls on two threads may then
fault only the pages of the tensors they return; a planted switch that frees the workspace after each call
(FASTATTN_CPU_PLANT=workspace_off) must fail the same check."""
import os
import subprocess
import sys

import pytest

from fastattn import ops

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

_COUNT = r"""
import resource, torch, fastattn
torch.set_num_threads(2)
torch.manual_seed(0)

def faults(dtype, Sq, Hq, Hkv, D, Sk, grad):
    q = torch.randn(1, Hq, Sq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, Hkv, Sk, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(1, Hkv, Sk, D, dtype=dtype, requires_grad=grad)
    def call():
        o = fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", enable_gqa=Hq != Hkv)
        if grad:
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        return o
    for _ in range(3):
        o = call()
    # pages of what a call returns and autograd allocates around it (the output, its ones, the three gradients)
    returned = o.nbytes * (2 if grad else 1) + (3 * q.nbytes + 2 * k.nbytes if grad else 0)
    n = 20
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n, returned / 4096

cases = [(torch.float32, 16, 12, 12, 64, 512, False), (torch.float32, 4, 16, 4, 128, 512, False),
         (torch.float16, 8, 16, 4, 128, 512, False), (torch.bfloat16, 16, 8, 8, 128, 512, False),
         (torch.float32, 128, 8, 8, 64, 128, True), (torch.bfloat16, 128, 8, 8, 64, 256, True),
         (torch.float16, 256, 8, 8, 64, 256, True)]
over = 0
for c in cases:
    per_call, pages = faults(*c)
    bad = per_call > pages + 32
    over += bad
    print(f"{str(c[0])[6:]} Sq={c[1]} Hq={c[2]} Hkv={c[3]} D={c[4]} Sk={c[5]} {'fwd+bwd' if c[6] else 'fwd'}: "
          f"{per_call:.0f} faults a call, {pages:.0f} pages returned{' TOO MANY' if bad else ''}")
print(f"{over} of {len(cases)} cases over")
"""


@pytest.mark.parametrize("plant", ["", "workspace_off"], ids=["kept", "planted_per_call"])
def test_repeated_calls_fault_only_their_outputs(plant):
    """With the workspace no case faults more than its returned tensors' pages (+32); freed after every call, the
    kernels' buffers fault in again and every case goes over (Intel Xeon, two threads: 110-1989 faults a call freed, 0-325
    kept)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_TRIM_THRESHOLD_="0", FASTATTN_CPU_PLANT=plant)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COUNT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("7 of 7" if plant else "0 of 7") + " cases over" in r.stdout, r.stdout
