"""Packed varlen documents under Ulysses (a 1-D group) and the hybrid (Ulysses x ring, a 2-D group).

Ulysses over W ranks: one all-to-all turns this rank's shard of the packed stream (all heads) into the WHOLE stream
of its head group (H/W query heads). The rows arrive as the ranks' shards concatenated in rank order, which is not
packed order for per_doc sharding or zigzag, so they are put back in packed order first (the sharding's inverse,
`_orders`); then ONE varlen block call with the GLOBAL cu_seqlens, every document from position 0, computes per head
exactly what one process computes (no merge), and the reverse all-to-all sends every rank its rows back.

Hybrid on W = U x R ranks (rank (u, r) is flattened rank r * U + u, comm.HybridComm): the packed stream is laid out
for a ring of R ranks (per_doc or stream sharding, cp.balance: "ring shard" r), and each ring shard is cut into U
equal consecutive pieces, rank (u, r) holding piece u (`shard_2d`). The all-to-all over U concatenates the pieces in
rank order, which is ring shard r in its local order for H/U heads (no permutation); the packed varlen ring
(varlen.py) runs on it over R, and the reverse all-to-all gives each rank its rows of every head.

Both: K/V heads are replicated when H_kv does not divide by the all-to-all's ranks (CPConfig.plan's kv_repeat; the
replicas' dK/dV travel back unrounded and are summed); ALiBi slopes ((H,) or (N, H)) are sliced to the rank's heads.
Dropout: the block calls get head_start = the rank's first global query head (Ulysses: rank * H/W; the hybrid's ring:
u * H/U), and every call lists the documents under their global index at in-document positions, so the kernels'
mask, keyed on (document, global query head, positions), is what one process drops with the same (seed, offset);
the backward op gets the forward's (dropout_p, seed, offset) and drops the same elements.
Each all-to-all carries all its tensors at once, each viewed as bytes (q|k|v, out|lse, dout, dq|dk|dv): forward 2,
backward 2; the hybrid adds the varlen ring's hops over R (R-1 forward, 2R-1 backward).
One custom op pair (fastattn::cp_varlen_a2a_fwd / cp_varlen_a2a_bwd); the forward also returns the head-sharded
tensors the backward needs, so the backward does not redo the forward's all-to-all.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import layout
from ..blocks import block_backward, block_forward
from ._call import CallSpec
from .comm import lookup_comm
from .varlen import _DTYPES, _run

A2A_STRATEGIES = ("ulysses", "hybrid")


# --- layout of a 2-D group -------------------------------------------------------------------------------------

def _ring_shard(x: Tensor, cu_seqlens, dim: int, ring: int, r: int, sharding: str, balance: str) -> Tensor:
    if sharding == "per_doc":
        return layout.shard_varlen(x, cu_seqlens, dim, ring, r, balance)
    return layout.shard(x, dim, ring, r, balance)


def shard_2d(x: Tensor, cu_seqlens, dim: int, ulysses: int, ring: int, rank: int, sharding: str = "per_doc",
             balance: str = "zigzag") -> Tensor:
    """Flattened rank `rank`'s shard of the packed tensor x along dim on a 2-D group (U = ulysses, R = ring): piece
    u of U equal consecutive pieces of ring shard r (the per_doc or stream shard over R ranks), rank = r * U + u."""
    r, u = divmod(rank, ulysses)
    rs = _ring_shard(x, cu_seqlens, dim, ring, r, sharding, balance)
    if rs.shape[dim] % ulysses:
        raise ValueError(f"fastattn.distributed: a ring shard holds {rs.shape[dim]} tokens (x {tuple(x.shape)} over "
                         f"R={ring}), not divisible by U={ulysses}; pad the packed sequence")
    n = rs.shape[dim] // ulysses
    return rs.narrow(dim, u * n, n)


def unshard_2d_list(shards: Sequence[Tensor], cu_seqlens, dim: int, ulysses: int, ring: int,
                    sharding: str = "per_doc", balance: str = "zigzag") -> Tensor:
    """The packed tensor from every rank's shard in flattened rank order: the inverse of `shard_2d`."""
    rings = [torch.cat(list(shards[r * ulysses:(r + 1) * ulysses]), dim) for r in range(ring)]
    if sharding == "per_doc":
        return layout.unshard_varlen_list(rings, cu_seqlens, dim, balance)
    return layout.unshard_list(rings, dim, balance)


@lru_cache(maxsize=64)
def _orders(lengths: Tuple[int, ...], world_size: int, sharding: str, balance: str, device: torch.device
            ) -> Optional[Tuple[Tensor, Tensor]]:
    """(order, inverse) int64 on device, made once per document layout: order[i] = packed row of row i of the ranks'
    shards concatenated in rank order, inverse = its argsort; None when that is packed order already (stream,
    contiguous)."""
    if sharding == "per_doc":
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        order = layout.varlen_order(cu, world_size, balance)
    elif balance == "contiguous":
        return None
    else:
        order = layout.order(sum(lengths), world_size, balance)
    return order.to(device), torch.argsort(order).to(device)


