"""`reference`: naive softmax(QKᵀ·scale)V in PyTorch — any device, any dtype, every feature.

It materialises the (Sq, Sk) score matrix, so it is the benchmarks' "naive" baseline and the semantic
definition the fused backends are held to (tests compare everything with a float64 oracle of their own)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import AttnParams
from .base import Backend


def visibility(sq: int, sk: int, window_left: int, window_right: int, bottom_right: bool, device, positions=None):
    """Bool (Sq, Sk), or (B, 1, Sq, Sk) with positions: True where key j is visible to query i; None when every key
    is visible. positions = (q_pos (B, Sq), k_pos (B, Sk)): global positions of a block call (csrc/ops.cpp)."""
    if window_left < 0 and window_right < 0:
        return None
    qp, kp = _positions(sq, sk, bottom_right, device, positions)
    vis = torch.ones(qp.shape[0], 1, sq, sk, dtype=torch.bool, device=device) if positions else \
        torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        vis &= kp >= qp - window_left
    if window_right >= 0:
        vis &= kp <= qp + window_right
    return vis


def _positions(sq: int, sk: int, bottom_right: bool, device, positions):
    """(query positions, key positions) broadcastable to the score matrix: (Sq, 1) and (1, Sk), or from a block
    call's positions (B, 1, Sq, 1) and (B, 1, 1, Sk)."""
    if positions is not None:
        q_pos, k_pos = positions
        return q_pos[:, None, :, None], k_pos[:, None, None, :]  # (B, Sq) -> (B, 1, Sq, 1); (B, Sk) -> (B, 1, 1, Sk)
    i = torch.arange(sq, device=device).unsqueeze(1)  # (Sq, 1)
    j = torch.arange(sk, device=device).unsqueeze(0)  # (1, Sk)
    return i + (sk - sq if bottom_right else 0), j


def alibi_bias(slopes, sq: int, sk: int, B: int, H: int, device, positions=None):
    """flash-attn's ALiBi: -slope * |i + Sk - Sq - j| (block calls: -slope * |q_pos - k_pos|), fp32 (B|1, H, Sq, Sk)."""
    qp, kp = _positions(sq, sk, True, device, positions)
    dist = (qp - kp).abs().float()  # (Sq, Sk) or (B, 1, Sq, Sk)
    s = slopes.view(-1, H, 1, 1) if slopes.dim() == 2 else slopes.view(1, H, 1, 1)
    return -s * dist


def scores(q, k, scale, bias=None, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0,
           alibi_slopes=None, positions=None):
    """The masked score matrix S (B, Hq, Sq, Sk) in the inputs' dtype (K expanded for GQA), -inf where invisible,
    and tanh(S_raw / softcap) (None without softcap) for the backward."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if Hq != k.shape[1]:  # GQA: each K/V head serves Hq // Hkv query heads
        k = k.repeat_interleave(Hq // k.shape[1], dim=1)  # (B, Hq, Sk, D)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Sq, Sk, B, Hq, q.device, positions).to(s.dtype)
    if bias is not None:
        s = s + bias
    vis = visibility(Sq, Sk, window_left, window_right, bottom_right, q.device, positions)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    return s, t


def naive_attention(q, k, v, scale, bias=None, window_left=-1, window_right=-1, bottom_right=False,
                    softcap=0.0, alibi_slopes=None, dropout_p=0.0, positions=None):
    """Dense naive attention, computed in at least fp32 as PyTorch's math SDPA does (fp16/bf16 inputs are widened,
    the output rounded once: fp16 scores past 65504 had turned rows into NaN). Returns (out (B,H,Sq,Dv) in the
    inputs' dtype, lse (B,H,Sq) fp32)."""
    dtype = q.dtype
    wt = torch.promote_types(dtype, torch.float32)
    if wt != dtype:
        q, k, v = (t.to(wt) for t in (q, k, v))
        bias = None if bias is None else bias.to(wt)
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Sk == 0:  # no keys: every row is empty
        # An empty slice's sum is an exact 0 that keeps the graph (gradients come back as zeros); q.sum() * 0
        # would turn a NaN/Inf in q into NaN rows.
        zero = q.narrow(-1, 0, 0).sum() + k.sum() + v.sum()
        out = q.new_zeros(B, Hq, Sq, v.shape[-1]) + zero
        return out.to(dtype), q.new_full((B, Hq, Sq), float("inf"), dtype=torch.float32)
    if Hq != Hkv:
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Sk, Dv)
    s, _ = scores(q, k, scale, bias, window_left, window_right, bottom_right, softcap, alibi_slopes, positions)
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)  # rows with no visible key -> output 0, lse +inf
    s = s.masked_fill(empty, 0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0)
    lse = torch.logsumexp(s.float(), dim=-1).masked_fill(empty.squeeze(-1), float("inf"))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v).to(dtype), lse


