"""The SDPA surface's lean path: a plain CPU inference call replays the route the dispatcher chose for an earlier
call with the same facts, as one cached callable, instead of building params and asking the dispatcher again.

Why: a step of generation (one or a few query tokens against a cache) takes 20-400 us on a CPU, and the Python
around it ran cold there, each step's kernel having streamed the cache through the L2: the full path cost ~20 us
more than PyTorch's own SDPA (one C++ call), so auto's hand-over to `sdpa` read 0.81-0.94x torch on such steps
(benchmarks/test_auto_rule.py). This path costs a few microseconds.

Plain: q, k, v plain 4-D torch.Tensors on the CPU with nothing to broadcast (SDPA's common case), stride 1 along the
head dim, no attn_mask, no dropout, no autograd, eager. Anything else takes the full path, as does every call the
lean path has not seen the facts of. The facts (`key`): the requested backend, dtype, q's shape, k's and v's but the
key length, whose class stands in for it (dispatch.length_class: the intervals between the key lengths at which the
dispatcher or a backend declares its per-call answers may change), is_causal, scale. The route is
dispatch.lean_route on the first such call (its backend's or decode kernel's `Lean` runner, or none: the key then
keeps taking the full path). tests/test_lean.py checks the replayed route against a fresh decision for every key
length around every declared break, and the outputs against the full path's.

Validation still runs on every call: check_tensors, and the shape checks are the key itself (a key's shapes passed
them once; the key length matches v's or the call takes the full path)."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .params import check_tensors

_Tensor = torch.Tensor
_is_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling


def key(query, key, value, is_causal, scale, enable_gqa, backend) -> Optional[tuple]:
    """The call's lean key, or None where the lean path does not apply (the caller has checked attn_mask is None and
    dropout_p == 0). Raises what check_tensors raises."""
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor and type(is_causal) is bool
            and type(enable_gqa) is bool and (scale is None or type(scale) is float)) or _is_compiling():
        return None
    check_tensors(query, key, value)
    if not query.is_cpu or _is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    qs, ks, vs = query.shape, key.shape, value.shape
    if not (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]
            and (qs[1] == ks[1] or enable_gqa and ks[1] > 0 and qs[1] % ks[1] == 0) and qs[3] == ks[3]
            and ks[2] == vs[2] and query.stride()[-1] == 1 and key.stride()[-1] == 1 and value.stride()[-1] == 1):
        return None
    requested = backend or dispatch._ambient() or "auto"
    # (k's batch and head dim, v's batch, heads and length, enable_gqa: fixed by q's and k's above)
    return dispatch.LEAN, requested, query.dtype, qs, ks[1], vs[3], dispatch.length_class(qs[2], ks[2]), is_causal, scale


def learn(k: tuple, p, backend) -> None:
    """Remembers the route run(p, backend) took for calls with lean key k (False: none, take the full path; so for
    empty calls, which run answers itself)."""
    if len(dispatch._CHOICES) >= dispatch._CACHE_LIMIT:
        dispatch._CHOICES.clear()
    empty = 0 in p.q.shape or 0 in p.k.shape or p.v.shape[3] == 0
    dispatch._CHOICES[k] = not empty and dispatch.lean_route(p, backend) or False
