"""Ring attention: K/V travel around the CP group; each rank merges its queries' per-block (out, lse) in fp32.

Step t = 0..W-1: rank r holds the K/V of rank src = (r - t) mod W. The hop that brings the next K/V is posted
before the step's compute and waited after it; the last step posts none, so every rank runs exactly W-1 hops
whatever it computes (a rank that skipped a hop would deadlock the others).

Each shard is a list of layout segments (runs of consecutive global positions). A step computes every (query
segment, key segment) pair that has a visible key, with the segments' global starts as q_start/k_start: the kernels
then apply causal, sliding window, ALiBi and dropout exactly as for the whole sequence. For the zigzag layout this
gives the classical schedule: at t > 0, src < r: both local query chunks x the first key chunk of src; src > r: the
second local query chunk x both key chunks; the same work on every rank. Such a step's pairs are fully visible, so
without ALiBi or dropout (the only position-dependent terms left) they run as ONE block call (_calls).

Forward state is fp32 (out, lse) per query segment, merged with fastattn.blocks.merge_ (safe for empty rows) and
rounded to the input dtype once. Backward: the merged global lse makes every block's gradient an independent sum,
so dQ accumulates locally in fp32 and each K/V block's dK/dV accumulator travels with it (W hops, in
grad_comm_dtype), arriving home after the last step.

Key padding: a key bias (B, S/W) in the inputs' dtype (0 or -inf per key) travels with its K/V and becomes each block
call's attn_bias (B, 1, 1, keys); it depends on keys only, so fused calls stay fused.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from . import layout
from ..blocks import block_backward, block_forward, merge_
from ._call import CallSpec, fully_visible, rows, visible
from .layout import Segment


class _Call(NamedTuple):
    """One block call of a step: local query rows q against local key rows k (Segments). exact: at their global
    positions with the window; otherwise a fused call of fully visible pairs, no mask, positions irrelevant.
    parts: the query segments the call covers, in local order (each merges into its own accumulator)."""
    q: Segment
    k: Segment
    exact: bool
    parts: Tuple[Segment, ...]


def _span(segs) -> Optional[Segment]:
    """The segments as one run of local rows, or None when they are not adjacent."""
    segs = sorted(segs, key=lambda s: s.local)
    if any(a.local + a.length != b.local for a, b in zip(segs, segs[1:])):
        return None
    return Segment(segs[0].start, segs[0].local, sum(s.length for s in segs))


def _calls(spec: CallSpec, q_segs, src: int, local_len: int) -> List[_Call]:
    """The block calls of one step: every visible (query segment, key segment) pair at its global positions, or,
    when all of them are fully visible, form a rectangle and nothing depends on positions (no ALiBi, no dropout),
    one fused call (zigzag: 2 query chunks x 1 key chunk, or 1 x 2; non-causal zigzag: 2 x 2 in one call)."""
    k_segs = layout.segments(local_len, spec.comm.world_size, src, spec.balance)
    pairs = [(qs, ks) for qs in q_segs for ks in k_segs if visible(qs, ks, spec.window)]
    if len(pairs) > 1 and spec.alibi_slopes is None and spec.dropout_p == 0 and all(
            fully_visible(qs, ks, spec.window) for qs, ks in pairs):
        qset, kset = sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs})
        q, k = _span(qset), _span(kset)
        if len(pairs) == len(qset) * len(kset) and q is not None and k is not None:
            return [_Call(q, k, False, tuple(sorted(qset, key=lambda s: s.local)))]
    return [_Call(qs, ks, True, (qs,)) for qs, ks in pairs]


def _call_kw(kw: dict, c: _Call) -> dict:
    if c.exact:
        return dict(kw, q_start=c.q.start, k_start=c.k.start)
    return dict(kw, q_start=0, k_start=0, window_size=(-1, -1))  # fully visible: no mask, positions unused


def _bias(held, c: _Call) -> Optional[torch.Tensor]:
    """The key bias of call c's keys as an attn_bias (B, 1, 1, keys), or None without key padding."""
    if len(held) < 3:
        return None
    return held[2][:, None, None, c.k.local:c.k.local + c.k.length]  # (B, S/W) -> (B, 1, 1, keys)


class _KVRing:
    """The K/V buffers of the ring (and the key bias, when given). Received K/V alternate between two scratch sets
    and never land in the inputs (k.contiguous() may BE the caller's k, saved for the backward)."""

    def __init__(self, comm, k, v, key_bias=None):
        self.comm = comm
        self.held = (k.contiguous(), v.contiguous()) + (() if key_bias is None else (key_bias.contiguous(),))
        W = comm.world_size
        self.scratch = [tuple(torch.empty_like(t) for t in self.held) for _ in range(min(W - 1, 2))]

    def post(self, t: int):
        """Starts the hop of step t (none at the last step)."""
        if t == self.comm.world_size - 1:
            return None
        nxt = self.scratch[t % 2]
        return self.comm.ring_hop(self.held, nxt), nxt

    def advance(self, pending):
        if pending is not None:
            pending[0].wait()  # also completes this hop's send: the buffer sent at step t-1 may receive at t+1
            self.held = pending[1]


