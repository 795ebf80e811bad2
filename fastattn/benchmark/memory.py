"""Peak extra memory of one call: the most bytes held by tensors allocated during the call, above what was
allocated before it (inputs and anything alive before the call are not counted; outputs the call returns are).

GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the call
  (bytes handed out by PyTorch's caching allocator; the cache's own reserve is not counted).
CPU: the allocation event stream of torch.profiler(profile_memory=True): every allocation and free made through
  PyTorch's CPU allocator (all tensors, including the kernels' temporaries created as tensors), replayed in time
  order; the peak of the running sum is the peak extra memory. Memory a kernel takes outside PyTorch's
  allocator (raw malloc, BLAS/OpenMP scratch) is not seen; process RSS would see it but cannot be reset
  between calls, and it also counts freed-but-cached pages, so it is not used."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Tuple


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines to fd 2 at every profile; hide them (restored even on error)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class CpuAllocTracker:
    """Context manager: after exit, .peak is the peak extra bytes and .current the net bytes still held."""

    def __init__(self):
        self.peak = 0
        self.current = 0
        self.events = 0

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        with _quiet_stderr():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        if exc[0] is not None:
            return False
        evs = [e for e in self._prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type().name == "CPU"]
        evs.sort(key=lambda e: e.start_ns())
        run = peak = 0
        for e in evs:
            run += e.nbytes()
            peak = max(peak, run)
        self.peak, self.current, self.events = peak, run, len(evs)
        return False


def peak_extra_bytes(fn: Callable[[], object], device: str) -> Tuple[int, str]:
    """Runs fn once and returns (peak extra bytes, what measured it)."""
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del r
        return max(0, peak), "torch.cuda.max_memory_allocated"
    with CpuAllocTracker() as t:
        r = fn()
        del r
    return t.peak, "torch.profiler allocation events"
