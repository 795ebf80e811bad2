"""CP attention as custom ops with fake functions and a registered autograd, so torch.compile(fullgraph=True) sees
one opaque op instead of tracing the communication: fastattn::cp_attn_fwd / cp_attn_bwd (ring, all-gather) and
fastattn::cp_ulysses_fwd / cp_ulysses_bwd (Ulysses; its forward also returns the head-sharded tensors its backward
needs, so the backward does not redo the forward's all-to-alls) and fastattn::cp_hybrid_fwd / cp_hybrid_bwd (Ulysses
x ring on a 2-D group; the same arguments and saved tensors as Ulysses, its all-to-alls over the Ulysses dim only).

The communicator travels as a name (a string argument, comm.comm_name), which the op looks up in this process.
Eager calls go through the same ops. key_bias (B, S/W) in the inputs' dtype (0 or -inf per key: key padding) is the
last argument of the ring/all-gather ops, optional; the Ulysses and hybrid ops take (dropout_p, seed, offset) after
it, defaulting to no dropout.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._call import CallSpec
from .allgather import allgather_backward, allgather_forward
from .comm import comm_name, lookup_comm
from .hybrid import hybrid_backward, hybrid_forward
from .ring import ring_backward, ring_forward
from .ulysses import ulysses_backward, ulysses_forward

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
                dropout_p: float, seed: int, offset: int, grad_comm_dtype: str, backend: str,
                key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    spec = _spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
                 offset, grad_comm_dtype, backend)
    return _FWD[strategy](spec, q, k, v, key_bias)


@cp_attn_fwd.register_fake
def _(q, k, v, alibi_slopes, comm, strategy, balance, layout, scale, window_left, window_right, softcap, dropout_p,
      seed, offset, grad_comm_dtype, backend, key_bias=None):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    B, H, S = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else q.shape[:3]
    return out, q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("fastattn::cp_attn_bwd", mutates_args=())
def cp_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                alibi_slopes: Optional[Tensor], comm: str, strategy: str, balance: str, layout: str, scale: float,
                window_left: int, window_right: int, softcap: float, dropout_p: float, seed: int, offset: int,
                grad_comm_dtype: str, backend: str, key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
                 offset, grad_comm_dtype, backend)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    return _BWD[strategy](spec, dout, q, k, v, out, lse, key_bias)


@cp_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, alibi_slopes, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi = inputs[:4]
    key_bias = inputs[17] if len(inputs) > 17 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi, key_bias)
    ctx.args = inputs[4:17]  # comm name, strategy, ..., backend: everything between alibi_slopes and key_bias
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi, key_bias = ctx.saved_tensors
    dq, dk, dv = cp_attn_bwd(dout, q, k, v, out, lse, alibi, *ctx.args, key_bias)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


cp_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastattn::cp_ulysses_fwd", mutates_args=())
def cp_ulysses_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], comm: str, balance: str,
                   layout: str, scale: float, window_left: int, window_right: int, softcap: float, kv_repeat: int,
                   return_lse: bool, grad_comm_dtype: str, backend: str, key_bias: Optional[Tensor] = None,
                   dropout_p: float = 0.0, seed: int = 0, offset: int = 0
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = _ulysses_spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, kv_repeat,
                         return_lse, grad_comm_dtype, backend, dropout_p, seed, offset)
    return ulysses_forward(spec, q, k, v, key_bias)


def _a2a_size(comm: str) -> int:
    """The ranks of the all-to-alls: the whole group for Ulysses, the Ulysses dim of a hybrid group."""
    c = lookup_comm(comm)
    return c.ulysses.world_size if hasattr(c, "ulysses") else c.world_size


def _a2a_fwd_fake(oh_heads_first: bool):
    """The fake of cp_ulysses_fwd (oh (B, h, S, Dv), as its block call returns it) or cp_hybrid_fwd (oh (B, S/R, h,
    Dv), as its ring returns it)."""
    def fake(q, k, v, alibi_slopes, comm, balance, layout, scale, window_left, window_right, softcap, kv_repeat,
             return_lse, grad_comm_dtype, backend, key_bias=None, dropout_p=0.0, seed=0, offset=0):
        W = _a2a_size(comm)  # qh etc. hold W shards (W * s rows) of H/W heads
        bshd = layout == "bshd"
        B, s, Hq, Hkv = q.shape[0], q.shape[1 if bshd else 2], q.shape[2 if bshd else 1], k.shape[2 if bshd else 1]
        h, hk, Dv = Hq // W, Hkv * kv_repeat // W, v.shape[-1]
        f32 = dict(dtype=torch.float32)
        lse = q.new_empty((B, Hq, s), **f32) if return_lse else q.new_empty(0, **f32)
        return (q.new_empty(q.shape[:-1] + (Dv,)), lse, q.new_empty(B, W * s, h, q.shape[-1]),
                k.new_empty(B, W * s, hk, k.shape[-1]), v.new_empty(B, W * s, hk, Dv),
                q.new_empty((B, h, W * s, Dv) if oh_heads_first else (B, W * s, h, Dv)),
                q.new_empty((B, h, W * s), **f32))
    return fake


cp_ulysses_fwd.register_fake(_a2a_fwd_fake(oh_heads_first=True))


@torch.library.custom_op("fastattn::cp_ulysses_bwd", mutates_args=())
def cp_ulysses_bwd(dout: Tensor, qh: Tensor, kh: Tensor, vh: Tensor, oh: Tensor, lse_h: Tensor,
                   alibi_slopes: Optional[Tensor], comm: str, balance: str, layout: str, scale: float,
                   window_left: int, window_right: int, softcap: float, kv_repeat: int, return_lse: bool,
                   grad_comm_dtype: str, backend: str, key_bias: Optional[Tensor] = None, dropout_p: float = 0.0,
                   seed: int = 0, offset: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _ulysses_spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, kv_repeat,
                         return_lse, grad_comm_dtype, backend, dropout_p, seed, offset)
    return ulysses_backward(spec, dout, qh, kh, vh, oh, lse_h, key_bias)


@cp_ulysses_bwd.register_fake
def _ulysses_bwd_fake(dout, qh, kh, vh, oh, lse_h, alibi_slopes, comm, balance, layout, scale, window_left,
                      window_right, softcap, kv_repeat, *args):
    W = _a2a_size(comm)
    B, S, h = qh.shape[:3]
    hkv = kh.shape[2] * W // kv_repeat

    def shaped(like, heads):  # (B, S/W, H, D) in bshd, (B, H, S/W, D) in bhsd
        return like.new_empty((B, S // W, heads, like.shape[-1]) if layout == "bshd" else
                              (B, heads, S // W, like.shape[-1]))
    return shaped(qh, h * W), shaped(kh, hkv), shaped(vh, hkv)


def _ulysses_spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi, kv_repeat, return_lse,
                  grad_comm_dtype, backend, dropout_p=0.0, seed=0, offset=0) -> CallSpec:
    return CallSpec(comm=lookup_comm(comm), balance=balance, layout=layout, scale=scale,
                    window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi, kv_repeat=kv_repeat,
                    return_lse=return_lse, grad_comm_dtype=_DTYPES[grad_comm_dtype], backend=backend or None,
                    dropout_p=dropout_p, rng=(seed, offset) if dropout_p > 0 else None)


def _ulysses_setup_context(ctx, inputs, output):
    out, lse, qh, kh, vh, oh, lse_h = output
    key_bias = inputs[15] if len(inputs) > 15 else None
    ctx.save_for_backward(qh, kh, vh, oh, lse_h, inputs[3], key_bias)
    ctx.args = inputs[4:15]  # comm name, balance, ..., backend: everything between alibi_slopes and key_bias
    ctx.dropout = tuple(inputs[16:19])  # (dropout_p, seed, offset): the forward's, so the backward drops the same
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, qh, kh, vh, oh, lse_h)


def _a2a_backward(bwd_op):
    def backward(ctx, dout, *unused):
        qh, kh, vh, oh, lse_h, alibi, key_bias = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, qh, kh, vh, oh, lse_h, alibi, *ctx.args, key_bias, *ctx.dropout)
        return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)
    return backward


cp_ulysses_fwd.register_autograd(_a2a_backward(cp_ulysses_bwd), setup_context=_ulysses_setup_context)


# The hybrid: Ulysses' signature and saved tensors (qh etc. hold this ring shard's U pieces of H/U heads).
@torch.library.custom_op("fastattn::cp_hybrid_fwd", mutates_args=())
def cp_hybrid_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], comm: str, balance: str,
                  layout: str, scale: float, window_left: int, window_right: int, softcap: float, kv_repeat: int,
                  return_lse: bool, grad_comm_dtype: str, backend: str, key_bias: Optional[Tensor] = None,
                  dropout_p: float = 0.0, seed: int = 0, offset: int = 0
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = _ulysses_spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, kv_repeat,
                         return_lse, grad_comm_dtype, backend, dropout_p, seed, offset)
    return hybrid_forward(spec, q, k, v, key_bias)


@torch.library.custom_op("fastattn::cp_hybrid_bwd", mutates_args=())
def cp_hybrid_bwd(dout: Tensor, qh: Tensor, kh: Tensor, vh: Tensor, oh: Tensor, lse_h: Tensor,
                  alibi_slopes: Optional[Tensor], comm: str, balance: str, layout: str, scale: float,
                  window_left: int, window_right: int, softcap: float, kv_repeat: int, return_lse: bool,
                  grad_comm_dtype: str, backend: str, key_bias: Optional[Tensor] = None, dropout_p: float = 0.0,
                  seed: int = 0, offset: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _ulysses_spec(comm, balance, layout, scale, window_left, window_right, softcap, alibi_slopes, kv_repeat,
                         return_lse, grad_comm_dtype, backend, dropout_p, seed, offset)
    return hybrid_backward(spec, dout, qh, kh, vh, oh, lse_h, key_bias)


cp_hybrid_fwd.register_fake(_a2a_fwd_fake(oh_heads_first=False))
cp_hybrid_bwd.register_fake(_ulysses_bwd_fake)
cp_hybrid_fwd.register_autograd(_a2a_backward(cp_hybrid_bwd), setup_context=_ulysses_setup_context)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).split(".")[-1]


def cp_ulysses(spec: CallSpec, q, k, v, key_bias=None, op=cp_ulysses_fwd):
    """Calls the Ulysses op (or the hybrid's, which takes the same arguments) for a CallSpec; returns (out, lse or
    None)."""
    seed, offset = spec.rng if spec.rng is not None else (0, 0)
    out, lse = op(q, k, v, spec.alibi_slopes, comm_name(spec.comm), spec.balance, spec.layout,
                  spec.scale, spec.window[0], spec.window[1], spec.softcap, spec.kv_repeat,
                  spec.return_lse, _dtype_name(spec.grad_comm_dtype), spec.backend or "", key_bias,
                  spec.dropout_p, seed, offset)[:2]
    return out, lse if spec.return_lse else None


def cp_attn(spec: CallSpec, q, k, v, strategy: str, key_bias=None):
    """Calls the op of a strategy for a CallSpec: ring or allgather (cp_attn_fwd), hybrid (cp_hybrid_fwd)."""
    if strategy == "hybrid":
        return cp_ulysses(spec, q, k, v, key_bias, op=cp_hybrid_fwd)
    seed, offset = spec.rng if spec.rng is not None else (0, 0)
    return cp_attn_fwd(q, k, v, spec.alibi_slopes, comm_name(spec.comm), strategy, spec.balance, spec.layout,
                       spec.scale, spec.window[0], spec.window[1], spec.softcap, spec.dropout_p, seed, offset,
                       _dtype_name(spec.grad_comm_dtype), spec.backend or "", key_bias)
