"""Test-side helpers for block calls (issue #14): cutting a sequence into blocks and an independent fp32
log-sum-exp merge of block results (the library's own merge is fastattn/blocks.py merge_; tests check the kernels
against this one so a bug in either shows)."""
import torch

INF = float("inf")


def merge_(o_acc, l_acc, o, l):
    """In place, fp32: (o_acc, l_acc) <- log-sum-exp merge with (o, l). o (..., S, Dv), l (..., S); lse = +inf marks
    an empty row (weight 0), as the kernels return it."""
    la, lb = (torch.where(x == INF, -INF, x) for x in (l_acc, l))
    m = torch.logaddexp(la, lb)
    safe = torch.where(torch.isneginf(m), 0.0, m)  # both empty: weights exp(-inf) = 0, no NaN
    o_acc.mul_(torch.exp(la - safe)[..., None]).add_(o * torch.exp(lb - safe)[..., None])
    l_acc.copy_(torch.where(torch.isneginf(m), INF, m))


def blocks(n, cuts):
    """[(start, end)] covering range(n), cut at the given positions (those outside (0, n) ignored)."""
    edges = [0] + [c for c in cuts if 0 < c < n] + [n]
    return list(zip(edges, edges[1:]))
