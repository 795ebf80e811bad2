"""Public context-parallel attention over packed varlen documents: `cp_varlen_attention` (GLOBAL cu_seqlens) and the
ring-flash-attention compatible functions (their own cu_seqlens conventions, stated per function).

Every function returns this rank's rows of what one process computes with flash_attn_varlen_func on the whole
packed sequence (documents never attend to each other; causal, window, ALiBi and dropout at positions within each
document), and with return_attn_probs / return_lse the lse as flash-attn's varlen functions give it: fp32
(Hq, T/W), this rank's tokens in its order (+inf for rows that see no key).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import layout
from .api import _shared_rng, check_placement_and_scalars
from .comm import comm_name
from .config import CPConfig, CPUnsupportedError, Plan
from .varlen import SHARDINGS, cp_varlen_fwd
from .varlen_ulysses import A2A_STRATEGIES, cp_varlen_a2a_fwd

_GDT = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _check(q, k, v, window_size, dropout_p, softcap=0.0, softmax_scale=None, alibi_slopes=None):
    def shapes():
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"fastattn.distributed: varlen {name} must be a 3-D packed tensor (tokens, heads, dim): "
                             f"{shapes()}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _GDT:
        raise ValueError(f"fastattn.distributed: q, k, v must share one dtype of float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or q.shape[0] == 0:
        raise ValueError(f"fastattn.distributed: context parallelism is self-attention over one sharded packed "
                         f"sequence: q, k and v need the same (non-zero) local token count: {shapes()}")
    if k.shape[1] != v.shape[1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"fastattn.distributed: query heads must be a multiple of the (equal) key and value heads: "
                         f"{shapes()}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fastattn.distributed: q and k head dims differ: {shapes()}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"fastattn.distributed: window_size must be (left, right) with -1 = unlimited, got "
                         f"{window_size}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastattn.distributed: dropout_p must be in [0, 1), got {dropout_p}")
    check_placement_and_scalars(q, softcap, softmax_scale, k=k, v=v, alibi_slopes=alibi_slopes)


def _check_softcap(softcap, fn: str):
    """ring-flash-attention has no softcap: a positional call written for it lands alibi_slopes (or later
    arguments) here. A clear error instead of a silent mix-up."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"fastattn.distributed: {fn}: softcap must be a float, got {type(softcap).__name__}; unlike "
                        "ring-flash-attention this function takes softcap after window_size (flash-attn's order): "
                        "pass alibi_slopes, deterministic, return_attn_probs and group by keyword")


def _check_alibi(alibi_slopes, q, n_docs: int):
    if alibi_slopes is None:
        return
    H = q.shape[1]
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32 or \
            tuple(alibi_slopes.shape) not in ((H,), (n_docs, H)):
        got = (f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}" if isinstance(alibi_slopes, torch.Tensor)
               else type(alibi_slopes).__name__)
        raise ValueError(f"fastattn.distributed: alibi_slopes must be float32 ({H},) or (documents, {H}) = "
                         f"({n_docs}, {H}), got {got}")


def _check_across_ranks(cp: CPConfig, q, k, v, cu: Optional[list], failed: bool):
    """One small all-gather, before any other collective: shapes (and the global cu_seqlens) must agree on every
    rank, and a rank that rejected its inputs makes every rank raise (so no peer waits in a collective)."""
    mine = list(q.shape) + list(k.shape) + list(v.shape)
    mine += [len(cu), sum(cu), sum(i * c for i, c in enumerate(cu)) % (2 ** 61)] if cu is not None else [0, 0, 0]
    got = cp.comm.all_gather(torch.tensor([mine + [int(failed)]], dtype=torch.int64, device=q.device))
    got = got.view(cp.world_size, -1).tolist()  # (W, 1, 13) -> (W, 13)
    if failed:
        return  # this rank raises its own error
    bad = [r for r, g in enumerate(got) if g[-1]]
    if bad:
        raise ValueError(f"fastattn.distributed: CP rank(s) {bad} rejected their varlen inputs (see their error)")
    if any(g[:-1] != got[0][:-1] for g in got):
        per = "; ".join(f"rank {r}: q {g[0:3]}, k {g[3:6]}, v {g[6:9]}" + (
            f", cu_seqlens (len {g[9]}, sum {g[10]})" if cu is not None else "") for r, g in enumerate(got))
        raise ValueError(f"fastattn.distributed: varlen inputs differ across the CP ranks (cu_seqlens must be the same "
                         f"on every rank): {per}")


