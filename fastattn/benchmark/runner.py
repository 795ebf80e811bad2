"""The measurement loop: every case x every implementation, each either measured or listed with its reason."""
from __future__ import annotations

import contextlib
import gc
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .cases import Case, flops, kv_bytes
from .check import sized_check, small_check
from .impls import NAIVE, Impl, Refused
from .inputs import make_inputs, step_for
from .memory import CpuAllocTracker, peak_extra_bytes
from .timing import Timed, bench, bench_cpu_interleaved


class Progress:
    """On a terminal: tqdm when installed, else a counter redrawn in place with \\r. Elsewhere (a log file, a pipe,
    CI) redrawing would pile every update onto one line, so it writes a plain line at each tenth of the run."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.n, self.enabled, self._bar = total, 0, enabled, None
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._next_line = 0  # non-TTY: the count at which the next line is written
        if enabled and self.tty:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, file=self.stream, unit="run", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, desc: str):
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(desc[:60])
            self._bar.update(1)
        elif self.tty:
            self.stream.write(f"\r[{self.n}/{self.total}] {desc[:70]:<70}")
            self.stream.flush()
        elif self.n >= self._next_line or self.n == self.total:
            self.stream.write(f"[{self.n}/{self.total}] {desc[:100]}\n")
            self.stream.flush()
            self._next_line = self.n + max(1, self.total // 10)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.tty:
            self.stream.write("\n")


# Stopping: Ctrl-C / SIGTERM set STATE["stop"]; they interrupt only code run under interruptible() (a measurement,
# a probe wait, the model-level runs), so the bookkeeping between them always completes and results get written.
STATE = {"stop": False, "interruptible": False}


def request_stop(signum=None, frame=None):
    """Signal handler for SIGINT/SIGTERM."""
    STATE["stop"] = True
    if STATE["interruptible"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible():
    STATE["interruptible"] = True
    try:
        yield
    except KeyboardInterrupt:
        STATE["stop"] = True
    finally:
        STATE["interruptible"] = False


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _probe(step):
    """First call, with warnings kept: SDPA explains a refusal only through warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step()
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001 - any failure becomes a listed reason
            if _is_oom(e):
                raise
            why = [str(w.message).strip().replace("\n", " ") for w in caught
                   if issubclass(w.category, UserWarning)]
            raise Refused([_first_line(e)] + [w[:200] for w in why[:4]]) from None


def prepare(impl: Impl, case: Case, inp, device: str, checks: Dict[tuple, tuple]) -> Tuple[dict, Optional[Timed]]:
    """Everything of one measurement but the timing: build, first call (and on the CPU its memory), the
    correctness checks (the small case's, once per kind; the timed call's on sampled rows), the GPU's peak memory. Returns the record and the step to time (None once it failed)."""
    rec = {"impl": impl.name, "family": impl.family, "status": "ok", "reason": ""}
    t_start = time.monotonic()
    grad = case.mode in ("bwd", "fwd_bwd")
    timed = None
    try:
        runner = impl.build(case, inp, grad)
        with runner.context():
            if runner.notes:
                rec["notes"] = "; ".join(runner.notes)
            step = step_for(runner, case.mode)
            cpu = not device.startswith("cuda")
            # CPU: the first call is also the memory measurement (PyTorch's CPU allocator caches nothing, so the
            # first call allocates what every call does) and its duration sizes the repeats. GPU: a separate call
            # after the first, so one-time allocations (workspaces, autotuning) stay out of the peak.
            t_probe = time.perf_counter()
            if cpu:
                with CpuAllocTracker() as tracker:
                    _probe(step)
                rec.update(peak_mem_mb=tracker.peak / 2 ** 20, memory="torch.profiler allocation events")
            else:
                _probe(step)
            t_probe = time.perf_counter() - t_probe
            key = (impl.name, case.kind)
            if key not in checks:
                try:
                    checks[key] = small_check(impl, case, device)
                except Refused as e:
                    checks[key] = (None, "small check refused: " + str(e))
                except Exception as e:  # noqa: BLE001
                    checks[key] = (False, "small check raised " + _first_line(e))
            small_ok, small_detail = checks[key]
            try:
                sized_ok, sized_detail = sized_check(case, inp, runner)
            except Exception as e:  # noqa: BLE001
                sized_ok, sized_detail = False, "raised " + _first_line(e)
            # Wrong if either check is; the timed call's own check passing vouches for it when the small one was
            # refused.
            rec["correct"] = False if False in (small_ok, sized_ok) else sized_ok
            rec["check"] = f"timed size: {sized_detail}; small case: {small_detail}"
            if not cpu:
                peak, how = peak_extra_bytes(step, device)
                rec.update(peak_mem_mb=peak / 2 ** 20, memory=how)
        timed = Timed(step, t_probe, runner.context)
    except Refused as e:
        rec.update(status="refused", reason=str(e))
    except Exception as e:  # noqa: BLE001
        rec.update(status="oom" if _is_oom(e) else "error", reason=_first_line(e))
    rec["wall_s"] = round(time.monotonic() - t_start, 3)  # everything: compile, check, memory (finish: + timing)
    return rec, timed


