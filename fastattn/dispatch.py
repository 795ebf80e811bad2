"""Chooses the backend for a call: explicit `backend=` > `use_backend(...)` context > FASTATTN_BACKEND > auto.

`auto` takes the first backend in PREFERENCE[device] whose `reasons(p)` and `auto_reasons(p)` are empty. An
explicitly requested backend that cannot take the call raises with its reasons; nothing falls back silently.

Split-KV decode is part of the same choice, not a second one: a backend declares a decode kernel
(backends/base.py `DecodeKernel`), and
  * `run(p)` sends a dense short-query call (HF GPT-2 decode: q (B, H, <= 8, D) against k (B, H, N, D), no grad;
    a mask rides along for the kernels that take one) to the chosen backend's decode kernel when it takes the call — only the kernel changes, never the backend;
    a kernel that `takes_sdpa_layout` (the C++ op) gets k/v as they are, without a lengths tensor (DecodeCall.kv_bhsd);
  * `run_decode(c)` (flash_attn_with_kvcache) takes the first backend in the same order whose decode kernel takes
    the cache in its own layout, or returns None (the caller then runs its generic path through `run`).
`explain_params` / `explain_decode` build one `Explanation` type for both, with every backend's reasons.

Per-call cost: what the declarations decide depends only on a few facts of a call (device, dtype, head counts and
dims, a query-length class, the features used, the requested backend, grad mode: `_key`), so it is computed once
per key and cached. A call then pays a dict lookup plus the backends' per-call checks (`extra_reasons`,
`auto_reasons`, `extra_decode_reasons`). Descriptions and explanations are built only when asked for
(fastattn.explain, explain_kvcache) or on refusal. While torch.compile traces, the cache is bypassed (the same
decision is recomputed from the declarations, so the trace guards on shapes, not on a dict). Only decisions are
cached, never a call's validation: value checks (cu_seqlens, cache indices) run on every call. The SDPA function's
lean path (fastattn/lean.py) goes one step further for plain CPU inference calls: `lean_route` hands it the chosen
route as a callable, replayed for calls whose facts match and whose key length is in the same class
(between two of `length_breaks`).
tests/test_dispatch_cache.py shows each key field matters: blank any one and some call inherits another's decision."""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from .backends import BACKENDS, PREFERENCE, Backend, get_backend
from .backends.base import needed_features
from .params import AttnParams, DecodeCall, InputValueError, forward_ad, func_transform, symbolic, trace_constant

_ctx_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastattn_backend", default=None)

MAX_ROUTE_Q = 8  # dense calls with at most this many query tokens go to a decode kernel
_CACHE_LIMIT = 4096  # entries per cache; cleared when full (a key is a handful of small facts)
# Largest query-rows limit of any decode kernel: rows past it are one key class (every kernel refuses them).
_MAX_ROWS = max((b.decode.max_rows for b in BACKENDS.values() if b.decode is not None), default=0)


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


def _env_reader():
    """() -> os.environ.get("FASTATTN_BACKEND"). Where os.environ keeps the encoded mapping it writes through
    (CPython), that mapping is read with the key encoded once: os.environ.get encodes it on every call (~1 us)."""
    env = os.environ
    try:
        data, key, decode = env._data, env.encodekey("FASTATTN_BACKEND"), env.decodevalue
    except AttributeError:
        return lambda: os.environ.get("FASTATTN_BACKEND")

    def read():
        if os.environ is not env:  # replaced wholesale (a test may): read the new one the slow way
            return os.environ.get("FASTATTN_BACKEND")
        v = data.get(key)
        return None if v is None else decode(v)
    return read


_env_backend = _env_reader()


@trace_constant
def _dynamo_traces_contextvars() -> bool:
    """Whether torch.compile's dynamo traces ContextVar.get (resolving it at trace time with a guard, as torch 2.14
    does); torch 2.11's stops there ("Unsupported method call"). Asked at trace time only."""
    return hasattr(sys.modules.get("torch._dynamo.variables"), "ContextVarVariable")


