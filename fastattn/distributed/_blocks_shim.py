"""TEMPORARY stand-in for fastattn.blocks until it lands on main (removed before merge). Naive fp32 math."""
from __future__ import annotations

import torch


def _scores(q, k, q_start, k_start, scale, window_size, alibi_slopes):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kk = k.float().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    qp = (torch.arange(Sq) + q_start).view(Sq, 1)
    kp = (torch.arange(Sk) + k_start).view(1, Sk)
    if alibi_slopes is not None:
        s = s - alibi_slopes.float().view(1, Hq, 1, 1) * (qp - kp).abs().float()
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    wl, wr = window_size
    if wl >= 0:
        vis &= kp >= qp - wl
    if wr >= 0:
        vis &= kp <= qp + wr
    return s.masked_fill(~vis, float("-inf"))


def _window(causal, window_size):
    wl, wr = window_size
    return (wl, 0) if causal else (wl, wr)


def block_forward(q, k, v, *, q_start, k_start, scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, rng=None, backend="auto", **kw):
    assert softcap == 0 and dropout_p == 0
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = _scores(q, k, q_start, k_start, scale, _window(causal, window_size), alibi_slopes)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - lse.masked_fill(empty, 0).unsqueeze(-1)).masked_fill(empty.unsqueeze(-1), 0)
    vv = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(p, vv), lse.masked_fill(empty, float("inf"))


def block_backward(dout, q, k, v, out, lse, *, q_start, k_start, scale=None, causal=False, window_size=(-1, -1),
                   softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng=None, backend="auto", dq_acc=None,
                   dk_acc=None, dv_acc=None, **kw):
    assert softcap == 0 and dropout_p == 0
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    g = q.shape[1] // k.shape[1]
    s = _scores(q, k, q_start, k_start, scale, _window(causal, window_size), alibi_slopes)
    p = torch.exp(s - lse.unsqueeze(-1))  # +inf lse -> 0
    vv = v.float().repeat_interleave(g, dim=1)
    kk = k.float().repeat_interleave(g, dim=1)
    do = dout.float()
    dvv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vv.transpose(-1, -2))
    delta = (do * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kk) * scale
    dkk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    B, Hkv, Sk = k.shape[0], k.shape[1], k.shape[2]
    dk = dkk.view(B, Hkv, g, Sk, -1).sum(2)
    dv = dvv.view(B, Hkv, g, Sk, -1).sum(2)
    res = []
    for x, acc in ((dq, dq_acc), (dk, dk_acc), (dv, dv_acc)):
        if acc is not None:
            acc += x
            res.append(acc)
        else:
            res.append(x)
    return tuple(res)


def merge_(out_acc, lse_acc, out_b, lse_b):
    a = lse_acc.masked_fill(torch.isposinf(lse_acc), float("-inf"))
    b = lse_b.masked_fill(torch.isposinf(lse_b), float("-inf"))
    m = torch.maximum(a, b)
    none = torch.isneginf(m)
    m0 = m.masked_fill(none, 0)
    wa, wb = torch.exp(a - m0), torch.exp(b - m0)
    tot = (wa + wb).masked_fill(none, 1)
    out_acc.copy_((wa.unsqueeze(-1) * out_acc + wb.unsqueeze(-1) * out_b) / tot.unsqueeze(-1))
    lse_acc.copy_((m0 + torch.log(tot)).masked_fill(none, float("inf")))


def dropout_rng():
    g = torch.randint(0, 2**62, (2,))
    return int(g[0]), int(g[1])
