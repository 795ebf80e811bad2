"""Interleaved timing for side-by-side ratios (benchmarks/test_auto_rule.py, bench_small_grad.py): on a shared host a
load spell lasts seconds, so each implementation is timed in short batches, round after round, and ratios are taken
within a round, where both sides met the same load."""
from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, List


def calls_per_batch(impls: Dict[str, Callable[[], object]], clock: Callable[[], float], batch_s: float = 0.02,
                    base: str = "torch") -> int:
    """Back-to-back calls of each implementation that fill about batch_s at base's (torch's) speed, after two warm-up
    calls of each. A batch's mean, not one call: PyTorch's CPU flash kernel allocates its scratch on every call and
    page-faults on it or not depending on the heap's state (~46 faults per call on average at B4 H8 S128 D128 bf16,
    perf stat), so the fastest single call of torch or of auto's hand-over to it differed by ~40 us while their means
    over 2000 calls differed by 4 us. The same count for all: what a switch between implementations costs (caches,
    the heap) then weighs alike on each (counted from each one's first call, auto's hand-over got half torch's
    count at 1 ms a call, its first call learning the route, and read 0.91-0.94x torch, 0.97-0.98x with equal
    counts)."""
    for f in impls.values():
        f()
        f()
    t0 = clock()
    for _ in range(3):
        impls[base]()
    return max(1, int(batch_s / max((clock() - t0) / 3, 1e-6)))


def balanced_orders(n: int) -> List[List[int]]:
    """A Williams design: n orders of range(n) (2n for odd n) in which each index takes each place, and directly
    follows each other index, equally often. What follows whom matters (a batch after torch's meets the heap torch
    left: implementations identical in code read 1.41x and 1.64x torch side by side when four of them took the first 9
    of the 24 permutations in turn, each following torch in 2 of the 9 rounds or none). For 2 and 3 implementations
    these are all the permutations."""
    first = [0]
    for i in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        first.append((i + 1) // 2 if i % 2 else n - i // 2)
    rows = [[(x + r) % n for x in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def rounds_of(impls: Dict[str, Callable[[], object]], clock: Callable[[], float], rounds: int,
              calls: int) -> Dict[str, List[float]]:
    """name -> per-call seconds in each of `rounds` rounds, each round one batch of `calls` calls per implementation,
    the rounds taking the orders of a Williams design in turn (balanced_orders)."""
    names = list(impls)
    orders = [[names[i] for i in row] for row in balanced_orders(len(names))]
    per = {name: [] for name in impls}
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            f = impls[name]
            t0 = clock()
            for _ in range(calls):
                f()
            per[name].append((clock() - t0) / calls)
    return per


def ratios_to(per: Dict[str, List[float]], base: str = "torch") -> Dict[str, float]:
    """base's time over each implementation's: the median over the rounds of the ratio within a round."""
    return {name: statistics.median(a / b for a, b in zip(per[base], per[name])) for name in per}


def switched(force: Callable[[int], None], value: int, call: Callable[[], object]) -> Callable[[], object]:
    """call() with a test switch of the kernels (force, e.g. ops._C.cpu_fwd_l2_force) at value, reset to 0 (this
    CPU's own choice) after each call, so that the paths of one interleaved run each take their own setting."""
    def run():
        force(value)
        try:
            return call()
        finally:
            force(0)
    return run


def with_env(name: str, value: str, call: Callable[[], object]) -> Callable[[], object]:
    """call() with the environment variable name set to value (a switch the kernels read per call, e.g.
    FASTATTN_CPU_PREFETCH), restored after, so that the other paths of one interleaved run see the caller's."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return call()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def sdpa_call(f: Callable, q, k, v, do=None, **kw) -> Callable[[], object]:
    """One timed call of an SDPA-like f(q, k, v, **kw): the forward, and with an upstream gradient do the backward
    too, the inputs' gradients cleared after it."""
    if do is None:
        return lambda: f(q, k, v, **kw)

    def run():
        f(q, k, v, **kw).backward(do)
        q.grad = k.grad = v.grad = None
    return run
