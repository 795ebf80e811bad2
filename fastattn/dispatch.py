"""Chooses the backend for a call: explicit `backend=` > `use_backend(...)` context > FASTATTN_BACKEND > auto.

`auto` takes the first backend in PREFERENCE[device] whose `reasons(p)` is empty. An explicitly requested
backend that cannot take the call raises with its reasons; nothing falls back silently."""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .backends import BACKENDS, PREFERENCE, Backend, get_backend
from .decode import decode_route, explain_dense
from .params import AttnParams

_ctx_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastattn_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend (or, under auto, every backend) cannot take a call."""


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Within the block, fastattn calls without `backend=` use this backend ('auto' or None: choose)."""
    if name is not None and name != "auto":
        get_backend(name)
    tok = _ctx_backend.set(name)
    try:
        yield
    finally:
        _ctx_backend.reset(tok)


def requested_backend(backend: Optional[str] = None) -> str:
    name = backend or _ctx_backend.get() or os.environ.get("FASTATTN_BACKEND") or "auto"
    if name != "auto":
        get_backend(name)  # unknown names raise here
    return name


@dataclass
class Explanation:
    call: str
    requested: str
    chosen: Optional[str]
    refused: Dict[str, List[str]] = field(default_factory=dict)
    order: List[str] = field(default_factory=list)
    decode: Optional[str] = None  # how a short-query call is routed to a split-KV decode kernel

    def __str__(self) -> str:
        lines = [f"call: {self.call}", f"requested: {self.requested}",
                 f"chosen: {self.chosen or 'none'}"]
        for name in self.order:
            if name == self.chosen:
                lines.append(f"  {name}: takes the call")
            elif name in self.refused:
                lines.append(f"  {name}: refused — " + "; ".join(self.refused[name]))
            else:
                lines.append(f"  {name}: not tried (a preferred backend took the call)")
        if self.decode:
            lines.append("decode route: " + self.decode.replace("\n", "\n  "))
        return "\n".join(lines)


def _order(p: AttnParams, requested: str) -> List[str]:
    if requested != "auto":
        return [requested]
    return list(PREFERENCE.get(p.device.type, PREFERENCE["default"]))


def explain_params(p: AttnParams, backend: Optional[str] = None, *, full: bool = True) -> Explanation:
    requested = requested_backend(backend)
    order = _order(p, requested)
    ex = Explanation(call=p.describe(), requested=requested, chosen=None, order=list(order))
    for name in order:
        r = BACKENDS[name].reasons(p)
        if r:
            ex.refused[name] = r
        elif ex.chosen is None:
            ex.chosen = name
            if not full:
                return ex
    if full and ex.chosen is not None:
        dex = explain_dense(p, ex.chosen)
        if dex is not None:
            ex.decode = str(dex)
    if full:  # also report the backends auto never tries on this device
        for name in BACKENDS:
            if name not in order:
                ex.order.append(name)
                ex.refused[name] = BACKENDS[name].reasons(p) or [f"not in auto's order for {p.device.type}"]
    return ex


def select(p: AttnParams, backend: Optional[str] = None) -> Backend:
    ex = explain_params(p, backend, full=False)
    if ex.chosen is None:
        if ex.requested != "auto":
            raise BackendUnavailableError(
                f"fastattn: backend {ex.requested!r} cannot run this call ({ex.call}): "
                + "; ".join(ex.refused[ex.requested]))
        raise BackendUnavailableError("fastattn: no backend can run this call:\n" + str(ex))
    return BACKENDS[ex.chosen]


def run(p: AttnParams, backend: Optional[str] = None):
    """Validated params -> (out, lse) from the chosen backend. Handles empty sequences before any kernel."""
    B, Hq, Sq, _ = p.q.shape
    Dv = p.v.shape[-1]
    if p.q.shape[2] == 0 or p.k.shape[2] == 0 or B == 0:
        # Nothing to attend to: rows with no keys give 0 (grads flow as zeros), lse +inf.
        zero = (p.q.sum() + p.k.sum() + p.v.sum()) * 0 if p.requires_grad else 0
        out = p.q.new_zeros(B, Hq, Sq, Dv) + zero
        lse = p.q.new_full((B, Hq, Sq), float("inf"), dtype=torch.float32)
        return out, lse
    b = select(p, backend)
    route = decode_route(p, b.name)  # short-query calls (e.g. one generated token) go to split-KV decode kernels
    if route is not None:
        return route(p)
    return b.forward(p)
