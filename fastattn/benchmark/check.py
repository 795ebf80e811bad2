"""Correctness of every timed implementation, checked once per (implementation, kind of case) at a small size,
with the project's tolerance rule (tolerance.py, the same code the tests use) for the output and every gradient;
ref is naive attention in float64 and base the same naive attention in the case's dtype. Padded query rows are
excluded (the loss ignores them; varlen does not compute them)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from fastattn.backends.reference import naive_attention

from .cases import Case
from .inputs import Inputs, Runner, step_for
from .tolerance import tolerance


def _naive(case: Case, inp: Inputs, dtype, grad: bool):
    leaves = [t.detach().to(dtype).requires_grad_(grad) for t in (inp.q, inp.k, inp.v)]
    bias = None
    if inp.mask is not None:
        bias = torch.zeros(inp.mask.shape, dtype=dtype, device=inp.q.device).masked_fill(~inp.mask, float("-inf"))
    with torch.set_grad_enabled(grad):
        out, _ = naive_attention(*leaves, 1.0 / case.head_dim ** 0.5, bias, window_right=0 if case.causal else -1)
    outs = [out]
    if grad:
        outs += list(torch.autograd.grad(out, leaves, inp.dout.to(dtype)))
    return [o.detach().double() for o in outs]


def check(case: Case, inp: Inputs, runner: Runner) -> Tuple[bool, str]:
    """Runs the case's mode once through `runner` and compares output (and gradients) with the rule."""
    grad = case.mode in ("bwd", "fwd_bwd")
    with runner.context():
        if grad:
            out = runner.forward()
            grads = torch.autograd.grad(out, runner.leaves, runner.dout)
            got = [out] + list(grads)
        else:
            got = [step_for(runner, case.mode)()]
    got = [runner.to_bhsd(g.detach()).double() for g in got]
    ref = _naive(case, inp, torch.float64, grad)
    dt = case.torch_dtype
    base = _naive(case, inp, dt, grad) if dt != torch.float32 else None
    rows = inp.row_valid  # (B, 1, Sq, 1)
    worst, notes, ok = 0.0, [], True
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base or [None] * 4):
        if g.shape != r.shape:
            return False, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        keep = rows if name in ("out", "dq") else torch.ones_like(rows[:, :, :1])
        g, r = g * keep, r * keep
        if not torch.isfinite(g).all():
            return False, f"{name}: non-finite values"
        err = float((g - r).abs().max())
        tol, _ = tolerance(dt, float(r.abs().max()), None if b is None else float(((b * keep) - r).abs().max()))
        worst = max(worst, err / tol)
        if err > tol:
            ok = False
            notes.append(f"{name} err {err:.2e} > tol {tol:.2e}")
    return ok, ("; ".join(notes) if notes else f"max err/tol {worst:.2f}")


def small_check(impl, case: Case, device: str) -> Tuple[bool, str]:
    """Builds the small version of `case` for `impl` and checks it. Returns (ok, detail)."""
    from .inputs import make_inputs
    small = case.small()
    inp = make_inputs(small, device, seed=1234)
    runner = impl.build(small, inp, grad=small.mode in ("bwd", "fwd_bwd"))
    return check(small, inp, runner)


__all__: List[str] = ["check", "small_check"]
