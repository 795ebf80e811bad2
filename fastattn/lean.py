"""The lean paths of the SDPA surface and of flash_attn_with_kvcache (`cache_key`, below). The SDPA surface's: a
plain CPU inference call replays the route the dispatcher chose for an earlier call with the same facts, as one
cached callable, instead of building params and asking the dispatcher again.

Why: a step of generation (one or a few query tokens against a cache) takes 20-400 us on a CPU, and the Python
around it ran cold there, each step's kernel having streamed the cache through the L2: the full path cost ~20 us
more than PyTorch's own SDPA (one C++ call), so auto's hand-over to `sdpa` read 0.81-0.94x torch on such steps
(benchmarks/test_auto_rule.py). This path costs a few microseconds.

Plain: q, k, v plain 4-D torch.Tensors on the CPU with nothing to broadcast (SDPA's common case), stride 1 along the
head dim (and not 0, which the full path pads), no dropout, eager; no autograd, except where the route records the
gradient (`learn`: the hand-over to PyTorch's SDPA of small training calls, whose full path cost ~25 us over torch's
own call; the cpu kernels' C++ autograd node); no attn_mask, or a plain 4-D one, bool or in q's
dtype (padding masks: the full path's Python for a masked call ran ~30 us cold, ~10% of a 250 us padded call).
Anything else takes the full path, as does every call the lean path has not seen the facts of. The facts (`key`):
the requested backend, dtype, q's shape, k's and v's but the key length, whose class stands in for it
(dispatch.length_breaks: the intervals between the key lengths at which the dispatcher or a backend declares its
per-call answers may change; with a gradient to record, -1 - the length), is_causal, scale, the mask's dims but its
last, and whether calls run on one thread (auto's rules for inference steps differ there). The route is
dispatch.lean_route on the first such call (its backend's or decode kernel's `Lean` runner, or none: the key then
keeps taking the full path). tests/test_lean.py checks the replayed route
against a fresh decision for every key length around every declared break, and the outputs against the full
path's.

Validation still runs on every call: check_tensors' common case, and the shape checks are the key itself (a key's
shapes passed them once; the key length matches v's or the call takes the full path)."""
from __future__ import annotations

import bisect
import os
from typing import Optional

import torch

from . import dispatch, ops
from .params import FLOAT_DTYPES, forward_ad, functorch_level

_Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_get_num_threads = torch.get_num_threads
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_function_mode = torch._C._is_torch_function_mode_enabled


def tracing() -> bool:
    """Callers ask this before any key below: True while dynamo traces (key and cache_key are C++, which dynamo
    cannot trace), while a forward-mode AD level is open (a replayed route runs a kernel that carries no tangent;
    the full path's dispatcher looks for tangents and picks a backend that carries them), inside any torch.func
    transform (a route may run an autograd.Function that functorch cannot take) and while a torch-function mode is
    active (the C++ routes call the ops below Python's torch.ops, which a TorchFunctionMode sees on the full path).
    Other tracers (make_fx, non-strict export) run the keys as they are, on FakeTensors that the type tests send
    down the full path, or on real tensors, where a replay records the same ops as the full path (a dispatch mode
    sees the C++ routes' calls as it sees torch.ops')."""
    return (_is_dynamo_compiling() or _function_mode() or forward_ad() or functorch_level() is not None)


def fx_node(fn, proxy, arguments: dict):
    """Under torch.fx.symbolic_trace (proxy: a torch.fx.Proxy argument): the call of fn as one call_function node of
    the graph, as torch's own functional ops record (the surfaces read sizes and strides a Proxy does not have).
    arguments: every parameter of fn by name (the surface's locals() before anything else is bound)."""
    return proxy.tracer.create_proxy("call_function", fn, (), arguments)


_FLOAT = frozenset(FLOAT_DTYPES)
_ctx_backend, _env_backend = dispatch._ctx_backend, dispatch._env_backend


