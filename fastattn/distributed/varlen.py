"""Context parallelism over packed varlen documents (flash-attn's cu_seqlens): exact, any kernel of the block contract.

Tensors are packed like flash_attn_varlen_func's: q (T/W, Hq, D), k (T/W, Hkv, D), v (T/W, Hkv, Dv), this rank's
tokens; documents never see each other. How the tokens are split (`sharding`):
  per_doc: every document cut into W (balance "contiguous") or 2W ("zigzag", head-tail) equal pieces, every rank
      holding its piece(s) of every document (layout.shard_varlen; ring-flash-attention's varlen functions, torch's
      per-document load balancer). Needs every document length % W (2W).
  stream: the packed stream itself split like a dense sequence (layout.shard; llama3's contiguous slices), so
      documents cross rank boundaries. Needs only the total % W (2W zigzag).
Both strategies take both shardings:
  ring: K/V travel the ring (W-1 hops); per hop, per (query group, key group), one varlen block call whose
      sequences are the documents, at their positions within the document (q_start/k_start per document), merged in
      fp32. Calls where no document has a visible pair are skipped.
  allgather: one all-gather of K|V into packed order, one varlen block call per query group against every key it
      may see, no merge; backward: one reduce-scatter of dK|dV.
Every block call lists the documents under their GLOBAL index (documents absent from a block have length 0), so
causal / window / ALiBi use in-document positions and dropout (keyed on (document, head, q_pos, k_pos)) drops
exactly what one process's flash_attn_varlen_func on the whole packed sequence drops with the same rng.

A rank's rows are handled in "group-major" order: each group holds at most one piece of each document, in
document order (per_doc zigzag: all head pieces, then all tail pieces; stream zigzag: the two chunks). K/V travel
and are gathered in that order; outputs and gradients go back to the caller's order at the end.

One custom op pair (fastattn::cp_varlen_fwd / cp_varlen_bwd) makes the whole call opaque to torch.compile.
Ulysses and the hybrid (a 2-D group; its ring over R is ring_varlen_forward/backward here): varlen_ulysses.py.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import layout
from ..blocks import block_backward, block_forward, merge_
from ._call import CallSpec, visible
from .comm import lookup_comm
from .layout import Segment
from .ring import _GradRing, _KVRing

SHARDINGS = ("per_doc", "stream")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Group(NamedTuple):
    """Rows [row0, row0 + cu[-1]) of a rank's group-major order: sequence n (a document) has cu[n+1] - cu[n] rows
    starting at position starts[n] within the document."""
    row0: int
    cu: Tuple[int, ...]
    starts: Tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.cu[-1]


class RankPlan(NamedTuple):
    groups: Tuple[Group, ...]
    perm: Optional[Tensor]  # int64 on the CPU: group-major row i is the caller's row perm[i]; None: the same order


class Keys(NamedTuple):
    """The keys an all-gather call sees: packed rows [lo, hi), sequence n = cu[n]..cu[n+1] from in-doc position
    starts[n]; index[j] = packed row of gathered row j (ranks' group-major rows in rank order), None = identity."""
    lo: int
    hi: int
    cu: Tuple[int, ...]
    starts: Tuple[int, ...]
    index: Optional[Tensor]


def _ranges(starts: Sequence[int], lengths: Sequence[int]) -> Tensor:
    """int64: starts[0] .. starts[0] + lengths[0] - 1, then the same for each following run, concatenated."""
    st, ln = torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
    first = torch.cumsum(ln, 0) - ln  # output index of each run's first element
    return torch.repeat_interleave(st - first, ln) + torch.arange(int(ln.sum()))


def _cumsum(lengths: Sequence[int]) -> Tuple[int, ...]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return tuple(cu)


def rank_plan(lengths: Sequence[int], world_size: int, rank: int, sharding: str, balance: str) -> RankPlan:
    """The groups of rank `rank` for documents of these lengths (every rank holds T/W tokens)."""
    N = len(lengths)
    if sharding == "per_doc":
        pieces = layout.doc_pieces(lengths, world_size, rank, balance)
        per = layout.chunks_per_rank(balance)
        groups, row0 = [], 0
        for g in range(per):
            mine = pieces[g::per]  # piece g of every document (pieces alternate head, tail per document)
            cu = _cumsum([p.length for p in mine])
            groups.append(Group(row0, cu, tuple(p.pos for p in mine)))
            row0 += cu[-1]
        grouped = [p for g in range(per) for p in pieces[g::per]]
        perm = _ranges([p.local for p in grouped], [p.length for p in grouped]) if per > 1 else None
        return RankPlan(tuple(groups), perm)
    if sharding != "stream":
        raise ValueError(f"fastattn.distributed: sharding must be one of {SHARDINGS}, got {sharding!r}")
    cu_docs = _cumsum(lengths)
    T = cu_docs[-1] // world_size
    groups = []
    for seg in layout.segments(T, world_size, rank, balance):
        lo, hi = seg.start, seg.start + seg.length
        lens, starts = [], []
        for n in range(N):  # the part of each document inside this chunk of the packed stream
            a, b = max(lo, cu_docs[n]), min(hi, cu_docs[n + 1])
            lens.append(max(0, b - a))
            starts.append(a - cu_docs[n] if b > a else 0)
        groups.append(Group(seg.local, _cumsum(lens), tuple(starts)))
    return RankPlan(tuple(groups), None)


def global_index(plans: Sequence[RankPlan], cu_docs: Sequence[int]) -> Tensor:
    """int64 (CPU): the packed row of every gathered row (ranks' group-major rows, in rank order)."""
    starts, lengths = [], []
    for plan in plans:
        for g in plan.groups:
            for n in range(len(g.starts)):
                starts.append(cu_docs[n] + g.starts[n])
                lengths.append(g.cu[n + 1] - g.cu[n])
    return _ranges(starts, lengths)


@lru_cache(maxsize=64)
def _plans(lengths: Tuple[int, ...], world_size: int, sharding: str, balance: str):
    """Every rank's plan and the gathered rows' packed index (None: identity), per document layout: a training run
    sees few distinct cu_seqlens per step, and each layer's forward and backward reuse them."""
    plans = tuple(rank_plan(lengths, world_size, j, sharding, balance) for j in range(world_size))
    identity = sharding == "stream" and balance == "contiguous"
    return plans, None if identity else global_index(plans, _cumsum(lengths))


# --------------------------------------------------------------------------------------------------------------
# helpers

def _bh(x: Tensor) -> Tensor:
    """(T, H, D) packed -> (1, H, T, D) view: the block contract's layout."""
    return x.transpose(0, 1).unsqueeze(0)


def _rows(x: Tensor, g: Group) -> Tensor:
    return x.narrow(2, g.row0, g.rows)


def _to_groups(x: Tensor, perm: Optional[Tensor], dim: int = 0) -> Tensor:
    return x if perm is None else x.index_select(dim, perm)


def _from_groups(x: Tensor, perm: Optional[Tensor], dim: int = 0) -> Tensor:
    return x if perm is None else torch.empty_like(x).index_copy_(dim, perm, x)


class _Seqs:
    """int32 tensors of a group's cu / starts on a device, made once per call."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def __call__(self, values: Tuple[int, ...]) -> Tensor:
        t = self.cache.get(values)
        if t is None:
            t = self.cache[values] = torch.tensor(values, dtype=torch.int32, device=self.device)
        return t


def _max_len(cu: Tuple[int, ...]) -> int:
    return max(b - a for a, b in zip(cu, cu[1:]))


def _pair_visible(qg: Group, kg: Group, window) -> bool:
    """True when some document has a query of qg that sees a key of kg."""
    for n in range(len(qg.starts)):
        lq, lk = qg.cu[n + 1] - qg.cu[n], kg.cu[n + 1] - kg.cu[n]
        if lq and lk and visible(Segment(qg.starts[n], 0, lq), Segment(kg.starts[n], 0, lk), window):
            return True
    return False


@lru_cache(maxsize=256)
def _schedule(lengths: Tuple[int, ...], world_size: int, sharding: str, balance: str, window: Tuple[int, int],
              rank: int) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """Per ring step t: the (query group, key group) pairs of rank `rank` with a visible pair (the others skipped)."""
    plans, _ = _plans(lengths, world_size, sharding, balance)
    mine = plans[rank]
    return tuple(tuple((i, j) for i, qg in enumerate(mine.groups)
                       for j, kg in enumerate(plans[(rank - t) % world_size].groups) if _pair_visible(qg, kg, window))
                 for t in range(world_size))


def _call_kw(seqs: _Seqs, qg: Group, kcu, kstarts) -> dict:
    return dict(q_start=seqs(qg.starts), k_start=seqs(kstarts), cu_seqlens_q=seqs(qg.cu), cu_seqlens_k=seqs(kcu),
                max_seqlen_q=_max_len(qg.cu), max_seqlen_k=_max_len(kcu))


def _assemble(q, v, groups, acc, perm):
    """Per-group (out fp32 (1, H, n, Dv), lse) -> out (T, H, Dv) in q.dtype and lse (H, T), caller's order."""
    T, H = q.shape[0], q.shape[1]
    out = q.new_empty(T, H, v.shape[-1])
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)
    for g, a in zip(groups, acc):
        if a is None:  # no document of this group sees any key: out 0, lse +inf
            out.narrow(0, g.row0, g.rows).zero_()
            lse.narrow(1, g.row0, g.rows).fill_(float("inf"))
        else:
            out.narrow(0, g.row0, g.rows).copy_(a[0][0].transpose(0, 1))  # (1, H, n, Dv) -> (n, H, Dv): one rounding
            lse.narrow(1, g.row0, g.rows).copy_(a[1][0])
    return _from_groups(out, perm), _from_groups(lse, perm, 1)


