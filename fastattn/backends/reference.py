"""`reference`: naive softmax(QKᵀ·scale)V in PyTorch — any device, any dtype, every feature.

It materialises the (Sq, Sk) score matrix, so it is the benchmarks' "naive" baseline and the semantic
definition the fused backends are held to (tests compare everything with a float64 oracle of their own)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import AttnParams
from .base import Backend


def visibility(sq: int, sk: int, window_left: int, window_right: int, bottom_right: bool, device):
    """Bool (Sq, Sk): True where key j is visible to query i; None when every key is visible."""
    if window_left < 0 and window_right < 0:
        return None
    i = torch.arange(sq, device=device).unsqueeze(1)  # (Sq, 1)
    j = torch.arange(sk, device=device).unsqueeze(0)  # (1, Sk)
    diag = i + (sk - sq if bottom_right else 0)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        vis &= j >= diag - window_left
    if window_right >= 0:
        vis &= j <= diag + window_right
    return vis


def alibi_bias(slopes, sq: int, sk: int, B: int, H: int, device):
    """flash-attn's ALiBi: -slope * |i + Sk - Sq - j|, as fp32 (B|1, H, Sq, Sk)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    dist = (i + sk - sq - j).abs().float()  # (Sq, Sk)
    s = slopes.view(-1, H, 1, 1) if slopes.dim() == 2 else slopes.view(1, H, 1, 1)
    return -s * dist


def naive_attention(q, k, v, scale, bias=None, window_left=-1, window_right=-1, bottom_right=False,
                    softcap=0.0, alibi_slopes=None, dropout_p=0.0):
    """Dense naive attention in the inputs' dtype. Returns (out (B,H,Sq,Dv), lse (B,H,Sq) fp32)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Sk == 0:  # no keys: every row is empty
        zero = (q.sum() + k.sum() + v.sum()) * 0  # keeps the graph so gradients come back as zeros
        return q.new_zeros(B, Hq, Sq, v.shape[-1]) + zero, q.new_full((B, Hq, Sq), float("inf"), dtype=torch.float32)
    if Hq != Hkv:  # GQA: each K/V head serves Hq // Hkv query heads
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Sk, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Sk, Dv)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Sq, Sk, B, Hq, q.device).to(s.dtype)
    if bias is not None:
        s = s + bias
    vis = visibility(Sq, Sk, window_left, window_right, bottom_right, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)  # rows with no visible key -> output 0, lse +inf
    s = s.masked_fill(empty, 0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0)
    lse = torch.logsumexp(s.float(), dim=-1).masked_fill(empty.squeeze(-1), float("inf"))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v), lse


class ReferenceBackend(Backend):
    name = "reference"
    description = "naive PyTorch softmax(QK^T*scale)V; materialises the score matrix"
    devices = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims = (1, 1 << 16)
    features = frozenset({"causal", "bottom_right", "window", "mask", "mask_grad", "dropout", "gqa", "varlen",
                          "softcap", "alibi", "grad", "deterministic", "lse", "dv_ne_d"})

    def forward(self, p: AttnParams):
        kw = dict(window_left=p.window_left, window_right=p.window_right, bottom_right=p.bottom_right,
                  softcap=p.softcap, dropout_p=p.dropout_p)
        if not p.is_varlen:
            return naive_attention(p.q, p.k, p.v, p.scale, p.attn_bias, alibi_slopes=p.alibi_slopes, **kw)
        # Varlen: one naive call per packed sequence; q is (1, H, total_q, D).
        cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
        outs, lses = [], []
        for n in range(len(cq) - 1):
            sl_q, sl_k = slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])
            al = p.alibi_slopes
            if al is not None and al.dim() == 2:
                al = al[n]
            o, lse = naive_attention(p.q[:, :, sl_q], p.k[:, :, sl_k], p.v[:, :, sl_k], p.scale,
                                     alibi_slopes=al, **kw)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