def key_py(query, key, value, is_causal, scale, enable_gqa, backend, attn_mask=None) -> Optional[tuple]:
    """The call's lean key, or None where the lean path does not apply (the caller has checked dropout_p == 0 and
    `tracing`). The reference of fastattn._C.lean_key, which `key` is where the extension is built (the same key
    from the tensors' metadata in C++: this function cost 2.4 us warm, 4-7 us cold between two kernels that stream
    a cache). One flat function: each Python call it made cost 1-3 us (cold), against ~0.3 us warm. A mask: a
    plain 4-D CPU tensor, bool or in q's dtype, not requiring grad, whose last dim is the key length or 1 (checked
    here, per call); its other dims join the key (the route itself does not depend on them, but the full path
    checked them against q's once), so a mask that grows with the cache keeps one key."""
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor and type(is_causal) is bool
            and type(enable_gqa) is bool and (scale is None or type(scale) is float)):
        return None
    dt = query.dtype
    # check_tensors' common case (a call that fails it takes the full path, for its message); then CPU
    if not (dt in _FLOAT and key.dtype is dt and value.dtype is dt and query.is_cpu and key.is_cpu and value.is_cpu
            and not (query.is_nested or key.is_nested or value.is_nested)):
        return None
    grad = _is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    qs, ks, vs = query.shape, key.shape, value.shape
    if not (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]
            and (qs[1] == ks[1] or enable_gqa and ks[1] > 0 and qs[1] % ks[1] == 0) and qs[3] == ks[3] and qs[3] > 0
            and ks[2] == vs[2] and query.stride()[-1] == 1 and key.stride()[-1] == 1 and value.stride()[-1] == 1):
        return None  # (head dim 0: the full path pads it to 1, so the route it learns cannot replay the call)
    mask = None
    if attn_mask is not None:
        if type(attn_mask) is not _Tensor or not attn_mask.is_cpu or attn_mask.is_nested:
            return None
        mdt, ms = attn_mask.dtype, attn_mask.shape
        if not (len(ms) == 4 and (mdt is torch.bool or mdt is dt and not (_is_grad_enabled() and
                                                                          attn_mask.requires_grad))
                and (ms[3] == ks[2] or ms[3] == 1)):
            return None
        mask = ms[0], ms[1], ms[2]  # checked against q's dims by the call that learnt the route
    Sq = qs[2]
    if grad:  # the key length itself, negative (classes are not): auto's rule for small training calls bounds
        length = -1 - ks[2]  # B * Hq * Sq * Sk * D
    else:
        breaks = dispatch._CHOICES.get((dispatch.LEAN, Sq)) or dispatch.length_breaks(Sq)  # the lookup inlined
        length = bisect.bisect_left(breaks, ks[2])
    requested = backend or _ctx_backend.get() or _env_backend() or "auto"  # dispatch._ambient
    # (k's batch and head dim, v's batch, heads and length, enable_gqa: fixed by q's and k's above; the last field:
    # auto's rules differ on one thread and on more, backends/cpu.py)
    return (dispatch.LEAN, requested, dt, qs, ks[1], vs[3], length, is_causal, scale, mask, _get_num_threads() == 1)


def learn(k: tuple, p, backend) -> None:
    """Remembers the route run(p, backend) took for calls with lean key k (False: none, take the full path; so for
    empty calls, which run answers itself). A call that records a gradient (its key's length field is negative)
    keeps only a route that records it (Lean.records_grad: the hand-over to PyTorch's SDPA, whose own autograd
    does; the cpu kernels' C++ route, csrc/lean_routes.cpp FwdGrad); the others run their ops below Autograd."""
    if len(dispatch._CHOICES) >= dispatch._CACHE_LIMIT:
        dispatch._CHOICES.clear()
    empty = 0 in p.q.shape or 0 in p.k.shape or p.v.shape[3] == 0
    route = not empty and dispatch.lean_route(p, backend) or False
    dispatch._CHOICES[k] = route if route and (route.records_grad or not p.requires_grad) else False


# flash_attn_func's lean path: the SDPA surface's, on the (B, H, S, D) views of its (B, S, H, D) tensors, under keys of
# their own (its causal aligns bottom-right; the length classes keep Sk == Sq apart, where the two agree). Its full
# path cost ~13 us more than the SDPA surface's lean one (55 against 42 us for a 32-token causal fp32 call).
_FLASH = object()  # second field of flash_attn_func's lean keys


def flash_key(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
              return_attn_probs, backend) -> Optional[tuple]:
    """(lean key, q, k, v as (B, H, S, D) views) for a plain flash_attn_func call, or None where the lean path does
    not apply: dropout, a window, softcap, ALiBi, deterministic, the lse, and whatever `key` refuses."""
    if not (type(dropout_p) is float and dropout_p == 0.0 and type(softcap) is float and softcap == 0.0
            and alibi_slopes is None and deterministic is False and return_attn_probs is False
            and type(window_size) is tuple and window_size == (-1, -1) and type(q) is _Tensor and type(k) is _Tensor
            and type(v) is _Tensor and q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        return None
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)
    inner = key(qt, kt, vt, causal, softmax_scale, True, backend)  # (Hq % Hkv == 0 is flash-attn's GQA)
    return None if inner is None else ((dispatch.LEAN, _FLASH) + inner[1:], qt, kt, vt)


# flash_attn_with_kvcache's lean path: a decode step against a dense cache (no block_table, cache_batch_idx, rotary,
# alibi or cache_leftpad) replays the split-KV kernel the dispatcher chose for an earlier call with the same facts.
# Its Python had cost ~10 us a call over the kernel (1.56x torch's SDPA time at 128 keys). The value checks stay per
# call: cache_seqlens is read every time, and a call whose lengths fail them, or that appends into rows of different
# lengths, takes the full path (for its error message, or the indexed append).
_CACHE = object()  # second field of flash_attn_with_kvcache's lean keys


