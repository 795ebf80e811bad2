"""Attention over blocks of a sequence: the kernel contract context parallelism is built on.

One attention call can be computed as block pairs — this block's queries against one block of keys — and merged.
A block call names where its rows sit in the whole sequence (`q_start`, `k_start`: the global position of its first
query and first key, per sequence), so every position rule is exact for any pair of blocks: causal and sliding
windows (`k_pos <= q_pos`, ...), ALiBi (`-slope·|q_pos − k_pos|`) and dropout (the keep decision of an element is
keyed on its global positions, so blocks drop exactly what the unsplit call drops). A call may also hold a slice of
the unsplit call's query heads (Ulysses context parallelism): `head_start` names the first of them, and dropout is
keyed by the global head head_start + h, so a split over heads drops what the unsplit call drops too (K/V heads
follow the local GQA grouping, Hq / Hkv query heads per K/V head). Blocks return their output
unrounded in float32, merge in float32 (`merge_`, safe for rows that see no key), and round once; the backward of a
block adds float32 gradients into caller-given accumulators against the merged output and lse.

    out_acc = torch.zeros(B, H, Sq, Dv); lse_acc = torch.full((B, H, Sq), inf)     # fp32
    for k_blk, v_blk, k_start in blocks:
        o, l = block_forward(q, k_blk, v_blk, q_start=q_start, k_start=k_start, causal=True, rng=rng)
        merge_(out_acc, lse_acc, o, l)
    out = out_acc.to(q.dtype)                                                      # rounded once
    for k_blk, v_blk, k_start in blocks:                                           # backward
        block_backward(dout, q, k_blk, v_blk, out, lse_acc, q_start=..., k_start=..., causal=True, rng=rng,
                       dq_acc=dq, dk_acc=dk[blk], dv_acc=dv[blk])

Tensors are (B, H, S, D) views with stride 1 along D, like torch.ops.fastattn (csrc/ops.cpp has the contract).
The functions are not differentiable themselves: the caller (context parallelism) owns the autograd.
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence, Tuple, Union

import torch

from . import dispatch
from .params import (AttnParams, InputTypeError, InputValueError, check_alibi, check_cu_seqlens, check_dropout,
                     check_qkv, check_softcap, check_window, default_scale, last_dim_contiguous)

Start = Union[int, torch.Tensor]
_POS_LIMIT = 2 ** 31  # positions are int32 in the kernels
_INF = float("inf")


def dropout_rng() -> Tuple[int, int]:
    """(seed, offset) for a block call's dropout, drawn from torch's default generator (reproducible under
    torch.manual_seed). Pass the same pair to every block of one logical call, forward and backward."""
    s = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64).tolist()
    return int(s[0]), int(s[1])


def _start(x: Start, name: str, n: int, lengths: torch.Tensor, device) -> torch.Tensor:
    """q_start/k_start as int32 (N,) on device; values checked in eager mode (the CUDA op cannot read them)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in (torch.int32, torch.int64) or x.dim() != 1 or x.shape[0] != n:
            raise InputValueError(f"fastattn: {name} must be an int or an integer tensor of shape ({n},) (one start "
                                  f"per sequence), got {x.dtype} {tuple(x.shape)}")
        t = x.to(device=device, dtype=torch.int32).contiguous()
    elif isinstance(x, numbers.Integral) and not isinstance(x, bool):  # NumPy ints too, as head_start
        x = operator.index(x)
        if x >= _POS_LIMIT:  # (before any tensor is built from it: int64 may overflow too)
            raise InputValueError(f"fastattn: {name} and {name} + sequence length must lie in [0, 2**31), got "
                                  f"{name} {x}")
        t = torch.full((n,), max(x, 0), dtype=torch.int32, device=device)
    else:
        raise InputTypeError(f"fastattn: {name} must be an int or an integer tensor, got {type(x).__name__}")
    if not torch.compiler.is_compiling():
        first = x.long().cpu() if isinstance(x, torch.Tensor) else torch.full((n,), x)
        if bool((first < 0).any()) or bool((first + lengths >= _POS_LIMIT).any()):
            raise InputValueError(f"fastattn: {name} and {name} + sequence length must lie in [0, 2**31), got "
                                  f"{name} {first.tolist()} with lengths {lengths.tolist()}")
    return t