# --- the all-to-alls: several tensors, one collective --------------------------------------------------------------

def _bytes(xs: Sequence[Tensor], lead: Tuple[int, int]) -> Tensor:
    """Tensors (rows, H_i, D_i) of any dtypes -> uint8 (*lead, F): each viewed as bytes, rows and heads split as
    lead, concatenated along the last dim (one collective for all, whatever their dtypes)."""
    return torch.cat([x.contiguous().view(torch.uint8).reshape(*lead, -1) for x in xs], dim=-1)


def _split(t: Tensor, specs) -> List[Tensor]:
    """uint8 (..., F) -> per spec (heads, dim, dtype) a tensor (..., heads, dim) of that dtype: inverse of _bytes."""
    out, at = [], 0
    for h, d, dt in specs:
        n = h * d * dt.itemsize
        out.append(t[..., at:at + n].contiguous().view(dt).reshape(*t.shape[:-1], h, d))
        at += n
    return out


def seq_to_heads(comm, xs: Sequence[Tensor]) -> List[Tensor]:
    """Tensors (s, H_i, D_i), this rank's rows of every head -> (n*s, H_i/n, D_i): every rank's rows of this rank's
    head group, in rank order (the ranks' shards concatenated); one all-to-all over comm's n ranks."""
    n, s = comm.world_size, xs[0].shape[0]
    got = comm.all_to_all(_bytes(xs, (s, n)).transpose(0, 1))  # (s, n, F) -> (n, s, F): slot j (head group j) to j
    return _split(got.reshape(n * s, -1), [(x.shape[1] // n, x.shape[2], x.dtype) for x in xs])  # (n*s, F)


def heads_to_seq(comm, xs: Sequence[Tensor]) -> List[Tensor]:
    """Inverse of seq_to_heads: (n*s, h_i, D_i) in rank order -> (s, n*h_i, D_i), this rank's rows of every head."""
    n, S = comm.world_size, xs[0].shape[0]
    got = comm.all_to_all(_bytes(xs, (n, S // n)))  # (n, s, F): rank j's rows to rank j; got[j]: my rows, j's heads
    parts = _split(got.transpose(0, 1), [(x.shape[1], x.shape[2], x.dtype) for x in xs])  # (s, n, h_i, D_i)
    return [p.reshape(p.shape[0], -1, p.shape[-1]) for p in parts]  # (s, n, h, D) -> (s, n*h, D)


def _kv_heads(x: Tensor, rep: int) -> Tensor:
    """(s, H_kv, D) -> (s, H_kv * rep, D): each K/V head repeated next to itself."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _sum_replicas(g: Tensor, rep: int, dtype: torch.dtype) -> Tensor:
    """(s, H_kv * rep, D) -> (s, H_kv, D) in dtype: a K/V head's gradient is the sum of its replicas'."""
    if rep == 1:
        return g.to(dtype)
    s, Hr, D = g.shape
    return g.float().view(s, Hr // rep, rep, D).sum(2).to(dtype)


def _slopes(alibi: Optional[Tensor], h: int, rank: int) -> Optional[Tensor]:
    return None if alibi is None else alibi[..., rank * h:(rank + 1) * h]  # (H,) or (N, H): this rank's heads


def _bh(x: Tensor) -> Tensor:
    """(T, h, D) -> (1, h, T, D) view: the block contract's layout."""
    return x.transpose(0, 1).unsqueeze(0)


def _reorder(x: Tensor, idx: Optional[Tensor]) -> Tensor:
    return x if idx is None else x.index_select(0, idx)


# --- Ulysses ---------------------------------------------------------------------------------------------------

def _doc_kw(cu: Tensor, lengths: Sequence[int], device) -> dict:
    """The block call over the whole packed stream: every document from its position 0, the GLOBAL cu_seqlens."""
    z = torch.zeros(len(lengths), dtype=torch.int32, device=device)
    c = cu.to(device=device, dtype=torch.int32)
    m = max(lengths)
    return dict(q_start=z, k_start=z, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=m, max_seqlen_k=m)


def _head_kw(spec: CallSpec, h: int) -> dict:
    """block_kw of this rank's head group (h query heads): its ALiBi slopes and its first global query head
    (head_start, the dropout key; K/V heads, replicated or not, follow the query heads)."""
    return dict(spec.block_kw(_slopes(spec.alibi_slopes, h, spec.comm.rank)),
                head_start=spec.head_start + spec.comm.rank * h)


def _ulysses_fwd(spec: CallSpec, q, k, v, cu, sharding, balance, kv_repeat):
    comm = spec.comm
    lengths = tuple(layout.doc_lengths(cu))
    orders = _orders(lengths, comm.world_size, sharding, balance, q.device)
    inv = None if orders is None else orders[1]
    qh, kh, vh = (_reorder(t, inv) for t in seq_to_heads(comm, [q, _kv_heads(k, kv_repeat), _kv_heads(v, kv_repeat)]))
    o, lse = block_forward(_bh(qh), _bh(kh), _bh(vh), **_doc_kw(cu, lengths, q.device),
                           **_head_kw(spec, qh.shape[1]))  # (1, h, T, Dv), (1, h, T)
    oh = o[0].transpose(0, 1).to(q.dtype).contiguous()  # (1, h, T, Dv) -> (T, h, Dv): the one rounding
    lse_h = lse[0].contiguous()  # (h, T)
    return qh, kh, vh, oh, lse_h, (None if orders is None else orders[0])


def _ulysses_bwd(spec: CallSpec, dout, qh, kh, vh, oh, lse_h, cu, sharding, balance, kv_dt):
    comm = spec.comm
    lengths = tuple(layout.doc_lengths(cu))
    orders = _orders(lengths, comm.world_size, sharding, balance, qh.device)
    doh = _reorder(seq_to_heads(comm, [dout])[0], None if orders is None else orders[1])  # (T, h, Dv) packed order
    dq, dk, dv = block_backward(_bh(doh), _bh(qh), _bh(kh), _bh(vh), _bh(oh), lse_h.unsqueeze(0),
                                **_doc_kw(cu, lengths, qh.device), **_head_kw(spec, qh.shape[1]))  # fp32 (1, h, T, D)
    order = None if orders is None else orders[0]
    return [_reorder(g[0].transpose(0, 1).to(dt), order) for g, dt in ((dq, qh.dtype), (dk, kv_dt), (dv, kv_dt))]


# --- hybrid ------------------------------------------------------------------------------------------------------

def _ring_spec(spec: CallSpec, h: int) -> CallSpec:
    """The varlen ring's CallSpec for this Ulysses rank's h query heads: the ring group, their ALiBi slopes and
    their first global query head (head_start, the dropout key)."""
    u = spec.comm.ulysses.rank
    return replace(spec, comm=spec.comm.ring, alibi_slopes=_slopes(spec.alibi_slopes, h, u),
                   head_start=spec.head_start + u * h)


def _hybrid_fwd(spec: CallSpec, q, k, v, cu, sharding, balance, kv_repeat):
    qh, kh, vh = seq_to_heads(spec.comm.ulysses, [q, _kv_heads(k, kv_repeat), _kv_heads(v, kv_repeat)])  # ring shard
    oh, lse_h = _run(True, _ring_spec(spec, qh.shape[1]), (qh, kh, vh), qh, "ring", cu, cu, sharding, balance, 0, 0, 0)
    return qh, kh, vh, oh.contiguous(), lse_h.contiguous(), None


def _hybrid_bwd(spec: CallSpec, dout, qh, kh, vh, oh, lse_h, cu, sharding, balance, kv_dt):
    doh = seq_to_heads(spec.comm.ulysses, [dout])[0]  # (T/R, h, Dv): ring shard r
    return list(_run(False, _ring_spec(spec, qh.shape[1]), (doh, qh, kh, vh, oh, lse_h), qh, "ring", cu, cu,
                     sharding, balance, 0, 0, 0, kv_grad_dtype=kv_dt))


# --- the op pair -------------------------------------------------------------------------------------------------

def _spec(comm, alibi, scale, window_left, window_right, softcap, grad_comm_dtype, backend, dropout_p, seed,
          offset) -> CallSpec:
    return CallSpec(comm=lookup_comm(comm), balance="contiguous", layout="thd", scale=scale,
                    window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi,
                    grad_comm_dtype=_DTYPES[grad_comm_dtype], backend=backend or None, dropout_p=dropout_p,
                    rng=(seed, offset) if dropout_p > 0 else None)


def _a2a_comm(spec: CallSpec, strategy: str):
    return spec.comm.ulysses if strategy == "hybrid" else spec.comm


@torch.library.custom_op("fastattn::cp_varlen_a2a_fwd", mutates_args=())
def cp_varlen_a2a_fwd(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, alibi_slopes: Optional[Tensor], comm: str,
                      strategy: str, sharding: str, balance: str, scale: float, window_left: int, window_right: int,
                      softcap: float, kv_repeat: int, return_lse: bool, grad_comm_dtype: str, backend: str,
                      dropout_p: float = 0.0, seed: int = 0, offset: int = 0
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out (T/W, Hq, Dv), lse (Hq, T/W) fp32 (empty unless return_lse), and for the backward qh, kh, vh (n*T/W,
    h, D) this rank's head group of the gathered rows (Ulysses: packed order; hybrid: ring shard order), oh in q's
    dtype and lse_h (h, n*T/W) fp32 alike; n = the all-to-all's ranks. dropout_p > 0: (seed, offset) key the
    mask, the same on every rank; the autograd backward passes the forward's to cp_varlen_a2a_bwd."""
    spec = _spec(comm, alibi_slopes, scale, window_left, window_right, softcap, grad_comm_dtype, backend, dropout_p,
                 seed, offset)
    fwd = _hybrid_fwd if strategy == "hybrid" else _ulysses_fwd
    qh, kh, vh, oh, lse_h, order = fwd(spec, q, k, v, cu, sharding, balance, kv_repeat)
    send = [_reorder(oh, order)] + ([_reorder(lse_h.t().unsqueeze(-1), order)] if return_lse else [])  # (n*s, h, 1)
    back = heads_to_seq(_a2a_comm(spec, strategy), send)
    lse = back[1][..., 0].t().contiguous() if return_lse else lse_h.new_empty(0)  # (s, Hq, 1) -> (Hq, s)
    return back[0], lse, qh, kh, vh, oh, lse_h


@cp_varlen_a2a_fwd.register_fake
def _(q, k, v, cu, alibi_slopes, comm, strategy, sharding, balance, scale, window_left, window_right, softcap,
      kv_repeat, return_lse, grad_comm_dtype, backend, dropout_p=0.0, seed=0, offset=0):
    c = lookup_comm(comm)
    n = c.ulysses.world_size if strategy == "hybrid" else c.world_size
    s, Hq, D, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    h, hk = Hq // n, k.shape[1] * kv_repeat // n
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(s, Hq, Dv), q.new_empty((Hq, s) if return_lse else (0,), **f32), q.new_empty(n * s, h, D),
            k.new_empty(n * s, hk, D), v.new_empty(n * s, hk, Dv), q.new_empty(n * s, h, Dv),
            q.new_empty(h, n * s, **f32))


@torch.library.custom_op("fastattn::cp_varlen_a2a_bwd", mutates_args=())
def cp_varlen_a2a_bwd(dout: Tensor, qh: Tensor, kh: Tensor, vh: Tensor, oh: Tensor, lse_h: Tensor, cu: Tensor,
                      alibi_slopes: Optional[Tensor], comm: str, strategy: str, sharding: str, balance: str,
                      scale: float, window_left: int, window_right: int, softcap: float, kv_repeat: int,
                      return_lse: bool, grad_comm_dtype: str, backend: str, dropout_p: float = 0.0, seed: int = 0,
                      offset: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _spec(comm, alibi_slopes, scale, window_left, window_right, softcap, grad_comm_dtype, backend, dropout_p,
                 seed, offset)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # dq is final: rounded before the trip. Replicated K/V heads' dK/dV are summed after it: sent unrounded.
    kv_dt = spec.grad_comm_dtype if kv_repeat > 1 else kh.dtype
    bwd = _hybrid_bwd if strategy == "hybrid" else _ulysses_bwd
    dq, dk, dv = heads_to_seq(_a2a_comm(spec, strategy),
                              bwd(spec, dout, qh, kh, vh, oh, lse_h, cu, sharding, balance, kv_dt))
    return dq, _sum_replicas(dk, kv_repeat, kh.dtype), _sum_replicas(dv, kv_repeat, vh.dtype)


@cp_varlen_a2a_bwd.register_fake
def _(dout, qh, kh, vh, oh, lse_h, cu, alibi_slopes, comm, strategy, sharding, balance, scale, window_left,
      window_right, softcap, kv_repeat, *args):
    c = lookup_comm(comm)
    n = c.ulysses.world_size if strategy == "hybrid" else c.world_size
    s = qh.shape[0] // n
    hkv = kh.shape[1] * n // kv_repeat
    return (qh.new_empty(s, qh.shape[1] * n, qh.shape[2]), kh.new_empty(s, hkv, kh.shape[2]),
            vh.new_empty(s, hkv, vh.shape[2]))


def _setup_context(ctx, inputs, output):
    out, lse, qh, kh, vh, oh, lse_h = output
    ctx.save_for_backward(qh, kh, vh, oh, lse_h, inputs[3], inputs[4])  # ..., cu, alibi_slopes
    ctx.args = inputs[5:]  # comm name, strategy, ..., backend, dropout_p, seed, offset: the backward drops the same
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, qh, kh, vh, oh, lse_h)


def _backward(ctx, dout, *unused):
    qh, kh, vh, oh, lse_h, cu, alibi = ctx.saved_tensors
    dq, dk, dv = cp_varlen_a2a_bwd(dout, qh, kh, vh, oh, lse_h, cu, alibi, *ctx.args)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


cp_varlen_a2a_fwd.register_autograd(_backward, setup_context=_setup_context)