def block_grads(dout, q, k, v, out, lse, scale, bias=None, window_left=-1, window_right=-1, softcap=0.0,
                alibi_slopes=None, positions=None):
    """One block's (dq, dk, dv) against a merged lse (csrc/ops.cpp bwd), spelled out in at least fp32:
    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q."""
    wt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, dout, out = (t.to(wt) for t in (q, k, v, dout, out))
    B, Hq, Sq, _ = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    s, t = scores(q, k, scale, None if bias is None else bias.to(wt), window_left, window_right, False, softcap,
                  alibi_slopes, positions)
    p = torch.exp(s - lse.to(wt).unsqueeze(-1)).nan_to_num(nan=0.0)  # lse +inf (empty row): exp(-inf) = 0
    p = p.masked_fill(torch.isinf(lse).unsqueeze(-1), 0)
    ve = v.repeat_interleave(g, dim=1) if g > 1 else v  # (B, Hq, Sk, Dv)
    ke = k.repeat_interleave(g, dim=1) if g > 1 else k  # (B, Hq, Sk, D)
    dv = p.transpose(-1, -2) @ dout  # (B, Hq, Sk, Dv)
    dp = dout @ ve.transpose(-1, -2)  # (B, Hq, Sq, Sk)
    delta = (dout * out).sum(-1, keepdim=True)  # (B, Hq, Sq, 1)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = scale * (ds @ ke)
    dk = scale * (ds.transpose(-1, -2) @ q)  # (B, Hq, Sk, D)
    if g > 1:  # GQA: a K/V head's gradient sums its query heads
        dk = dk.view(B, Hkv, g, *dk.shape[2:]).sum(2)  # (B, Hkv*g, Sk, D) -> (B, Hkv, Sk, D)
        dv = dv.view(B, Hkv, g, *dv.shape[2:]).sum(2)  # (B, Hkv*g, Sk, Dv) -> (B, Hkv, Sk, Dv)
    return dq, dk, dv


