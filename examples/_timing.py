"""Steady-state timing shared by the examples: warm-up calls first, then the median of several timed rounds.

A single timed call is mostly noise on a shared or busy machine (first-call setup, allocator growth, a scheduler
tick); the median of a few runs after warm-up is what a loop in real use sees."""
import os
import statistics
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict, *, warmup: int = 2, runs: int = 7) -> dict:
    """{name: (median seconds per call, all timings, last result)} of each fn() after `warmup` untimed calls each,
    timed in rounds that call every fn once (the order reversed every other round), so that load on a shared
    machine falls on all of them alike: timed one block after another, a busy spell lands on one of them and the
    ratio reads anything from 0.8x to 2.5x run to run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    last = {}
    names = list(fns)
    for r in range(max(1, runs)):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync()
            t0 = time.perf_counter()
            last[name] = fns[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), times[name], last[name]) for name in fns}


def spread(times) -> str:
    """'min–max' of the timed runs in ms, to show how noisy the median is."""
    return f"{min(times) * 1e3:.1f}–{max(times) * 1e3:.1f} ms"


def threads_line(device: str) -> str:
    if device != "cpu":
        return f"device {device}"
    env = os.environ.get("OMP_NUM_THREADS")
    return (f"{torch.get_num_threads()} CPU thread(s)" + (f" (OMP_NUM_THREADS={env})" if env else
            f" of {os.cpu_count()} cores; OMP_NUM_THREADS=1 gives steadier numbers on a shared machine"))