def _ambient() -> Optional[str]:
    """The backend use_backend(...) or FASTATTN_BACKEND names, if any."""
    return _ctx_backend.get() or _env_backend()


# _ambient read when a graph is traced and kept in it, for a dynamo that cannot trace ContextVar.get (a graph traced
# under use_backend("x") then keeps x; newer dynamo guards on it). A function object of its own: the mark is on it.
_ambient_at_trace = trace_constant(lambda: _ambient())


def _traced_request(backend: Optional[str]) -> str:
    """The requested backend's name while torch.compile traces."""
    return backend or (_ambient() if _dynamo_traces_contextvars() else _ambient_at_trace()) or "auto"


def requested_backend(backend: Optional[str] = None, compiling: Optional[bool] = None) -> str:
    """compiling: torch.compiler.is_compiling() when the caller has asked already (asked here otherwise)."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    name = _traced_request(backend) if compiling else backend or _ambient() or "auto"
    if name != "auto" and name not in BACKENDS:
        get_backend(name)  # unknown names raise here
    return name


def _is_zero(n) -> bool:
    """n == 0 for a size; a data-dependent size (torch.export) that may be 0 counts as non-zero instead of
    stopping the trace (the kernels take empty tensors)."""
    if type(n) is int:
        return n == 0
    if isinstance(n, torch.Tensor):  # torch.jit.trace hands sizes over as tensors: its graph would freeze them
        raise InputValueError("fastattn: torch.jit.trace cannot record this call (its choices depend on sizes the "
                              "trace would freeze); use torch.compile or torch.export, or for the SDPA surface "
                              "backend 'auto' (which records PyTorch's SDPA under torch.jit.trace)")
    from torch.fx.experimental.symbolic_shapes import guard_or_false  # a symbolic size: a trace loaded it
    return guard_or_false(n == 0)


def _any_zero(a, b, c) -> bool:
    """_is_zero(a) or _is_zero(b) or _is_zero(c), in one call for plain ints (every eager call)."""
    if type(a) is int and type(b) is int and type(c) is int:
        return not (a and b and c)
    return _is_zero(a) or _is_zero(b) or _is_zero(c)


def _order(device_type: str, requested: str) -> Tuple[str, ...]:
    if requested != "auto":
        return (requested,)
    return tuple(PREFERENCE.get(device_type, PREFERENCE["default"]))


# ------------------------------------------------------------------------------------------------- explanations
@dataclass
class Explanation:
    """Which backend runs a call and why each other one did not. One type for both kinds of call:
    kind "prefill" (fastattn.explain) and kind "decode" (explain_kvcache: a split-KV kernel, or the generic path)."""
    call: str
    requested: str
    chosen: Optional[str] = None  # the backend that runs the call (decode: whose kernel runs it)
    refused: Dict[str, List[str]] = field(default_factory=dict)
    order: List[str] = field(default_factory=list)
    declined: Dict[str, List[str]] = field(default_factory=dict)  # able, but auto passed it over (auto_reasons)
    kind: str = "prefill"
    kernel: Optional[str] = None  # decode: the split-KV kernel that runs; None = the generic path
    decode: Optional["Explanation"] = None  # prefill: how a short-query call is routed to a decode kernel
    generic: Optional["Explanation"] = None  # decode: the generic path's dispatch, when it runs

    @property
    def backend(self) -> Optional[str]:
        """Decode: the backend that owns the kernel that runs (None on the generic path)."""
        return self.chosen if self.kernel else None

    def __str__(self) -> str:
        return self._decode_str() if self.kind == "decode" else self._prefill_str()

    def _prefill_str(self) -> str:
        lines = [f"call: {self.call}", f"requested: {self.requested}",
                 f"chosen: {self.chosen or 'none'}"]
        for name in self.order:
            if name == self.chosen:
                lines.append(f"  {name}: takes the call")
            elif name in self.refused:
                lines.append(f"  {name}: refused — " + "; ".join(self.refused[name]))
            elif name in self.declined:
                lines.append(f"  {name}: passed over by auto — " + "; ".join(self.declined[name]))
            else:
                lines.append(f"  {name}: not tried (a preferred backend took the call)")
        if self.decode is not None:
            lines.append("decode route: " + self.decode._decode_str(self.chosen).replace("\n", "\n  "))
        return "\n".join(lines)

    def _decode_str(self, dense: Optional[str] = None) -> str:
        """dense: the backend of the dense call this decode route belongs to (its prefill kernel is the other path)."""
        generic = (f"{dense}'s prefill kernel on the call as given" if dense else
                   "generic (cache viewed/gathered to (B, Skv, Hkv, D), lengths/window/alibi as one additive bias, "
                   "then the dispatcher)")
        lines = [f"call: {self.call}", f"requested: {self.requested}",
                 "path: " + (f"split-KV decode kernel {self.kernel} (backend {self.chosen})" if self.kernel
                             else generic)]
        for name, why in self.refused.items():
            lines.append(f"  {name}: no decode kernel used — " + "; ".join(why))
        for name, why in self.declined.items():
            lines.append(f"  {name}: its decode kernel passed over by auto — " + "; ".join(why))
        if self.kernel:
            lines.append(f"  {self.chosen}: takes the call with {self.kernel}")
        if self.generic is not None:
            lines.append("generic path dispatch:")
            lines += ["  " + ln for ln in str(self.generic).splitlines()]
        return "\n".join(lines)


def explain_params(p: AttnParams, backend: Optional[str] = None, *, full: bool = True,
                   route_decode: bool = True) -> Explanation:
    """The dispatcher's decision for p, with every backend's reasons (full=False: stop at the chosen one)."""
    requested = requested_backend(backend)
    order = _order(p.device.type, requested)
    ex = Explanation(call=p.describe(), requested=requested, order=list(order))
    for name in order:
        b = BACKENDS[name]
        r = b.reasons(p)
        if r:
            ex.refused[name] = r
            continue
        a = b.auto_reasons(p) if requested == "auto" else []
        if a:
            ex.declined[name] = a
        elif ex.chosen is None:
            ex.chosen = name
            if not full:
                return ex
    if full and ex.chosen is not None and route_decode:
        c = dense_call(p)
        if c is not None:
            k = BACKENDS[ex.chosen].decode
            ex.decode = explain_decode(_as_decode(p, True) if k is not None and k.takes_sdpa_layout else c,
                                       ex.chosen)  # the call run() hands that kernel
    if full:  # also report the backends auto never tries on this device
        for name in BACKENDS:
            if name not in order:
                ex.order.append(name)
                ex.refused[name] = BACKENDS[name].reasons(p) or [f"not in auto's order for {p.device.type}"]
    return ex


def explain_decode(c: DecodeCall, backend: Optional[str] = None) -> Explanation:
    """Which backend's split-KV decode kernel serves c: under auto, the first in PREFERENCE whose kernel takes it;
    explicitly requested, that backend's kernel or none."""
    requested = requested_backend(backend)
    ex = Explanation(call=c.describe(), requested=requested, kind="decode")
    for name in _order(c.device.type, requested):
        ex.order.append(name)
        why = BACKENDS[name].decode_reasons(c)
        if why:
            ex.refused[name] = why
            continue
        ex.chosen, ex.kernel = name, BACKENDS[name].decode.name
        break
    return ex


