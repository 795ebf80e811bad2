"""flash_attn_with_kvcache: attention against a KV cache, appending new keys/values in place.

This is the generic path: the cache (dense or paged) is viewed or gathered as (B, Skv, Hkv, D) and each row's
valid prefix, causality and window become one additive bias, so every backend that takes masks can serve it.
Split-KV decode kernels (issue 6) plug in underneath the same function."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .params import AttnParams, check_alibi, check_qkv, check_window, default_scale, last_dim_contiguous


def _check_cache_seqlens(cache_seqlens, B, device):
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, int):
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"fastattn: cache_seqlens must be an int or an int32 tensor of shape ({B},), got "
                         f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} "
                         f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
    return cache_seqlens.to(device)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            backend: Optional[str] = None):
    """flash-attn's flash_attn_with_kvcache.

    q: (B, Sq, Hq, D). k_cache/v_cache: (B_cache, Smax, Hkv, D|Dv), or paged (num_blocks, page_size, Hkv, D|Dv)
    with block_table int32 (B, max_blocks). k, v: optional new (B, Snew, Hkv, D|Dv), written in place into the
    cache at positions cache_seqlens[b] .. cache_seqlens[b] + Snew - 1. cache_seqlens: int or int32 (B,) valid
    lengths before the append (None: the whole cache). cache_batch_idx: int32 (B,) rows of the cache to use.
    Attention covers each row's valid prefix (after the append); causal/window align bottom-right to it.
    Returns out (B, Sq, Hq, Dv), and softmax_lse (B, Hq, Sq) fp32 when return_softmax_lse.
    num_splits is a performance hint for split-KV kernels and does not change results.
    """
    for name, val in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_leftpad", cache_leftpad)):
        if val is not None:
            raise NotImplementedError(f"fastattn: flash_attn_with_kvcache({name}=...) is not supported yet")
    check_qkv(q, k_cache, v_cache, layout="bshd", names=("q", "k_cache", "v_cache"), same_batch=False)
    B, Sq, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != B:
            raise ValueError(f"fastattn: block_table must be int32 of shape ({B}, max_blocks), got "
                             f"{getattr(block_table, 'dtype', None)} {tuple(getattr(block_table, 'shape', ()))}")
        page = k_cache.shape[1]
        capacity = block_table.shape[1] * page
        if cache_batch_idx is not None:
            raise ValueError("fastattn: cache_batch_idx cannot be combined with block_table")
        if not torch.compiler.is_compiling() and block_table.numel() and \
                (int(block_table.min()) < 0 or int(block_table.max()) >= k_cache.shape[0]):
            raise ValueError(f"fastattn: block_table entries must lie in [0, {k_cache.shape[0]}) (num_blocks)")
    else:
        capacity = k_cache.shape[1]
    bidx = None
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype != torch.int32 or \
                tuple(cache_batch_idx.shape) != (B,):
            raise ValueError(f"fastattn: cache_batch_idx must be int32 of shape ({B},)")
        if not torch.compiler.is_compiling() and (int(cache_batch_idx.min()) < 0 or
                                                  int(cache_batch_idx.max()) >= k_cache.shape[0]):
            raise ValueError(f"fastattn: cache_batch_idx entries must lie in [0, {k_cache.shape[0]})")
        bidx = cache_batch_idx.long()
    elif not paged and k_cache.shape[0] != B:
        raise ValueError(f"fastattn: k_cache batch {k_cache.shape[0]} != q batch {B} (pass cache_batch_idx)")
    lens = _check_cache_seqlens(cache_seqlens, B, q.device)
    snew = 0
    if (k is None) != (v is None):
        raise ValueError("fastattn: pass both k and v to append, or neither")
    if k is not None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[0] != B or k.shape[2] != Hkv or k.shape[3] != D or \
                tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] != Dv:
            raise ValueError(f"fastattn: new k {tuple(k.shape)} / v {tuple(v.shape)} must be ({B}, Snew, {Hkv}, "
                             f"{D}) / ({B}, Snew, {Hkv}, {Dv})")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise TypeError(f"fastattn: new k/v dtype {k.dtype} must match the cache's {k_cache.dtype}")
        snew = k.shape[1]
        if lens is None:
            raise ValueError("fastattn: appending k/v needs cache_seqlens (where to write)")
    if lens is not None and not torch.compiler.is_compiling():
        if int(lens.min()) < 0 or int(lens.max()) + snew > capacity:
            raise ValueError(f"fastattn: cache_seqlens (max {int(lens.max())}) + new tokens ({snew}) exceed the cache "
                             f"capacity {capacity}, or are negative")
    wl, wr = check_window(window_size)
    if causal:
        wr = 0

    if snew:  # in-place append, row b at positions lens[b] + t
        pos = lens.long().unsqueeze(1) + torch.arange(snew, device=q.device)  # (B, Snew)
        if paged:
            blk = block_table.long().gather(1, pos // page)  # (B, Snew) physical page ids
            k_cache[blk, pos % page] = k
            v_cache[blk, pos % page] = v
        else:
            rows = (bidx if bidx is not None else torch.arange(B, device=q.device)).unsqueeze(1).expand(B, snew)
            k_cache[rows, pos] = k
            v_cache[rows, pos] = v
    if paged:
        nb = block_table.shape[1]
        K = k_cache[block_table.long()].reshape(B, nb * page, Hkv, D)  # (B, nb, page, Hkv, D) -> (B, Skv, Hkv, D)
        V = v_cache[block_table.long()].reshape(B, nb * page, Hkv, Dv)
    else:
        K = k_cache if bidx is None else k_cache[bidx]
        V = v_cache if bidx is None else v_cache[bidx]
    Skv = K.shape[1]

    alibi = check_alibi(alibi_slopes, B, Hq, q.device)
    bias = None
    if lens is not None or wl >= 0 or wr >= 0 or alibi is not None:
        seqk = (lens + snew).long() if lens is not None else torch.full((B,), Skv, device=q.device)
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
    p = AttnParams(q=qt, k=kt, v=vt,
                   scale=default_scale(softmax_scale, D), attn_bias=bias,
                   mask_kind=None if bias is None else "dense", softcap=float(softcap),
                   return_lse=bool(return_softmax_lse), extras={"decode": True, "num_splits": int(num_splits)})
    out, lse = dispatch.run(p, backend)
    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv) -> (B, Sq, Hq, Dv)
    return (out, lse) if return_softmax_lse else out
