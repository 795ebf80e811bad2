"""Random inputs for a case, in every layout the implementations take, and the runner each mode times."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .cases import Case


@dataclass
class Inputs:
    """One case's tensors. q/k/v are (B, H, S, D), contiguous or (Case.bshd) views of (B, S, H, D) memory (decode:
    q (B, Hq, 1, D), k/v (B, Hkv, Sk, D))."""
    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor                  # (B, Hq, Sq, D); zero on padded query rows (the loss ignores them)
    mask: Optional[torch.Tensor]        # bool (B, 1, 1, Sk), True = attend; padding cases only
    lengths: torch.Tensor               # int32 (B,) valid tokens per sequence
    row_valid: torch.Tensor             # bool (B, 1, Sq, 1): query rows that are real tokens

    @property
    def cu_seqlens(self) -> torch.Tensor:
        cu = torch.zeros(self.case.batch + 1, dtype=torch.int32, device=self.q.device)
        cu[1:] = torch.cumsum(self.lengths, 0)
        return cu

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, S, D) padded -> (total, H, D) packed valid tokens (varlen layout)."""
        B, H, S, D = t.shape
        keep = self.row_valid.reshape(B, S)
        return t.transpose(1, 2)[keep]  # (B, S, H, D)[keep] -> (total, H, D)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(total, H, D) packed -> (B, H, S, D) with zeros at padded positions."""
        B, S = self.case.batch, self.row_valid.shape[2]
        out = t.new_zeros(B, S, t.shape[1], t.shape[2])
        out[self.row_valid.reshape(B, S)] = t
        return out.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)  # generated where used: no host-to-device copies
    dt = case.torch_dtype
    B, H, Hkv, Sq, Sk, D = case.batch, case.heads, case.heads_kv, case.seqlen_q, case.seqlen_k, case.head_dim

    def rnd(B, H, S, D):
        if case.bshd:  # (B, S, H, D) -> (B, H, S, D) view
            return torch.randn(B, S, H, D, generator=g, device=device, dtype=dt).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g, device=device, dtype=dt)

    q, k, v, dout = rnd(B, H, Sq, D), rnd(B, Hkv, Sk, D), rnd(B, Hkv, Sk, D), rnd(B, H, Sq, D)
    lengths = torch.tensor(case.lengths(), dtype=torch.int32, device=device)
    pos = torch.arange(Sk, device=device)
    mask = None
    row_valid = torch.ones(B, 1, Sq, 1, dtype=torch.bool, device=device)
    if case.padding:
        mask = (pos.view(1, Sk) < lengths.view(B, 1)).view(B, 1, 1, Sk)
        row_valid = (torch.arange(Sq, device=device).view(1, Sq) < lengths.view(B, 1)).view(B, 1, Sq, 1)
        dout = dout * row_valid
    return Inputs(case, q, k, v, dout, mask, lengths, row_valid)


@dataclass
class Runner:
    """A ready-to-time implementation of one case.

    forward() returns the output in the implementation's own layout; to_bhsd maps it (or a gradient of a leaf)
    back to (B, H, S, D) for the correctness check. leaves are the differentiable inputs, dout the matching
    output gradient. context() is entered once around all calls (e.g. SDPA's sdpa_kernel backend choice)."""
    forward: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor]
    dout: torch.Tensor
    to_bhsd: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    notes: List[str] = field(default_factory=list)


def leaves_for(inp: Inputs, grad: bool, tensors=None):
    ts = tensors if tensors is not None else (inp.q, inp.k, inp.v)
    return [t.detach().clone().requires_grad_(grad) for t in ts]


def step_for(runner: Runner, mode: str) -> Callable[[], object]:
    """The callable that is timed for a mode. bwd times the backward of one recorded forward (retain_graph),
    fwd_bwd a fresh forward plus its backward; fwd and decode run without autograd."""
    if mode in ("fwd", "decode"):
        def step():
            with torch.no_grad():
                return runner.forward()
        return step
    if mode == "bwd":
        out = runner.forward()
        return lambda: torch.autograd.grad(out, runner.leaves, runner.dout, retain_graph=True)
    if mode == "fwd_bwd":
        return lambda: torch.autograd.grad(runner.forward(), runner.leaves, runner.dout)
    raise ValueError(f"unknown mode {mode!r}")
