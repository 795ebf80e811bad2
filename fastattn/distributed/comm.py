"""The communicators context parallelism runs on: the only file that names torch.distributed collectives.

A communicator (`CPComm`) is one rank's view of the CP group. The attention code calls only these methods, so the
same per-rank code runs over
  - `TorchComm`: a torch.distributed ProcessGroup or one dim of a DeviceMesh (gloo on CPU, NCCL on GPUs);
  - `LocalComm`: W simulated ranks in ONE process, each rank's code in its own thread (`run_local`), exchanging
    tensors through queues and barriers. Tests use it for the bulk of the matrix; on a single GPU it is how the
    GPU kernels get CP coverage (NCCL cannot run two ranks on one device).
  - `CountingComm`: wraps either and counts calls and bytes, so tests can assert exact communication;
  - `HybridComm`: the 2-D group of the hybrid strategy, a Ulysses group x a ring group (two of the above).

torch.distributed may be missing from the torch build (`dist.is_available()` False): LocalComm still works, TorchComm
raises a clear error.

Rules that keep the ring from hanging (a rank that skips or reorders a hop deadlocks every other rank):
  - a hop posts its sends and receives together, in one batch_isend_irecv, even ranks sending first and odd ranks
    receiving first (the order TransformerEngine uses);
  - every rank calls the same methods in the same order; the attention code never skips a hop on a rank that has
    nothing to compute.
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.distributed as dist

# Seconds a LocalComm rank waits for its peers before it fails (instead of hanging a test run).
LOCAL_TIMEOUT_S = 60.0


class CPCommError(RuntimeError):
    """A collective could not complete: a peer failed, timed out, or called a different collective."""


class PeerFailedError(CPCommError):
    """This rank's collective was abandoned because another rank failed (the other rank's error says why)."""


@runtime_checkable
class Handle(Protocol):
    def wait(self) -> None: ...


@runtime_checkable
class CPComm(Protocol):
    """One rank's view of the context-parallel group. Tensors are this rank's; every rank calls the same methods
    in the same order with tensors of the same shapes and dtypes."""
    rank: int
    world_size: int

    def ring_hop(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor]) -> Handle:
        """Starts one ring hop: send[i] goes to rank + 1, recv[i] is filled from rank - 1 (mod W). Returns a handle
        whose wait() completes both; neither list may be touched before."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(*s) -> (W, *s): slot j holds rank j's x."""
        ...

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(W, *s) -> (*s): the sum over ranks of their slot `rank`."""
        ...

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """(W, *s) -> (W, *s): out[j] is rank j's x[rank]."""
        ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        ...


# --------------------------------------------------------------------------------------------------------------
# torch.distributed

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn): one place to follow renames.
# A torch built without distributed has neither (its torch.distributed is a stub): TorchComm refuses to start there.
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)

class _Works:
    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


class TorchComm:
    """CPComm over a torch.distributed ProcessGroup (None = the default group) or one dim of a DeviceMesh."""

    def __init__(self, group: Optional["dist.ProcessGroup"] = None):
        if not dist.is_available():
            raise RuntimeError("fastattn.distributed: this torch build has no torch.distributed "
                               "(torch.distributed.is_available() is False); only LocalComm simulations can run")
        if not dist.is_initialized():
            raise RuntimeError("fastattn.distributed: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first (or use LocalComm for a simulation)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        # Global ranks of the ring neighbours (P2P ops take global ranks even inside a subgroup).
        self._next = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self._prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)

    @classmethod
    def from_mesh(cls, mesh, dim=None) -> "TorchComm":
        """The group of one DeviceMesh dim (a name or an index; None for a 1-D mesh)."""
        if dim is None and mesh.ndim != 1:
            raise ValueError(f"fastattn.distributed: a {mesh.ndim}-D DeviceMesh needs dim= (one of "
                             f"{mesh.mesh_dim_names})")
        return cls(mesh.get_group(dim if dim is not None else 0))

    def ring_hop(self, send, recv) -> Handle:
        sends = [dist.P2POp(dist.isend, t, self._next, self.group) for t in send]
        recvs = [dist.P2POp(dist.irecv, t, self._prev, self.group) for t in recv]
        ops = sends + recvs if self.rank % 2 == 0 else recvs + sends
        return _Works(dist.batch_isend_irecv(ops))

    def all_gather(self, x):
        # Flat buffers: the *_single collectives concatenate along dim 0, and gloo checks that shape exactly.
        out = x.new_empty(self.world_size * x.numel())
        _all_gather(out, x.contiguous().view(-1), group=self.group)
        return out.view((self.world_size,) + tuple(x.shape))  # (W * n,) -> (W, *s)

    def reduce_scatter(self, x):
        out = x.new_empty(x.numel() // self.world_size)
        _reduce_scatter(out, x.contiguous().view(-1), op=dist.ReduceOp.SUM, group=self.group)
        return out.view(x.shape[1:])  # (n,) -> (*s)

    def all_to_all(self, x):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=self.group)
        return out

    def all_reduce(self, x):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