# --------------------------------------------------------------------------------------------------------------
# ring

def ring_varlen_forward(spec: CallSpec, q, k, v, plans: Sequence[RankPlan], steps):
    comm = spec.comm
    W, r = comm.world_size, comm.rank
    mine = plans[r]
    perm = None if mine.perm is None else mine.perm.to(q.device)
    qv = _bh(_to_groups(q, perm))
    ring = _KVRing(comm, _to_groups(k, perm), _to_groups(v, perm))
    seqs, kw = _Seqs(q.device), spec.block_kw()
    acc: List[Optional[tuple]] = [None] * len(mine.groups)
    for t in range(W):
        src = (r - t) % W
        hop = ring.post(t)
        kb, vb = _bh(ring.held[0]), _bh(ring.held[1])
        for i, j in steps[t]:
            qg, kg = mine.groups[i], plans[src].groups[j]
            o, lse = block_forward(_rows(qv, qg), _rows(kb, kg), _rows(vb, kg),
                                   **_call_kw(seqs, qg, kg.cu, kg.starts), **kw)
            if acc[i] is None:
                acc[i] = (o, lse)  # fresh fp32 tensors from the block call: the accumulator
            else:
                merge_(acc[i][0], acc[i][1], o, lse)
        ring.advance(hop)
    return _assemble(q, v, mine.groups, acc, perm)


