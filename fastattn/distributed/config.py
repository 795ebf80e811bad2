"""CPConfig: how attention is split over a context-parallel group, and why (`explain`).

Strategies (every one exact: the same attention as one process on the whole sequence):
  ring:      K/V travel around the ring (W-1 hops, each overlapped with one block of compute); per-block (out, lse)
             merged in fp32. No head constraint. Zigzag balance makes causal work equal on every rank.
  allgather: one all-gather of K/V, one block call of the local queries against the keys they see (no merge), a
             reduce-scatter of dK/dV. Memory for the whole K/V on every rank; communication not overlapped.
  ulysses:   all-to-all from sequence shards to head shards, ordinary full-sequence attention on H/W heads, and back.
             Needs H % W == 0 (K/V heads are replicated when H_kv does not divide by W). Dropout is exact: each
             rank's block call keys it on its global query heads (head_start).
  hybrid:    ("USP") on a 2-D group of W = U x R ranks: Ulysses over the U ranks of one dim, then a ring over the R
             ranks of the other on the head-sharded pieces (hybrid.py has the token layout). Needs H % U == 0 only;
             the ring moves 1/U of the K/V per hop and runs R - 1 hops instead of W - 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch

from . import layout
from . import hybrid
from .comm import CPComm, HybridComm, as_comm, comm_name

STRATEGIES = ("auto", "ring", "allgather", "ulysses", "hybrid")


class CPUnsupportedError(ValueError):
    """The requested combination cannot be computed exactly by this strategy (the message says why)."""


class Plan(NamedTuple):
    strategy: str
    reason: str
    kv_repeat: int = 1  # ulysses, hybrid: each K/V head replicated this many times


@dataclass(frozen=True)
class CPConfig:
    """Context-parallel settings of one group (or of the two groups of a 2-D one, for the hybrid strategy).

    group: a ProcessGroup, a 1-D DeviceMesh, a CPComm (e.g. LocalComm, TorchComm.from_mesh(mesh, "cp")) or None
        (the default process group); or, for the hybrid strategy, a 2-D DeviceMesh with dims named "ulysses" and
        "ring" or a HybridComm.
    ulysses_group, ring_group: the hybrid strategy's two groups given one by one (each a ProcessGroup, a 1-D
        DeviceMesh such as mesh["ulysses"], or a CPComm), instead of group.
    strategy: "auto" | "ring" | "allgather" | "ulysses" on one group, "auto" | "hybrid" on a 2-D one (see the module
        docstring; `explain` says what auto picks).
    balance: the token layout of the inputs: "zigzag" (head-tail, the balanced one for causal; torch's order) or
        "contiguous". Every strategy accepts either; all sequence-indexed buffers must be sharded alike (`shard`:
        on a 2-D group the layout is the ring dim's, each ring shard cut into U pieces; hybrid.py).
    grad_comm_dtype: dtype of the dK/dV accumulators that travel the ring (fp32: no rounding per hop; the inputs'
        dtype halves the backward's bytes but rounds at every hop) and of the reduce-scatter of allgather.
    kv_replication: ulysses may replicate K/V heads when H_kv is not divisible by W (the hybrid: by U).
    backend: the fastattn backend of the block calls (None: fastattn's usual choice, FASTATTN_BACKEND /
        use_backend included, among the backends that declare the block contract).
    check_shapes: before each call, all-gather the input shapes, dtypes and the call's settings (strategy, balance,
        causal, window, softcap, scale, dropout, ALiBi slopes) and fail on any mismatch across ranks, or on every
        rank where one rank refused its inputs (one small collective per call; a mismatch otherwise shows up as a
        communication error or a hang on some backends, or as a silently different result).
    """
    group: Any = None
    strategy: str = "auto"
    balance: str = "zigzag"
    grad_comm_dtype: torch.dtype = torch.float32
    kv_replication: bool = True
    backend: Optional[str] = None
    check_shapes: bool = False
    ulysses_group: Any = None
    ring_group: Any = None
    comm: CPComm = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"fastattn.distributed: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        layout.check_balance(self.balance)
        if self.grad_comm_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"fastattn.distributed: grad_comm_dtype must be float32, float16 or bfloat16, got "
                             f"{self.grad_comm_dtype}")
        if self.ulysses_group is not None or self.ring_group is not None:
            if self.ulysses_group is None or self.ring_group is None or self.group is not None:
                raise ValueError("fastattn.distributed: a 2-D CP group is ulysses_group= and ring_group= together "
                                 "(and no group=), or group= a 2-D DeviceMesh with dims 'ulysses' and 'ring'")
            comm = HybridComm(as_comm(self.ulysses_group), as_comm(self.ring_group))
        else:
            comm = as_comm(self.group)
        object.__setattr__(self, "comm", comm)
        if self.is_2d and self.strategy not in ("auto", "hybrid"):
            raise ValueError(f"fastattn.distributed: strategy={self.strategy!r} runs on one group; this config has "
                             f"a 2-D group (ulysses U={self.mesh_shape[0]} x ring R={self.mesh_shape[1]}): use "
                             f"strategy='hybrid' (or 'auto'), or a CPConfig over one group")
        if not self.is_2d and self.strategy == "hybrid":
            raise ValueError("fastattn.distributed: strategy='hybrid' needs a 2-D group: ulysses_group= and "
                             "ring_group=, or group= a 2-D DeviceMesh with dims 'ulysses' and 'ring'")
        comm_name(self.comm)  # registered now, so that compiled code only reads the name

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def is_2d(self) -> bool:
        """A hybrid (Ulysses x ring) group."""
        return isinstance(self.comm, HybridComm)

    @property
    def mesh_shape(self) -> Optional[tuple]:
        """(U, R) of a 2-D group, None for one group."""
        return (self.comm.ulysses.world_size, self.comm.ring.world_size) if self.is_2d else None

    # layout helpers bound to this group
    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.is_2d:
            return hybrid.shard(x, dim, *self.mesh_shape, self.rank, self.balance)
        return layout.shard(x, dim, self.world_size, self.rank, self.balance)

    def unshard(self, x_local: torch.Tensor, dim: int) -> torch.Tensor:
        if self.is_2d:
            return self.unshard_list(list(self.comm.all_gather(x_local).unbind(0)), dim)  # (W, *s): rank order
        return layout.unshard(x_local, dim, self.comm, self.balance)

    def unshard_list(self, shards, dim: int) -> torch.Tensor:
        """The full sequence from every rank's shard, in rank order (no communication)."""
        if self.is_2d:
            return hybrid.unshard_list(shards, dim, *self.mesh_shape, self.balance)
        return layout.unshard_list(shards, dim, self.balance)

    def segments(self, local_len: int):
        """This rank's shard as runs of consecutive global positions (layout.Segment), local_len tokens per rank."""
        if self.is_2d:
            return hybrid.segments(local_len, *self.mesh_shape, self.rank, self.balance)
        return layout.segments(local_len, self.world_size, self.rank, self.balance)

    def global_positions(self, seq_len: int, device=None) -> torch.Tensor:
        if self.is_2d:
            return hybrid.global_positions(seq_len, *self.mesh_shape, self.rank, self.balance, device)
        return layout.global_positions(seq_len, self.world_size, self.rank, self.balance, device)

    # strategy choice
    def plan(self, *, heads_q: int, heads_kv: int, dropout: bool = False) -> Plan:
        """The strategy for these heads, with its reason; raises CPUnsupportedError for a refused combination.
        dropout does not change the choice (every strategy drops exactly what one process drops); it is accepted
        so that callers can describe the whole call."""
        if self.is_2d:
            return self._plan_2d(heads_q, heads_kv)
        W = self.world_size
        ulysses_ok, why_not = _ulysses_check(heads_q, heads_kv, W, self.kv_replication)
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

    def _plan_2d(self, hq: int, hkv: int) -> Plan:
        U, R = self.mesh_shape
        ok, why_not = _ulysses_check(hq, hkv, U, self.kv_replication, "U")
        if not ok:
            raise CPUnsupportedError(f"fastattn.distributed: strategy={self.strategy!r} on a 2-D group (ulysses U={U} "
                                     f"x ring R={R}) refused: the hybrid shards heads over U: {why_not}; a 1-D "
                                     f"CPConfig over the flattened group can run the ring instead")
        rep = _kv_repeat(hkv, U)
        reason = (f"a 2-D group: Ulysses over U={U} ({hq // U} of H={hq} query heads per rank"
                  + (f", K/V heads replicated {rep}x" if rep > 1 else "")
                  + f"), then a {self.balance} ring over R={R} on the head-sharded pieces: 4 all-to-alls over U, "
                    f"{R - 1} K/V hops of 1/U of the heads")
        return Plan("hybrid", "requested: " + reason if self.strategy == "hybrid" else reason, rep)

    def explain(self, *, heads_q: int, heads_kv: int, causal: bool = False, dropout: bool = False) -> str:
        """Which strategy runs for these heads and why, or why it is refused."""
        shape = f" (ulysses U={self.mesh_shape[0]} x ring R={self.mesh_shape[1]})" if self.is_2d else ""
        head = (f"fastattn.distributed: W={self.world_size}{shape}, strategy={self.strategy!r}, "
                f"balance={self.balance!r}, H={heads_q}, H_kv={heads_kv}, causal={causal}, dropout={dropout}")
        try:
            p = self.plan(heads_q=heads_q, heads_kv=heads_kv, dropout=dropout)
        except CPUnsupportedError as e:
            return f"{head}\n  refused: {e}"
        lines = [head, f"  -> {p.strategy}: {p.reason}"]
        if p.strategy == "ring" and causal and self.balance == "contiguous" and self.world_size > 1:
            lines.append("  note: causal with the contiguous layout leaves rank 0 idle most of the ring (rank W-1 "
                         "computes W blocks, rank 0 one); balance='zigzag' evens the work")
        if p.strategy == "hybrid" and causal and self.balance == "contiguous" and self.mesh_shape[1] > 1:
            lines.append("  note: causal with the contiguous layout leaves ring rank 0 idle most of the ring (ring "
                         "rank R-1 computes R blocks, ring rank 0 one); balance='zigzag' evens the work")
        return "\n".join(lines)


def _kv_repeat(heads_kv: int, W: int) -> int:
    """Replication of each K/V head so that the K/V heads split evenly over W ranks, groups kept whole."""
    a, b = W, heads_kv  # Euclid, not math.gcd: under torch.compile with dynamic shapes heads_kv is a SymInt, which
    while b:            # dynamo cannot pass to math.gcd (a graph break, an error under fullgraph=True)
        a, b = b, a % b
    return W // a


def _ulysses_check(hq: int, hkv: int, W: int, replication: bool, name: str = "W"):
    """Whether heads split over W ranks (named `name` in the reason) for Ulysses; (ok, why not). Dropout is no
    reason: the block calls key it on the global query head (head_start), as one process does."""
    if hq % W:
        return False, f"the {hq} query heads are not divisible by {name}={W}"
    rep = _kv_repeat(hkv, W)
    if rep > 1 and not replication:
        return False, f"the {hkv} K/V heads are not divisible by {name}={W} and kv_replication=False"
    if hq % (hkv * rep):
        return False, (f"replicating the {hkv} K/V heads {rep}x for {name}={W} gives {hkv * rep} heads, which do "
                       f"not divide the {hq} query heads")
    return True, ""