def _refuse(p: AttnParams, backend: Optional[str]):
    ex = explain_params(p, backend, full=False)
    if ex.requested != "auto":
        raise BackendUnavailableError(
            f"fastattn: backend {ex.requested!r} cannot run this call ({ex.call}): "
            + "; ".join(ex.refused[ex.requested]))
    raise BackendUnavailableError("fastattn: no backend can run this call:\n" + str(ex))


# ------------------------------------------------------------------------------------------------- the fast path
@dataclass(frozen=True)
class _Choice:
    candidates: Tuple[str, ...]  # in order: backends the declarations admit
    decodes: FrozenSet[str]  # those whose decode kernel the declarations admit for dense_call(p)
    direct: FrozenSet[str] = frozenset()  # of decodes: kernels that take p's k/v as they are (takes_sdpa_layout)


_CHOICES: Dict[tuple, object] = {}  # a _Choice per _key; under LEAN keys, lean.py's routes and length classes
_DECODES: Dict[tuple, Tuple[str, ...]] = {}


def _key(p: AttnParams, requested: str, route: bool, qs=None, ks=None) -> tuple:
    """Every fact the declarations (static_reasons, static_decode_reasons, dense_call's eligibility) read; plain
    field reads, as this runs on every call (qs, ks: q's and k's shapes when the caller has them; each read of a
    shape costs ~0.15 us). Empty calls (B, Sq or Sk = 0) never get here: run answers them first, and select's
    callers skip them."""
    q, k, bias = p.q, p.k, p.attn_bias
    _, Hq, Sq, D = q.shape if qs is None else qs
    _, Hkv, Sk, _ = k.shape if ks is None else ks
    varlen = p.cu_seqlens_q is not None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or p.v.requires_grad
                                        or bias is not None and bias.requires_grad)
    wr = p.window_right
    return (requested, route, q.device, q.dtype, Hq, Hkv, D, p.v.shape[3],
            Sq if Sq <= MAX_ROUTE_Q else -1,
            p.max_seqlen_q == p.max_seqlen_k if varlen else Sq == Sk, p.window_left >= 0,
            wr if wr <= 0 else 1, p.bottom_right, bias is not None, grad and bias is not None and bias.requires_grad,
            p.dropout_p > 0, varlen, p.softcap > 0, p.alibi_slopes is not None, grad, p.deterministic, p.return_lse,
            p.q_start is not None or (p.head_start != 0 and p.dropout_p > 0),  # needed_features' "block"
            forward_ad(q, k, p.v, bias), func_transform(q, k, p.v, bias))


