"""CPConfig: how attention is split over a context-parallel group, and why (`explain`).

Strategies (every one exact: the same attention as one process on the whole sequence):
  ring:      K/V travel around the ring (W-1 hops, each overlapped with one block of compute); per-block (out, lse)
             merged in fp32. No head constraint. Zigzag balance makes causal work equal on every rank.
  allgather: one all-gather of K/V, one block call of the local queries against the keys they see (no merge), a
             reduce-scatter of dK/dV. Memory for the whole K/V on every rank; communication not overlapped.
  ulysses:   all-to-all from sequence shards to head shards, ordinary full-sequence attention on H/W heads, and back.
             Needs H % W == 0 (K/V heads are replicated when H_kv does not divide by W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

from . import layout
from .comm import CPComm, as_comm, comm_name

STRATEGIES = ("auto", "ring", "allgather", "ulysses")


class CPUnsupportedError(ValueError):
    """The requested combination cannot be computed exactly by this strategy (the message says why)."""


class Plan(NamedTuple):
    strategy: str
    reason: str
    kv_repeat: int = 1  # ulysses: each K/V head replicated this many times


@dataclass(frozen=True)
class CPConfig:
    """Context-parallel settings of one group.

    group: a ProcessGroup, a 1-D DeviceMesh, a CPComm (e.g. LocalComm, TorchComm.from_mesh(mesh, "cp")) or None
        (the default process group).
    strategy: "auto" | "ring" | "allgather" | "ulysses" (see the module docstring; `explain` says what auto picks).
    balance: the token layout of the inputs: "zigzag" (head-tail, the balanced one for causal; torch's order) or
        "contiguous". Every strategy accepts either; all sequence-indexed buffers must be sharded alike.
    grad_comm_dtype: dtype of the dK/dV accumulators that travel the ring (fp32: no rounding per hop; the inputs'
        dtype halves the backward's bytes but rounds at every hop) and of the reduce-scatter of allgather.
    kv_replication: ulysses may replicate K/V heads when H_kv is not divisible by W.
    backend: the fastattn backend of the block calls (None: fastattn's usual choice, FASTATTN_BACKEND /
        use_backend included, among the backends that declare the block contract).
    check_shapes: before each call, all-gather the input shapes and fail on any mismatch across ranks (one small
        collective per call; a mismatch otherwise shows up as a communication error on some backends).
    """
    group: Any = None
    strategy: str = "auto"
    balance: str = "zigzag"
    grad_comm_dtype: torch.dtype = torch.float32
    kv_replication: bool = True
    backend: Optional[str] = None
    check_shapes: bool = False
    comm: CPComm = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"fastattn.distributed: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        layout.check_balance(self.balance)
        if self.grad_comm_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"fastattn.distributed: grad_comm_dtype must be float32, float16 or bfloat16, got "
                             f"{self.grad_comm_dtype}")
        object.__setattr__(self, "comm", as_comm(self.group))
        comm_name(self.comm)  # registered now, so that compiled code only reads the name

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        return self.comm.rank

    # layout helpers bound to this group
    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return layout.shard(x, dim, self.world_size, self.rank, self.balance)

    def unshard(self, x_local: torch.Tensor, dim: int) -> torch.Tensor:
        return layout.unshard(x_local, dim, self.comm, self.balance)

    def global_positions(self, seq_len: int, device=None) -> torch.Tensor:
        return layout.global_positions(seq_len, self.world_size, self.rank, self.balance, device)

    # strategy choice
    def plan(self, *, heads_q: int, heads_kv: int, dropout: bool = False) -> Plan:
        """The strategy for these heads, with its reason; raises CPUnsupportedError for a refused combination."""
        W = self.world_size
        ulysses_ok, why_not = _ulysses_check(heads_q, heads_kv, W, self.kv_replication, dropout)
        if self.strategy == "ulysses":
            if not ulysses_ok:
                raise CPUnsupportedError(f"fastattn.distributed: strategy='ulysses' refused: {why_not}")
            rep = _kv_repeat(heads_kv, W)
            return Plan("ulysses", "requested" + (f"; each K/V head replicated {rep}x" if rep > 1 else ""), rep)
        if self.strategy in ("ring", "allgather"):
            return Plan(self.strategy, "requested")
        if W == 1:
            return Plan("ring", "one rank: a single local block call, no communication")
        if ulysses_ok:
            rep = _kv_repeat(heads_kv, W)
            return Plan("ulysses", f"heads allow it (H={heads_q}, H_kv={heads_kv}, W={W}"
                        + (f", K/V heads replicated {rep}x" if rep > 1 else "")
                        + "): 4 all-to-alls, one full-sequence kernel call per rank, no merge", rep)
        return Plan("ring", f"ulysses not possible ({why_not}); the ring has no head constraint and overlaps its "
                    f"K/V hops with compute")

    def explain(self, *, heads_q: int, heads_kv: int, causal: bool = False, dropout: bool = False) -> str:
        """Which strategy runs for these heads and why, or why it is refused."""
        head = (f"fastattn.distributed: W={self.world_size}, strategy={self.strategy!r}, balance={self.balance!r}, "
                f"H={heads_q}, H_kv={heads_kv}, causal={causal}, dropout={dropout}")
        try:
            p = self.plan(heads_q=heads_q, heads_kv=heads_kv, dropout=dropout)
        except CPUnsupportedError as e:
            return f"{head}\n  refused: {e}"
        lines = [head, f"  -> {p.strategy}: {p.reason}"]
        if p.strategy == "ring" and causal and self.balance == "contiguous" and self.world_size > 1:
            lines.append("  note: causal with the contiguous layout leaves rank 0 idle most of the ring (rank W-1 "
                         "computes W blocks, rank 0 one); balance='zigzag' evens the work")
        return "\n".join(lines)


def _kv_repeat(heads_kv: int, W: int) -> int:
    """Replication of each K/V head so that the K/V heads split evenly over W ranks, groups kept whole."""
    return W // math.gcd(heads_kv, W)


def _ulysses_check(hq: int, hkv: int, W: int, replication: bool, dropout: bool):
    if dropout:
        return False, ("dropout: the kernels key the dropout mask by the local head index, so head-sharded "
                       "attention would not reproduce the single-process mask")
    if hq % W:
        return False, f"the {hq} query heads are not divisible by W={W}"
    rep = _kv_repeat(hkv, W)
    if rep > 1 and not replication:
        return False, f"the {hkv} K/V heads are not divisible by W={W} and kv_replication=False"
    if hq % (hkv * rep):
        return False, (f"replicating the {hkv} K/V heads {rep}x for W={W} gives {hkv * rep} heads, which do not "
                       f"divide the {hq} query heads")
    return True, ""
