"""flash_attn_with_kvcache: attention against a KV cache, appending new keys/values in place.

Order of work: validate everything (nothing is written before every check passed), append the new rows in place,
then ask the dispatcher (fastattn/dispatch.py `run_decode`) for a backend whose split-KV decode kernel reads the
cache in its own layout (dense or paged). When there is none, or the call does not qualify, the generic path runs: the cache
is viewed or gathered as (B, Skv, Hkv, D) and each row's valid prefix, causality, window and alibi become one
additive bias, so every backend that takes masks can serve it. `explain_kvcache` says which path runs and why."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import dispatch, rotary
from .params import (AttnParams, DecodeCall, check_alibi, check_qkv, check_window, default_scale,
                     last_dim_contiguous)


def _check_index(name: str, t, B: int, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() < 1 or t.shape[0] != B:
        raise ValueError(f"fastattn: {name} must be an int32 tensor with batch {B} first, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"fastattn: {name} is on {t.device} but q is on {device}")


def _check_cache_seqlens(cache_seqlens, B, device):
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise ValueError(f"fastattn: cache_seqlens must be an int or an int32 tensor of shape ({B},), got "
                         f"{type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"fastattn: cache_seqlens must be an int or an int32 tensor of shape ({B},), got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    return cache_seqlens.to(device)


def _stats(lens, snew, cache_batch_idx, block_table, nblocks):
    """[lens min, max][, batch_idx min, max, repeats][, bad block_table entries], or None when nothing to check.
    CPU tensors are read directly (no host sync to save); device tensors with one sync for all of them."""
    if lens is None and cache_batch_idx is None and block_table is None:
        return None
    if (lens if lens is not None else cache_batch_idx if cache_batch_idx is not None else block_table).is_cpu:
        vals = []
        if lens is not None:
            ls = lens.tolist()
            vals += [min(ls), max(ls)]
        if cache_batch_idx is not None:
            ix = cache_batch_idx.tolist()
            vals += [min(ix), max(ix), len(ix) - len(set(ix)) if snew else 0]
        if block_table is not None:
            vals.append(int(((block_table < 0) | (block_table >= nblocks)).sum()) if block_table.numel() else 0)
        return vals
    stats = []  # int64 scalars, read back together
    if lens is not None:
        stats += [lens.min(), lens.max()]
    if cache_batch_idx is not None:
        stats += [cache_batch_idx.min(), cache_batch_idx.max(),
                  (cache_batch_idx.sort().values.diff() == 0).sum() if snew else cache_batch_idx.new_zeros(())]
    if block_table is not None:
        stats.append(((block_table < 0) | (block_table >= nblocks)).sum() if block_table.numel()
                     else block_table.new_zeros(()))
    return torch.stack([t.to(torch.int64) for t in stats]).tolist()


def _check_values(lens, snew, capacity, cache_batch_idx, block_table, k_cache):
    """Every index the append and the kernels follow lies inside the cache."""
    nblocks = k_cache.shape[0]
    vals = _stats(lens, snew, cache_batch_idx, block_table, nblocks)
    if vals is None:
        return
    if lens is not None:
        lo, hi = vals[:2]
        vals = vals[2:]
        if lo < 0 or hi + snew > capacity:
            raise ValueError(f"fastattn: cache_seqlens (min {lo}, max {hi}) + new tokens ({snew}) must lie in "
                             f"[0, {capacity}] (the cache capacity per row)")
    if cache_batch_idx is not None:
        lo, hi, repeats = vals[:3]
        vals = vals[3:]
        if lo < 0 or hi >= nblocks:
            raise ValueError(f"fastattn: cache_batch_idx entries must lie in [0, {nblocks}) (k_cache batch), got "
                             f"{cache_batch_idx.tolist()}")
        if repeats:
            raise ValueError(f"fastattn: cache_batch_idx {cache_batch_idx.tolist()} repeats a cache row; appending "
                             "would write one row twice")
    if block_table is not None and vals[0]:
        bad = (block_table < 0) | (block_table >= nblocks)
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"fastattn: block_table[{b}, {j}] = {int(block_table[b, j])} is outside [0, {nblocks}) "
                         f"(num_blocks of k_cache {tuple(k_cache.shape)})")


@dataclass
class _Plan:
    """A validated call: sizes, where the cache lives, and each row's lengths."""
    B: int
    Sq: int
    Hq: int
    D: int
    Hkv: int
    Dv: int
    paged: bool
    page: int
    capacity: int  # keys one row can hold
    lens: Optional[torch.Tensor]  # int32 (B,) valid keys before the append, None = the whole cache
    snew: int
    wl: int
    wr: int
    alibi: Optional[torch.Tensor]

    def seqlens_k(self, device) -> torch.Tensor:
        """int32 (B,) valid keys per row after the append."""
        if self.lens is None:
            return torch.full((self.B,), self.capacity, dtype=torch.int32, device=device)
        return self.lens + self.snew


