"""Ring and all-gather CP attention as custom ops (fastattn::cp_attn_fwd / cp_attn_bwd) with fake functions and a
registered autograd, so torch.compile(fullgraph=True) sees one opaque op instead of tracing the communication.

The communicator travels as a name (a string argument, comm.comm_name), which the op looks up in this process.
Eager calls go through the same ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._call import CallSpec
from .allgather import allgather_backward, allgather_forward
from .comm import comm_name, lookup_comm
from .ring import ring_backward, ring_forward

_FWD = {"ring": ring_forward, "allgather": allgather_forward}
_BWD = {"ring": ring_backward, "allgather": allgather_backward}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _spec(comm: str, balance, layout, scale, window_left, window_right, softcap, alibi, dropout_p, seed, offset,
          grad_comm_dtype, backend) -> CallSpec:
    return CallSpec(comm=lookup_comm(comm), balance=balance, layout=layout, scale=scale,
                    window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi, dropout_p=dropout_p,
                    rng=(seed, offset) if dropout_p > 0 else None, grad_comm_dtype=_DTYPES[grad_comm_dtype],
                    backend=backend or None)


@torch.library.custom_op("fastattn::cp_attn_fwd", mutates_args=())
def cp_attn_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], comm: str, strategy: str,
                balance: str, layout: str, scale: float, window_left: int, window_right: int, softcap: float,
                dropout_p: float, seed: int, offset: int, grad_comm_dtype: str, backend: str) -> Tuple[Tensor, Tensor]:
    spec = _spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
                 offset, grad_comm_dtype, backend)
    return _FWD[strategy](spec, q, k, v)


@cp_attn_fwd.register_fake
def _(q, k, v, alibi_slopes, comm, strategy, balance, layout, scale, window_left, window_right, softcap, dropout_p,
      seed, offset, grad_comm_dtype, backend):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    B, H, S = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else q.shape[:3]
    return out, q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("fastattn::cp_attn_bwd", mutates_args=())
def cp_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                alibi_slopes: Optional[Tensor], comm: str, strategy: str, balance: str, layout: str, scale: float,
                window_left: int, window_right: int, softcap: float, dropout_p: float, seed: int, offset: int,
                grad_comm_dtype: str, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
                 offset, grad_comm_dtype, backend)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    return _BWD[strategy](spec, dout, q, k, v, out, lse)


@cp_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, alibi_slopes, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi = inputs[:4]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi)
    ctx.args = inputs[4:]  # comm name, strategy, ...: everything after q, k, v, alibi_slopes
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi = ctx.saved_tensors
    dq, dk, dv = cp_attn_bwd(dout, q, k, v, out, lse, alibi, *ctx.args)
    return (dq, dk, dv, None) + (None,) * len(ctx.args)


cp_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def cp_attn(spec: CallSpec, q, k, v, strategy: str):
    """Calls the op for a CallSpec (ring or allgather)."""
    seed, offset = spec.rng if spec.rng is not None else (0, 0)
    return cp_attn_fwd(q, k, v, spec.alibi_slopes, comm_name(spec.comm), strategy, spec.balance, spec.layout,
                       spec.scale, spec.window[0], spec.window[1], spec.softcap, spec.dropout_p, seed, offset,
                       str(spec.grad_comm_dtype).split(".")[-1], spec.backend or "")
