"""Public attention functions: an SDPA-compatible one and flash-attn-compatible ones.

Each validates its arguments, builds an AttnParams (q/k/v as (B, H, S, D) views, never copies), and hands it
to the dispatcher (fastattn/dispatch.py)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch
from .params import (AttnParams, check_alibi, check_cu_seqlens, check_dropout, check_qkv, check_window,
                     default_scale, last_dim_contiguous, normalize_mask)


def _sdpa_params(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if isinstance(query, torch.Tensor) and query.dim() == 3:
        # SDPA also takes (N, L, E): treat N as heads of one batch, (1, N, L, E); a 3-D mask pads the same way.
        query, key, value = (t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 3 else t
                             for t in (query, key, value))
    check_qkv(query, key, value, layout="bhsd")
    B, Hq, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"fastattn: query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for "
                         f"grouped-query attention")
    bias, kind = normalize_mask(attn_mask, query, B, Hq, Sq, Sk)
    query, key, value = last_dim_contiguous(query, key, value)
    return AttnParams(q=query, k=key, v=value, scale=default_scale(scale, D), attn_bias=bias, mask_kind=kind,
                      window_left=-1, window_right=0 if is_causal else -1, bottom_right=False,
                      dropout_p=check_dropout(dropout_p))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend: Optional[str] = None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Args:
        query: (B, Hq, Sq, D)   key: (B, Hkv, Sk, D)   value: (B, Hkv, Sk, Dv); any strides. 3-D (N, L, E)
            inputs are accepted as in PyTorch. Hq must equal Hkv unless enable_gqa=True (then Hq % Hkv == 0).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (B, Hq, Sq, Sk).
        dropout_p: dropout on the attention probabilities, applied whenever > 0 (as in PyTorch's function).
        is_causal: query i sees keys j <= i (top-left alignment, as PyTorch). May be combined with attn_mask.
        scale: defaults to 1/sqrt(D).
        backend: 'auto' (default) or a backend name; see fastattn.explain and `python -m fastattn.info`.

    Returns: (B, Hq, Sq, Dv) in query's dtype. Rows whose keys are all masked give 0 (PyTorch may give NaN).

    Equivalent PyTorch:
        s = (query @ key.transpose(-2, -1)) * scale  (+ mask, causal -> -inf above the diagonal)
        out = torch.softmax(s, -1) @ value
    """
    p = _sdpa_params(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    squeeze = isinstance(query, torch.Tensor) and query.dim() == 3
    out, _ = dispatch.run(p, backend)
    return out.squeeze(0) if squeeze else out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
            backend: Optional[str] = None) -> dispatch.Explanation:
    """Which backend would run this SDPA-style call, and why each other one was refused. print() it."""
    p = _sdpa_params(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return dispatch.explain_params(p, backend)


def _flash_params(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_lse, varlen=None):
    wl, wr = check_window(window_size)
    if causal:
        wr = 0
    if softcap is None or softcap < 0:
        raise ValueError(f"fastattn: softcap must be >= 0, got {softcap!r}")
    if varlen is None:
        check_qkv(q, k, v, layout="bshd", names=("q", "k", "v"))
        B, Sq, Hq, D = q.shape
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D) views
        extra = {}
    else:
        check_qkv(q, k, v, layout="bshd", names=("q", "k", "v"), varlen=True)
        cu_q, cu_k, max_q, max_k = varlen
        check_cu_seqlens(cu_q, "cu_seqlens_q", q.shape[0])
        check_cu_seqlens(cu_k, "cu_seqlens_k", k.shape[0])
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"fastattn: cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} "
                             f"must describe the same number of sequences")
        if cu_q.device != q.device or cu_k.device != q.device:
            raise ValueError(f"fastattn: cu_seqlens must be on q's device {q.device}")
        if not torch.compiler.is_compiling():
            lq, lk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
            if lq > max_q or lk > max_k:
                raise ValueError(f"fastattn: max_seqlen_q={max_q}, max_seqlen_k={max_k} are smaller than the longest "
                                 f"sequences ({lq}, {lk})")
        B, Hq, D = 1, q.shape[1], q.shape[2]
        # (total, H, D) -> (1, H, total, D) views
        qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        extra = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_q), max_seqlen_k=int(max_k))
    qt, kt, vt = last_dim_contiguous(qt, kt, vt)
    alibi = check_alibi(alibi_slopes, (cu_q.numel() - 1) if varlen else B, Hq, q.device)
    return AttnParams(q=qt, k=kt, v=vt, scale=default_scale(softmax_scale, D), window_left=wl, window_right=wr,
                      bottom_right=True, softcap=float(softcap), alibi_slopes=alibi, dropout_p=check_dropout(dropout_p),
                      deterministic=bool(deterministic), return_lse=bool(return_lse), **extra)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend: Optional[str] = None):
    """flash-attn's flash_attn_func: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> (B, Sq, Hq, Dv).

    Hq % Hkv == 0 gives GQA/MQA. causal and window_size align bottom-right when Sq != Sk:
        Sq=2, Sk=5 causal:  1 1 1 1 0      Sq=5, Sk=2 causal:  0 0   (rows with no key give 0)
                            1 1 1 1 1                          0 0
                                                               0 0
                                                               1 0
                                                               1 1
    window_size=(left, right): query i sees keys in [i + Sk - Sq - left, i + Sk - Sq + right]; -1 = unlimited.
    softcap > 0: scores become softcap * tanh(scores / softcap). alibi_slopes: fp32 (Hq,) or (B, Hq).
    return_attn_probs=True returns (out, softmax_lse (B, Hq, Sq) fp32, None): the probabilities themselves are
    never materialised (flash-attn returns them only for testing).
    """
    p = _flash_params(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)
    out, lse = dispatch.run(p, backend)
    out = out.transpose(1, 2)  # (B, H, Sq, Dv) -> (B, Sq, H, Dv)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           backend: Optional[str] = None):
    """flash-attn's flash_attn_varlen_func: packed sequences without padding.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_seqlens_q/k int32 (N+1,) cumulative
    lengths starting at 0; sequence n is rows [cu[n], cu[n+1]). Returns (total_q, Hq, Dv); with
    return_attn_probs, (out, softmax_lse (Hq, total_q), None). Causal/window align bottom-right per sequence.
    """
    if block_table is not None:
        raise NotImplementedError("fastattn: flash_attn_varlen_func(block_table=...) (paged KV) is not supported; "
                                  "use flash_attn_with_kvcache")
    p = _flash_params(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    out, lse = dispatch.run(p, backend)
    out = out[0].transpose(0, 1)  # (1, H, total, Dv) -> (total, H, Dv)
    return (out, lse[0], None) if return_attn_probs else out


from .kvcache import flash_attn_with_kvcache  # noqa: E402  (re-exported)

__all__ = ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
           "explain"]