def finish(rec: dict, timed: Timed, case: Case, timing_s: float) -> dict:
    """The record of a prepared measurement with its timing (or the error its timed calls raised)."""
    if timed.error is not None:
        e = timed.error
        rec.update(status="oom" if _is_oom(e) else "error", reason=_first_line(e))
    else:
        t = timed.timing
        rec.update(time_ms=t.median_ms, min_ms=t.min_ms, reps=t.reps, timing=t.method)
        s = rec["time_ms"] / 1e3
        rec["tflops"] = flops(case) / s / 1e12
        if case.mode == "decode":
            rec["gbps"] = kv_bytes(case) / s / 1e9
    rec["wall_s"] = round(rec["wall_s"] + timing_s, 3)
    return rec


def measure(impl: Impl, case: Case, inp, device: str, target_s: float, checks: Dict[tuple, tuple]) -> dict:
    """One implementation on one case, timed alone (the GPU's way; run() interleaves a CPU case's timings)."""
    rec, timed = prepare(impl, case, inp, device, checks)
    if timed is None:
        return rec
    t0 = time.monotonic()
    try:
        with timed.context():
            cpu = not device.startswith("cuda")
            timed.timing = bench(timed.fn, device, target_s, warm=timed.estimate_s if cpu else None)
    except Exception as e:  # noqa: BLE001
        timed.error = e
    return finish(rec, timed, case, time.monotonic() - t0)


def run(cases: List[Case], impls: List[Impl], device: str, target_s: float = 0.3,
        max_seconds: Optional[float] = None, progress: bool = True, not_run: Optional[Dict[str, list]] = None,
        gate: Optional[Callable[[Impl], List[str]]] = None, order: str = "cheapest",
        on_record: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Measures every case with every implementation; returns one record per (case, implementation).

    max_seconds: no new case starts after that (a started case finishes); the rest are listed as skipped.
    gate(impl): reasons to drop an implementation before its first use (the crash probe); dropped ones go to
    not_run. order: "cheapest" (fewest FLOPs first) or "given" (the list's order: most important first).
    on_record(rec): called with each record as soon as it exists (before the speedups are added)."""
    if order not in ("cheapest", "given"):
        raise ValueError(f"order must be 'cheapest' or 'given', got {order!r}")
    impls = list(impls)
    records: List[dict] = []
    checks: Dict[tuple, tuple] = {}
    bar = Progress(sum(i.applies(c) for c in cases for i in impls), enabled=progress)
    start = time.monotonic()
    # Cheapest cases first (unless the caller ordered them by importance): a run cut short by max_seconds loses
    # the most expensive points, not whole sweeps.
    todo = sorted(cases, key=lambda c: (flops(c), cases.index(c))) if order == "cheapest" else list(cases)
    # CPU: a case's implementations are prepared one by one, then timed together in interleaved rounds
    # (timing.bench_cpu_interleaved); an interruption before their timing ends leaves the case's records skipped.
    # GPU: each is timed alone, right after its preparation (do_bench; a GPU is not shared with other tenants).
    cpu = not device.startswith("cuda")
    try:
        for case in todo:
            inp = None
            over = max_seconds is not None and time.monotonic() - start > max_seconds
            pending = []  # (impl, record or None, Timed or None) in order
            for impl in [i for i in impls if i.applies(case)]:
                bar.update(f"{impl.name} {case.label}")
                rec = timed = None
                if not (STATE["stop"] or over):
                    with interruptible():
                        why = gate(impl) if gate is not None else []
                        if why:
                            impls.remove(impl)
                            if not_run is not None:
                                not_run[impl.name] = why
                            continue
                        if inp is None:
                            inp = make_inputs(case, device)
                        if cpu:
                            rec, timed = prepare(impl, case, inp, device, checks)
                        else:
                            rec = measure(impl, case, inp, device, target_s, checks)
                pending.append((impl, rec, timed))
            timing_s = 0.0
            items = [t for _, _, t in pending if t is not None]
            if items and not STATE["stop"]:
                t0 = time.monotonic()
                with interruptible():
                    bench_cpu_interleaved(items, target_s)
                timing_s = (time.monotonic() - t0) / len(items)  # each record's share of the rounds
            for impl, rec, timed in pending:
                if rec is not None and timed is not None:
                    rec = finish(rec, timed, case, timing_s) if timed.timing or timed.error else None
                if rec is None:
                    reason = "interrupted (Ctrl-C or SIGTERM)" if STATE["stop"] else \
                        f"time budget (--max-seconds {max_seconds:g}) used up"
                    rec = {"impl": impl.name, "family": impl.family, "status": "skipped", "reason": reason}
                rec.update(case=case.to_dict(), label=case.label)
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
            if inp is not None:  # free this case's tensors before the next (gc is slow: only when needed)
                del inp
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    finally:
        bar.close()
    add_speedups(records)
    rank = {c.label: i for i, c in enumerate(cases)}
    records.sort(key=lambda r: rank[r["label"]])  # report in the preset's order (stable within a case)
    return records


def add_speedups(records: List[dict]) -> None:
    """Per case: speedup over naive attention and over the fastest PyTorch SDPA kernel measured."""
    by_case: Dict[str, List[dict]] = {}
    for r in records:
        by_case.setdefault(r["label"], []).append(r)
    for rows in by_case.values():
        ok = [r for r in rows if r["status"] == "ok"]
        naive = next((r["time_ms"] for r in ok if r["impl"] == NAIVE), None)
        sdpa = [r for r in ok if r["family"] == "sdpa"]
        best = min(sdpa, key=lambda r: r["time_ms"]) if sdpa else None
        for r in ok:
            r["speedup_vs_naive"] = naive / r["time_ms"] if naive else None
            r["speedup_vs_sdpa_best"] = best["time_ms"] / r["time_ms"] if best else None
            r["sdpa_best"] = best["impl"] if best else None
