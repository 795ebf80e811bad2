"""What one CP attention call needs besides q, k, v: shared by the strategies (ring, allgather, ulysses)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .comm import CPComm
from .layout import Segment



@dataclass(frozen=True)
class CallSpec:
    comm: CPComm
    balance: str
    layout: str                       # "bshd" (B, S, H, D) or "bhsd" (B, H, S, D): the user's tensors
    scale: float
    window: Tuple[int, int]           # effective (left, right): causal is right = 0; -1 unlimited
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    rng: Optional[tuple] = None       # one (seed, offset) for every block of the call, the same on every rank
    backend: Optional[str] = None
    grad_comm_dtype: torch.dtype = torch.float32
    return_lse: bool = False
    kv_repeat: int = 1                # ulysses only
    head_start: int = 0               # global index of the first query head of the tensors the block calls get
                                      # (a head-sharded group: the dropout key, fastattn/blocks.py)

    @property
    def seq_dim(self) -> int:
        return 1 if self.layout == "bshd" else 2

    def bhsd(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D) or (B, H, S, D) user tensor -> (B, H, S, D) view."""
        return x.transpose(1, 2) if self.layout == "bshd" else x

    def block_kw(self, alibi_slopes=None) -> dict:
        """Keyword arguments of fastattn.blocks.block_forward/backward (positions added per call)."""
        return dict(scale=self.scale, causal=False, window_size=self.window, softcap=self.softcap,
                    alibi_slopes=self.alibi_slopes if alibi_slopes is None else alibi_slopes,
                    dropout_p=self.dropout_p, rng=self.rng, backend=self.backend, head_start=self.head_start)


def visible(qs: Segment, ks: Segment, window: Tuple[int, int]) -> bool:
    """False when no query of qs sees any key of ks (the block is skipped; its K/V still travel)."""
    wl, wr = window
    if wr >= 0 and ks.start > qs.start + qs.length - 1 + wr:
        return False
    if wl >= 0 and ks.start + ks.length - 1 < qs.start - wl:
        return False
    return True


def fully_visible(qs: Segment, ks: Segment, window: Tuple[int, int]) -> bool:
    """True when every query of qs sees every key of ks: the block needs no mask at all."""
    wl, wr = window
    return ((wr < 0 or ks.start + ks.length - 1 <= qs.start + wr)
            and (wl < 0 or ks.start >= qs.start + qs.length - 1 - wl))


def key_range(qs: Segment, window: Tuple[int, int], seq_len: int) -> Tuple[int, int]:
    """[lo, hi): the global key positions any query of qs can see."""
    wl, wr = window
    lo = max(0, qs.start - wl) if wl >= 0 else 0
    hi = min(seq_len, qs.start + qs.length + wr) if wr >= 0 else seq_len
    return lo, max(lo, hi)


def rows(x: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The rows of a (B, H, S, ...) tensor that belong to segment seg (a view)."""
    return x.narrow(2, seg.local, seg.length)
