"""Block decomposition for tests: one attention call computed as block pairs with global offsets, merged.

The unsplit call over (Sq, Sk) with bottom-right alignment is the block call with q_start = Sk - Sq, k_start = 0
(csrc/ops.cpp); splitting q at q_bounds and k/v at k_bounds, block (a, b) gets q_start = Sk - Sq + q_bounds[a] and
k_start = k_bounds[b]. The float64 oracle of the unsplit call is tests/support/oracle.py with bottom_right=True."""
from __future__ import annotations

import random
from typing import List, Optional

import torch

from fastattn.blocks import block_backward, block_forward, merge_

INF = float("inf")


def bounds(n: int, parts: int, rnd: random.Random) -> List[int]:
    """[0, ..., n]: `parts` pieces at random boundaries (some may be empty)."""
    cuts = sorted(rnd.randint(0, n) for _ in range(parts - 1))
    return [0] + cuts + [n]


def _pairs(q, k, qb, kb):
    """(query rows, key rows, {q_start, k_start}) of every block pair, positions as in the unsplit bottom-right call."""
    Sq, Sk = q.shape[2], k.shape[2]
    for a in range(len(qb) - 1):
        for b in range(len(kb) - 1):
            yield (slice(qb[a], qb[a + 1]), slice(kb[b], kb[b + 1]),
                   dict(q_start=Sk - Sq + qb[a], k_start=kb[b]))


def _cut(bias, rows, cols):
    return None if bias is None else bias[:, :, rows, cols]


def blockwise_forward(q, k, v, qb, kb, *, backend=None, **kw):
    """(out fp32, lse) of the whole call from every block pair (q rows qb[a]:qb[a+1], keys kb[b]:kb[b+1]), merged
    with fastattn.blocks.merge_. kw: block_forward's keywords except q_start/k_start (bias: full (B, H, Sq, Sk))."""
    B, Hq, Sq, _ = q.shape
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float32)
    lse = torch.full((B, Hq, Sq), float("inf"))
    bias = kw.pop("attn_bias", None)
    for rows, cols, starts in _pairs(q, k, qb, kb):
        o, l = block_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], **starts, attn_bias=_cut(bias, rows, cols),
                             backend=backend, **kw)
        merge_(out[:, :, rows], lse[:, :, rows], o, l)
    return out, lse


def blockwise_backward(dout, q, k, v, out, lse, qb, kb, *, backend=None, init: Optional[tuple] = None, **kw):
    """(dq, dk, dv) fp32 of the whole call from every block pair's block_backward into shared accumulators (given
    as `init`, which are added to; zeros otherwise). out (q.dtype) and lse are the merged ones."""
    if init is None:
        init = tuple(torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v))
    dq, dk, dv = init
    bias = kw.pop("attn_bias", None)
    for rows, cols, starts in _pairs(q, k, qb, kb):
        block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols], out[:, :, rows],
                       lse[:, :, rows], **starts, attn_bias=_cut(bias, rows, cols), dq_acc=dq[:, :, rows],
                       dk_acc=dk[:, :, cols], dv_acc=dv[:, :, cols], backend=backend, **kw)
    return dq, dk, dv


def cuts(n: int, at) -> List[tuple]:
    """[(start, end)] covering range(n), cut at the given positions (those outside (0, n) ignored)."""
    edges = [0] + [c for c in at if 0 < c < n] + [n]
    return list(zip(edges, edges[1:]))


def reference_merge_(o_acc, l_acc, o, l):
    """An fp32 log-sum-exp merge written independently of fastattn.blocks.merge_ (logaddexp form), so kernel tests
    that use it do not share a bug with the library. In place; lse = +inf marks an empty row (weight 0)."""
    la, lb = (torch.where(x == INF, -INF, x) for x in (l_acc, l))
    m = torch.logaddexp(la, lb)
    safe = torch.where(torch.isneginf(m), 0.0, m)  # both empty: weights exp(-inf) = 0, no NaN
    o_acc.mul_(torch.exp(la - safe)[..., None]).add_(o * torch.exp(lb - safe)[..., None])
    l_acc.copy_(torch.where(torch.isneginf(m), INF, m))
