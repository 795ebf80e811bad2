"""DTensor inputs for context parallelism: `cp_attention` on DTensors, and the `FastattnContextParallel` ParallelStyle.

    mesh = init_device_mesh("cuda", (W,), mesh_dim_names=("cp",))             # or mesh["cp"] of a bigger mesh
    q, k, v = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q_full, k_full, v_full))   # (B, S, H, D)
    out = cp_attention(q, k, v, causal=True)        # a DTensor, Shard(1) on mesh; the CPConfig comes from the mesh

    model = parallelize_module(model, mesh, FastattnContextParallel(cp))   # or {"blocks.*.attn": ...} in a plan
    logits = model(distribute_tensor(ids, mesh, [Shard(1)]))   # runs inside context_parallel(cp) on the local shard

Token order. A DTensor placed Shard(seq_dim) holds on rank r the r-th contiguous chunk of its global sequence, so the
config's `balance` says what that global sequence is:
  - cp=None: CPConfig(group=mesh, balance="contiguous"): the DTensor is the sequence in its natural order
    (distribute_tensor, DTensor.from_local of contiguous shards). Exact for every DTensor the user did not permute.
  - cp with balance="zigzag" (CPConfig's default): the DTensor's global sequence must be the head-tail permuted one,
    rank r holding chunks r and 2W-1-r of 2W: what torch's `_context_parallel_shard(..., load_balancer=
    _HeadTailLoadBalancer(...))` leaves, or `DTensor.from_local(cp.shard(x, dim), mesh, [Shard(dim)])`. The output
    is in the same permuted order. Passing a naturally ordered DTensor with a zigzag config is wrong for causal
    attention (the numbers cannot tell): pass cp=None or balance="contiguous" for those.
The unwrapping is torch.distributed.tensor.experimental.local_map (it works on CPU/gloo: it only calls to_local and
from_local, which carry the gradients as DTensors with the inputs' placements).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import local_map
from torch.distributed.tensor.parallel import ParallelStyle

from .comm import CountingComm, TorchComm
from .config import CPConfig
from .context import context_parallel


def _mesh_desc(mesh: DeviceMesh) -> str:
    return f"DeviceMesh {mesh.mesh.tolist()} (dims {mesh.mesh_dim_names})"


def config_for_mesh(mesh: DeviceMesh, cp: Optional[CPConfig], who: str) -> CPConfig:
    """The CPConfig of a 1-D CP mesh: a contiguous-layout one from the mesh when cp is None, else cp, which must run
    over the same ranks."""
    if mesh.ndim != 1:
        raise ValueError(f"{who}: DTensor inputs must live on a 1-D CP mesh (e.g. mesh['cp']), got a {mesh.ndim}-D "
                         f"{_mesh_desc(mesh)}; the 2-D hybrid takes local tensors")
    if cp is None:  # one per mesh object, kept on it: the backward finds the communicator by name, weakly held
        cp = mesh.__dict__.get("_fastattn_cp_config")
        if cp is None:
            cp = mesh.__dict__["_fastattn_cp_config"] = CPConfig(group=mesh, balance="contiguous")
        return cp
    if not isinstance(cp, CPConfig):
        raise TypeError(f"{who}: cp must be a CPConfig or None, got {type(cp).__name__}")
    if cp.is_2d:
        raise ValueError(f"{who}: cp has a 2-D (hybrid) group {cp.mesh_shape}, but the DTensors are on the 1-D "
                         f"{_mesh_desc(mesh)}; DTensor inputs take a 1-D CPConfig over that mesh")
    comm = cp.comm
    while isinstance(comm, CountingComm):
        comm = comm.inner
    mesh_ranks = mesh.mesh.flatten().tolist()
    if isinstance(comm, TorchComm):
        cp_ranks = dist.get_process_group_ranks(comm.group)
        if cp_ranks != mesh_ranks:
            raise ValueError(f"{who}: cp's group (global ranks {cp_ranks}) differs from the DTensors' "
                             f"{_mesh_desc(mesh)}: build the CPConfig over that mesh (CPConfig(group=mesh)) or "
                             f"pass cp=None")
    elif (comm.world_size, comm.rank) != (mesh.size(), mesh.get_local_rank()):
        raise ValueError(f"{who}: cp's communicator (rank {comm.rank} of {comm.world_size}) differs from the "
                         f"DTensors' {_mesh_desc(mesh)} (rank {mesh.get_local_rank()} of {mesh.size()})")
    return cp


def _check_placed(name: str, t, mesh: DeviceMesh, seq_dim: int, who: str, multiple: int):
    """t a DTensor on mesh, placed (Shard(seq_dim),), its global length a multiple of `multiple` (equal shards)."""
    if not isinstance(t, DTensor):
        raise TypeError(f"{who}: q, k and v must all be DTensors or all local tensors; {name} is a "
                        f"{type(t).__name__}")
    if t.device_mesh != mesh:
        raise ValueError(f"{who}: {name} is on {_mesh_desc(t.device_mesh)}, q on {_mesh_desc(mesh)}: one CP mesh")
    if tuple(t.placements) != (Shard(seq_dim),):
        raise ValueError(f"{who}: {name} must be placed {(Shard(seq_dim),)} (the sequence dim of its layout) on the "
                         f"CP mesh, got {tuple(t.placements)} for {name} {tuple(t.shape)}; redistribute it first "
                         f"(x.redistribute(mesh, [Shard({seq_dim})]))")
    if t.shape[seq_dim] % multiple:
        raise ValueError(f"{who}: {name}'s global sequence length {t.shape[seq_dim]} (shape {tuple(t.shape)}) must "
                         f"divide by {multiple} so that every rank holds an equal shard")


def dtensor_cp_attention(attend, q, k, v, *, cp: Optional[CPConfig], layout: str = "bshd",
                         key_padding_mask=None, alibi_slopes=None, return_lse: bool = False, **kw):
    """attend (api.cp_attention, passed in: api dispatches DTensors here) on DTensors q, k, v placed
    (Shard(seq_dim),) on one 1-D mesh (seq_dim 1 for "bshd", 2 for "bhsd"): out as a DTensor with q's placement,
    lse (B, Hq, S) as a DTensor placed (Shard(2),). key_padding_mask: a bool DTensor (B, S) placed (Shard(1),) or
    this rank's local (B, S/W) shard; alibi_slopes: a tensor or a Replicate DTensor. Gradients of q, k, v are
    DTensors with their placements. See the module docstring for the token order (cp=None: contiguous)."""
    who = "fastattn.distributed.cp_attention"
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"{who}: layout must be 'bshd' or 'bhsd', got {layout!r}")
    seq_dim = 1 if layout == "bshd" else 2
    if not isinstance(q, DTensor):
        raise TypeError(f"{who}: q, k and v must all be DTensors or all local tensors; q is a {type(q).__name__}")
    mesh = q.device_mesh
    cp = config_for_mesh(mesh, cp, who)
    W = mesh.size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_placed(name, t, mesh, seq_dim, who, W * (2 if cp.balance == "zigzag" else 1))
    seq = (Shard(seq_dim),)
    mask_in = None
    if isinstance(key_padding_mask, DTensor):
        _check_placed("key_padding_mask", key_padding_mask, mesh, 1, who, W)
        mask_in = (Shard(1),)
    alibi_in = None
    if isinstance(alibi_slopes, DTensor):
        if tuple(alibi_slopes.placements) != (Replicate(),) or alibi_slopes.device_mesh != mesh:
            raise ValueError(f"{who}: an alibi_slopes DTensor must be (Replicate(),) on the CP mesh, got "
                             f"{tuple(alibi_slopes.placements)} on {_mesh_desc(alibi_slopes.device_mesh)}")
        alibi_in = (Replicate(),)

    def local(ql, kl, vl, mask, alibi):
        return attend(ql, kl, vl, cp=cp, layout=layout, key_padding_mask=mask, alibi_slopes=alibi,
                      return_lse=return_lse, **kw)
    # one PlacementType per output (a lone tuple of placements would read as one per output): lse (B, Hq, S/W) is
    # sharded on dim 2
    out_placements = (seq, (Shard(2),)) if return_lse else (seq,)
    fn = local_map(local, out_placements=out_placements, in_placements=(seq, seq, seq, mask_in, alibi_in),
                   device_mesh=mesh)
    return fn(q, k, v, key_padding_mask, alibi_slopes)


class FastattnContextParallel(ParallelStyle):
    """A ParallelStyle (torch.distributed.tensor.parallel) that runs a module's fastattn attention as context
    parallelism over the mesh it is applied on, like torch's _ContextParallel:

        parallelize_module(model, mesh["cp"], {"blocks.*.attn": FastattnContextParallel(cp)})

    - Before forward, each DTensor argument (positional or keyword) must be placed (Shard(seq_dim),) on the mesh and
      becomes its local shard; local tensors pass unchanged (they are already this rank's shard).
    - The forward runs inside `context_parallel(cp)`, so code reading `active_cp()` (the reference models, the
      "fastattn_cp" transformers attention, any module calling cp_attention(cp=active_cp())) takes the CP path.
    - After forward, tensor outputs are returned local (use_local_output=True, torch's default for its styles) or as
      DTensors placed (Shard(seq_dim),) on the mesh.
    cp=None: CPConfig(group=mesh, balance="contiguous") (DTensors in their natural token order); a given cp must run
    over the mesh's ranks, and its balance says the token order of the shards (see this module's docstring).
    """

    def __init__(self, cp: Optional[CPConfig] = None, *, seq_dim: int = 1, use_local_output: bool = True):
        super().__init__()
        if cp is not None and not isinstance(cp, CPConfig):
            raise TypeError(f"FastattnContextParallel: cp must be a CPConfig or None, got {type(cp).__name__}")
        self.cp, self.seq_dim, self.use_local_output = cp, int(seq_dim), bool(use_local_output)

    def _apply(self, module: torch.nn.Module, device_mesh: DeviceMesh) -> torch.nn.Module:
        cp = config_for_mesh(device_mesh, self.cp, "FastattnContextParallel")
        tokens: list = []  # one context token per forward in flight (re-entrant: recomputation, nested calls)

        def to_local(name, x):
            if not isinstance(x, DTensor):
                return x
            if x.device_mesh != device_mesh or tuple(x.placements) != (Shard(self.seq_dim),):
                raise ValueError(f"FastattnContextParallel({type(module).__name__}): input {name} must be placed "
                                 f"{(Shard(self.seq_dim),)} on {_mesh_desc(device_mesh)}, got "
                                 f"{tuple(x.placements)} on {_mesh_desc(x.device_mesh)} (shape {tuple(x.shape)})")
            return x.to_local()

        def pre(mod, args, kwargs):
            try:
                args = tuple(to_local(f"#{i}", a) for i, a in enumerate(args))
                kwargs = {n: to_local(n, a) for n, a in kwargs.items()}
            except Exception:
                tokens.append(None)  # nothing entered: the always-called post hook pops this
                raise
            ctx = context_parallel(cp)
            ctx.__enter__()
            tokens.append(ctx)
            return args, kwargs

        def post(mod, args, kwargs, output):
            ctx = tokens.pop() if tokens else None
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if self.use_local_output:
                return output
            return _wrap(output, device_mesh, self.seq_dim)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True, always_call=True)  # the context exits on errors too
        return module


def _wrap(output: Any, mesh: DeviceMesh, seq_dim: int):
    """Local tensor outputs (a tensor, or a tuple/list of them and other values) -> DTensors (Shard(seq_dim),)."""
    if isinstance(output, torch.Tensor) and not isinstance(output, DTensor):
        return DTensor.from_local(output, mesh, [Shard(seq_dim)], run_check=False)
    if isinstance(output, (tuple, list)):
        return type(output)(_wrap(o, mesh, seq_dim) for o in output)
    return output


__all__ = ["FastattnContextParallel", "config_for_mesh", "dtensor_cp_attention"]
