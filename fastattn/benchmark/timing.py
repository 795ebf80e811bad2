"""Median wall time of a callable.

GPU: triton.testing.do_bench (median; it flushes the L2 cache between calls), or CUDA events when Triton is
missing. CPU: time.perf_counter around each call after warm-up; the number of repeats adapts so the timed
calls take about `target_s` (at least `min_reps`), and the median is reported. `bench_cpu_interleaved` times
several callables that way in rounds, so that load on a shared CPU falls on all of them alike."""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence

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
    reps = _reps(target_s, estimate_s, min_reps, max_reps)
    times: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, reps, "perf_counter median")


def _reps(target_s: float, estimate_s: float, min_reps: int = 3, max_reps: int = 200) -> int:
    return int(min(max_reps, max(min_reps, target_s / max(estimate_s, 1e-6))))


@dataclass
class Timed:
    """One callable of an interleaved measurement: fn, the context entered around each of its batches (e.g.
    SDPA's sdpa_kernel choice), the duration of a call already made (it sizes the repeats); after
    bench_cpu_interleaved, `timing` or the exception a call raised."""
    fn: Callable[[], object]
    estimate_s: float
    context: Callable[[], ContextManager] = contextlib.nullcontext
    timing: Optional[Timing] = None
    error: Optional[Exception] = None


ROUNDS = 8


def bench_cpu_interleaved(items: Sequence[Timed], target_s: float = 0.3, rounds: int = ROUNDS) -> None:
    """bench_cpu for several callables at once: each still makes its own number of timed calls (about target_s of
    them, at least 3), spread evenly over `rounds` rounds that visit the callables in turn, so a spell of load on a
    shared CPU (seconds long on the 2-vCPU VMs this was measured on) lands on every callable's calls alike instead of
    on one callable's whole block. Timed one block after another, the quick preset read the same kernel 0.81x and
    0.88x torch in two cases on one such VM, 1.50x and 1.14x in the interleaved rounds of an A/B script. Each round
    takes its own order (rotated, reversed every other round), so a callable does not always run just after the
    same other one: in one fixed order the cpu kernels always ran just before auto's hand-over to torch's SDPA in
    benchmarks/test_auto_rule.py and it read 0.89-0.94x torch's very call, 0.96-1.01x in every order. A callable
    that raises is left out of the later rounds, with its exception in `error`."""
    reps = [_reps(target_s, t.estimate_s) for t in items]
    times: List[List[float]] = [[] for _ in items]
    for r in range(rounds):
        for i in _round_order(len(items), r):
            t = items[i]
            n = (r + 1) * reps[i] // rounds - r * reps[i] // rounds  # reps[i] calls over the rounds, evenly
            if n == 0 or t.error is not None:
                continue
            try:
                with t.context():
                    for _ in range(n):
                        t0 = time.perf_counter()
                        t.fn()
                        times[i].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - the caller lists it as the implementation's failure
                t.error = e
    for t, ts in zip(items, times):
        if t.error is None:
            t.timing = Timing(statistics.median(ts) * 1e3, min(ts) * 1e3, len(ts), "perf_counter median, interleaved")


def _round_order(k: int, r: int) -> List[int]:
    """Round r's order of k callables: rotated by r // 2, reversed in odd rounds (a callable's predecessor is then
    one of its neighbours either side in turn; with three callables, each of the other two alike)."""
    order = [(i + r // 2) % k for i in range(k)] if k else []
    return order[::-1] if r % 2 else order


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