def cache_key_py(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
                 return_lse, backend) -> Optional[tuple]:
    """The call's lean key, or None where the lean path does not apply (the caller has checked block_table,
    cache_batch_idx, rotary_cos, alibi_slopes and cache_leftpad are None). The facts: the requested backend, dtype,
    q's and the caches' shapes, the new k/v's, and the flags that reach the kernel. The reference of
    fastattn._C.cache_key, which `cache_key` is where the extension is built (as key_py and key)."""
    if not (type(q) is _Tensor and type(k_cache) is _Tensor and type(v_cache) is _Tensor and type(causal) is bool
            and type(return_lse) is bool and type(num_splits) is int and type(softcap) is float
            and (softmax_scale is None or type(softmax_scale) is float) and type(window_size) is tuple
            and len(window_size) == 2 and type(window_size[0]) is int and type(window_size[1]) is int
            and (k is None and v is None or type(k) is _Tensor and type(v) is _Tensor)):
        return None
    dt = q.dtype
    if not (dt in _FLOAT and k_cache.dtype is dt and v_cache.dtype is dt and q.is_cpu and k_cache.is_cpu
            and v_cache.is_cpu) or q.is_nested or k_cache.is_nested or v_cache.is_nested:
        return None  # (nested tensors have no strides: the full path refuses them with its message)
    grad = _is_grad_enabled()
    if (q.stride()[-1] != 1 or k_cache.stride()[-1] != 1 or v_cache.stride()[-1] != 1
            or grad and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)):
        return None
    qs = q.shape
    if type(cache_seqlens) is not int and not (
            type(cache_seqlens) is _Tensor and cache_seqlens.dtype is torch.int32 and cache_seqlens.is_cpu
            and len(qs) == 4 and cache_seqlens.shape == (qs[0],) and cache_seqlens.stride()[0] == 1):
        return None
    new = None
    if k is not None:
        if (not (k.dtype is dt and v.dtype is dt and k.is_cpu and v.is_cpu) or k.is_nested or v.is_nested
                or grad and (k.requires_grad or v.requires_grad)):
            return None
        new = k.shape, v.shape
    requested = backend or _ctx_backend.get() or _env_backend() or "auto"  # dispatch._ambient
    # (cache_seqlens and return_lse: read by cache_run on every call)
    return (dispatch.LEAN, _CACHE, requested, dt, qs, k_cache.shape, v_cache.shape, new, causal, window_size, softcap,
            softmax_scale, num_splits)


def cache_append_py(k_cache, v_cache, k, v, lo: int):
    """Slots [lo, lo + Snew) of every row of the caches take k, v; returns (the slots' old keys, old values, the int32
    (B,) lengths after the append). The reference of fastattn._C.cache_append (one C++ call for these seven ops)."""
    snew = k.shape[1]
    ks, vs = k_cache.narrow(1, lo, snew), v_cache.narrow(1, lo, snew)  # (B, Snew, Hkv, D|Dv) slots written
    old = ks.clone(), vs.clone()
    ks.copy_(k)
    vs.copy_(v)
    return old[0], old[1], torch.full((k_cache.shape[0],), lo + snew, dtype=torch.int32)


# What makes call refuse (besides dynamo, which the caller asks about: it cannot trace the C++ call): torch.jit.trace
# (the full path records its own graph), autocast (the full path casts the inputs first), a torch-function mode, a
# functorch transform's level (each answers None or False when the call may go on), and an open forward-AD level.
_GUARDS = (torch._C._is_tracing, torch._C._is_any_autocast_enabled, _function_mode, functorch_level)


def _refused() -> bool:
    """Whether call / cache_call leave the call to the full path (_GUARDS, forward AD; csrc/lean.cpp refused)."""
    return any(g() not in (None, False) for g in _GUARDS) or forward_ad()


def call_py(q, k, v, is_causal, scale, enable_gqa, backend, attn_mask=None):
    """The SDPA surface's lean path (the caller has checked dropout_p == 0 and that dynamo is not tracing): the
    learnt route's output where the call's key has one; the key where none is learnt yet (the surface learns it after
    its full path); None where the call cannot take the path or its key takes the full path. The reference of
    fastattn._C.lean_call, which `call` is where the extension is built (one C++ call: each Python frame the surface
    ran before it, ~0.1 us warm, cost ~1 us cold between two kernels that stream a cache)."""
    return None if _refused() else replay(q, k, v, is_causal, scale, enable_gqa, backend, attn_mask)