def _seed_offset(cp: CPConfig, q, dropout_p, rng):
    """The call's (seed, offset): rng, or one drawn and shared from rank 0; (0, 0) without dropout."""
    if dropout_p > 0 and rng is None:  # under torch.compile pass rng: drawing one here breaks the graph
        rng = _shared_rng(cp, q.device)
    return (int(rng[0]), int(rng[1])) if dropout_p > 0 else (0, 0)


def _call(cp: CPConfig, q, k, v, cu_a, cu_b, strategy, sharding, balance, k_lo, k_hi, doc_base, causal,
          softmax_scale, dropout_p, window_size, softcap, alibi_slopes, rng):
    seed, offset = _seed_offset(cp, q, dropout_p, rng)
    wl, wr = int(window_size[0]), 0 if causal else int(window_size[1])
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    cu_a, cu_b = (c.to(torch.int64) for c in (cu_a, cu_b))  # read on the host by the op: left where they are
    return cp_varlen_fwd(q, k, v, cu_a, cu_b, alibi_slopes, comm_name(cp.comm), strategy, sharding, balance, k_lo,
                         k_hi, doc_base, scale, wl, wr, float(softcap), float(dropout_p), seed, offset,
                         _GDT[cp.grad_comm_dtype], cp.backend or "")


def plan_varlen(cp: CPConfig, *, heads_q: int, heads_kv: int, sharding: str = "per_doc",
                dropout: bool = False) -> Plan:
    """The strategy cp_varlen_attention runs for these heads, with its reason (CPConfig.plan's choice; raises
    CPUnsupportedError for a refused combination). auto: Ulysses when the heads allow it (as for dense sequences),
    else the ring for per_doc sharding or the all-gather for stream sharding; a 2-D group runs the hybrid.
    dropout does not change the choice: every strategy drops exactly what one process drops (accepted for
    CPConfig.plan's signature)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"fastattn.distributed: sharding must be one of {SHARDINGS}, got {sharding!r}")
    p = cp.plan(heads_q=heads_q, heads_kv=heads_kv, dropout=dropout)  # the head split is CPConfig.plan's
    if cp.is_2d:
        U, R = cp.mesh_shape
        rep = f", K/V heads replicated {p.kv_repeat}x" if p.kv_repeat > 1 else ""
        return p._replace(reason=("requested: " if cp.strategy == "hybrid" else "") + (
            f"a 2-D group: Ulysses over U={U} ({heads_q // U} of H={heads_q} query heads per rank{rep}), then the "
            f"packed varlen ring over R={R} on the head-sharded ring shards ({cp.balance} {sharding} over R): one "
            f"all-to-all each way over U for q|k|v and for out, {R - 1} K/V hops of 1/U of the heads"))
    if cp.strategy != "auto" or cp.world_size == 1:
        return p  # requested, or one rank: as for dense sequences
    W = cp.world_size
    if p.strategy == "ulysses":
        rep = f", K/V heads replicated {p.kv_repeat}x" if p.kv_repeat > 1 else ""
        return p._replace(reason=f"heads allow it (H={heads_q}, H_kv={heads_kv}, W={W}{rep}): one all-to-all each "
                                 "way for q|k|v and for out, ONE varlen kernel call per rank over the whole packed "
                                 "stream (GLOBAL cu_seqlens), no merge")
    # CPConfig.plan's reason: "ulysses not possible (<why>); the ring ...": its first part is kept
    why = p.reason.split("; the ring")[0]
    if sharding == "per_doc":
        return Plan("ring", f"{why}; per-document shards: K/V travel the ring, its hops overlapped with compute")
    return Plan("allgather", f"{why}; stream shards (documents cross ranks): one all-gather of K/V, one kernel call "
                             "per query chunk, no merge")


def explain_varlen(cp: CPConfig, *, heads_q: int, heads_kv: int, sharding: str = "per_doc", causal: bool = False,
                   dropout: bool = False) -> str:
    """Which strategy cp_varlen_attention runs for these heads and sharding, and why, or why it is refused."""
    shape = f" (ulysses U={cp.mesh_shape[0]} x ring R={cp.mesh_shape[1]})" if cp.is_2d else ""
    head = (f"fastattn.distributed: packed varlen documents, sharding={sharding!r}, W={cp.world_size}{shape}, "
            f"strategy={cp.strategy!r}, balance={cp.balance!r}, H={heads_q}, H_kv={heads_kv}, causal={causal}, "
            f"dropout={dropout}")
    try:
        p = plan_varlen(cp, heads_q=heads_q, heads_kv=heads_kv, sharding=sharding, dropout=dropout)
    except CPUnsupportedError as e:
        return f"{head}\n  refused: {e}"
    text = f"{head}\n  -> {p.strategy}: {p.reason}"
    if dropout:
        heads = (", each rank's block calls starting at its first global query head (head_start)"
                 if p.strategy in A2A_STRATEGIES else "")
        text += (f"\n  dropout: exact (the single-process mask of the same rng: keyed on the global document index, "
                 f"query head and in-document positions{heads})")
    return text


def cp_varlen_attention(q, k, v, cu_seqlens, *, cp: CPConfig, sharding: str = "per_doc", causal: bool = False,
                        softmax_scale: Optional[float] = None, dropout_p: float = 0.0, window_size=(-1, -1),
                        softcap: float = 0.0, alibi_slopes=None, return_lse: bool = False,
                        rng: Optional[tuple] = None):
    """Attention over packed documents split over the CP group of `cp`.

    q (T/W, Hq, D), k (T/W, Hkv, D), v (T/W, Hkv, Dv): this rank's tokens. cu_seqlens: the GLOBAL document
    boundaries (int (N+1,), 0 .. T, the same on every rank). sharding:
      "per_doc": every document split into W (cp.balance="contiguous") or 2W ("zigzag") equal pieces, rank r holding
          its piece(s) of every document (layout.shard_varlen(x, cu_seqlens, 0, W, r, balance)); every document
          length must divide by W (2W), else a ValueError names the documents.
      "stream": the packed stream split like a dense sequence (layout.shard(x, 0, W, r, cp.balance)); documents
          may cross ranks; only T % W (2W for zigzag) is needed.
    On a 2-D group (U x R, the hybrid) the sharding is over the R ring ranks and each ring shard is cut into U
    consecutive pieces: varlen_ulysses.shard_2d(x, cu_seqlens, 0, U, R, rank, sharding, balance).
    cp.strategy: "ring" (K/V travel, merged in fp32), "allgather" (one all-gather, no merge), "ulysses" (all-to-all
    to head shards, one varlen kernel call over the whole packed stream; H % W == 0, K/V heads replicated when
    needed), "hybrid" (2-D group: Ulysses over U, the ring over R) or "auto" (plan_varlen / explain_varlen say
    what runs: Ulysses when the heads allow it, else ring for per_doc, allgather for stream; the hybrid on 2-D).
    causal / window_size / alibi_slopes (fp32 (Hq,) or (N, Hq)) / softcap as flash_attn_varlen_func, at positions
    within each document. dropout_p > 0 drops exactly what one process drops with the same rng (seed, offset) on a
    backend whose block calls take dropout (the keep decision is keyed on document, head and in-document
    positions; ulysses and the hybrid also give each rank's block calls its first global query head); rng=None
    draws one and shares rank 0's (under torch.compile pass rng). Returns out (T/W, Hq, Dv), and with return_lse
    also lse fp32 (Hq, T/W).
    Differentiable in q, k, v; one custom op under torch.compile (fastattn::cp_varlen_fwd, or cp_varlen_a2a_fwd for
    ulysses / hybrid; value checks of cu_seqlens run in eager mode only). With cp.check_shapes, shapes and
    cu_seqlens are compared across ranks first (one small all-gather).
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"fastattn.distributed: sharding must be one of {SHARDINGS}, got {sharding!r}")
    if torch.compiler.is_compiling():  # (eagerly: below, where a rank that refuses tells the others)
        _check(q, k, v, window_size, dropout_p, softcap, softmax_scale, alibi_slopes)

    def plan():
        return plan_varlen(cp, heads_q=q.shape[1], heads_kv=k.shape[1], sharding=sharding, dropout=dropout_p > 0)
    W = cp.world_size
    if not torch.compiler.is_compiling():
        err, cu, p = None, None, None
        try:
            _check(q, k, v, window_size, dropout_p, softcap, softmax_scale, alibi_slopes)
            p = plan()
            lengths = layout.doc_lengths(cu_seqlens)
            cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
            if cu[-1] != W * q.shape[0]:
                raise ValueError(f"fastattn.distributed: cu_seqlens ends at {cu[-1]} but the {W} ranks hold "
                                 f"{W} x {q.shape[0]} = {W * q.shape[0]} tokens (q {tuple(q.shape)} on this rank): "
                                 "cu_seqlens must be the GLOBAL document boundaries of the packed sequence")
            # the layout's group: the ring dim of a 2-D group (each ring shard then cut into U pieces)
            Wl, rl, Tl = (cp.mesh_shape[1], cp.rank // cp.mesh_shape[0], cp.mesh_shape[0] * q.shape[0]) \
                if cp.is_2d else (W, cp.rank, q.shape[0])
            if sharding == "per_doc":
                layout.check_docs_divisible(lengths, Wl, cp.balance)
            else:
                layout.segments(Tl, Wl, rl, cp.balance)  # zigzag: even local count
            _check_alibi(alibi_slopes, q, len(lengths))
        except (ValueError, TypeError) as e:  # CPUnsupportedError and fastattn's input errors included
            err = e
        if cp.check_shapes:
            _check_across_ranks(cp, q, k, v, cu, err is not None)
        if err is not None:
            raise err
    else:
        p = plan()
    if p.strategy in A2A_STRATEGIES:
        out, lse = _call_a2a(cp, q, k, v, cu_seqlens, p, sharding, causal, softmax_scale, dropout_p, window_size,
                             softcap, alibi_slopes, return_lse, rng)
    else:
        out, lse = _call(cp, q, k, v, cu_seqlens, cu_seqlens, p.strategy, sharding, cp.balance, 0, 0, 0, causal,
                         softmax_scale, dropout_p, window_size, softcap, alibi_slopes, rng)
    return (out, lse) if return_lse else out


def _call_a2a(cp: CPConfig, q, k, v, cu, p: Plan, sharding, causal, softmax_scale, dropout_p, window_size, softcap,
              alibi_slopes, return_lse, rng):
    seed, offset = _seed_offset(cp, q, dropout_p, rng)
    wl, wr = int(window_size[0]), 0 if causal else int(window_size[1])
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return cp_varlen_a2a_fwd(q, k, v, cu.to(torch.int64), alibi_slopes, comm_name(cp.comm), p.strategy, sharding,
                             cp.balance, scale, wl, wr, float(softcap), p.kv_repeat, bool(return_lse),
                             _GDT[cp.grad_comm_dtype], cp.backend or "", float(dropout_p), seed, offset)[:2]


# --------------------------------------------------------------------------------------------------------------
# ring-flash-attention compatible functions

def _config(group, strategy: str, balance: str) -> CPConfig:
    """The drop-ins' group: a ProcessGroup, a CPComm, None (the default group), or a CPConfig whose backend,
    grad_comm_dtype and check_shapes apply (strategy and layout are the function's)."""
    if isinstance(group, CPConfig):
        return CPConfig(group.comm, strategy=strategy, balance=balance, grad_comm_dtype=group.grad_comm_dtype,
                        backend=group.backend, check_shapes=group.check_shapes)
    return CPConfig(group=group, strategy=strategy, balance=balance)


def _per_doc_compat(balance, q, k, v, cu_seqlens, dropout_p, softmax_scale, causal, window_size, softcap,
                    alibi_slopes, return_attn_probs, group, fn):
    _check_softcap(softcap, fn)
    cp = _config(group, "ring", balance)
    _check(q, k, v, window_size, dropout_p)
    if not torch.compiler.is_compiling():
        try:
            local = layout.doc_lengths(cu_seqlens)
            W, T = cp.world_size, q.shape[0]
            if sum(local) != T:
                hint = (" (it ends at W x the local count: pass the LOCAL cu_seqlens, i.e. the global one // W)"
                        if sum(local) == W * T else "")
                raise ValueError(f"fastattn.distributed: {fn}: cu_seqlens ends at {sum(local)} but q holds {T} "
                                 f"tokens (q {tuple(q.shape)}): cu_seqlens is this rank's LOCAL one, the global "
                                 f"cu_seqlens // W={W}{hint}")
            if balance == "zigzag" and any(L % 2 for L in local):
                i, L = next((i, L) for i, L in enumerate(local) if L % 2)
                raise ValueError(f"fastattn.distributed: {fn}: cu_seqlens: document {i} has local length {L} (global "
                                 f"{L * W}), not divisible by 2: zigzag needs every document length % 2W = {2 * W}; "
                                 f"pad the documents, or use llama3_flash_attn_varlen_func (any lengths, total % W)")
        except ValueError:
            if cp.check_shapes:  # the peers learn it in their shape check instead of waiting in a collective
                _check_across_ranks(cp, q, k, v, None, True)
            raise
    out, lse = cp_varlen_attention(q, k, v, cu_seqlens * cp.world_size, cp=cp, sharding="per_doc", causal=causal,
                                   softmax_scale=softmax_scale, dropout_p=dropout_p, window_size=window_size,
                                   softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None):
    """ring-flash-attention's ring_flash_attn_varlen_func. As there, cu_seqlens is this rank's LOCAL one: the global
    boundaries // W (every global document length divisible by W), the same on every rank, and rank r holds piece r
    of W of every document, documents in order (layout.shard_varlen(x, global_cu, 0, W, r, "contiguous")).
    q (T/W, Hq, D), k/v (T/W, Hkv, D). max_seqlen and deterministic are accepted and unused (lengths come from
    cu_seqlens; the ring is always deterministic). Unlike ring-flash-attention, softcap sits after window_size as
    in flash-attn (pass alibi_slopes by keyword), and window, ALiBi ((Hq,) or (N, Hq)), softcap, non-causal and
    dropout are exact (see cp_varlen_attention). return_attn_probs=True: (out, lse fp32 (Hq, T/W), None).
    group: a ProcessGroup, a CPComm, None (the default group), or a CPConfig whose backend, grad_comm_dtype and
    check_shapes apply (check_shapes: inputs compared across ranks first, so bad input on one rank raises on all)."""
    return _per_doc_compat("contiguous", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, return_attn_probs, group, "ring_flash_attn_varlen_func")


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                       deterministic=False, return_attn_probs=False, group=None):
    """ring-flash-attention's zigzag_ring_flash_attn_varlen_func: as ring_flash_attn_varlen_func (LOCAL cu_seqlens =
    global // W), but every document is cut into 2W pieces and rank r holds pieces r and 2W-1-r of each, head then
    tail (layout.shard_varlen(..., "zigzag"); ring-flash-attention's test extract_local), which balances causal work.
    Every global document length must divide by 2W. causal=False is exact too (ring-flash-attention asserts
    causal)."""
    return _per_doc_compat("zigzag", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, return_attn_probs, group, "zigzag_ring_flash_attn_varlen_func")


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size):
    """ring-flash-attention's helper: from the GLOBAL cu_seqlens (total % world_size == 0), rank `rank`'s
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice) for llama3_flash_attn_varlen_func, rank r
    holding packed tokens [r*T/W, (r+1)*T/W). cu_seqlens_q: the documents clipped to the slice; keys: from the start
    of the first document overlapping the slice to the slice end (causal) or to the end of its last document."""
    cu = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    layout.doc_lengths(cu)
    if cu[-1] % world_size:
        raise ValueError(f"fastattn.distributed: cu_seqlens total {cu[-1]} is not divisible by world_size "
                         f"{world_size}; pad the packed sequence")
    L = cu[-1] // world_size
    lo, hi = rank * L, (rank + 1) * L
    left = next(i for i, c in enumerate(cu) if c >= lo)
    right = next(i for i, c in enumerate(cu) if c >= hi)
    if cu[left] != lo:
        left -= 1
    cq = [c - lo for c in cu[left:right + 1]]
    cq[0], cq[-1] = 0, L
    slice_left, slice_right = cu[left], (hi if causal else cu[right])
    ck = [c - slice_left for c in cu[left:right + 1]]
    if causal:
        ck[-1] = slice_right - slice_left
    dev = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    mq = max(b - a for a, b in zip(cq, cq[1:]))
    mk = max(b - a for a, b in zip(ck, ck[1:]))
    return (torch.tensor(cq, dtype=torch.int32, device=dev), torch.tensor(ck, dtype=torch.int32, device=dev), mq, mk,
            slice(slice_left, slice_right))


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                  softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                  group=None):
    """ring-flash-attention's llama3_flash_attn_varlen_func (all-gather K/V): rank r holds packed tokens
    [r*T/W, (r+1)*T/W) (documents may cross ranks; only T % W needed), and cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q/k and local_k_slice come from llama3_flash_attn_prepare_cu_seqlens(global cu_seqlens, causal, r, W)
    with the SAME causal flag. Positions are taken from these arguments (query rows at their place in the document),
    so window and ALiBi are exact too, not only bottom-right causal. heads_k_stride must divide Hkv (as there) and is
    otherwise unused: K/V of all heads are gathered in one collective (a performance knob there, no effect on
    results); max_seqlen_q/k and deterministic are unused. alibi_slopes (Hq,) or (documents of cu_seqlens_q, Hq).
    Dropout is exact (one extra tiny all-gather finds the global index of the first local document).
    return_attn_probs=True: (out, lse fp32 (Hq, T/W), None)."""
    _check_softcap(softcap, "llama3_flash_attn_varlen_func")
    cp = _config(group, "allgather", "contiguous")
    _check(q, k, v, window_size, dropout_p)
    W, r, T = cp.world_size, cp.rank, q.shape[0]
    if not isinstance(local_k_slice, slice) or local_k_slice.step not in (None, 1):
        raise ValueError(f"fastattn.distributed: local_k_slice must be a slice(start, stop) of packed rows, got "
                         f"{local_k_slice!r}")
    k_lo = 0 if local_k_slice.start is None else int(local_k_slice.start)
    k_hi = W * T if local_k_slice.stop is None else int(local_k_slice.stop)
    if not isinstance(heads_k_stride, int) or heads_k_stride < 1 or k.shape[1] % heads_k_stride:
        raise ValueError(f"fastattn.distributed: heads_k_stride must be a positive divisor of the {k.shape[1]} K/V "
                         f"heads, got {heads_k_stride!r}")
    doc_base = 0
    if not torch.compiler.is_compiling():
        cq = layout.doc_lengths(cu_seqlens_q, "cu_seqlens_q")
        ck = layout.doc_lengths(cu_seqlens_k, "cu_seqlens_k")
        cqs, cks = [0] + torch.tensor(cq).cumsum(0).tolist(), [0] + torch.tensor(ck).cumsum(0).tolist()
        bad = None
        if sum(cq) != T:
            bad = f"cu_seqlens_q ends at {sum(cq)} but q holds {T} tokens"
        elif not 0 <= k_lo <= k_hi <= W * T or sum(ck) != k_hi - k_lo:
            bad = (f"local_k_slice {local_k_slice} must lie in the {W * T} packed tokens and span cu_seqlens_k "
                   f"(ends at {sum(ck)})")
        elif len(cq) != len(ck):
            bad = f"cu_seqlens_q has {len(cq)} documents, cu_seqlens_k {len(ck)}"
        else:
            for i in range(len(cq)):  # the queries of document i lie inside its keys' document
                if r * T + cqs[i] < k_lo + cks[i] or (cq[i] and r * T + cqs[i + 1] > k_lo + cks[i + 1]):
                    bad = (f"document {i}: queries at packed rows [{r * T + cqs[i]}, {r * T + cqs[i + 1]}) are not "
                           f"inside its keys [{k_lo + cks[i]}, {k_lo + cks[i + 1]})")
                    break
        try:
            if bad:
                raise ValueError(f"fastattn.distributed: llama3_flash_attn_varlen_func on rank {r} of {W}: {bad}; "
                                 "pass the outputs of llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, "
                                 "rank, W)")
            _check_alibi(alibi_slopes, q, len(cq))
        except ValueError:
            if cp.check_shapes:
                _check_across_ranks(cp, q, k, v, None, True)
            raise
        if cp.check_shapes:  # cu_seqlens_q/k differ per rank by design: shapes only
            _check_across_ranks(cp, q, k, v, None, False)
        if dropout_p > 0:  # the call's sequence index must be the global document index (the dropout key)
            here = sum(1 for i in range(len(ck)) if k_lo + cks[i] >= r * T)  # documents starting in this slice
            counts = cp.comm.all_gather(torch.tensor([here], dtype=torch.int64, device=q.device)).view(-1).tolist()
            doc_base = sum(counts[:r]) - (1 if k_lo < r * T else 0)
    if alibi_slopes is not None and alibi_slopes.dim() == 2 and doc_base:
        alibi_slopes = torch.cat([alibi_slopes.new_zeros(doc_base, alibi_slopes.shape[1]), alibi_slopes])
    out, lse = _call(cp, q, k, v, cu_seqlens_q, cu_seqlens_k, "allgather", "llama3", "contiguous", k_lo, k_hi,
                     doc_base, causal, softmax_scale, dropout_p, window_size, softcap, alibi_slopes, None)
    return (out, lse, None) if return_attn_probs else out


__all__ = ["cp_varlen_attention", "plan_varlen", "explain_varlen", "ring_flash_attn_varlen_func",
           "zigzag_ring_flash_attn_varlen_func", "llama3_flash_attn_varlen_func",
           "llama3_flash_attn_prepare_cu_seqlens"]
