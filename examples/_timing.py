"""Steady-state timing shared by the examples: warm-up calls first, then the median of several timed runs.

A single timed call is mostly noise on a shared or busy machine (first-call setup, allocator growth, a scheduler
tick); the median of a few runs after warm-up is what a loop in real use sees."""
import os
import statistics
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steady(fn, *, warmup: int = 2, runs: int = 7):
    """(median seconds per call, all timings, last result) of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(max(1, runs)):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def spread(times) -> str:
    """'min–max' of the timed runs in ms, to show how noisy the median is."""
    return f"{min(times) * 1e3:.1f}–{max(times) * 1e3:.1f} ms"


def threads_line(device: str) -> str:
    if device != "cpu":
        return f"device {device}"
    env = os.environ.get("OMP_NUM_THREADS")
    return (f"{torch.get_num_threads()} CPU thread(s)" + (f" (OMP_NUM_THREADS={env})" if env else
            f" of {os.cpu_count()} cores; OMP_NUM_THREADS=1 gives steadier numbers on a shared machine"))