def replay(q, k, v, is_causal, scale, enable_gqa, backend, attn_mask=None):
    """call_py without its refusals: what the surface runs on inputs autocast has cast (lean_call refuses autocast,
    whose cast the full path makes first)."""
    lean_key = key(q, k, v, is_causal, scale, enable_gqa, backend, attn_mask)
    if lean_key is None:
        return None
    route = dispatch._CHOICES.get(lean_key)
    if route is None:
        return lean_key
    if not route:
        return None
    return route.run(q, k, v) if attn_mask is None else route.run(q, k, v, attn_mask)


def cache_call_py(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
                  return_lse, backend):
    """flash_attn_with_kvcache's lean path (the caller has checked block_table, cache_batch_idx, rotary_cos,
    alibi_slopes and cache_leftpad are None and that dynamo is not tracing): the learnt route's result (cache_run); the
    key where none is learnt yet; None where the call cannot take the path, its key takes the full path or its values
    send it there. The reference of fastattn._C.lean_cache_call, which `cache_call` is where the extension is built
    (the Python around the kernel had cost ~15 us a call cold, GQA 16/4 D=128 bf16 at 1024 keys, one thread)."""
    if _refused():
        return None
    lean_key = cache_key(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap,
                         num_splits, return_lse, backend)
    if lean_key is None:
        return None
    route = dispatch._CHOICES.get(lean_key)
    if route is None:
        return lean_key
    return cache_run(route, q, k_cache, v_cache, k, v, cache_seqlens, return_lse) if route else None


key, call, cache_key, cache_append = key_py, call_py, cache_key_py, cache_append_py
cache_call = cache_call_py
if ops._C is not None and hasattr(ops._C, "lean_cache_call"):  # an extension built before them keeps the Python ones
    _environ = os.environ  # its encoded mapping is read in C++ while os.environ is this object (dispatch._env_reader)
    _env_data, _env_key = ((_environ._data, _environ.encodekey("FASTATTN_BACKEND"))
                           if isinstance(getattr(_environ, "_data", None), dict) else (None, None))
    ops._C.lean_init(dispatch, dispatch.LEAN, _CACHE, _ctx_backend, _env_backend, os, _environ, _env_data, _env_key)
    key, call, cache_key, cache_append = ops._C.lean_key, ops._C.lean_call, ops._C.cache_key, ops._C.cache_append
    cache_call = ops._C.lean_cache_call


def describe() -> str:
    """How the lean paths run in this build, for `python -m fastattn.info`."""
    if call is call_py:
        return "Python references (fastattn._C without lean_call: rebuild the extension for the C++ paths)"
    memo = ("on (the last 4 calls' facts and routes)" if getattr(ops._C, "LEAN_MEMO", False)
            else "off (CPython 3.13+ gives dicts no version tag)")
    grad = "; cpu training calls record their gradient on a C++ autograd node" if ops._ROUTES else ""
    return f"one C++ call each (fastattn._C.lean_call, lean_cache_call); lean_call's memo {memo}{grad}"


def learn_cache(k: tuple, chosen, call) -> None:
    """Remembers the kernel flash_attn_with_kvcache chose for calls with lean key k: chosen's split-KV kernel as a
    cache runner, or False (the generic path, or an empty call: take the full path)."""
    if len(dispatch._CHOICES) >= dispatch._CACHE_LIMIT:
        dispatch._CHOICES.clear()
    empty = call.q.numel() == 0 or call.k_cache.shape[1] == 0 or call.v_cache.shape[3] == 0
    dispatch._CHOICES[k] = chosen is not None and not empty and chosen.decode.cache_lean(call) or False


def cache_run(route, q, k_cache, v_cache, k, v, cache_seqlens, return_lse):
    """flash_attn_with_kvcache on its learnt route, or None where this call's values send it down the full path."""
    if type(cache_seqlens) is int:
        lo = hi = cache_seqlens
    else:
        ls = cache_seqlens.tolist()
        lo, hi = min(ls), max(ls)
    snew = 0 if k is None else k.shape[1]
    if lo < 0 or hi + snew > k_cache.shape[1] or snew and lo != hi:
        return None
    qt = q.transpose(1, 2)  # (B, Sq, Hq, D) -> (B, Hq, Sq, D)
    if not snew:
        seqlens = (cache_seqlens if type(cache_seqlens) is not int
                   else torch.full((q.shape[0],), lo, dtype=torch.int32))  # int32 (B,) valid keys
        out, lse = route.run(qt, k_cache, v_cache, seqlens)
    else:
        old_k, old_v, seqlens = cache_append(k_cache, v_cache, k, v, lo)  # seqlens: lo + snew
        try:
            out, lse = route.run(qt, k_cache, v_cache, seqlens)
        except BaseException:
            cache_append(k_cache, v_cache, old_k, old_v, lo)  # the caches bit for bit as they were
            raise
    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv) -> (B, Sq, Hq, Dv)
    return (out, lse) if return_lse else out
