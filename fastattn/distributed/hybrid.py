"""Hybrid ("USP") attention on a 2-D CP group (comm.HybridComm): Ulysses all-to-all over U ranks, ring over R.

Layout. W = U * R ranks; rank (u, r) is rank i = r * U + u of the flattened group. The sequence is laid out for a
ring of R ranks (CPConfig.balance: zigzag = chunks r and 2R-1-r of 2R, or contiguous), and each ring shard is cut
into U equal consecutive pieces: rank (u, r) holds piece u of ring shard r (yunchang's extract functions with
rd=R, ud=U). The Ulysses all-to-all of ring rank r's U ranks concatenates the pieces in rank order, which is
exactly ring shard r in its local order, for H/U heads: no permutation. The ring (ring.py, unchanged) then runs on
those head-sharded ring shards as it does on R ranks (zigzag balances its causal work), and the inverse all-to-all
gives each rank its rows of every head. Causal, windows, ALiBi and key padding use global positions as in the ring.

GQA: as Ulysses over U (K/V heads replicated when H_kv does not divide by U; replicas' dK/dV summed after the trip).
Dropout: the ring's block calls get head_start = u * H/U (Ulysses rank u's first global query head), so with the
positions they key the mask exactly as one process does.
Counts: all-to-alls over U as Ulysses (forward 4, +1 for lse; backward 4), ring hops over R as the ring (forward R-1,
backward 2R-1); a key bias adds one all_gather over U to each.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence

import torch

from . import layout
from ._call import CallSpec
from .ring import ring_backward, ring_forward
from .ulysses import _bshd, _kv_heads, _user, heads_to_seq, kv_grad_dtype, seq_to_heads, sum_replicas


# --- layout ------------------------------------------------------------------------------------------------------

def order(seq_len: int, ulysses: int, ring: int, balance: str, device=None) -> torch.Tensor:
    """int64 (S,): the global position at each index of the W = U * R shards concatenated in flattened rank order
    (the ring layout's order over R ranks: ring shard r is the run of its U pieces)."""
    layout.check_divisible(seq_len, ulysses * ring, balance)  # even pieces, like the 1-D layout over W ranks
    return layout.order(seq_len, ring, balance, device)


def global_positions(seq_len: int, ulysses: int, ring: int, rank: int, balance: str, device=None) -> torch.Tensor:
    """int64 (S/W,): the global positions of flattened rank `rank`'s tokens."""
    s = seq_len // (ulysses * ring)
    return order(seq_len, ulysses, ring, balance, device)[rank * s:(rank + 1) * s]


def segments(local_len: int, ulysses: int, ring: int, rank: int, balance: str) -> List[layout.Segment]:
    """The runs of consecutive global positions of flattened rank `rank`'s shard (local_len tokens per rank): its
    piece of each segment of its ring shard."""
    r, u = divmod(rank, ulysses)
    lo, hi = u * local_len, (u + 1) * local_len  # this piece's rows in the ring shard
    out = []
    for seg in layout.segments(ulysses * local_len, ring, r, balance):
        a, b = max(lo, seg.local), min(hi, seg.local + seg.length)
        if a < b:
            out.append(layout.Segment(seg.start + a - seg.local, a - lo, b - a))
    return out


def shard(x: torch.Tensor, dim: int, ulysses: int, ring: int, rank: int, balance: str) -> torch.Tensor:
    """Flattened rank `rank`'s shard of the full sequence x along dim (a copy)."""
    return x.index_select(dim, global_positions(x.shape[dim], ulysses, ring, rank, balance, x.device))


def unshard_list(shards: Sequence[torch.Tensor], dim: int, ulysses: int, ring: int, balance: str) -> torch.Tensor:
    """The full sequence from every rank's shard in flattened rank order: the inverse of `shard`."""
    cat = torch.cat(list(shards), dim=dim)
    return cat.index_select(dim, torch.argsort(order(cat.shape[dim], ulysses, ring, balance, cat.device)))


# --- attention ---------------------------------------------------------------------------------------------------

def _ring_spec(spec: CallSpec, h: int) -> CallSpec:
    """The ring's CallSpec: the ring group, head-sharded (B, S/R, h, D) tensors, this Ulysses rank's ALiBi slopes
    and first global query head (head_start, the dropout key)."""
    hc = spec.comm
    u = hc.ulysses.rank
    a = spec.alibi_slopes
    if a is not None:
        a = a[..., u * h:(u + 1) * h]  # (H,) or (B, H): this rank's head group
    return replace(spec, comm=hc.ring, layout="bshd", alibi_slopes=a, kv_repeat=1,
                   head_start=spec.head_start + u * h)


def _ring_key_bias(spec: CallSpec, key_bias):
    """(B, S/W) key bias of this rank -> (B, S/R) of its ring shard: the U pieces gathered in rank order."""
    if key_bias is None:
        return None
    got = spec.comm.ulysses.all_gather(key_bias.contiguous())  # (U, B, s)
    return got.movedim(0, 1).reshape(key_bias.shape[0], -1)  # (U, B, s) -> (B, U*s)


def hybrid_forward(spec: CallSpec, q, k, v, key_bias=None):
    """-> (out (q's layout and dtype), lse (B, H, S/W) fp32 or an empty tensor unless spec.return_lse, and what the
    backward needs: qh, kh, vh (B, S/R, h, D) this ring shard's head group, oh (B, S/R, h, Dv) rounded, lse_h
    (B, h, S/R)). Every returned tensor is fresh and contiguous (they are custom op outputs)."""
    uly = spec.comm.ulysses
    u = replace(spec, comm=uly)  # the input layout and kv_repeat, over the Ulysses group
    qh = seq_to_heads(uly, _bshd(u, q))  # (B, S/W, H, D) -> (B, S/R, h, D)
    kh = seq_to_heads(uly, _kv_heads(u, _bshd(u, k)))
    vh = seq_to_heads(uly, _kv_heads(u, _bshd(u, v)))
    oh, lse_h = ring_forward(_ring_spec(spec, qh.shape[2]), qh, kh, vh, _ring_key_bias(spec, key_bias))
    lse_h = lse_h.contiguous()  # (B, h, S/R): may be a view of the ring's merge buffers
    out = _user(u, heads_to_seq(uly, oh)).contiguous()
    if spec.return_lse:
        lse = heads_to_seq(uly, lse_h.transpose(1, 2).unsqueeze(-1))  # (B, h, S/R) -> (B, S/R, h, 1) -> (B, s, H, 1)
        lse = lse.squeeze(-1).transpose(1, 2).contiguous()  # (B, s, H) -> (B, H, s)
    else:
        lse = lse_h.new_empty(0)
    return out, lse, qh, kh, vh, oh, lse_h


def hybrid_backward(spec: CallSpec, dout, qh, kh, vh, oh, lse_h, key_bias=None):
    """Gradients in the user's layout (contiguous): dq (B, S/W, Hq, D), dk, dv (B, S/W, Hkv, D) for bshd."""
    uly = spec.comm.ulysses
    u = replace(spec, comm=uly)
    doh = seq_to_heads(uly, _bshd(u, dout))  # (B, S/W, H, Dv) -> (B, S/R, h, Dv)
    kv_dt = kv_grad_dtype(spec, kh.dtype)  # exact until the replicas are summed
    dq, dk, dv = ring_backward(_ring_spec(spec, qh.shape[2]), doh, qh, kh, vh, oh, lse_h,
                               _ring_key_bias(spec, key_bias), kv_grad_dtype=kv_dt)  # (B, S/R, h, D)
    dq = heads_to_seq(uly, dq)
    dk = sum_replicas(spec, heads_to_seq(uly, dk), kh.dtype)
    dv = sum_replicas(spec, heads_to_seq(uly, dv), vh.dtype)
    return tuple(_user(u, t).contiguous() for t in (dq, dk, dv))
