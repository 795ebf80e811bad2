"""Crash probe: a native kernel that segfaults would take the whole benchmark down with it, so each fastattn
backend with native kernels first runs a few tiny calls (the benchmark's kinds of case) in a child process.
A backend whose child dies is not run, and is listed with the signal and the call that crashed.

Errors that Python can catch are not the probe's business: the benchmark lists those per case."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import List

import fastattn

# Backends that are plain PyTorch: they cannot crash the process in ways a probe would catch.
PURE_PYTORCH = {"sdpa", "reference"}


def _calls(backend: str, device: str):
    """(description, thunk) pairs: the kinds of call the benchmark makes, at tiny sizes."""
    import torch
    dt = torch.float32 if device == "cpu" else torch.bfloat16

    def rnd(*s, grad=False):
        return torch.randn(*s, device=device, dtype=dt).requires_grad_(grad)

    def sdpa(causal=False, gqa=False, mask=False, grad=False):
        q, k, v = rnd(2, 4, 33, 32, grad=grad), rnd(2, 2 if gqa else 4, 33, 32, grad=grad), \
            rnd(2, 2 if gqa else 4, 33, 32, grad=grad)
        m = (torch.arange(33, device=device) < 20).view(1, 1, 1, 33) if mask else None
        o = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa,
                                                  backend=backend)
        if grad:
            o.sum().backward()

    def varlen(grad=False):
        cu = torch.tensor([0, 20, 53], dtype=torch.int32, device=device)
        q, k, v = (rnd(53, 4, 32, grad=grad) for _ in range(3))
        o = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 33, 33, causal=True, backend=backend)
        if grad:
            o.sum().backward()

    def decode():
        q, kc, vc = rnd(2, 1, 4, 32), rnd(2, 65, 2, 32), rnd(2, 65, 2, 32)
        fastattn.flash_attn_with_kvcache(q, kc, vc, backend=backend)

    for grad in (False, True):
        for kw in (dict(), dict(causal=True), dict(causal=True, gqa=True), dict(mask=True)):
            yield f"scaled_dot_product_attention({kw}, grad={grad})", lambda kw=kw, g=grad: sdpa(grad=g, **kw)
        yield f"flash_attn_varlen_func(grad={grad})", lambda g=grad: varlen(g)
    yield "flash_attn_with_kvcache", decode


def child(backend: str, device: str) -> None:
    for desc, call in _calls(backend, device):
        print(desc, flush=True)
        try:
            call()
        except Exception:  # noqa: BLE001 - refusals and Python errors are reported per case later
            pass
    print("PROBE-DONE", flush=True)


def crash_reasons(backend: str, device: str, timeout: float = 300) -> List[str]:
    """Empty when the backend's tiny calls finish in a child process; otherwise why it is not safe to run."""
    if backend in PURE_PYTORCH or os.environ.get("FASTATTN_BENCH_NO_PROBE") == "1":
        return []
    cmd = [sys.executable, "-m", "fastattn.benchmark.probe", backend, device]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"a tiny probe call did not finish in {timeout:.0f} s in a child process (hang?)"]
    lines = r.stdout.strip().splitlines()
    if lines and lines[-1] == "PROBE-DONE" and r.returncode == 0:
        return []
    last = lines[-1] if lines else "start-up"
    how = f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit code {r.returncode}"
    return [f"crashed ({how}) in a child-process probe during {last}; not run so the benchmark survives"]


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
