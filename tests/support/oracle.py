"""The float64 oracle and the tolerance rule, in one place for every backend.

The oracle is written independently of fastattn (no fastattn imports): explicit index arithmetic for
visibility, a gather for GQA, an explicit dropout mask. Run in float64 it is X_ref; run in the inputs'
low precision it is X_base, "the naive algorithm run entirely in p" of the tolerance rule (README, Tests):

    max|X_fast - X_ref| <= 2 * max|X_base - X_ref| + floor,   floor = eps(p) * max|X_ref|
    fp32: max|X_fast - X_ref| <= 1e-5 * max|X_ref|
The rule itself is fastattn/benchmark/tolerance.py, shared with the benchmark's correctness flag.
"""
from __future__ import annotations

import torch

from fastattn.benchmark.tolerance import EPS, FP32_REL, tolerance


def oracle_attention(q, k, v, *, scale, mask=None, window=(-1, -1), bottom_right=False, softcap=0.0,
                     alibi_slopes=None, dropout_mask=None, dropout_p=0.0, dtype=torch.float64, masked="fill"):
    """Naive attention computed in `dtype`. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv).

    mask: bool (True = attend) or float (additive), broadcastable to (B, Hq, Sq, Sk).
    window: (left, right), -1 unlimited; causal is right = 0. bottom_right aligns the diagonal at Sk - Sq.
    dropout_mask: bool (B, Hq, Sq, Sk) of kept probabilities (scaled by 1 / (1 - dropout_p)).
    Rows with no visible key give 0. NaN/Inf inputs propagate; where they sit at a position the mask hides, the
    answer depends on how masking is done, and `masked` picks one (the fuzz test accepts either "add" or "skip"):
      "fill": hidden scores are set to -inf, then P @ V (a NaN value row reaches queries that do not see it: 0 * NaN);
      "add":  PyTorch's SDPA math path: -inf is added (a +inf or NaN hidden score makes the row NaN), then P @ V;
      "skip": hidden keys are left out entirely, as a fused kernel that skips masked tiles does."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    head = torch.arange(Hq, device=q.device) // (Hq // Hkv)  # kv head serving each query head
    k, v = k[:, head], v[:, head]  # (B, Hq, Sk, D), (B, Hq, Sk, Dv)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device).view(Sq, 1)
    j = torch.arange(Sk, device=q.device).view(1, Sk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).view(-1, Hq, 1, 1)
        s = s - slopes * (i + Sk - Sq - j).abs().to(dtype)
    diag = i + (Sk - Sq if bottom_right else 0)
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if window[0] >= 0:
        allowed = allowed & (j >= diag - window[0])
    if window[1] >= 0:
        allowed = allowed & (j <= diag + window[1])
    allowed = allowed.expand(B, Hq, Sq, Sk)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(dtype)
    if masked == "add":
        s = s + torch.zeros((), dtype=dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    else:
        s = s.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)  # rows with no visible key
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask.to(dtype) / (1.0 - dropout_p)
    if masked == "skip":
        pv = p.unsqueeze(-1) * v.unsqueeze(2)  # (B, Hq, Sq, Sk, Dv)
        return pv.masked_fill(torch.isneginf(s).unsqueeze(-1), 0.0).sum(-2)  # s: -inf where masked
    return torch.einsum("bhij,bhjd->bhid", p, v)


def bias_terms(params, name: str) -> float:
    """check_rule's magnitude for the gradient of parameter `name` (params: name -> parameter of the reference
    model, gradients filled). A linear bias's gradient sums the per-token terms dY_t its weight's gradient weighs by
    the inputs (sum_t dY_t against sum_t dY_t x_t^T) and may cancel where the weight's does not, e.g. a key bias
    under RoPE: its terms are the weight gradient's size. 0 for any other parameter."""
    weight = params.get(name[:-len("bias")] + "weight") if name.endswith(".bias") else None
    return float(weight.grad.abs().max()) if weight is not None and weight.grad is not None else 0.0


def floor_for(dtype, ref) -> float:
    """Rounding noise of p at the result's magnitude: one ulp (eps) at the largest |X_ref|."""
    return EPS[dtype] * max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-6)


# PyTorch's own CPU SDPA (the `sdpa` backend) rounds P and dS to fp16/bf16 for its backward products and sums dK/dV
# per block in that precision: its dK/dV error reached 2.04x the naive backward's (beyond the floor) in a CI draw and
# up to 1.8x in 1280 more (B2 H4, 17-257 keys, GQA 4:1, causal or not). fastattn's own kernels stay at 2 (the cpu
# backend measured at most 1.54x); torch's gradients get this factor, which a wrapping bug (a wrong head, scale or
# mask; errors of order 1) still exceeds by far.
TORCH_CPU_GRAD_FACTOR = 3.0


