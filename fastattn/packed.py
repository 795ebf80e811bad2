"""flash-attn's packed entry points: q, k, v (or k, v) stacked in one tensor, as a fused QKV projection produces.

Thin wrappers: each splits the packed tensor into strided views (no copy) and calls flash_attn_func or
flash_attn_varlen_func, so every backend, check and gradient is theirs; autograd gathers the three gradients back
into one packed gradient. Signatures, layouts and return values are flash-attn 2's."""
from typing import Optional

import torch

from .functional import flash_attn_func, flash_attn_varlen_func
from .lean import fx_node
from .params import InputTypeError, InputValueError, _shape


def _unpack(t, name: str, n: int, axis: int, layout: str):
    """Views t.unbind(axis) after checking that t is a tensor with n entries on `axis` and the right rank."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"fastattn: {name} must be a torch.Tensor, got {type(t).__name__}")
    rank = len(layout.split(","))
    if t.dim() != rank or t.shape[axis] != n:
        raise InputValueError(f"fastattn: {name} must be {rank}-D {layout} with {n} on dim {axis}, got shape {_shape(t)}")
    return t.unbind(axis)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend: Optional[str] = None):
    """flash-attn's flash_attn_qkvpacked_func: qkv (B, S, 3, H, D) -> out (B, S, H, D).

    Same as flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...); the gradient is one (B, S, 3, H, D)
    tensor. return_attn_probs=True returns (out, softmax_lse (B, H, S), S_dmask (empty))."""
    if isinstance(qkv, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node
        return fx_node(flash_attn_qkvpacked_func, qkv, locals())
    q, k, v = _unpack(qkv, "qkv", 3, 2, "(B, S, 3, H, D)")  # each (B, S, H, D), strided views
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend: Optional[str] = None):
    """flash-attn's flash_attn_kvpacked_func: q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D) -> out (B, Sq, Hq, D).

    Same as flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], ...), GQA/MQA and bottom-right causal alignment
    included."""
    if isinstance(q, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node
        return fx_node(flash_attn_kvpacked_func, q, locals())
    k, v = _unpack(kv, "kv", 2, 2, "(B, Sk, 2, Hkv, D)")  # each (B, Sk, Hkv, D), strided views
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend: Optional[str] = None):
    """flash-attn's flash_attn_varlen_qkvpacked_func: qkv (total, 3, H, D), cu_seqlens int32 (N+1,) ->
    out (total, H, D). Queries and keys share cu_seqlens and max_seqlen."""
    if isinstance(qkv, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node
        return fx_node(flash_attn_varlen_qkvpacked_func, qkv, locals())
    q, k, v = _unpack(qkv, "qkv", 3, 1, "(total, 3, H, D)")  # each (total, H, D), strided views
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    backend: Optional[str] = None):
    """flash-attn's flash_attn_varlen_kvpacked_func: q (total_q, Hq, D), kv (total_k, 2, Hkv, D) ->
    out (total_q, Hq, D)."""
    if isinstance(q, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node
        return fx_node(flash_attn_varlen_kvpacked_func, q, locals())
    k, v = _unpack(kv, "kv", 2, 1, "(total_k, 2, Hkv, D)")  # each (total_k, Hkv, D), strided views
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


__all__ = ["flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func"]