def _decide(p: AttnParams, requested: str, route: bool) -> _Choice:
    need = needed_features(p)
    cands = tuple(n for n in _order(p.device.type, requested) if not BACKENDS[n].static_reasons(p, need))
    decodes = frozenset()
    c = dense_call(p) if route and cands else None
    if c is not None:
        decodes = frozenset(n for n in cands if not BACKENDS[n].static_decode_reasons(c))
    direct = frozenset(n for n in decodes if BACKENDS[n].decode.takes_sdpa_layout)
    return _Choice(cands, decodes, direct)


def _choice(p: AttnParams, requested: str, route: bool) -> _Choice:
    if torch.compiler.is_compiling():
        return _decide(p, requested, route)
    key = _key(p, requested, route)
    ch = _CHOICES.get(key)
    return _remember(key, p, requested, route) if ch is None else ch


def _remember(key: tuple, p: AttnParams, requested: str, route: bool) -> _Choice:
    if len(_CHOICES) >= _CACHE_LIMIT:
        _CHOICES.clear()
    ch = _CHOICES[key] = _decide(p, requested, route)
    return ch


def _pick(p: AttnParams, requested: str, candidates: Tuple[str, ...]) -> Optional[Backend]:
    auto = requested == "auto"
    for name in candidates:
        b = BACKENDS[name]
        if not b.extra_reasons(p) and not (auto and b.auto_reasons(p)):
            return b
    return None


def select(p: AttnParams, backend: Optional[str] = None) -> Backend:
    requested = requested_backend(backend)
    b = _pick(p, requested, _choice(p, requested, False).candidates)
    if b is None:
        _refuse(p, backend)
    return b


