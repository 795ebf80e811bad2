"""Read-only view of the backends' split-KV decode kernels, for `python -m fastattn.info` only.

Decode is a capability a backend declares (`Backend.decode`, fastattn/backends/base.py) and the dispatcher chooses
it (fastattn/dispatch.py `run_decode`, `run`). This module keeps the name info.py reads; it goes once info.py
iterates BACKENDS itself."""
from __future__ import annotations

from typing import Dict

from .backends import BACKENDS, Backend


class _KernelView:
    """A backend's decode kernel as info.py prints it: the kernel's declarations plus the backend's devices."""

    def __init__(self, backend: Backend):
        k = backend.decode
        self.name, self.dtypes, self.head_dims, self.max_rows = k.name, k.dtypes, k.head_dims, k.max_rows
        self.devices = backend.devices
        self.unavailable = k.unavailable  # the kernel's own state (info.py lists the backend's above it)


_ORDER = ("triton", "cpu", "cuda")  # the order info.py has always printed
DECODE_KERNELS: Dict[str, _KernelView] = {
    n: _KernelView(BACKENDS[n]) for n in sorted((n for n, b in BACKENDS.items() if b.decode is not None),
                                                key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))}