def _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_size,
              softcap, alibi_slopes, num_splits, rotary_cos, rotary_sin, cache_leftpad) -> _Plan:
    for name, val in (("cache_leftpad", cache_leftpad),):  # rotary_cos/sin: fastattn/rotary.py
        if val is not None:
            raise NotImplementedError(f"fastattn: flash_attn_with_kvcache({name}=...) is not supported yet")
    check_qkv(q, k_cache, v_cache, layout="bshd", names=("q", "k_cache", "v_cache"), same_batch=False)
    B, Sq, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"fastattn: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"fastattn: softcap must be a number >= 0, got {softcap!r}")
    # Value checks read tensor contents: one host sync (below). Skipped while tracing (they ran in eager mode) and
    # during CUDA graph capture (where a sync is illegal; replays reuse the captured, checked shapes).
    compiling = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    paged = block_table is not None
    page = 0
    if paged:
        _check_index("block_table", block_table, B, q.device)
        if block_table.dim() != 2:
            raise ValueError(f"fastattn: block_table must be int32 of shape ({B}, max_blocks), got "
                             f"{tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise ValueError("fastattn: cache_batch_idx cannot be combined with block_table")
        page = k_cache.shape[1]
        if page == 0:
            raise ValueError(f"fastattn: paged k_cache {tuple(k_cache.shape)} has page size 0")
        capacity = block_table.shape[1] * page
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            _check_index("cache_batch_idx", cache_batch_idx, B, q.device)
            if cache_batch_idx.dim() != 1:
                raise ValueError(f"fastattn: cache_batch_idx must be int32 of shape ({B},), got "
                                 f"{tuple(cache_batch_idx.shape)}")
        elif k_cache.shape[0] != B:
            raise ValueError(f"fastattn: k_cache batch {k_cache.shape[0]} != q batch {B} (pass cache_batch_idx)")
    lens = _check_cache_seqlens(cache_seqlens, B, q.device)
    snew = 0
    if (k is None) != (v is None):
        raise ValueError("fastattn: pass both k and v to append, or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fastattn: {name} must be a torch.Tensor, got {type(t).__name__}")
        if k.dim() != 4 or v.dim() != 4 or k.shape[0] != B or k.shape[2] != Hkv or k.shape[3] != D or \
                tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] != Dv:
            raise ValueError(f"fastattn: new k {tuple(k.shape)} / v {tuple(v.shape)} must be ({B}, Snew, {Hkv}, "
                             f"{D}) / ({B}, Snew, {Hkv}, {Dv})")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise TypeError(f"fastattn: new k/v dtype {k.dtype}/{v.dtype} must match the cache's {k_cache.dtype}")
        if k.device != k_cache.device or v.device != k_cache.device:
            raise ValueError(f"fastattn: new k/v are on {k.device}/{v.device} but the cache is on {k_cache.device}")
        snew = k.shape[1]
        if lens is None:
            raise ValueError("fastattn: appending k/v needs cache_seqlens (where to write)")
    if not compiling and B:
        _check_values(lens, snew, capacity, None if paged else cache_batch_idx, block_table, k_cache)
    wl, wr = check_window(window_size)
    if causal:
        wr = 0
    return _Plan(B=B, Sq=Sq, Hq=Hq, D=D, Hkv=Hkv, Dv=Dv, paged=paged, page=page, capacity=capacity, lens=lens,
                 snew=snew, wl=wl, wr=wr, alibi=check_alibi(alibi_slopes, B, Hq, q.device))