def dense_call(p: AttnParams) -> Optional[DecodeCall]:
    """A dense short-query call as a decode call on k/v viewed as a cache, or None when it is not one: dropout,
    varlen, autograd, many query tokens or a symbolic query length (torch.export with a dynamic Sq: the prefill
    kernel takes any length, and no class guards the program; params.symbolic), or top-left causal/window with Sq != Sk (decode
    kernels align bottom-right). A mask rides along as the call's attn_bias, for the kernels that declare
    `takes_bias`."""
    if p.dropout_p > 0 or p.is_varlen or p.requires_grad or p.is_block:
        return None
    B, Hq, Sq, D = p.q.shape
    Sk = p.k.shape[2]
    if symbolic(Sq) or Sq > MAX_ROUTE_Q or _any_zero(Sq, Sk, B):
        return None
    if (p.window_left >= 0 or p.window_right >= 0) and not p.bottom_right and Sq != Sk:
        return None
    return _as_decode(p)


def _as_decode(p: AttnParams, direct: bool = False) -> DecodeCall:
    """dense_call(p) for a p it accepts (run: the cached decision says so) without asking again. direct (a kernel
    that takes_sdpa_layout): the same call with k/v as they are and no lengths tensor (DecodeCall.kv_bhsd), which
    saves two views and a tensor per call."""
    q, k = p.q, p.k
    if direct:
        return DecodeCall(q, k, p.v, None, None, None, p.scale, p.window_left, p.window_right, p.softcap,
                          p.alibi_slopes, 0, True, p.attn_bias)
    return DecodeCall(q, k.transpose(1, 2), p.v.transpose(1, 2),  # (B, H, S, D) -> (B, S, H, D) views
                      q.new_full((q.shape[0],), k.shape[2], dtype=torch.int32), None, None, p.scale, p.window_left,
                      p.window_right, p.softcap, p.alibi_slopes, 0, False, p.attn_bias)


def _route(p: AttnParams, backend: Optional[str], route_decode: bool, qs, ks):
    """(backend, DecodeCall or None) for a non-empty call: the backend that runs p, and the call its split-KV kernel
    takes instead of its prefill kernel (None: the prefill kernel). qs, ks: p.q's and p.k's shapes."""
    compiling = torch.compiler.is_compiling()
    # requested_backend, inlined
    requested = _traced_request(backend) if compiling else backend or _ctx_backend.get() or _env_backend() or "auto"
    if requested != "auto" and requested not in BACKENDS:
        get_backend(requested)  # unknown names raise here
    if compiling:
        ch = _decide(p, requested, route_decode)
    else:  # _choice, inlined
        key = _key(p, requested, route_decode, qs, ks)
        ch = _CHOICES.get(key) or _remember(key, p, requested, route_decode)
    b = _pick(p, requested, ch.candidates)
    if b is None:
        _refuse(p, backend)
    if b.name in ch.decodes:  # short-query call (e.g. one generated token): the backend's split-KV kernel
        direct = b.name in ch.direct
        c = _as_decode(p, direct)
        # direct: c holds p's own q/k/v, unit-stride along the head dims (AttnParams' contract), so only the
        # kernel's own checks remain (extra_decode_reasons would re-read three strides)
        if not (b.decode.extra_reasons(c) if direct else b.extra_decode_reasons(c)):
            return b, c
    return b, None


def run(p: AttnParams, backend: Optional[str] = None, *, route_decode: bool = True):
    """Validated params -> (out, lse) from the chosen backend. Handles empty sequences before any kernel.
    route_decode=False keeps a short-query call on the backend's prefill kernel (the kvcache generic path)."""
    q = p.q
    qs, ks = q.shape, p.k.shape
    B, Hq, Sq, _ = qs
    if _any_zero(Sq, ks[2], B * Hq):
        # Nothing to attend to (or no query heads): rows with no keys give 0 (grads flow as zeros), lse +inf.
        # Sums of empty slices: exact zeros that keep the graph (q.sum() * 0 would be NaN for an Inf in q).
        zero = sum(t.narrow(-1, 0, 0).sum() for t in (p.q, p.k, p.v)) if p.requires_grad else 0
        out = p.q.new_zeros(B, Hq, Sq, p.v.shape[-1]) + zero
        lse = p.q.new_full((B, Hq, Sq), float("inf"), dtype=torch.float32)
        return out, lse
    b, c = _route(p, backend, route_decode, qs, ks)
    return b.forward(p) if c is None else b.decode.run(c)


