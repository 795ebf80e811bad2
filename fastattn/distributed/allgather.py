"""All-gather K/V attention ("llama3" style): no merge, so numerically the single-process computation.

Forward: one all-gather of K|V (packed along the last dim: one collective), put in global order; each local query
segment attends, in ONE block call, to the global key range it can see (causal / window trim it), at its global
positions. Backward: the same K/V gathered again (memory over communication: nothing of size S is saved), one
block backward per query segment accumulating dK/dV of the whole sequence in fp32, then one reduce-scatter (sum,
in grad_comm_dtype) hands each rank its own rows.
Counts: forward 1 all_gather; backward 1 all_gather + 1 reduce_scatter; a key bias (key padding) adds one
all_gather to each.
"""
from __future__ import annotations

import torch

from . import layout
from ..blocks import block_backward, block_forward
from ._call import CallSpec, key_range, rows


def _gather_kv(spec: CallSpec, k, v):
    """-> (k_full, v_full) as (B, H, S, D) views, in global order."""
    comm, d = spec.comm, spec.seq_dim
    kv = torch.cat([k, v], dim=-1)  # (.., Dk + Dv): one collective for both
    got = comm.all_gather(kv)  # (W, *kv.shape), shard order
    full = layout.unshard_list(list(got.unbind(0)), d, spec.balance)
    Dk = k.shape[-1]
    return spec.bhsd(full[..., :Dk]), spec.bhsd(full[..., Dk:]), full


def gather_key_bias(spec: CallSpec, key_bias):
    """(B, S/W) shard -> (B, 1, 1, S) attn_bias in global order, or None (also used by ulysses)."""
    if key_bias is None:
        return None
    got = spec.comm.all_gather(key_bias.contiguous())  # (W, B, S/W)
    return layout.unshard_list(list(got.unbind(0)), 1, spec.balance)[:, None, None, :]  # (B, S) -> (B, 1, 1, S)


def allgather_forward(spec: CallSpec, q, k, v, key_bias=None):
    comm = spec.comm
    qv = spec.bhsd(q)
    B, H, S, _ = qv.shape
    q_segs = layout.segments(S, comm.world_size, comm.rank, spec.balance)
    kf, vf, _ = _gather_kv(spec, k, v)
    bias = gather_key_bias(spec, key_bias)
    S_all = kf.shape[2]
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    ov = spec.bhsd(out)
    lses = []
    kw = spec.block_kw()
    for qs in q_segs:
        lo, hi = key_range(qs, spec.window, S_all)
        o, lse = block_forward(rows(qv, qs), kf[:, :, lo:hi], vf[:, :, lo:hi], q_start=qs.start, k_start=lo,
                               attn_bias=None if bias is None else bias[..., lo:hi], **kw)
        rows(ov, qs).copy_(o)  # the one rounding
        lses.append(lse)
    return out, torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]


def allgather_backward(spec: CallSpec, dout, q, k, v, out, lse, key_bias=None):
    comm, d = spec.comm, spec.seq_dim
    W = comm.world_size
    qv, ov, dov = spec.bhsd(q), spec.bhsd(out), spec.bhsd(dout)
    S = qv.shape[2]
    q_segs = layout.segments(S, W, comm.rank, spec.balance)
    kf, vf, full = _gather_kv(spec, k, v)
    bias = gather_key_bias(spec, key_bias)
    S_all, Dk = kf.shape[2], k.shape[-1]
    dkv = torch.zeros(full.shape, dtype=torch.float32, device=full.device)  # K|V's layout, global order
    dkf, dvf = spec.bhsd(dkv[..., :Dk]), spec.bhsd(dkv[..., Dk:])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dqv = spec.bhsd(dq)
    kw = spec.block_kw()
    for qs in q_segs:
        lo, hi = key_range(qs, spec.window, S_all)
        block_backward(rows(dov, qs), rows(qv, qs), kf[:, :, lo:hi], vf[:, :, lo:hi], rows(ov, qs),
                       lse.narrow(2, qs.local, qs.length).contiguous(), q_start=qs.start, k_start=lo,
                       dq_acc=rows(dqv, qs), dk_acc=dkf[:, :, lo:hi], dv_acc=dvf[:, :, lo:hi],
                       attn_bias=None if bias is None else bias[..., lo:hi], **kw)
    # Back to shard order, one slot per rank: (B, S, .., Dk+Dv) -> (W, B, S/W, .., Dk+Dv) (seq dim d)
    perm = layout.order(S_all, W, spec.balance, dkv.device)
    sh = dkv.index_select(d, perm).to(spec.grad_comm_dtype)
    sh = sh.unflatten(d, (W, S_all // W)).movedim(d, 0)  # seq dim S -> (W, S/W), W to the front
    mine = comm.reduce_scatter(sh)  # (B, S/W, .., Dk+Dv) in k's layout
    # copy=True: dk and dv must not be views of one buffer (outputs of a custom op may not alias)
    return dq.to(q.dtype), mine[..., :Dk].to(k.dtype, copy=True), mine[..., Dk:].to(v.dtype, copy=True)
