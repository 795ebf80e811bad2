"""The gloo worker pool of tests/distributed (tier 1), in an importable module: spawned workers unpickle `_worker`
by its module name, and a conftest's module name ("conftest") is ambiguous once several conftests are loaded.

Each pool runs W worker processes (spawn: fork deadlocks gloo in a large session) with OMP_NUM_THREADS=1 and one
torch thread, joined through a FileStore in a temp dir (no ports), with a 60 s process-group timeout. The workers
take the test process's fp32 engine (FASTATTN_CPU_FP32_GEMM, csrc/cpu/blas.cpp): each process otherwise times
sgemm against brgemm at start-up on its own, and where the two tie a busy host can part them, so a worker would
round differently from the single-process reference it is compared with bitwise. A test sends
a function (module file, name, args) to every rank and gets the W results back. Around each task a worker arms
faulthandler.dump_traceback_later, so a hang prints every thread's stack and ends the worker instead of the run; a
worker that dies fails the waiting test at once (its exit code in the message) instead of after the task limit.
"""
from __future__ import annotations

import os
import tempfile
import time

PG_TIMEOUT_S = 60
TASK_TIMEOUT_S = 180  # generous: a loaded 2-core machine; a real hang fails on the 60 s process-group timeout first


def _worker(rank, world_size, store_path, tasks, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    import faulthandler
    import importlib.util
    import traceback
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=PG_TIMEOUT_S))
        results.put((rank, "ready", None))
    except BaseException:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
        return
    modules = {}
    while True:
        task = tasks.get()
        if task is None:
            break
        path, name, args = task
        faulthandler.dump_traceback_later(TASK_TIMEOUT_S - 10, exit=True)
        try:
            if path not in modules:
                spec = importlib.util.spec_from_file_location(f"_cp_task_{len(modules)}", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                modules[path] = mod
            res = getattr(modules[path], name)(*args)
            results.put((rank, "ok", res))
        except BaseException:  # noqa: BLE001
            results.put((rank, "error", traceback.format_exc()))
        finally:
            faulthandler.cancel_dump_traceback_later()
    dist.destroy_process_group()


def parent_fp32_engine():
    """This process's fp32 engine ("sgemm" or "brgemm"), or None without the C++ extension."""
    from fastattn import ops
    if not ops.loaded():
        return None
    engine = ops.cpu_matmul_report().get("fp32")
    return engine if engine in ("sgemm", "brgemm") else None


class GlooPool:
    def __init__(self, world_size: int):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.dir = tempfile.TemporaryDirectory(prefix=f"fastattn_gloo{world_size}_")
        store = os.path.join(self.dir.name, "store")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        pinned = {"OMP_NUM_THREADS": "1"}  # read by the children's torch import
        engine = parent_fp32_engine()
        if engine:
            pinned["FASTATTN_CPU_FP32_GEMM"] = engine
        env_before = {name: os.environ.get(name) for name in pinned}
        os.environ.update(pinned)
        try:
            self.procs = [ctx.Process(target=_worker, args=(r, world_size, store, self.tasks[r], self.results),
                                      daemon=True, name=f"gloo{world_size}-rank{r}") for r in range(world_size)]
            for p in self.procs:
                p.start()
        finally:
            for name, value in env_before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self._ready = False

    def _collect(self, what: str):
        import queue
        got, errors = {}, []
        deadline = time.monotonic() + TASK_TIMEOUT_S
        while len(got) < self.world_size:
            try:
                rank, status, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [f"{p.name} (exit code {p.exitcode})" for r, p in enumerate(self.procs)
                        if r not in got and not p.is_alive()]
                if dead:
                    raise RuntimeError(f"gloo pool W={self.world_size}: workers died before answering {what}: "
                                       f"{', '.join(dead)} (their output is in the captured stderr)") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gloo pool W={self.world_size}: no answer to {what} within "
                                       f"{TASK_TIMEOUT_S} s (their stacks are in the captured stderr)") from None
                continue
            got[rank] = payload
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise RuntimeError(f"gloo pool W={self.world_size}: {what} failed\n" + "\n".join(errors))
        return [got[r] for r in range(self.world_size)]

    def run(self, path: str, name: str, *args):
        if not self._ready:
            self._collect("process group start")
            self._ready = True
        for q in self.tasks:
            q.put((os.path.abspath(path), name, args))
        return self._collect(name)

    def stop(self):
        for q in self.tasks:
            q.put(None)

    def close(self, deadline: float):
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        self.dir.cleanup()
