"""Ulysses attention: all-to-all from sequence shards to head shards, whole-sequence attention, and back.

Rank j receives the whole sequence of head group j (query heads [j*H/W, (j+1)*H/W)), puts it in global order, runs
ONE block call (no merge: per head, exactly the single-process computation) and sends each rank its rows back.
GQA: K/V heads split the same way, so query groups land with their K/V head; when H_kv is not divisible by W each
K/V head is first replicated (CPConfig.plan gives the factor) and the backward sums the replicas' gradients.
Counts: forward 4 all-to-alls (q, k, v, out; +1 for lse when asked); backward 4 (dout, dq, dk, dv).
"""
from __future__ import annotations

import torch

from . import layout
from ..blocks import block_backward, block_forward
from ._call import CallSpec


def _to_heads(spec: CallSpec, x: torch.Tensor) -> torch.Tensor:
    """(B, S/W, H, D) shard (bshd view) -> (B, S, H/W, D): the whole sequence of this rank's head group, global
    order."""
    comm, W = spec.comm, spec.comm.world_size
    B, s, H, D = x.shape
    x = x.reshape(B, s, W, H // W, D).movedim(2, 0)  # (B, s, H, D) -> (W, B, s, H/W, D): slot j to rank j
    got = comm.all_to_all(x)  # got[j]: rank j's rows of my heads
    full = got.movedim(0, 1).reshape(B, W * s, H // W, D)  # (W, B, s, h, D) -> (B, S, h, D), shard order
    if spec.balance == "contiguous":
        return full
    return full.index_select(1, torch.argsort(layout.order(W * s, W, spec.balance, x.device)))


def _to_seq(spec: CallSpec, x: torch.Tensor) -> torch.Tensor:
    """Inverse of _to_heads: (B, S, H/W, D) global order -> (B, S/W, H, D) this rank's rows of every head."""
    comm, W = spec.comm, spec.comm.world_size
    B, S, h, D = x.shape
    if spec.balance != "contiguous":
        x = x.index_select(1, layout.order(S, W, spec.balance, x.device))  # global -> shard order
    x = x.reshape(B, W, S // W, h, D).movedim(1, 0)  # (B, S, h, D) -> (W, B, S/W, h, D): slot j to rank j
    got = comm.all_to_all(x)  # got[j]: my rows of rank j's heads
    return got.movedim(0, 2).reshape(B, S // W, W * h, D)  # (W, B, s, h, D) -> (B, s, H, D)


def _bshd(spec: CallSpec, x):
    return x if spec.layout == "bshd" else x.transpose(1, 2)


def _user(spec: CallSpec, x):
    return x if spec.layout == "bshd" else x.transpose(1, 2)


def _slopes(spec: CallSpec, h: int):
    a = spec.alibi_slopes
    if a is None:
        return None
    r = spec.comm.rank
    return a[..., r * h:(r + 1) * h]  # (H,) or (B, H): this rank's head group


def _kv_heads(spec: CallSpec, x):
    """(B, s, H_kv, D) -> (B, s, H_kv * kv_repeat, D): each K/V head repeated next to itself."""
    return x if spec.kv_repeat == 1 else x.repeat_interleave(spec.kv_repeat, dim=2)


class UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: CallSpec):
        qh = _to_heads(spec, _bshd(spec, q))  # (B, S, h, D)
        kh = _to_heads(spec, _kv_heads(spec, _bshd(spec, k)))
        vh = _to_heads(spec, _kv_heads(spec, _bshd(spec, v)))
        h = qh.shape[2]
        o, lse = block_forward(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), q_start=0, k_start=0,
                               **spec.block_kw(_slopes(spec, h)))  # (B, h, S, Dv) fp32, (B, h, S)
        oh = o.transpose(1, 2).to(q.dtype)  # (B, S, h, Dv): the one rounding
        out = _user(spec, _to_seq(spec, oh))
        ctx.save_for_backward(qh, kh, vh, oh, lse)
        ctx.spec, ctx.dtypes = spec, (q.dtype, k.dtype, v.dtype)
        if not spec.return_lse:
            return out, None
        lse_l = _to_seq(spec, lse.transpose(1, 2).unsqueeze(-1))  # (B, h, S) -> (B, S, h, 1) -> (B, S/W, H, 1)
        lse_l = lse_l.squeeze(-1).transpose(1, 2).contiguous()  # (B, H, S/W)
        ctx.mark_non_differentiable(lse_l)
        return out, lse_l

    @staticmethod
    def backward(ctx, dout, dlse):
        spec = ctx.spec
        qh, kh, vh, oh, lse = ctx.saved_tensors
        qdt, kdt, vdt = ctx.dtypes
        doh = _to_heads(spec, _bshd(spec, dout))
        h = qh.shape[2]
        dq, dk, dv = block_backward(doh.transpose(1, 2), qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                    oh.transpose(1, 2), lse, q_start=0, k_start=0,
                                    **spec.block_kw(_slopes(spec, h)))  # fp32 (B, h, S, D)
        # dq is final: round before sending. dK/dV of replicated heads are summed after the trip: send them exact.
        kv_dt = spec.grad_comm_dtype if spec.kv_repeat > 1 else kdt
        dq = _to_seq(spec, dq.transpose(1, 2).to(qdt))
        dk = _to_seq(spec, dk.transpose(1, 2).to(kv_dt))
        dv = _to_seq(spec, dv.transpose(1, 2).to(kv_dt if spec.kv_repeat > 1 else vdt))
        if spec.kv_repeat > 1:
            B, s, Hr, D = dk.shape
            # (B, s, H_kv * rep, D) -> (B, s, H_kv, rep, D): a K/V head's gradient sums its replicas
            dk = dk.float().view(B, s, Hr // spec.kv_repeat, spec.kv_repeat, D).sum(3).to(kdt)
            dv = dv.float().view(B, s, Hr // spec.kv_repeat, spec.kv_repeat, -1).sum(3).to(vdt)
        return _user(spec, dq), _user(spec, dk), _user(spec, dv), None