def block_params(q, k, v, *, q_start: Start, k_start: Start, scale=None, causal=False, window_size=(-1, -1),
                 softcap=0.0, alibi_slopes=None, attn_bias=None, dropout_p=0.0, rng=None, cu_seqlens_q=None,
                 cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, head_start=0) -> AttnParams:
    """Checks a block call and returns its AttnParams (q, k, v (B, H, S, D) views; see the module docstring).
    head_start: q's heads are heads head_start.. of the unsplit call (the dropout key); an int >= 0."""
    check_qkv(q, k, v, layout="bhsd", names=("q", "k", "v"), same_batch=True)
    wl, wr = check_window(window_size)
    if causal:
        wr = 0
    # With offsets a window is never "wider than the call": off = q_start - k_start can exceed any length. Only a
    # window past every position is no window.
    wl, wr = (-1 if w >= _POS_LIMIT else w for w in (wl, wr))
    B, Hq = q.shape[0], q.shape[1]
    varlen = {}
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if cu_seqlens_q is None or cu_seqlens_k is None or B != 1:
            raise InputValueError("fastattn: varlen block calls take cu_seqlens_q and cu_seqlens_k together, with "
                                  f"batch 1 (packed rows), got q {tuple(q.shape)}")
        cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[2])
        cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[2])
        if cu_q.numel() != cu_k.numel():
            raise InputValueError(f"fastattn: cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} "
                                  "must describe the same number of sequences")
        len_q, len_k = (cu_q[1:] - cu_q[:-1]).long().cpu(), (cu_k[1:] - cu_k[:-1]).long().cpu()
        mq = int(len_q.max()) if max_seqlen_q is None else max_seqlen_q
        mk = int(len_k.max()) if max_seqlen_k is None else max_seqlen_k
        varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
        n = cu_q.numel() - 1
    else:
        n = B
        len_q, len_k = torch.full((n,), q.shape[2]), torch.full((n,), k.shape[2])
    qs = _start(q_start, "q_start", n, len_q, q.device)
    ks = _start(k_start, "k_start", n, len_k, q.device)
    bias = None
    if attn_bias is not None:
        want = (B, Hq, q.shape[2], k.shape[2])
        if attn_bias.dtype != q.dtype:
            raise InputValueError(f"fastattn: attn_bias dtype {attn_bias.dtype} must be q's {q.dtype}")
        try:
            bias = attn_bias.expand(want)  # (B|1, H|1, Sq|1, Sk) -> (B, Hq, Sq, Sk), stride 0 on broadcast dims
        except RuntimeError:
            raise InputValueError(f"fastattn: attn_bias {tuple(attn_bias.shape)} does not broadcast to {want}") \
                from None
    q, k, v = last_dim_contiguous(q, k, v)
    if rng is not None:
        if not (isinstance(rng, (tuple, list)) and len(rng) == 2 and
                all(isinstance(r, (numbers.Integral, torch.SymInt)) and not isinstance(r, bool) for r in rng)):
            raise InputTypeError(f"fastattn: rng must be a (seed, offset) pair of ints (fastattn.blocks."
                                 f"dropout_rng()), got {rng!r}")
        rng = (int(rng[0]), int(rng[1]))
    dropout_p = check_dropout(dropout_p)
    if dropout_p > 0 and rng is None:
        raise InputValueError("fastattn: a block call with dropout needs rng=(seed, offset) (fastattn.blocks."
                              "dropout_rng()): every block of one call must share it")
    head_start = _check_head_start(head_start, Hq)
    return AttnParams(q=q, k=k, v=v, scale=default_scale(scale, q.shape[-1]), attn_bias=bias,
                      mask_kind=None if bias is None else "dense", window_left=wl, window_right=wr,
                      softcap=check_softcap(softcap), alibi_slopes=check_alibi(alibi_slopes, n, Hq, q.device),
                      dropout_p=dropout_p, q_start=qs, k_start=ks, out_fp32=True, rng=rng, return_lse=True,
                      head_start=head_start, **varlen)