def ring_varlen_backward(spec: CallSpec, dout, q, k, v, out, lse, plans: Sequence[RankPlan], steps,
                         kv_grad_dtype: Optional[torch.dtype] = None):
    """-> dq, dk, dv in q's / k's / v's dtype, or dk, dv in kv_grad_dtype when given (the hybrid sums replicated
    K/V heads' gradients after its all-to-all: unrounded until then)."""
    comm = spec.comm
    W, r = comm.world_size, comm.rank
    mine = plans[r]
    perm = None if mine.perm is None else mine.perm.to(q.device)
    qv, ov, dov = (_bh(_to_groups(t, perm)) for t in (q, out, dout))
    lse_g = _to_groups(lse, perm, 1).unsqueeze(0)  # (H, T) -> (1, H, T)
    lse_rows = [lse_g.narrow(2, g.row0, g.rows).contiguous() for g in mine.groups]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # group-major
    dqv = _bh(dq)
    kg_, vg_ = _to_groups(k, perm), _to_groups(v, perm)
    ring = _KVRing(comm, kg_, vg_)
    grads = _GradRing(comm, k, v, spec.grad_comm_dtype)
    dkb, dvb = _bh(grads.dk), _bh(grads.dv)
    seqs, kw = _Seqs(q.device), spec.block_kw()
    for t in range(W):
        src = (r - t) % W
        hop = ring.post(t)
        kb, vb = _bh(ring.held[0]), _bh(ring.held[1])
        grads.begin(t)
        for i, j in steps[t]:
            qg, kg = mine.groups[i], plans[src].groups[j]
            block_backward(_rows(dov, qg), _rows(qv, qg), _rows(kb, kg), _rows(vb, kg), _rows(ov, qg), lse_rows[i],
                           dq_acc=_rows(dqv, qg), dk_acc=_rows(dkb, kg), dv_acc=_rows(dvb, kg),
                           **_call_kw(seqs, qg, kg.cu, kg.starts), **kw)
        if W == 1:
            break
        grads.send(t)
        ring.advance(hop)
    dk, dv = grads.result()
    kv_dt = (kv_grad_dtype or k.dtype, kv_grad_dtype or v.dtype)
    return tuple(_from_groups(g, perm).to(dt) for g, dt in ((dq, q.dtype), (dk, kv_dt[0]), (dv, kv_dt[1])))


