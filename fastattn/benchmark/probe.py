"""Crash probe: a native kernel that segfaults would take the whole benchmark down with it, so each fastattn
backend with native kernels first runs a few tiny calls (the benchmark's kinds of case) in a child process.
A backend whose child dies is not run, and is listed with the signal and the call that crashed.

Errors that Python can catch are not the probe's business: the benchmark lists those per case."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, Iterable, List

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


class Probes:
    """Probe children started in the background (they run while the benchmark sets up and measures the plain
    PyTorch implementations); reasons(backend) waits for that backend's child."""

    def __init__(self, backends: Iterable[str], device: str, timeout: float = 300):
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.done: Dict[str, List[str]] = {}
        self.failed = set()  # backends whose child crashed or hung (a bug: cli's exit status)
        self.procs = {}
        if os.environ.get("FASTATTN_BENCH_NO_PROBE") == "1":
            return
        # No autotuning in the child: it would time every Triton config for each tiny call, cold, for minutes,
        # while the main run waits in reasons(); one heuristic config per kernel runs the same code paths.
        env = dict(os.environ, FASTATTN_TRITON_AUTOTUNE="0")
        for b in sorted(set(backends) - PURE_PYTORCH):
            # Their own session: a terminal's Ctrl-C (or `timeout`) signals the run's process group, and a child
            # killed by it would read as a crash of the backend.
            self.procs[b] = subprocess.Popen([sys.executable, "-m", "fastattn.benchmark.probe", b, device], text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                             start_new_session=True)

    def reasons(self, backend: str) -> List[str]:
        if backend in self.done or backend not in self.procs:
            return self.done.get(backend, [])
        p = self.procs[backend]
        try:
            stdout, _ = p.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            why = [f"tiny probe calls did not finish in {self.timeout:.0f} s in a child process (hang?)"]
            self.failed.add(backend)
        else:
            lines = stdout.strip().splitlines()
            rc = p.returncode
            if lines and lines[-1] == "PROBE-DONE" and rc == 0:
                why = []
            elif rc in (-signal.SIGINT, -signal.SIGTERM):  # sent from outside (the session is its own)
                why = ["its probe was stopped by SIGINT/SIGTERM from outside (not a crash); not run"]
            else:
                last = lines[-1] if lines else "start-up"
                how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
                why = [f"crashed ({how}) in a child-process probe during {last}; not run so the benchmark survives"]
                self.failed.add(backend)
        self.done[backend] = why
        return why

    def close(self) -> None:
        """Ends the children still running (a run stopped early)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()


def crash_reasons(backend: str, device: str, timeout: float = 300) -> List[str]:
    """Empty when the backend's tiny calls finish in a child process; otherwise why it is not safe to run."""
    return Probes([backend], device, timeout).reasons(backend)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