def _check_head_start(head_start, heads_q: int) -> int:
    """head_start as an int >= 0 with head_start + Hq <= 2**31 (the kernels' dropout counter holds the global
    head)."""
    try:
        if isinstance(head_start, (bool, torch.Tensor)):  # a tensor would sync with its device
            raise TypeError
        head_start = operator.index(head_start)  # int, numpy integers; not floats
    except TypeError:
        raise InputTypeError(f"fastattn: head_start must be an int (the first query head of this call in the "
                             f"unsplit call), got {type(head_start).__name__}") from None
    if head_start < 0 or head_start + heads_q > _POS_LIMIT:
        raise InputValueError(f"fastattn: head_start must be >= 0 with head_start + Hq <= 2**31, got head_start="
                              f"{head_start} with Hq={heads_q}")
    return head_start


def block_forward(q, k, v, *, q_start: Start, k_start: Start, backend: Optional[str] = None, **kw):
    """This block's queries against one block of keys, positions global. Returns (out fp32 (B, Hq, Sq, Dv),
    lse fp32 (B, Hq, Sq)); rows that see no key in this block: out 0, lse +inf. Keywords: scale, causal,
    window_size, softcap, alibi_slopes, attn_bias, dropout_p, rng, cu_seqlens_q/k, max_seqlen_q/k, head_start."""
    p = block_params(q, k, v, q_start=q_start, k_start=k_start, **kw)
    B, Hq, Sq, _ = q.shape
    if Sq == 0 or k.shape[2] == 0 or B == 0:
        return (q.new_zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float32),
                q.new_full((B, Hq, Sq), _INF, dtype=torch.float32))
    with torch.no_grad():
        return dispatch.select(p, backend).forward(p)


