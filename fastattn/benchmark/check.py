"""Correctness of every timed implementation with the project's tolerance rule (tolerance.py, the same code the
tests use): ref is naive attention in float64, base the same naive attention in the case's dtype. Two checks:
- once per (implementation, kind of case) at a small odd size, the output and every gradient;
- on every timed case at its own size, the output and dQ on a sample of query rows (rows are independent there, so
  the float64 reference costs rows x keys, not the whole score matrix): an error that appears only at the timed
  sizes is seen, and `fastattn.auto` is checked on the route it takes for the timed call, which can differ from the
  small case's.
Padded query rows are excluded (the loss ignores them; varlen does not compute them)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastattn.backends.reference import naive_attention

from .cases import Case
from .inputs import Inputs, Runner, step_for
from .tolerance import tolerance

SAMPLED_ROWS = 32  # query rows checked at the timed size (both ends and random ones between)


def sample_rows(sq: int, n: int = SAMPLED_ROWS, seed: int = 0) -> Optional[torch.Tensor]:
    """Sorted query-row indices to check at the timed size: the first and last row and random ones between;
    None (every row) when there are no more than n."""
    if sq <= n:
        return None
    g = torch.Generator().manual_seed(seed)
    middle = torch.randperm(sq - 2, generator=g)[: n - 2] + 1
    return torch.cat([torch.tensor([0, sq - 1]), middle]).sort().values


def _naive(case: Case, inp: Inputs, dtype, grad: bool, rows: Optional[torch.Tensor] = None):
    """[out, dq, dk, dv] (grad) or [out] of naive attention in dtype, as float64; with rows, only those query rows:
    [out, dq] (a row's output and dQ depend on no other query row)."""
    q = inp.q if rows is None else inp.q[:, :, rows.to(inp.q.device)]  # (B, H, R, D)
    leaves = [q.detach().to(dtype).requires_grad_(grad)]
    leaves += [t.detach().to(dtype).requires_grad_(grad and rows is None) for t in (inp.k, inp.v)]
    bias = None
    if inp.mask is not None:
        bias = torch.zeros(inp.mask.shape, dtype=dtype, device=inp.q.device).masked_fill(~inp.mask, float("-inf"))
    positions = None
    if rows is not None and case.causal:  # causal needs the rows' own positions (Sq == Sk in the sweeps)
        B, Sk = case.batch, inp.k.shape[2]
        positions = (rows.to(inp.q.device).view(1, -1).expand(B, -1),
                     torch.arange(Sk, device=inp.q.device).view(1, Sk).expand(B, Sk))
    dout = inp.dout if rows is None else inp.dout[:, :, rows.to(inp.q.device)]
    with torch.set_grad_enabled(grad):
        out, _ = naive_attention(*leaves, 1.0 / case.head_dim ** 0.5, bias, window_right=0 if case.causal else -1,
                                 positions=positions)
    outs = [out]
    if grad:
        wrt = leaves if rows is None else leaves[:1]
        outs += list(torch.autograd.grad(out, wrt, dout.to(dtype)))
    return [o.detach().double() for o in outs]


def check(case: Case, inp: Inputs, runner: Runner, rows: Optional[torch.Tensor] = None) -> Tuple[bool, str]:
    """Runs the case's mode once through `runner` and compares output (and gradients) with the rule; with rows,
    the output and dQ on those query rows only."""
    grad = case.mode in ("bwd", "fwd_bwd")
    with runner.context():
        if grad:
            out = runner.forward()
            grads = torch.autograd.grad(out, runner.leaves, runner.dout)
            got = [out] + list(grads)
        else:
            got = [step_for(runner, case.mode)()]
    got = [runner.to_bhsd(g.detach()) for g in got]
    valid = inp.row_valid  # (B, 1, Sq, 1)
    if rows is not None:
        got = [g[:, :, rows.to(g.device)] for g in got[:2]]  # out, dq: (B, H, R, D)
        valid = valid[:, :, rows.to(valid.device)]
    got = [g.double() for g in got]
    ref = _naive(case, inp, torch.float64, grad, rows)
    dt = case.torch_dtype
    base = _naive(case, inp, dt, grad, rows) if dt != torch.float32 else None
    worst, notes, ok = 0.0, [], True
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base or [None] * 4):
        if g.shape != r.shape:
            return False, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        keep = valid if name in ("out", "dq") else torch.ones_like(valid[:, :, :1])
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


def sized_check(case: Case, inp: Inputs, runner: Runner) -> Tuple[bool, str]:
    """The timed case itself, on the runner that is timed: output and dQ on sampled query rows (every row when
    there are few, e.g. decode)."""
    return check(case, inp, runner, sample_rows(case.seqlen_q))


__all__: List[str] = ["check", "small_check", "sized_check", "sample_rows"]
