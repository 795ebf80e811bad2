"""Ulysses attention: all-to-all from sequence shards to head shards, whole-sequence attention, and back.

Rank j receives the whole sequence of head group j (query heads [j*H/W, (j+1)*H/W)), puts it in global order, runs
ONE block call (no merge: per head, exactly the single-process computation) and sends each rank its rows back.
The block call gets head_start = j*H/W, so dropout is keyed by the global query head and drops exactly what one
process drops with the same rng.
GQA: K/V heads split the same way, so query groups land with their K/V head; when H_kv is not divisible by W each
K/V head is first replicated (CPConfig.plan gives the factor) and the backward sums the replicas' gradients.
Counts: forward 4 all-to-alls (q, k, v, out; +1 for lse when asked); backward 4 (dout, dq, dk, dv); a key bias
(key padding) adds one all_gather to each.
"""
from __future__ import annotations

import torch

from . import layout
from ..blocks import block_backward, block_forward
from ._call import CallSpec
from .allgather import gather_key_bias


def seq_to_heads(comm, x: torch.Tensor) -> torch.Tensor:
    """The all-to-all (B, s, H, D) -> (B, n*s, H/n, D) over comm's n ranks: every rank's shard of this rank's head
    group, concatenated in rank order (shard order, not global order)."""
    n = comm.world_size
    B, s, H, D = x.shape
    x = x.reshape(B, s, n, H // n, D).movedim(2, 0)  # (B, s, H, D) -> (n, B, s, H/n, D): slot j to rank j
    got = comm.all_to_all(x)  # got[j]: rank j's rows of my heads
    return got.movedim(0, 1).reshape(B, n * s, H // n, D)  # (n, B, s, h, D) -> (B, n*s, h, D)


def heads_to_seq(comm, x: torch.Tensor) -> torch.Tensor:
    """Inverse of seq_to_heads: (B, n*s, H/n, D) in rank order -> (B, s, H, D) this rank's rows of every head."""
    n = comm.world_size
    B, S, h, D = x.shape
    x = x.reshape(B, n, S // n, h, D).movedim(1, 0)  # (B, S, h, D) -> (n, B, S/n, h, D): slot j to rank j
    got = comm.all_to_all(x)  # got[j]: my rows of rank j's heads
    return got.movedim(0, 2).reshape(B, S // n, n * h, D)  # (n, B, s, h, D) -> (B, s, H, D)


def _to_heads(spec: CallSpec, x: torch.Tensor) -> torch.Tensor:
    """(B, S/W, H, D) shard (bshd view) -> (B, S, H/W, D): the whole sequence of this rank's head group, global
    order."""
    full = seq_to_heads(spec.comm, x)  # shard order
    if spec.balance == "contiguous":
        return full
    W = spec.comm.world_size
    return full.index_select(1, torch.argsort(layout.order(full.shape[1], W, spec.balance, x.device)))


def _to_seq(spec: CallSpec, x: torch.Tensor) -> torch.Tensor:
    """Inverse of _to_heads: (B, S, H/W, D) global order -> (B, S/W, H, D) this rank's rows of every head."""
    W, S = spec.comm.world_size, x.shape[1]
    if spec.balance != "contiguous":
        x = x.index_select(1, layout.order(S, W, spec.balance, x.device))  # global -> shard order
    return heads_to_seq(spec.comm, x)


def _bshd(spec: CallSpec, x):
    return x if spec.layout == "bshd" else x.transpose(1, 2)


def _user(spec: CallSpec, x):
    return x if spec.layout == "bshd" else x.transpose(1, 2)


def _head_kw(spec: CallSpec, h: int) -> dict:
    """block_kw of this rank's head group (h query heads): its ALiBi slopes and its first global query head (the
    dropout key; K/V heads, replicated or not, follow the query heads)."""
    kw = spec.block_kw(_slopes(spec, h))
    kw["head_start"] = spec.head_start + spec.comm.rank * h
    return kw


def _slopes(spec: CallSpec, h: int):
    a = spec.alibi_slopes
    if a is None:
        return None
    r = spec.comm.rank
    return a[..., r * h:(r + 1) * h]  # (H,) or (B, H): this rank's head group


def _kv_heads(spec: CallSpec, x):
    """(B, s, H_kv, D) -> (B, s, H_kv * kv_repeat, D): each K/V head repeated next to itself."""
    return x if spec.kv_repeat == 1 else x.repeat_interleave(spec.kv_repeat, dim=2)


def ulysses_forward(spec: CallSpec, q, k, v, key_bias=None):
    """-> (out (q's layout and dtype), lse (B, H, S/W) fp32 or an empty tensor unless spec.return_lse, and what the
    backward needs: qh, kh, vh (B, S, h, D) head-sharded in global order, oh (B, h, S, Dv) rounded, lse_h (B, h, S)).
    Every returned tensor is fresh and contiguous (they are custom op outputs)."""
    qh = _to_heads(spec, _bshd(spec, q))  # (B, S, h, D)
    kh = _to_heads(spec, _kv_heads(spec, _bshd(spec, k)))
    vh = _to_heads(spec, _kv_heads(spec, _bshd(spec, v)))
    h = qh.shape[2]
    o, lse_h = block_forward(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), q_start=0, k_start=0,
                             attn_bias=gather_key_bias(spec, key_bias),
                             **_head_kw(spec, h))  # (B, h, S, Dv) fp32, (B, h, S)
    oh = o.to(q.dtype).contiguous()  # the one rounding; (B, h, S, Dv) contiguous whatever order the kernel wrote
    out = _user(spec, _to_seq(spec, oh.transpose(1, 2))).contiguous()
    if spec.return_lse:
        lse = _to_seq(spec, lse_h.transpose(1, 2).unsqueeze(-1))  # (B, h, S) -> (B, S, h, 1) -> (B, S/W, H, 1)
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()  # (B, S/W, H) -> (B, H, S/W)
    else:
        lse = lse_h.new_empty(0)
    return out, lse, qh, kh, vh, oh, lse_h


def ulysses_backward(spec: CallSpec, dout, qh, kh, vh, oh, lse_h, key_bias=None):
    """Gradients in the user's layout (contiguous): dq (B, S/W, Hq, D), dk, dv (B, S/W, Hkv, D) for bshd."""
    doh = _to_heads(spec, _bshd(spec, dout))
    h = qh.shape[2]
    dq, dk, dv = block_backward(doh.transpose(1, 2), qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                oh, lse_h, q_start=0, k_start=0, attn_bias=gather_key_bias(spec, key_bias),
                                **_head_kw(spec, h))  # fp32 (B, h, S, D)
    # dq is final: round before sending. dK/dV of replicated heads are summed after the trip: send them exact.
    dq = _to_seq(spec, dq.transpose(1, 2).to(qh.dtype))
    kv_dt = kv_grad_dtype(spec, kh.dtype)
    dk = _to_seq(spec, dk.transpose(1, 2).to(kv_dt))
    dv = _to_seq(spec, dv.transpose(1, 2).to(kv_dt))
    dk, dv = sum_replicas(spec, dk, kh.dtype), sum_replicas(spec, dv, vh.dtype)
    return tuple(_user(spec, t).contiguous() for t in (dq, dk, dv))


def kv_grad_dtype(spec: CallSpec, dtype: torch.dtype) -> torch.dtype:
    """The dtype dK/dV travel back in: exact (grad_comm_dtype) when replicas are summed after the trip."""
    return spec.grad_comm_dtype if spec.kv_repeat > 1 else dtype


def sum_replicas(spec: CallSpec, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, s, H_kv * rep, D) -> (B, s, H_kv, D) in dtype: a K/V head's gradient is the sum of its replicas'."""
    rep = spec.kv_repeat
    if rep == 1:
        return g
    B, s, Hr = g.shape[:3]
    return g.float().view(B, s, Hr // rep, rep, -1).sum(3).to(dtype)  # (B, s, H_kv, rep, D) summed over rep