# --------------------------------------------------------------------------------------------------------------
# all-gather

def _gather_kv(comm, k, v, keys: Keys):
    kv = torch.cat([k, v], dim=-1)  # (T, Hkv, Dk + Dv): one collective for both
    got = comm.all_gather(kv).flatten(0, 1)  # (W, T, ..) -> (W*T, ..), ranks' group-major rows in rank order
    full = got if keys.index is None else torch.empty_like(got).index_copy_(0, keys.index, got)  # packed order
    return full


def allgather_varlen_forward(spec: CallSpec, q, k, v, mine: RankPlan, keys: Keys):
    perm = None if mine.perm is None else mine.perm.to(q.device)
    qv = _bh(_to_groups(q, perm))
    full = _gather_kv(spec.comm, _to_groups(k, perm), _to_groups(v, perm), keys)
    Dk = k.shape[-1]
    kf, vf = _bh(full[keys.lo:keys.hi, :, :Dk]), _bh(full[keys.lo:keys.hi, :, Dk:])
    seqs, kw = _Seqs(q.device), spec.block_kw()
    acc = []
    for qg in mine.groups:
        acc.append(block_forward(_rows(qv, qg), kf, vf, **_call_kw(seqs, qg, keys.cu, keys.starts), **kw)
                   if qg.rows and keys.hi > keys.lo else None)
    return _assemble(q, v, mine.groups, acc, perm)


def allgather_varlen_backward(spec: CallSpec, dout, q, k, v, out, lse, mine: RankPlan, keys: Keys):
    comm = spec.comm
    W = comm.world_size
    perm = None if mine.perm is None else mine.perm.to(q.device)
    qv, ov, dov = (_bh(_to_groups(t, perm)) for t in (q, out, dout))
    lse_g = _to_groups(lse, perm, 1).unsqueeze(0)  # (H, T) -> (1, H, T)
    full = _gather_kv(comm, _to_groups(k, perm), _to_groups(v, perm), keys)
    Dk = k.shape[-1]
    kf, vf = _bh(full[keys.lo:keys.hi, :, :Dk]), _bh(full[keys.lo:keys.hi, :, Dk:])
    dfull = torch.zeros(full.shape, dtype=torch.float32, device=full.device)  # packed order
    dkf, dvf = _bh(dfull[keys.lo:keys.hi, :, :Dk]), _bh(dfull[keys.lo:keys.hi, :, Dk:])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # group-major
    dqv = _bh(dq)
    seqs, kw = _Seqs(q.device), spec.block_kw()
    for qg in mine.groups:
        if qg.rows and keys.hi > keys.lo:
            lse_rows = lse_g.narrow(2, qg.row0, qg.rows).contiguous()
            block_backward(_rows(dov, qg), _rows(qv, qg), kf, vf, _rows(ov, qg), lse_rows, dq_acc=_rows(dqv, qg),
                           dk_acc=dkf, dv_acc=dvf, **_call_kw(seqs, qg, keys.cu, keys.starts), **kw)
    sh = dfull if keys.index is None else dfull.index_select(0, keys.index)  # gathered order: rank-major
    sh = sh.to(spec.grad_comm_dtype).unflatten(0, (W, -1))  # (W*T, ..) -> (W, T, ..)
    mine_kv = comm.reduce_scatter(sh)  # (T, Hkv, Dk + Dv), this rank's group-major rows
    dk = _from_groups(mine_kv[..., :Dk], perm).to(k.dtype, copy=True)  # dk, dv: no aliasing of one buffer
    dv = _from_groups(mine_kv[..., Dk:], perm).to(v.dtype, copy=True)
    return _from_groups(dq, perm).to(q.dtype), dk, dv


# --------------------------------------------------------------------------------------------------------------
# plans from the op's arguments