def block_backward(dout, q, k, v, out, lse, *, q_start: Start, k_start: Start, dq_acc=None, dk_acc=None,
                   dv_acc=None, backend: Optional[str] = None, **kw):
    """Adds this block pair's gradients, in fp32, into dq_acc/dk_acc/dv_acc (fp32, q's/k's/v's shapes; zeros are
    allocated for those not given) and returns the three. out (q.dtype) and lse are the MERGED output and lse of
    the whole call (P = exp(S − lse) is then the true probability, so block gradients simply add)."""
    p = block_params(q, k, v, q_start=q_start, k_start=k_start, **kw)
    accs = []
    for acc, t, name in ((dq_acc, q, "dq_acc"), (dk_acc, k, "dk_acc"), (dv_acc, v, "dv_acc")):
        if acc is None:
            acc = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        elif acc.dtype != torch.float32 or acc.shape != t.shape or acc.device != t.device:
            raise InputValueError(f"fastattn: {name} must be float32 of shape {tuple(t.shape)} on {t.device}, got "
                                  f"{acc.dtype} {tuple(acc.shape)} on {acc.device}")
        accs.append(acc)
    if dout.shape != (q.shape[0], q.shape[1], q.shape[2], v.shape[-1]) or out.shape != dout.shape:
        want = (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
        raise InputValueError(f"fastattn: dout and out must be (B, Hq, Sq, Dv) = {want}, got dout "
                              f"{tuple(dout.shape)}, out {tuple(out.shape)}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise InputValueError(f"fastattn: lse must be float32 {tuple(q.shape[:3])}, got {lse.dtype} "
                              f"{tuple(lse.shape)}")
    if q.shape[2] and k.shape[2] and q.shape[0]:
        dout, out = last_dim_contiguous(dout.to(q.dtype), out.to(q.dtype))
        with torch.no_grad():
            dispatch.select(p, backend).block_backward(p, dout, out, lse, *accs)
    return tuple(accs)


def _check_merge(out_acc, lse_acc, out_b, lse_b) -> None:
    """merge_'s arguments: fp32 accumulators (a bf16 one rounds every merge), no broadcasting (a one-head block would
    silently fill every head of the accumulator), one device."""
    ts = {"out_acc": out_acc, "lse_acc": lse_acc, "out_b": out_b, "lse_b": lse_b}
    for name, t in ts.items():
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"fastattn: merge_: {name} must be a tensor, got {type(t).__name__}")
    if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
        raise InputValueError(f"fastattn: merge_ accumulates in float32: out_acc is {out_acc.dtype}, lse_acc "
                              f"{lse_acc.dtype}")
    if out_b.shape != out_acc.shape or lse_b.shape != lse_acc.shape or lse_acc.shape != out_acc.shape[:-1]:
        raise InputValueError(f"fastattn: merge_ needs out_b {tuple(out_b.shape)} == out_acc {tuple(out_acc.shape)} "
                              f"and lse_b {tuple(lse_b.shape)} == lse_acc {tuple(lse_acc.shape)} == out_acc's "
                              f"without its last dim")
    if len({t.device for t in ts.values()}) > 1:
        raise InputValueError(f"fastattn: merge_'s tensors must share a device, got "
                              f"{ {n: str(t.device) for n, t in ts.items()} }")


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merges a block's (out_b, lse_b) into the running (out_acc, lse_acc), in place, in fp32.

    Both lse follow the kernels' convention: +inf marks a row that has seen no key (its out is 0), so the
    accumulator starts as (zeros, +inf). With m = max of the two lse (empty rows as -inf): w = exp(lse - m) for each
    side (one of them is 1), lse' = m + log(w_a + w_b), out' = (w_a out_a + w_b out_b) / (w_a + w_b): no overflow
    for any finite lse, no NaN from empty rows (the textbook sigmoid form gives NaN or a zeroed row there). NaN in
    either input propagates. out_acc (..., Sq, Dv) and lse_acc (..., Sq) float32; the block's of the same shapes."""
    _check_merge(out_acc, lse_acc, out_b, lse_b)
    a = torch.where(lse_acc == _INF, -_INF, lse_acc)
    b = torch.where(lse_b == _INF, -_INF, lse_b.to(torch.float32))
    m = torch.maximum(a, b)
    m = torch.where(m == -_INF, 0.0, m)  # both empty: the weights below are exp(-inf) = 0
    wa, wb = torch.exp(a - m), torch.exp(b - m)
    tot = wa + wb
    empty = tot == 0
    inv = 1.0 / torch.where(empty, 1.0, tot)
    out_acc.mul_((wa * inv).unsqueeze(-1)).add_(out_b.to(torch.float32) * (wb * inv).unsqueeze(-1))
    lse_acc.copy_(torch.where(empty, _INF, m + torch.log(torch.where(empty, 1.0, tot))))


def merge_many(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges several blocks' (out, lse) at once: lse = logsumexp of the block lse, out = Σ exp(lse_b − lse)·out_b,
    each weight rounded once. Same conventions as merge_. Returns (out fp32, lse fp32)."""
    if len(outs) == 0 or len(outs) != len(lses):
        raise InputValueError(f"fastattn: merge_many needs as many outs as lses (at least one), got {len(outs)} and "
                              f"{len(lses)}")
    ls = torch.stack([l.to(torch.float32) for l in lses])  # (n, B, H, S)
    ls = torch.where(ls == _INF, -_INF, ls)
    m = ls.amax(0)
    m = torch.where(m == -_INF, 0.0, m)
    w = torch.exp(ls - m)  # (n, B, H, S)
    tot = w.sum(0)
    empty = tot == 0
    w = w / torch.where(empty, 1.0, tot)
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for wi, o in zip(w, outs):
        out.add_(o.to(torch.float32) * wi.unsqueeze(-1))
    lse = torch.where(empty, _INF, m + torch.log(torch.where(empty, 1.0, tot)))
    return out, lse


__all__ = ["block_forward", "block_backward", "block_params", "merge_", "merge_many", "dropout_rng"]
