"""The active context-parallel config: `with context_parallel(cp): model(...)`.

Code that cannot take a `cp=` argument (transformers' attention_implementation="fastattn_cp", the reference models
called through a library's training loop) reads the config entered here. A ContextVar, not a global: simulated ranks
(run_local) are threads of one process, each with its own config.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator, Optional

from .config import CPConfig

_ACTIVE: contextvars.ContextVar[Optional[CPConfig]] = contextvars.ContextVar("fastattn_cp", default=None)
# Blocks open in any thread. While none is, active_cp answers without reading the ContextVar, which dynamo in torch
# 2.11 cannot trace (a model compiled outside any CP block then keeps one graph; a plain int is guarded on).
_OPEN = 0
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def context_parallel(cp: CPConfig) -> Iterator[CPConfig]:
    """Makes `cp` the active config of this thread for the block (nested blocks restore the outer one)."""
    if not isinstance(cp, CPConfig):
        raise TypeError(f"fastattn.distributed.context_parallel: expected a CPConfig, got {type(cp).__name__}")
    global _OPEN
    token = _ACTIVE.set(cp)
    with _OPEN_LOCK:
        _OPEN += 1
    try:
        yield cp
    finally:
        _ACTIVE.reset(token)
        with _OPEN_LOCK:
            _OPEN -= 1


def active_cp() -> Optional[CPConfig]:
    """The config of the innermost `context_parallel` block of this thread, or None outside any."""
    return _ACTIVE.get() if _OPEN else None


def require_cp(who: str) -> CPConfig:
    """The active config; a clear error outside `context_parallel` (a sharded input must never run unsharded)."""
    cp = _ACTIVE.get()
    if cp is None:
        raise RuntimeError(f"{who} runs only inside `with fastattn.distributed.context_parallel(cp_config):` (it "
                           f"needs the communicator and the token layout of the sharded inputs); outside one, use "
                           f"a non-parallel implementation such as 'fastattn'")
    return cp