# In fp32 its CPU backward errs past the fp32 rule's 1e-5 too: dQ 1.9e-5 of max|dQ| at D=256, causal (AMD EPYC Zen 4,
# FASTATTN_FUZZ_SEED=4242 case 198, against a tolerance of 1.5e-5 with the naive fp32 backward's error and the inherent
# term), and up to 2.1e-5 (dV) in 40 draws at D=128-256 against torch's float64 SDPA. torch's fp32 gradients are held
# to this relative bound instead, which a wrapping bug (errors of order 1) still exceeds by far.
TORCH_CPU_FP32_REL = 4e-5


def _torch_cpu(backend, device) -> bool:
    """Whether the result is PyTorch's own CPU SDPA's (the sdpa backend on a CPU tensor), not a fastattn kernel's."""
    return backend == "sdpa" and str(device).startswith("cpu")


def base_fp32_rel(backend, device, grad_name) -> float:
    """check_rule's fp32_rel for one result: FP32_REL, but TORCH_CPU_FP32_REL for the sdpa backend's gradients from a
    CPU tensor (the error is torch's, as base_factor's)."""
    return TORCH_CPU_FP32_REL if _torch_cpu(backend, device) and grad_name in ("dq", "dk", "dv") else FP32_REL


def base_factor(backend, device, dtype, grad_name) -> float:
    """The rule's multiple of the naive error for one result: 2, but TORCH_CPU_GRAD_FACTOR for the sdpa backend's
    dK and dV from a CPU tensor in fp16/bf16 (the error is torch's, not a fastattn kernel's)."""
    low = dtype in (torch.float16, torch.bfloat16)
    return TORCH_CPU_GRAD_FACTOR if _torch_cpu(backend, device) and low and grad_name in ("dk", "dv") else 2.0


def check_rule(name, fast, ref, base, dtype, *, fp32_rel=FP32_REL, magnitude=0.0, inherent=0.0, factor=2.0):
    """Returns (ok, message). fast/ref/base are tensors of one output or gradient. magnitude: the size of the terms
    X is summed from when X itself can cancel to ~0 (a gradient with a single key is exactly 0, its rounding noise is
    not); the relative bound and the floor then scale with max(max|X_ref|, magnitude). inherent: the error the
    error of the O a backward reads forces on dQ/dK (delta_error), added in every precision. factor: base_factor's."""
    fast, ref = fast.detach().double().cpu(), ref.detach().double().cpu()
    if fast.shape != ref.shape:
        return False, f"{name}: shape {tuple(fast.shape)} != expected {tuple(ref.shape)}"
    if fast.numel() == 0:
        return True, f"{name}: empty"
    # Non-finite values are wrong unless the oracle has the same infinity (lse = +inf for rows with no key).
    same_inf = torch.isinf(ref) & (fast == ref)
    bad = ~torch.isfinite(fast) & ~same_inf
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        return False, f"{name}: {int(bad.sum())} non-finite values (first at {idx}) — unwritten or NaN output"
    if (torch.isinf(ref) & ~same_inf).any():
        return False, f"{name}: finite values where the oracle has +-inf (rows with no visible key)"
    if base is not None:
        base = base.detach().double().cpu()
        base = base.masked_fill(torch.isinf(ref) & (base == ref), 0)
    fast, ref = fast.masked_fill(same_inf, 0), ref.masked_fill(same_inf, 0)
    diff = (fast - ref).abs()
    err, mean = float(diff.max()), float(diff.mean())
    scale_ref = max(float(ref.abs().max()), magnitude)
    base_err = float((base - ref).abs().max()) if base is not None else None  # (fp32 callers may pass ref: 0)
    tol, rule = tolerance(dtype, scale_ref, base_err, fp32_rel, inherent, factor)
    where = tuple(int(x) for x in torch.nonzero(diff == diff.max())[0].tolist())
    msg = (f"{name}: max_err={err:.3g} (at {where}) mean_err={mean:.3g} tol={tol:.3g} = {rule}")
    return err <= tol, msg


def assert_rule(name, fast, ref, base, dtype, **kw):
    ok, msg = check_rule(name, fast, ref, base, dtype, **kw)
    print(msg)
    assert ok, msg


def assert_param_grads(ref, grads) -> None:
    """Each fp32 gradient grads[name] against the float64 reference model ref's p.grad, a linear bias's at its
    terms' size (bias_terms)."""
    params = dict(ref.named_parameters())
    for name, p in params.items():
        assert_rule(f"d {name}", grads[name], p.grad, None, torch.float32, magnitude=bias_terms(params, name))


