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


# --------------------------------------------------------------------------------------------------------------
# Packed varlen documents (cu_seqlens): per-document sharding, as ring-flash-attention's varlen functions and torch's
# _PerDocumentHeadTailLoadBalancer lay them out. Every document is cut into W (contiguous) or 2W (zigzag) equal
# pieces and every rank holds its piece(s) of EVERY document, documents in order: rank r's shard is
#   contiguous: [doc0 piece r, doc1 piece r, ...]
#   zigzag:     [doc0 piece r, doc0 piece 2W-1-r, doc1 piece r, doc1 piece 2W-1-r, ...]
# so the local cu_seqlens is the global one divided by W.

class Piece(NamedTuple):
    """`length` consecutive tokens of document `doc` from position `pos` (within the document), at local row `local`."""
    doc: int
    pos: int
    local: int
    length: int


def doc_lengths(cu_seqlens, name: str = "cu_seqlens") -> List[int]:
    """The document lengths of cu_seqlens (an integer tensor or a list: 0, non-decreasing), as Python ints."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"fastattn.distributed: {name} must be a 1-D int32 tensor (N+1,), got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
    else:
        cu = [int(c) for c in cu_seqlens]
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"fastattn.distributed: {name} must start at 0, be non-decreasing and describe at least one "
                         f"document, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:])]


def check_docs_divisible(lengths: Sequence[int], world_size: int, balance: str, name: str = "cu_seqlens") -> int:
    """Per-document sharding needs every document length % (W, or 2W for zigzag): a clear error naming the first
    documents that do not split. Returns the number of pieces per document."""
    n = world_size * chunks_per_rank(balance)
    bad = [(i, L) for i, L in enumerate(lengths) if L % n]
    if bad:
        docs = ", ".join(f"document {i} (length {L})" for i, L in bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise ValueError(f"fastattn.distributed: {name}: {docs} not divisible by {n}: per-document {balance} "
                         f"sharding over W={world_size} ranks cuts every document into {n} equal pieces. Pad each "
                         f"document to a multiple of {n}, or use the all-gather path (llama3_flash_attn_varlen_func, "
                         f"or cp_varlen_attention(..., sharding='stream')), which needs only the total % W")
    return n


def doc_pieces(lengths: Sequence[int], world_size: int, rank: int, balance: str = "zigzag") -> List[Piece]:
    """Rank `rank`'s pieces under per-document sharding, in local order."""
    n = check_docs_divisible(lengths, world_size, balance)
    out, local = [], 0
    for d, L in enumerate(lengths):
        c = L // n
        chunks = (rank,) if n == world_size else (rank, 2 * world_size - 1 - rank)
        for j in chunks:
            out.append(Piece(d, j * c, local, c))
            local += c
    return out


def _piece_rows(pieces: Sequence[Piece], cu: Sequence[int], device=None) -> torch.Tensor:
    """int64: the packed (global) row of every local row of these pieces, in local order."""
    starts = torch.tensor([cu[p.doc] + p.pos for p in pieces], dtype=torch.int64, device=device)
    lens = torch.tensor([p.length for p in pieces], dtype=torch.int64, device=device)
    first = torch.cumsum(lens, 0) - lens  # local row of each piece's first token
    return torch.repeat_interleave(starts - first, lens) + torch.arange(int(lens.sum()), device=device)


def varlen_order(cu_seqlens, world_size: int, balance: str = "zigzag", device=None) -> torch.Tensor:
    """int64 (T,): the packed row at each index of the ranks' per-document shards concatenated in rank order."""
    lengths = doc_lengths(cu_seqlens)
    cu = [0]
    for L in lengths:
        cu.append(cu[-1] + L)
    return torch.cat([_piece_rows(doc_pieces(lengths, world_size, r, balance), cu, device)
                      for r in range(world_size)])


def shard_varlen(x: torch.Tensor, cu_seqlens, dim: int, world_size: int, rank: int,
                 balance: str = "zigzag") -> torch.Tensor:
    """Rank `rank`'s per-document shard of the packed tensor x along dim (cu_seqlens: GLOBAL boundaries, every
    document length % W, or % 2W for zigzag). Its local cu_seqlens is cu_seqlens // W."""
    lengths = doc_lengths(cu_seqlens)
    if sum(lengths) != x.shape[dim]:
        raise ValueError(f"fastattn.distributed: cu_seqlens ends at {sum(lengths)} but x has {x.shape[dim]} tokens "
                         f"along dim {dim} (x {tuple(x.shape)})")
    T = sum(lengths) // world_size
    return x.index_select(dim, varlen_order(cu_seqlens, world_size, balance, x.device)[rank * T:(rank + 1) * T])


def unshard_varlen_list(shards: Sequence[torch.Tensor], cu_seqlens, dim: int, balance: str = "zigzag"
                        ) -> torch.Tensor:
    """The packed sequence from every rank's per-document shard (in rank order): the inverse of `shard_varlen`."""
    cat = torch.cat(list(shards), dim=dim)
    order_ = varlen_order(cu_seqlens, len(shards), balance, cat.device)
    if order_.numel() != cat.shape[dim]:
        raise ValueError(f"fastattn.distributed: cu_seqlens describes {order_.numel()} tokens, the shards hold "
                         f"{cat.shape[dim]} along dim {dim}")
    return cat.index_select(dim, torch.argsort(order_))


def unshard_varlen(x_local: torch.Tensor, cu_seqlens, dim: int, comm, balance: str = "zigzag") -> torch.Tensor:
    """The packed sequence on every rank: all-gathers the per-document shards over comm and undoes the layout."""
    got = comm.all_gather(x_local)  # (*s) -> (W, *s)
    return unshard_varlen_list(list(got.unbind(0)), cu_seqlens, dim, balance)


def varlen_positions(cu_seqlens, world_size: int, rank: int, balance: str = "zigzag", device=None) -> torch.Tensor:
    """int64 (T/W,): the position WITHIN its document of each of rank `rank`'s tokens (position_ids of packed
    documents, e.g. for RoPE), per-document sharding."""
    lengths = doc_lengths(cu_seqlens)
    pieces = doc_pieces(lengths, world_size, rank, balance)
    return _piece_rows(pieces, [0] * (len(lengths) + 1), device) if pieces else torch.zeros(0, dtype=torch.int64)