# --------------------------------------------------------------------------------------------------------------
# W simulated ranks in one process

class _LocalWorld:
    """State shared by the W threads of one simulation: P2P mailboxes and a slot array for collectives."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size = world_size
        self.timeout = timeout
        # mail[(r, n)]: the tensors of the n-th ring hop sent to rank r. Hops match in posting order, as P2P ops
        # between two ranks do, whatever order the receiver waits in (the backward has two hops in flight).
        self.mail: dict = {}
        self.lock = threading.Lock()
        self.slots: List[Optional[torch.Tensor]] = [None] * world_size
        self.ops: List[Optional[str]] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)

    def box(self, rank: int, hop: int) -> queue.Queue:
        with self.lock:
            return self.mail.setdefault((rank, hop), queue.Queue())

    def abort(self):
        self.barrier.abort()  # peers blocked in a collective fail at once instead of waiting for the timeout


class _LocalRecv:
    def __init__(self, comm: "LocalComm", recv, box: queue.Queue):
        self.comm, self.recv, self.box, self.done = comm, recv, box, False

    def wait(self) -> None:
        if self.done:
            return
        w = self.comm._world
        for buf in self.recv:
            try:
                t = self.box.get(timeout=w.timeout)
            except queue.Empty:
                raise CPCommError(f"fastattn.distributed LocalComm: rank {self.comm.rank} waited {w.timeout:g} s "
                                  "for a ring hop from its neighbour (a rank skipped a hop or failed)") from None
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise CPCommError(f"fastattn.distributed LocalComm: rank {self.comm.rank} expected "
                                  f"{tuple(buf.shape)} {buf.dtype} in a ring hop, got {tuple(t.shape)} {t.dtype}")
            buf.copy_(t)
        self.done = True


class LocalComm:
    """One simulated rank. Build all W with `LocalComm.world(W)` and run per-rank code with `run_local`."""

    def __init__(self, world: _LocalWorld, rank: int):
        self._world, self.rank, self.world_size = world, rank, world.world_size
        self._hops = 0

    @staticmethod
    def world(world_size: int, timeout: float = LOCAL_TIMEOUT_S) -> List["LocalComm"]:
        w = _LocalWorld(world_size, timeout)
        return [LocalComm(w, r) for r in range(world_size)]

    def ring_hop(self, send, recv) -> Handle:
        nxt, n = (self.rank + 1) % self.world_size, self._hops
        self._hops += 1
        box = self._world.box(nxt, n)
        for t in send:  # a send completes at once (the mailbox holds a copy), as an eager isend may
            box.put(t.detach().clone())
        return _LocalRecv(self, recv, self._world.box(self.rank, n))

    def _exchange(self, op: str, x: torch.Tensor) -> List[torch.Tensor]:
        """Every rank deposits x, then reads all W deposits. Checks that all ranks called the same op."""
        w = self._world
        w.slots[self.rank], w.ops[self.rank] = x.detach().clone(), op
        self._wait()
        if len(set(w.ops)) != 1 or len({(tuple(s.shape), s.dtype) for s in w.slots}) != 1:
            calls = ", ".join(f"rank {r}: {o} {tuple(s.shape)} {s.dtype}" for r, (o, s) in enumerate(zip(w.ops,
                                                                                                     w.slots)))
            self._wait()
            raise CPCommError(f"fastattn.distributed LocalComm: ranks disagree on a collective: {calls}")
        got = list(w.slots)
        self._wait()  # nobody overwrites a slot before every rank has read it
        return got

    def _wait(self):
        try:
            self._world.barrier.wait()
        except threading.BrokenBarrierError:
            raise PeerFailedError(f"fastattn.distributed LocalComm: rank {self.rank}: a peer failed or did not reach "
                              f"the collective within {self._world.timeout:g} s") from None

    def all_gather(self, x):
        return torch.stack(self._exchange("all_gather", x))

    def reduce_scatter(self, x):
        got = self._exchange("reduce_scatter", x)
        out = got[0][self.rank].clone()
        for g in got[1:]:  # rank order, as a deterministic reduction
            out += g[self.rank]
        return out

    def all_to_all(self, x):
        return torch.stack([g[self.rank] for g in self._exchange("all_to_all", x)])

    def all_reduce(self, x):
        got = self._exchange("all_reduce", x)
        total = got[0].clone()
        for g in got[1:]:
            total += g
        return x.copy_(total)


def run_local(world_size: int, fn: Callable, *args, timeout: float = LOCAL_TIMEOUT_S, wrap=None,
              mesh: Optional[Tuple[int, int]] = None, **kwargs):
    """Runs fn(comm, *args, **kwargs) for W simulated ranks, each in its own thread; returns the W results in rank
    order. wrap(comm) -> comm can wrap each rank's communicator (e.g. CountingComm). An exception on any rank fails
    the peers' pending collectives and is re-raised here (the first one, by rank).
    mesh=(U, R), U * R = W: each rank's comm is a HybridComm of a U-rank Ulysses LocalComm and an R-rank ring
    LocalComm (rank i = r * U + u), and wrap wraps each of the two."""
    comms, worlds = _local_comms(world_size, timeout, wrap, mesh)
    results: list = [None] * world_size
    errors: list = [None] * world_size

    def body(r):
        try:
            results[r] = fn(comms[r], *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            errors[r] = e
            for w in worlds:  # a peer may wait in any of the groups
                w.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"cp-rank{r}", daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
        if t.is_alive():
            raise CPCommError(f"fastattn.distributed run_local: {t.name} still running after {timeout + 30:g} s")
    first = [e for e in errors if e is not None and not isinstance(e, PeerFailedError)] or [e for e in errors if e]
    if first:
        raise first[0]
    return results


def _local_comms(world_size: int, timeout: float, wrap, mesh):
    """-> (each rank's communicator, every _LocalWorld of the simulation)."""
    wrap = wrap or (lambda c: c)
    if mesh is None:
        comms = LocalComm.world(world_size, timeout)
        return [wrap(c) for c in comms], [comms[0]._world]
    U, R = mesh
    if U < 1 or R < 1 or U * R != world_size:
        raise ValueError(f"fastattn.distributed run_local: mesh=(U, R) = {mesh} must multiply to the world size "
                         f"{world_size}")
    uly = [LocalComm.world(U, timeout) for _ in range(R)]  # uly[r]: the Ulysses group of ring rank r
    ring = [LocalComm.world(R, timeout) for _ in range(U)]  # ring[u]: the ring group of Ulysses rank u
    comms = [HybridComm(wrap(uly[i // U][i % U]), wrap(ring[i % U][i // U])) for i in range(world_size)]
    return comms, [g[0]._world for g in uly + ring]


# --------------------------------------------------------------------------------------------------------------
# the 2-D group of the hybrid strategy

class HybridComm:
    """The 2-D CP group of the hybrid (Ulysses x ring, "USP") strategy: `ulysses`, a group of U ranks (the
    all-to-alls), and `ring`, a group of R ranks (the K/V hops), each a CPComm; W = U * R ranks in a grid: the U
    ranks of this rank's Ulysses group share its ring rank r, the R ranks of its ring group its Ulysses rank u.
    This rank is rank r * U + u of the flattened group (the order of its sequence shard, hybrid.py). The collectives
    over all W ranks that the rest of the package uses (all_gather, reduce_scatter, all_reduce: shapes, unshard,
    loss) compose the two groups'; ring hops and all-to-alls exist only along one dim (.ring / .ulysses)."""

    def __init__(self, ulysses: CPComm, ring: CPComm):
        for name, c in (("ulysses", ulysses), ("ring", ring)):
            if not isinstance(c, CPComm) or isinstance(c, HybridComm):
                raise TypeError(f"fastattn.distributed HybridComm: {name} must be a 1-D CPComm, got "
                                f"{type(c).__name__}")
        if isinstance(ulysses, TorchComm) and isinstance(ring, TorchComm):
            _check_grid(ulysses, ring)
        self.ulysses, self.ring = ulysses, ring
        self.world_size = ulysses.world_size * ring.world_size
        self.rank = ring.rank * ulysses.world_size + ulysses.rank

    @classmethod
    def from_mesh(cls, mesh, ulysses_dim: str = "ulysses", ring_dim: str = "ring") -> "HybridComm":
        """The two dims of a 2-D DeviceMesh, named ulysses_dim and ring_dim (in either order)."""
        names = tuple(mesh.mesh_dim_names or ())
        if mesh.ndim != 2 or ulysses_dim not in names or ring_dim not in names:
            raise ValueError(f"fastattn.distributed: a hybrid CP group from a DeviceMesh needs 2 dims named "
                             f"{ulysses_dim!r} and {ring_dim!r}, got a {mesh.ndim}-D mesh with dims {names}")
        return cls(TorchComm.from_mesh(mesh, ulysses_dim), TorchComm.from_mesh(mesh, ring_dim))

    def _one_dim(self, what: str):
        raise CPCommError(f"fastattn.distributed HybridComm: {what} runs along one dim of the 2-D group: call it on "
                          ".ulysses or .ring (a 2-D CPConfig runs cp_attention's hybrid strategy only; other "
                          "strategies and packed varlen documents need a CPConfig over one group)")

    def ring_hop(self, send, recv) -> Handle:
        self._one_dim("a ring hop")

    def all_to_all(self, x):
        self._one_dim("an all-to-all")

    def all_gather(self, x):
        got = self.ring.all_gather(self.ulysses.all_gather(x))  # (*s) -> (U, *s) -> (R, U, *s)
        return got.reshape((self.world_size,) + tuple(x.shape))  # (R, U, *s) -> (W, *s): slot r * U + u

    def reduce_scatter(self, x):
        U, R = self.ulysses.world_size, self.ring.world_size
        mine = self.ring.reduce_scatter(x.reshape((R, U) + tuple(x.shape[1:])))  # (W, *s) -> (R, U, *s) -> (U, *s)
        return self.ulysses.reduce_scatter(mine)  # (U, *s) -> (*s)

    def all_reduce(self, x):
        return self.ring.all_reduce(self.ulysses.all_reduce(x))


def _check_grid(ulysses: TorchComm, ring: TorchComm):
    """The two groups must cross in this rank only (otherwise the flattened ranks collide); checked locally."""
    mine = set(dist.get_process_group_ranks(ulysses.group)) & set(dist.get_process_group_ranks(ring.group))
    if len(mine) != 1:
        raise ValueError(f"fastattn.distributed: the Ulysses and ring groups of a hybrid CP group must share only "
                         f"this rank, they share global ranks {sorted(mine)}: build them from the two dims of one "
                         f"2-D DeviceMesh")


# --------------------------------------------------------------------------------------------------------------
# accounting

class CountingComm:
    """Wraps a CPComm and counts each method's calls and bytes sent (this rank's payload), for exact tests."""

    def __init__(self, inner: CPComm):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.calls: dict = {}
        self.bytes: dict = {}
        self.log: List[tuple] = []  # (method, [shapes], dtype) in call order

    def _count(self, name, tensors):
        self.calls[name] = self.calls.get(name, 0) + 1
        self.bytes[name] = self.bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors)
        self.log.append((name, [tuple(t.shape) for t in tensors], tensors[0].dtype if tensors else None))

    def reset(self):
        self.calls, self.bytes, self.log = {}, {}, []

    def ring_hop(self, send, recv):
        self._count("ring_hop", list(send))
        return self.inner.ring_hop(send, recv)

    def all_gather(self, x):
        self._count("all_gather", [x])
        return self.inner.all_gather(x)

    def reduce_scatter(self, x):
        self._count("reduce_scatter", [x])
        return self.inner.reduce_scatter(x)

    def all_to_all(self, x):
        self._count("all_to_all", [x])
        return self.inner.all_to_all(x)

    def all_reduce(self, x):
        self._count("all_reduce", [x])
        return self.inner.all_reduce(x)


_COMMS: "weakref.WeakValueDictionary[str, CPComm]" = weakref.WeakValueDictionary()


def comm_name(comm: CPComm) -> str:
    """A name that finds `comm` in this process (lookup_comm): how a communicator travels through a custom op's
    string argument. Registered on first use (the registry holds no reference)."""
    name = getattr(comm, "_cp_op_name", None)
    if name is None:
        if isinstance(comm, TorchComm):
            from torch.distributed.distributed_c10d import _get_process_group_name  # private: the name funcol uses
            name = f"pg:{_get_process_group_name(comm.group)}"
        else:
            name = f"{type(comm).__name__}:{id(comm):x}"
        comm._cp_op_name = name
        _COMMS[name] = comm
    return name


def lookup_comm(name: str) -> CPComm:
    comm = _COMMS.get(name)
    if comm is None:
        raise RuntimeError(f"fastattn.distributed: no communicator named {name!r} in this process (it was garbage "
                           "collected, or the graph was built in another process)")
    return comm


def as_comm(group) -> CPComm:
    """A CPComm from a CPComm (returned as is), a ProcessGroup, a 1-D DeviceMesh, a 2-D DeviceMesh with dims named
    "ulysses" and "ring" (a HybridComm), or None (the default group)."""
    if isinstance(group, CPComm):
        return group
    if group is None or isinstance(group, getattr(dist, "ProcessGroup", ())):
        return TorchComm(group)
    if type(group).__name__ == "DeviceMesh":
        return HybridComm.from_mesh(group) if group.ndim == 2 else TorchComm.from_mesh(group)
    raise TypeError(f"fastattn.distributed: group must be a ProcessGroup, a DeviceMesh, a CPComm or None, "
                    f"got {type(group).__name__}")
