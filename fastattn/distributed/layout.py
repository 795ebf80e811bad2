"""Token layouts: which global sequence positions each CP rank holds, and in which order.

  contiguous: rank r holds chunk r of W equal chunks.
  zigzag (head-tail): the sequence is cut into 2W equal chunks; rank r holds chunk r then chunk 2W-1-r. For causal
      attention every rank then has the same amount of work (§ "zigzag" in ring.py). The order equals PyTorch's
      `_HeadTailLoadBalancer`, so buffers sharded by torch's context parallel are valid fastattn inputs.

A rank's shard is a list of `Segment`s: runs of consecutive global positions, in local order. The attention code
works on segments only, so it is exact for any layout (causal, window, ALiBi and dropout use global positions).
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

BALANCES = ("zigzag", "contiguous")


class Segment(NamedTuple):
    """A run of `length` consecutive global positions starting at `start`, at local offset `local`."""
    start: int
    local: int
    length: int


def check_balance(balance: str) -> str:
    if balance not in BALANCES:
        raise ValueError(f"fastattn.distributed: balance must be one of {BALANCES}, got {balance!r}")
    return balance


def chunks_per_rank(balance: str) -> int:
    return 2 if check_balance(balance) == "zigzag" else 1


def check_divisible(seq_len: int, world_size: int, balance: str, what: str = "sequence length") -> int:
    """Returns the chunk length; a clear error (not a hang later) when the sequence does not split evenly."""
    n = world_size * chunks_per_rank(balance)
    if seq_len % n:
        pad = (-seq_len) % n
        raise ValueError(f"fastattn.distributed: {what} {seq_len} is not divisible by {n} ({balance} layout over "
                         f"{world_size} ranks needs a multiple of {n}); pad the sequence by {pad} tokens (e.g. "
                         f"padding tokens whose labels are ignored) before sharding")
    return seq_len // n


def segments(local_len: int, world_size: int, rank: int, balance: str) -> List[Segment]:
    """The segments of rank `rank`'s shard when every rank holds `local_len` tokens."""
    if chunks_per_rank(balance) == 1:
        return [Segment(rank * local_len, 0, local_len)]
    if local_len % 2:
        raise ValueError(f"fastattn.distributed: the zigzag layout needs an even local sequence length (two chunks "
                         f"per rank), got {local_len}; the global length must be divisible by 2 * {world_size}")
    c = local_len // 2
    return [Segment(rank * c, 0, c), Segment((2 * world_size - 1 - rank) * c, c, c)]


def order(seq_len: int, world_size: int, balance: str, device=None) -> torch.Tensor:
    """int64 (S,): the global position at each index of the ranks' shards concatenated in rank order."""
    c = check_divisible(seq_len, world_size, balance)
    idx = torch.arange(seq_len, device=device)
    if balance == "contiguous":
        return idx
    chunks = idx.view(2 * world_size, c)  # (S,) -> (2W, c)
    head = torch.arange(world_size, device=device)
    return torch.stack([chunks[head], chunks[2 * world_size - 1 - head]], dim=1).reshape(-1)  # (W, 2, c) -> (S,)


def global_positions(seq_len: int, world_size: int, rank: int, balance: str = "zigzag", device=None) -> torch.Tensor:
    """int64 (S/W,): the global positions of rank `rank`'s tokens (position_ids for absolute-position models)."""
    local = check_divisible(seq_len, world_size, balance) * chunks_per_rank(balance)
    return order(seq_len, world_size, balance, device)[rank * local:(rank + 1) * local]


def shard(x: torch.Tensor, dim: int, world_size: int, rank: int, balance: str = "zigzag") -> torch.Tensor:
    """Rank `rank`'s shard of the full sequence x along dim (a copy for zigzag, a view for contiguous)."""
    S = x.shape[dim]
    c = check_divisible(S, world_size, balance, f"size {S} of dim {dim}")
    if balance == "contiguous":
        return x.narrow(dim, rank * c, c)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world_size - 1 - rank) * c, c)], dim=dim)


def unshard_list(shards: Sequence[torch.Tensor], dim: int, balance: str = "zigzag") -> torch.Tensor:
    """The full sequence from every rank's shard (in rank order): the inverse of `shard`."""
    cat = torch.cat(list(shards), dim=dim)
    if check_balance(balance) == "contiguous":
        return cat
    inv = torch.argsort(order(cat.shape[dim], len(shards), balance, cat.device))
    return cat.index_select(dim, inv)


def unshard(x_local: torch.Tensor, dim: int, comm, balance: str = "zigzag") -> torch.Tensor:
    """The full sequence on every rank: all-gathers the shards over comm and undoes the layout."""
    got = comm.all_gather(x_local)  # (*s) -> (W, *s)
    return unshard_list(list(got.unbind(0)), dim, balance)
