"""Ulysses attention: all-to-all from sequence shards to head shards, whole-sequence attention, and back.

Rank j receives the whole sequence of head group j (query heads [j*H/W, (j+1)*H/W)), puts it in global order, runs
ONE block call (no merge: per head, exactly the single-process computation) and sends each rank its rows back.
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
                             **spec.block_kw(_slopes(spec, h)))  # (B, h, S, Dv) fp32, (B, h, S)
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
                                **spec.block_kw(_slopes(spec, h)))  # fp32 (B, h, S, D)
    # dq is final: round before sending. dK/dV of replicated heads are summed after the trip: send them exact.
    rep = spec.kv_repeat
    kv_dt = spec.grad_comm_dtype if rep > 1 else kh.dtype
    dq = _to_seq(spec, dq.transpose(1, 2).to(qh.dtype))
    dk = _to_seq(spec, dk.transpose(1, 2).to(kv_dt))
    dv = _to_seq(spec, dv.transpose(1, 2).to(kv_dt))
    if rep > 1:
        B, s, Hr = dk.shape[:3]
        # (B, s, H_kv * rep, D) -> (B, s, H_kv, rep, D): a K/V head's gradient sums its replicas
        dk = dk.float().view(B, s, Hr // rep, rep, -1).sum(3).to(kh.dtype)
        dv = dv.float().view(B, s, Hr // rep, rep, -1).sum(3).to(vh.dtype)
    return tuple(_user(spec, t).contiguous() for t in (dq, dk, dv))