class ReferenceBackend(Backend):
    name = "reference"
    description = "naive PyTorch softmax(QK^T*scale)V; materialises the score matrix"
    devices = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims = (1, 1 << 16)
    features = frozenset({"causal", "bottom_right", "window", "mask", "mask_grad", "dropout", "gqa", "varlen",
                          "softcap", "alibi", "grad", "deterministic", "lse", "dv_ne_d", "block", "forward_ad",
                          "func_transform"})

    def extra_reasons(self, p: AttnParams):
        if p.dropout_p > 0 and p.is_block:
            return ["dropout in a block call (its dropout is torch's RNG, not keyed on positions)"]
        if p.dropout_p > 0 and p.head_start:
            return ["dropout with head_start (its dropout is torch's RNG, not keyed on heads)"]
        return []

    def forward(self, p: AttnParams):
        out, lse = self._forward(p)
        return (out.float(), lse) if p.out_fp32 else (out, lse)

    def block_backward(self, p: AttnParams, dout, out, lse, dq_acc, dk_acc, dv_acc) -> None:
        kw = dict(window_left=p.window_left, window_right=p.window_right, softcap=p.softcap)
        for sq, sk, n in self._sequences(p):
            dq, dk, dv = block_grads(dout[:, :, sq], p.q[:, :, sq], p.k[:, :, sk], p.v[:, :, sk], out[:, :, sq],
                                     lse[:, :, sq], p.scale, _rows(p.attn_bias, sq, sk), alibi_slopes=_slopes(p, n),
                                     positions=_block_positions(p, sq, sk, n), **kw)
            dq_acc[:, :, sq] += dq
            dk_acc[:, :, sk] += dk
            dv_acc[:, :, sk] += dv

    @staticmethod
    def _sequences(p: AttnParams):
        """(query rows, key rows, sequence index) of each sequence: one for dense calls (n None), N for varlen."""
        if not p.is_varlen:
            return [(slice(None), slice(None), None)]
        cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
        return [(slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1]), n) for n in range(len(cq) - 1)]

    def _forward(self, p: AttnParams):
        if p.is_block and p.q.dtype in (torch.float16, torch.bfloat16):
            # A block's backward (block_grads) recomputes P = exp(S - lse) in fp32 from the lse returned here, so
            # that lse must come from fp32 scores too: from scores rounded to bf16 it is off by up to |S| * 2^-9,
            # and every P of the row with it (dQ then missed the tolerance on ~1 seed in 250).
            out, lse = self._forward_in(p, torch.float32)
            return out.to(p.q.dtype), lse
        return self._forward_in(p, None)

    def _forward_in(self, p: AttnParams, dtype):
        """naive_attention per sequence, on the inputs cast to dtype (None: their own)."""
        q, k, v, bias = (t if t is None or dtype is None else t.to(dtype) for t in (p.q, p.k, p.v, p.attn_bias))
        kw = dict(window_left=p.window_left, window_right=p.window_right, bottom_right=p.bottom_right,
                  softcap=p.softcap, dropout_p=p.dropout_p)
        if not p.is_varlen:
            return naive_attention(q, k, v, p.scale, bias, alibi_slopes=p.alibi_slopes,
                                   positions=_block_positions(p, slice(None), slice(None), None), **kw)
        # Varlen: one naive call per packed sequence; q is (1, H, total_q, D).
        cq, ck = p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist()
        outs, lses = [], []
        for n in range(len(cq) - 1):
            sl_q, sl_k = slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])
            al = p.alibi_slopes
            if al is not None and al.dim() == 2:
                al = al[n]
            o, lse = naive_attention(q[:, :, sl_q], k[:, :, sl_k], v[:, :, sl_k], p.scale,
                                     alibi_slopes=al, positions=_block_positions(p, sl_q, sl_k, n), **kw)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _block_positions(p: AttnParams, sq: slice, sk: slice, n):
    """Global (q_pos (B|1, Sq), k_pos (B|1, Sk)) of a block call's rows sq/sk (sequence n of a varlen call), or None."""
    if not p.is_block:
        return None
    lq = len(range(p.q.shape[2])[sq])
    lk = len(range(p.k.shape[2])[sk])
    qs, ks = (p.q_start, p.k_start) if n is None else (p.q_start[n:n + 1], p.k_start[n:n + 1])
    q_pos = qs.long()[:, None] + torch.arange(lq, device=p.device)  # (B|1, Sq)
    k_pos = ks.long()[:, None] + torch.arange(lk, device=p.device)  # (B|1, Sk)
    return q_pos, k_pos


def _rows(bias, sq: slice, sk: slice):
    return None if bias is None else bias[:, :, sq, sk]


def _slopes(p: AttnParams, n):
    al = p.alibi_slopes
    if al is not None and al.dim() == 2 and n is not None:
        al = al[n]
    return al