def ring_forward(spec: CallSpec, q, k, v, key_bias=None):
    """q, k, v: this rank's shards in spec.layout; key_bias (B, S) or None. Returns out (q's layout and dtype) and
    lse fp32 (B, H, S)."""
    comm = spec.comm
    W, r = comm.world_size, comm.rank
    qv = spec.bhsd(q)
    B, H, S, _ = qv.shape
    Dv = v.shape[-1]
    q_segs = layout.segments(S, W, r, spec.balance)
    ring = _KVRing(comm, k, v, key_bias)
    acc: List[Optional[tuple]] = [None] * len(q_segs)  # per query segment: (out fp32, lse fp32)
    kw = spec.block_kw()
    for t in range(W):
        src = (r - t) % W
        hop = ring.post(t)
        kb, vb = spec.bhsd(ring.held[0]), spec.bhsd(ring.held[1])
        for c in _calls(spec, q_segs, src, S):
            o, lse = block_forward(rows(qv, c.q), rows(kb, c.k), rows(vb, c.k), attn_bias=_bias(ring.held, c),
                                   **_call_kw(kw, c))
            for qs in c.parts:
                at = qs.local - c.q.local
                o_s, lse_s = o.narrow(2, at, qs.length), lse.narrow(2, at, qs.length)
                i = q_segs.index(qs)
                if acc[i] is None:
                    acc[i] = (o_s, lse_s)  # fresh fp32 tensors from the block call: the accumulator
                else:
                    merge_(acc[i][0], acc[i][1], o_s, lse_s)
        ring.advance(hop)
    out = q.new_empty(q.shape[:-1] + (Dv,))
    ov = spec.bhsd(out)
    lses = []
    for qs, a in zip(q_segs, acc):
        if a is None:  # no visible key for the whole segment (e.g. a narrow window): out 0, lse +inf
            rows(ov, qs).zero_()
            lses.append(qv.new_full((B, H, qs.length), float("inf"), dtype=torch.float32))
        else:
            rows(ov, qs).copy_(a[0])  # the one rounding to the input dtype
            lses.append(a[1])
    return out, torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]


def ring_backward(spec: CallSpec, dout, q, k, v, out, lse, key_bias=None, kv_grad_dtype=None):
    """Gradients of ring_forward. dout, q, k, v, out in spec.layout; lse fp32 (B, H, S) as returned. dK/dV are
    returned in kv_grad_dtype (default k's and v's dtype; the hybrid sums replicated K/V heads' gradients later)."""
    comm = spec.comm
    W, r = comm.world_size, comm.rank
    qv, ov, dov = spec.bhsd(q), spec.bhsd(out), spec.bhsd(dout)
    S = qv.shape[2]
    q_segs = layout.segments(S, W, r, spec.balance)
    lse_rows = {}  # contiguous copies of lse rows, per (local, length) of a call
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # q's layout, fp32
    dqv = spec.bhsd(dq)
    ring = _KVRing(comm, k, v, key_bias)
    grads = _GradRing(comm, k, v, spec.grad_comm_dtype)
    dkb, dvb = spec.bhsd(grads.dk), spec.bhsd(grads.dv)
    kw = spec.block_kw()
    for t in range(W):
        src = (r - t) % W
        hop = ring.post(t)
        kb, vb = spec.bhsd(ring.held[0]), spec.bhsd(ring.held[1])
        grads.begin(t)
        for c in _calls(spec, q_segs, src, S):
            key = (c.q.local, c.q.length)
            if key not in lse_rows:
                lse_rows[key] = lse.narrow(2, c.q.local, c.q.length).contiguous()
            block_backward(rows(dov, c.q), rows(qv, c.q), rows(kb, c.k), rows(vb, c.k), rows(ov, c.q), lse_rows[key],
                           dq_acc=rows(dqv, c.q), dk_acc=rows(dkb, c.k), dv_acc=rows(dvb, c.k),
                           attn_bias=_bias(ring.held, c), **_call_kw(kw, c))
        if W == 1:
            break
        grads.send(t)
        ring.advance(hop)
    kdt, vdt = (kv_grad_dtype, kv_grad_dtype) if kv_grad_dtype is not None else (k.dtype, v.dtype)
    dk, dv = grads.result()
    return dq.to(q.dtype), dk.to(kdt), dv.to(vdt)


class _GradRing:
    """dK/dV accumulators that travel the ring with their K/V block. Each step's contribution to the held block goes
    into dk / dv (fp32, zeroed by begin); send adds it to the accumulator of that block, which arrived from rank
    r - 1, and passes it on to rank r + 1, which holds the block at the next step. After W steps this rank's own
    block's accumulator is home (result)."""

    def __init__(self, comm, k, v, comm_dtype):
        self.comm = comm
        self.dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        self.dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        self.acc = self.pending = None  # the accumulator of the block held now; a hop in flight
        if comm.world_size > 1:
            self.acc = (torch.empty(k.shape, dtype=comm_dtype, device=k.device),
                        torch.empty(v.shape, dtype=comm_dtype, device=v.device))
            self.free = (torch.empty_like(self.acc[0]), torch.empty_like(self.acc[1]))

    def begin(self, t: int):
        if t > 0:
            self.dk.zero_()
            self.dv.zero_()

    def send(self, t: int):
        if t == 0:
            self.acc[0].copy_(self.dk)
            self.acc[1].copy_(self.dv)
        else:
            self.pending.wait()  # the accumulator of the held block, from rank r - 1 (it lands in `acc`)
            _add(self.acc[0], self.dk)
            _add(self.acc[1], self.dv)
        self.pending = self.comm.ring_hop(self.acc, self.free)
        self.acc, self.free = self.free, self.acc

    def result(self):
        """(dK, dV) of this rank's own block: fp32 with one rank, else in the accumulators' dtype."""
        if self.pending is None:
            return self.dk, self.dv
        self.pending.wait()  # the last hop brings this rank's own block home
        return self.acc


def _add(acc: torch.Tensor, x: torch.Tensor):
    if acc.dtype == torch.float32:
        acc += x
    else:  # a low-precision travelling accumulator: add in fp32, round once per hop
        acc.copy_(acc.float() + x)
