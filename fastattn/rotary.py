"""Rotary position embedding (RoPE) as flash_attn_with_kvcache applies it: to the new keys before they are written
into the cache, and to the queries, at each row's positions in the cache.

flash-attn's semantics (rotary_cos / rotary_sin of shape (seqlen_ro, rotary_dim / 2), rotary_dim <= head dim, even):
  - the new keys k[b, i] sit at position cache_seqlens[b] + i;
  - the queries q[b, i] sit at cache_seqlens[b] + i when the call is causal or has a window ("local"), and all at
    cache_seqlens[b] otherwise;
  - rotary_interleaved=True rotates the pairs (0, 1), (2, 3), ... of the first rotary_dim dims (GPT-J); False
    rotates dim j with j + rotary_dim / 2 (GPT-NeoX); dims past rotary_dim pass through;
  - only with new k and v (flash-attn refuses rotary without them), and seqlen_ro must cover the cache.
The rotation runs in fp32 and is rounded once to the inputs' dtype; q and k are copied, never rotated in place."""
from __future__ import annotations

import torch

from .params import InputTypeError, InputValueError, _shape


def check(rotary_cos, rotary_sin, q, k, capacity: int) -> int:
    """rotary_dim (0 when both are None). Raises for a half-given pair, bad shapes, or rotary without new keys."""
    if rotary_cos is None and rotary_sin is None:
        return 0
    if rotary_cos is None or rotary_sin is None:
        raise InputValueError("fastattn: pass both rotary_cos and rotary_sin, or neither")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise InputValueError(f"fastattn: {name} must be a floating tensor (seqlen_ro, rotary_dim / 2), got "
                                  f"{_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != q.device:
            raise InputValueError(f"fastattn: {name} is on {t.device} but q is on {q.device}")
    if rotary_cos.shape != rotary_sin.shape:
        raise InputValueError(f"fastattn: rotary_cos {_shape(rotary_cos)} and rotary_sin {_shape(rotary_sin)} must "
                              f"have the same shape")
    if k is None:
        raise InputValueError("fastattn: rotary_cos/rotary_sin rotate the new keys: pass k and v to append (as "
                              "flash-attn requires)")
    seqlen_ro, rotary_dim = rotary_cos.shape[0], 2 * rotary_cos.shape[1]
    head_dim = q.shape[-1]
    if rotary_dim == 0 or rotary_dim > head_dim:
        raise InputValueError(f"fastattn: rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must lie in [2, head dim "
                              f"{head_dim}]; rotary_cos {_shape(rotary_cos)}")
    if seqlen_ro < capacity:
        raise InputValueError(f"fastattn: rotary_cos/rotary_sin cover {seqlen_ro} positions but the cache holds "
                              f"{capacity} per row: seqlen_ro must be >= the cache length")
    return rotary_dim


def apply(x, cos, sin, pos, interleaved: bool):
    """x (B, S, H, D) rotated at integer positions pos (B, S) by cos/sin (seqlen_ro, rotary_dim / 2)."""
    half = cos.shape[1]
    rd = 2 * half
    c = cos.float()[pos].unsqueeze(2)  # (B, S, half) -> (B, S, 1, half), broadcast over heads
    s = sin.float()[pos].unsqueeze(2)
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]  # (B, S, H, half) each: the pairs (0, 1), (2, 3), ...
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)  # (B,S,H,half,2) -> (B,S,H,rd)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]  # dims j and j + rotary_dim / 2
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def apply_kvcache(plan, q, k, rotary_cos, rotary_sin, interleaved: bool):
    """(q, k) as flash_attn_with_kvcache attends and appends them: rotated copies when rotary_cos/sin are given,
    the inputs themselves otherwise. plan: kvcache's validated call (lens, snew, window, capacity)."""
    if not check(rotary_cos, rotary_sin, q, k, plan.capacity):
        return q, k
    start = plan.lens.long().unsqueeze(1)  # (B, 1): the first new key's position in each row
    pos_k = start + torch.arange(plan.snew, device=q.device)  # (B, Snew)
    local = plan.wl >= 0 or plan.wr >= 0  # causal sets wr = 0
    pos_q = start + torch.arange(plan.Sq, device=q.device) if local else start.expand(plan.B, plan.Sq)  # (B, Sq)
    if local and plan.Sq > plan.snew and plan.B and not torch.compiler.is_compiling():
        # q's rows run past the new keys (whose positions the cache checks bound): their positions must have a row
        # of cos/sin too (flash-attn would read past it). One host sync, in this rare case only.
        last = int(pos_q[:, -1].max())
        if last >= rotary_cos.shape[0]:
            raise InputValueError(f"fastattn: q's last row sits at position {last} (cache_seqlens + {plan.Sq} query "
                                  f"rows - 1), past rotary_cos/rotary_sin's {rotary_cos.shape[0]} positions")
    return apply(q, rotary_cos, rotary_sin, pos_q, interleaved), apply(k, rotary_cos, rotary_sin, pos_k, interleaved)