def _append(plan: _Plan, k, v, k_cache, v_cache, cache_batch_idx, block_table):
    """Writes row b's new tokens at positions lens[b] .. lens[b] + Snew - 1 (in place, nothing else changes)."""
    pos = plan.lens.long().unsqueeze(1) + torch.arange(plan.snew, device=k.device)  # (B, Snew)
    if plan.paged:
        blk = block_table.long().gather(1, pos // plan.page)  # (B, Snew) physical page ids
        k_cache[blk, pos % plan.page] = k
        v_cache[blk, pos % plan.page] = v
    else:
        rows = (cache_batch_idx.long() if cache_batch_idx is not None
                else torch.arange(plan.B, device=k.device)).unsqueeze(1).expand(plan.B, plan.snew)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v


def _decode_call(plan: _Plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap, num_splits):
    return DecodeCall(q=q.transpose(1, 2), k_cache=k_cache, v_cache=v_cache,  # q (B,Sq,H,D)->(B,H,Sq,D)
                      seqlens_k=plan.seqlens_k(q.device), block_table=block_table,
                      cache_batch_idx=cache_batch_idx, scale=scale, window_left=plan.wl,
                      window_right=plan.wr, softcap=float(softcap), alibi_slopes=plan.alibi,
                      num_splits=num_splits)


def _generic_params(plan: _Plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap,
                    return_lse) -> AttnParams:
    """The cache as (B, Skv, Hkv, D) (a view, a row gather or a page gather) plus one additive bias."""
    B, Sq, Hq, D, Hkv, Dv = plan.B, plan.Sq, plan.Hq, plan.D, plan.Hkv, plan.Dv
    if plan.paged:
        nb, page = block_table.shape[1], plan.page
        bt = block_table.long()
        K = k_cache[bt].reshape(B, nb * page, Hkv, D)  # (B, nb, page, Hkv, D) -> (B, Skv, Hkv, D)
        V = v_cache[bt].reshape(B, nb * page, Hkv, Dv)
    else:
        K = k_cache if cache_batch_idx is None else k_cache[cache_batch_idx.long()]
        V = v_cache if cache_batch_idx is None else v_cache[cache_batch_idx.long()]
    Skv = K.shape[1]
    bias = None
    wl, wr, alibi = plan.wl, plan.wr, plan.alibi
    if plan.lens is not None or wl >= 0 or wr >= 0 or alibi is not None:
        seqk = plan.seqlens_k(q.device).long()
        i = torch.arange(Sq, device=q.device).view(1, Sq, 1)
        j = torch.arange(Skv, device=q.device).view(1, 1, Skv)
        diag = i + (seqk.view(B, 1, 1) - Sq)  # (B, Sq, 1): bottom-right aligned to each row's length
        vis = j < seqk.view(B, 1, 1)  # (B, Sq, Skv)
        if wl >= 0:
            vis = vis & (j >= diag - wl)
        if wr >= 0:
            vis = vis & (j <= diag + wr)
        bias = torch.zeros(B, 1, Sq, Skv, dtype=torch.float32, device=q.device)
        if alibi is not None:
            slopes = alibi.view(-1, Hq, 1, 1)
            bias = bias - slopes * (diag - j).abs().unsqueeze(1).float()  # (B, Hq, Sq, Skv)
        bias = bias.masked_fill(~vis.unsqueeze(1), float("-inf")).to(q.dtype).expand(B, Hq, Sq, Skv)
    qt, kt, vt = last_dim_contiguous(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2))  # (B,S,H,D)->(B,H,S,D)
    return AttnParams(q=qt, k=kt, v=vt, scale=scale, attn_bias=bias,
                      mask_kind=None if bias is None else "dense", softcap=float(softcap),
                      return_lse=bool(return_lse))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            backend: Optional[str] = None):
    """flash-attn's flash_attn_with_kvcache.

    q: (B, Sq, Hq, D). k_cache/v_cache: (B_cache, Smax, Hkv, D|Dv), or paged (num_blocks, page_size, Hkv, D|Dv)
    with block_table int32 (B, max_blocks) (any page size). k, v: optional new (B, Snew, Hkv, D|Dv), written in
    place into the cache at positions cache_seqlens[b] .. cache_seqlens[b] + Snew - 1. cache_seqlens: int or int32
    (B,) valid lengths before the append (None: the whole cache). cache_batch_idx: int32 (B,) rows of the cache.
    Attention covers each row's valid prefix (after the append); causal/window align bottom-right to it:

        keys   0 1 2 ... L-3 L-2 L-1          (L = cache_seqlens[b] + Snew, Sq = 2, causal)
        q[0]   x x x ...  x   x   .
        q[1]   x x x ...  x   x   x

    rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2) rotate the new keys and q first (flash-attn's rule: rotary.py).
    Returns out (B, Sq, Hq, Dv), and softmax_lse (B, Hq, Sq) fp32 when return_softmax_lse. num_splits (0 = heuristic)
    is a performance hint for split-KV kernels and does not change results beyond rounding.
    """
    plan = _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_size,
                     softcap, alibi_slopes, num_splits, rotary_cos, rotary_sin, cache_leftpad)
    q, k = rotary.apply_kvcache(plan, q, k, rotary_cos, rotary_sin, rotary_interleaved)  # checks, then copies
    scale = default_scale(softmax_scale, plan.D)
    if plan.snew:
        _append(plan, k, v, k_cache, v_cache, cache_batch_idx, block_table)
    res = dispatch.run_decode(_decode_call(plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap,
                                           num_splits), backend)
    if res is None:
        p = _generic_params(plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap,
                            return_softmax_lse)
        res = dispatch.run(p, backend, route_decode=False)
    out, lse = res
    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv) -> (B, Sq, Hq, Dv)
    return (out, lse) if return_softmax_lse else out


def explain_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                    return_softmax_lse=False, *, backend: Optional[str] = None) -> dispatch.Explanation:
    """Which path flash_attn_with_kvcache takes for these arguments (a split-KV kernel, or the generic path and
    the backend the dispatcher picks there), and why. Validates like the real call; writes and computes nothing."""
    plan = _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_size,
                     softcap, alibi_slopes, num_splits, rotary_cos, rotary_sin, cache_leftpad)
    rotary.check(rotary_cos, rotary_sin, q, k, plan.capacity)
    scale = default_scale(softmax_scale, plan.D)
    ex = dispatch.explain_decode(_decode_call(plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale,
                                              softcap, num_splits), backend)
    if ex.kernel is None:
        p = _generic_params(plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap,
                            return_softmax_lse)
        ex.generic = dispatch.explain_params(p, backend, full=False, route_decode=False)
    return ex