def lse_magnitude(q, k, scale) -> float:
    """check_rule's magnitude for a log-sum-exp: the size of the terms of a score, scale·max Σ_d |q_d k_d|.
    With one visible key the lse is that score, which can cancel to ~0 while its rounding noise does not.
    q (B, Hq, Sq, D), k (B, Hkv, L, D)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    q, k = q.detach().double().cpu().abs(), k.detach().double().cpu().abs()
    k = k[:, torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])]  # (B, Hkv, L, D) -> (B, Hq, L, D)
    return float(torch.einsum("bhid,bhjd->bhij", q, k).max()) * scale


def lse_reference(q, k, scale, window, softcap, alibi, dtype=torch.float64, bias=None):
    """Log-sum-exp of the visible scores (bottom-right) computed in dtype (float64: the reference; the inputs'
    precision: the naive baseline of the tolerance rule), +inf for rows with no visible key.
    q (B, Hq, Sq, D), k (B, Hkv, L, D); bias: additive, broadcastable to (B, Hq, Sq, L), after softcap and alibi."""
    q, k = q.to(dtype), k.to(dtype)
    Hq, Sq, L = q.shape[1], q.shape[2], k.shape[2]
    k = k[:, torch.arange(Hq) // (Hq // k.shape[1])]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(Sq).view(Sq, 1), torch.arange(L).view(1, L)
    if alibi is not None:
        s = s - alibi.to(dtype).view(1, Hq, 1, 1) * (i + L - Sq - j).abs().to(dtype)
    if bias is not None:
        s = s + bias.to(dtype)
    vis = torch.ones(Sq, L, dtype=torch.bool)
    if window[0] >= 0:
        vis &= j >= i + L - Sq - window[0]
    if window[1] >= 0:
        vis &= j <= i + L - Sq + window[1]
    lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def delta_error(attend, q, k, view_q, view_k, dout, out, out_ref, scale):
    """max|error| of (dQ, dK) that the error of O forces on a FlashAttention-style backward, which forms
    delta_i = sum_d dO_id O_id from the O it is given (O in the inputs' precision, with the forward's own error, which
    the rule checks on its own): with Delta_i = sum_d dO_id (O - O_ref)_id, dS_ij gains -P_ij Delta_i, so dQ_i gains
    -scale Delta_i (P K)_i and dK_j gains -scale sum_i P_ij Delta_i Q_i (first order, exact in float64).

    attend(q, k, v) -> the float64 oracle's output in the caller's layout; q, k: the leaves, view_q/view_k: leaf ->
    the view the call sees (q's view is laid out like out but for the last dim), so the errors come back summed onto
    the leaves as their gradients are; dout: the upstream gradient as the kernel gets it; out: the O the backward
    reads. Softcap's tanh' factor is left out (it is at most 1)."""
    ql = q.detach().double().requires_grad_(True)
    kl = k.detach().double().requires_grad_(True)
    d = (dout.double() * (out.detach().double() - out_ref.detach().double())).sum(-1, keepdim=True)  # Delta_i
    qv = view_q(ql)
    pk = attend(qv.detach(), view_k(k.detach().double()), view_k(kl))  # (P K)_i, shaped like q's view
    dq, = torch.autograd.grad(qv, ql, d * pk.detach())
    dk, = torch.autograd.grad(pk, kl, d * qv.detach())  # sum_i P_ij Delta_i Q_i, summed as dK is
    top = lambda t: float(t.abs().max()) if t.numel() else 0.0  # noqa: E731 (empty: Sq, Sk or a head dim is 0)
    return scale * top(dq), scale * top(dk)


def fwd_bwd_inherent(attend, q, k, dout, out, out_ref, scale):
    """check_rule's inherent for (out, dq, dk, dv): delta_error's terms for dQ and dK, 0 for out and dV. attend, scale:
    delta_error's; q, k, dout, out laid out as attend takes them (out: the O the backward read)."""
    same = lambda t: t  # noqa: E731 (the leaves are the views the call sees)
    return (0.0, *delta_error(attend, q, k, same, same, dout, out, out_ref, scale), 0.0)


def oracle_fwd_bwd(q, k, v, dout, dtype, **kw):
    """(out, dq, dk, dv) of oracle_attention run in `dtype` (kw: its keywords) on q, k, v (B, H, S, D) under dout."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = oracle_attention(*leaves, dtype=dtype, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype)))


def assert_fwd_bwd(name, got, q, k, v, dout, dtype, **kw):
    """got = (out, dq, dk, dv) of one call on q, k, v (B, H, S, D) under the upstream gradient dout, out being the O
    its backward read: each against the float64 oracle (kw: oracle_attention's keywords, scale among them) with the
    oracle run in `dtype` as the rule's base, dQ and dK with the error the rounded O forces on the backward's delta
    (delta_error): a row that sees a few keys of nearly equal weight cancels there, past twice the naive error."""
    ref = oracle_fwd_bwd(q, k, v, dout, torch.float64, **kw)
    base = oracle_fwd_bwd(q, k, v, dout, dtype, **kw)
    # delta's error shifts dS_ij by -P_ij Delta_i with P before dropout: the oracle without its dropout mask
    plain = {n: a for n, a in kw.items() if n not in ("dropout_mask", "dropout_p")}
    attend = lambda q_, k_, v_: oracle_attention(q_, k_, v_, **plain)  # noqa: E731 (float64)
    inherent = fwd_bwd_inherent(attend, q, k, dout, got[0], ref[0], kw["scale"])
    for label, g, r, b, e in zip(("out", "dq", "dk", "dv"), got, ref, base, inherent):
        assert_rule(f"{name} {label}".lstrip(), g, r, b, dtype, inherent=e)
