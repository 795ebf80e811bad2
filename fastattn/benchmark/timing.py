"""Median wall time of a callable.

GPU: triton.testing.do_bench (median; it flushes the L2 cache between calls), or CUDA events when Triton is
missing. CPU: time.perf_counter around each call after warm-up; the number of repeats adapts so the timed
calls take about `target_s` (at least `min_reps`), and the median is reported."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    method: str


def bench_cpu(fn: Callable[[], object], target_s: float = 0.3, min_reps: int = 3, max_reps: int = 200,
              warmup: int = 1, estimate_s: Optional[float] = None) -> Timing:
    """estimate_s: the duration of an earlier call, when the caller has already warmed fn up (saves a call)."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        estimate_s = time.perf_counter() - t0
    if estimate_s is None:
        t0 = time.perf_counter()
        fn()
        estimate_s = time.perf_counter() - t0
    first = estimate_s
    reps = int(min(max_reps, max(min_reps, target_s / max(first, 1e-6))))
    times: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, reps, "perf_counter median")


def bench_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return Timing(float(ms), float(ms), -1, "triton.testing.do_bench median")
    # CUDA events: estimate one call, then time enough calls for rep_ms, each between its own pair of events.
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    return Timing(statistics.median(times), min(times), n, "CUDA events median")


def bench(fn: Callable[[], object], device: str, target_s: float = 0.3, warm: Optional[float] = None) -> Timing:
    """warm: seconds an earlier call of fn took, if fn was already called (then no separate CPU warm-up)."""
    if device.startswith("cuda"):
        return bench_cuda(fn)
    if warm is not None:
        return bench_cpu(fn, target_s=target_s, warmup=0, estimate_s=warm)
    return bench_cpu(fn, target_s=target_s)