def plans_for(comm, T: int, cu_a: Tensor, cu_b: Tensor, sharding: str, balance: str, k_lo: int, k_hi: int,
              doc_base: int, device):
    """-> (per-rank plans (ring) or this rank's plan, Keys (allgather), the document lengths (None for llama3)).
    per_doc / stream: cu_a = the GLOBAL cu_seqlens. llama3: cu_a / cu_b = its local cu_seqlens_q / cu_seqlens_k, the
    keys packed rows [k_lo, k_hi), doc_base = global index of the first local document (dropout only)."""
    W, r = comm.world_size, comm.rank
    if sharding == "llama3":
        cq, ck = cu_a.tolist(), cu_b.tolist()
        # document i: queries at packed rows r*T + cq[i].., keys from its start k_lo + ck[i]: in-doc query position
        pad = (0,) * doc_base
        starts = pad + tuple(r * T + cq[i] - (k_lo + ck[i]) for i in range(len(cq) - 1))
        plan = RankPlan((Group(0, pad + tuple(cq), starts),), None)
        return plan, Keys(k_lo, k_hi, pad + tuple(ck), (0,) * (doc_base + len(ck) - 1), None), None
    lengths = tuple(layout.doc_lengths(cu_a))
    plans, index = _plans(lengths, W, sharding, balance)
    cu_docs = _cumsum(lengths)
    keys = Keys(0, cu_docs[-1], cu_docs, (0,) * len(lengths), None if index is None else index.to(device))
    return plans, keys, lengths


def _spec(comm, scale, window_left, window_right, softcap, alibi, dropout_p, seed, offset, grad_comm_dtype,
          backend) -> CallSpec:
    return CallSpec(comm=lookup_comm(comm), balance="contiguous", layout="thd", scale=scale,
                    window=(window_left, window_right), softcap=softcap, alibi_slopes=alibi, dropout_p=dropout_p,
                    rng=(seed, offset) if dropout_p > 0 else None, grad_comm_dtype=_DTYPES[grad_comm_dtype],
                    backend=backend or None)


def _run(fwd: bool, spec: CallSpec, tensors, q, strategy, cu_a, cu_b, sharding, balance, k_lo, k_hi, doc_base,
         **kw):
    plans, keys, lengths = plans_for(spec.comm, q.shape[0], cu_a, cu_b, sharding, balance, k_lo, k_hi, doc_base,
                                     q.device)
    if strategy == "ring":
        steps = _schedule(lengths, spec.comm.world_size, sharding, balance, spec.window, spec.comm.rank)
        return (ring_varlen_forward if fwd else ring_varlen_backward)(spec, *tensors, plans, steps, **kw)
    mine = plans if sharding == "llama3" else plans[spec.comm.rank]
    return (allgather_varlen_forward if fwd else allgather_varlen_backward)(spec, *tensors, mine, keys)


@torch.library.custom_op("fastattn::cp_varlen_fwd", mutates_args=())
def cp_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_a: Tensor, cu_b: Tensor, alibi_slopes: Optional[Tensor],
                  comm: str, strategy: str, sharding: str, balance: str, k_lo: int, k_hi: int, doc_base: int,
                  scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float, seed: int,
                  offset: int, grad_comm_dtype: str, backend: str) -> Tuple[Tensor, Tensor]:
    spec = _spec(comm, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset,
                 grad_comm_dtype, backend)
    return _run(True, spec, (q, k, v), q, strategy, cu_a, cu_b, sharding, balance, k_lo, k_hi, doc_base)


@cp_varlen_fwd.register_fake
def _(q, k, v, cu_a, cu_b, alibi_slopes, *args):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastattn::cp_varlen_bwd", mutates_args=())
def cp_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_a: Tensor, cu_b: Tensor,
                  alibi_slopes: Optional[Tensor], comm: str, strategy: str, sharding: str, balance: str, k_lo: int,
                  k_hi: int, doc_base: int, scale: float, window_left: int, window_right: int, softcap: float,
                  dropout_p: float, seed: int, offset: int, grad_comm_dtype: str, backend: str
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _spec(comm, scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset,
                 grad_comm_dtype, backend)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    return _run(False, spec, (dout, q, k, v, out, lse), q, strategy, cu_a, cu_b, sharding, balance, k_lo, k_hi,
                doc_base)


@cp_varlen_bwd.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_a, cu_b, alibi = inputs[:6]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_a, cu_b, alibi)
    ctx.args = inputs[6:]  # comm name, strategy, ..., backend
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_a, cu_b, alibi = ctx.saved_tensors
    dq, dk, dv = cp_varlen_bwd(dout, q, k, v, out, lse, cu_a, cu_b, alibi, *ctx.args)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


cp_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