# ------------------------------------------------------------------------------------------------- lean routes
# The SDPA surface's replayed routes (fastattn/lean.py) and the length classes they use live in _CHOICES under keys
# that start with LEAN, so that clearing or replacing it (as tests do after changing a rule) drops them too.
LEAN = object()


def length_breaks(Sq: int) -> Tuple[int, ...]:
    """The sorted key lengths the dispatcher and the backends declare (`Backend.length_breaks`) for Sq query tokens,
    remembered: every per-call answer (auto_reasons, extra_reasons, the decode route) is the same for all Sk between
    two of them, (b_i, b_i+1] (lean.py keys on bisect_left(breaks, Sk), the class). The dispatcher's own: empty (0),
    Sk < Sq, Sk == Sq (_key's Sq == Sk)."""
    breaks = _CHOICES.get((LEAN, Sq))
    if breaks is None:
        declared = (0, Sq - 1, Sq) + tuple(x for b in BACKENDS.values() for x in b.length_breaks(Sq))
        breaks = _CHOICES[(LEAN, Sq)] = tuple(sorted(set(declared)))
    return breaks


def lean_route(p: AttnParams, backend: Optional[str]):
    """What run(p, backend) runs, as a `Lean` runner of (q, k, v) -> out for calls with p's facts (fastattn/lean.py),
    or None where that backend or kernel has none."""
    b, c = _route(p, backend, True, p.q.shape, p.k.shape)
    return b.lean(p) if c is None else b.decode.lean(c)


def _decode_key(c: DecodeCall, requested: str) -> tuple:
    q, kc, vc = c.q, c.k_cache, c.v_cache
    _, Hq, Sq, D = q.shape
    rows = min((Hq // kc.shape[2]) * Sq, _MAX_ROWS + 1)  # past every kernel's limit, one class
    return (requested, q.device, q.dtype, q.numel() == 0, D, vc.shape[3], rows,
            torch.is_grad_enabled() and (q.requires_grad or kc.requires_grad or vc.requires_grad))


def run_decode(c: DecodeCall, backend: Optional[str] = None):
    """(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32) from a decode kernel, or None when none takes the call."""
    b = choose_decode(c, backend)
    return None if b is None else b.decode.run(c)


def choose_decode(c: DecodeCall, backend: Optional[str] = None) -> Optional[Backend]:
    """The backend whose split-KV kernel takes c, or None (flash_attn_with_kvcache decides before it writes)."""
    if forward_ad(c.q, c.k_cache, c.v_cache) or func_transform(c.q, c.k_cache, c.v_cache):
        return None  # no decode kernel runs there: the generic path, whose dispatcher picks a backend that does
    compiling = torch.compiler.is_compiling()
    if compiling and symbolic(c.q.shape[2]):
        return None  # a dynamic query length: the generic path (the kernels' row limits would guard the graph)
    requested = requested_backend(backend, compiling)
    if compiling:
        names = _decode_candidates(c, requested)
    else:
        key = _decode_key(c, requested)
        names = _DECODES.get(key)
        if names is None:
            if len(_DECODES) >= _CACHE_LIMIT:
                _DECODES.clear()
            names = _DECODES[key] = _decode_candidates(c, requested)
    for name in names:
        b = BACKENDS[name]
        if not b.extra_decode_reasons(c):
            return b
    return None


def _decode_candidates(c: DecodeCall, requested: str) -> Tuple[str, ...]:
    return tuple(n for n in _order(c.device.type, requested) if not BACKENDS[n].static_decode_reasons(c))
