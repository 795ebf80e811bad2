"""Cross entropy under context parallelism: each rank holds some tokens of every sequence; normalise by the
GLOBAL number of counted tokens, not the local one (a per-rank mean weights ranks with few counted tokens up).

Shift the labels BEFORE sharding (labels[t] = input_ids[t + 1] on the whole sequence, the last one ignored):
after sharding, a rank's next token usually lives on another rank.

A loss of values every rank holds whole (a classifier on BERT's pooled [CLS] row, shared by an all-reduce) is the
same on every rank: cp_replicated_loss scales it by 1 / W so that the ranks' gradients sum to one process's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import CPConfig


def cp_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, cp: CPConfig, *, ignore_index: int = -100,
                     grad_average_world: int = 1) -> torch.Tensor:
    """logits (..., V) and labels (...) of this rank's tokens. Returns local_sum / global_count, so that

      - the SUM over CP ranks of the returned values is the global mean loss (times grad_average_world;
        `global_loss` for logging), and
      - summing the parameter gradients over CP ranks (all_reduce SUM) gives the single-process gradients.
    When a data-parallel wrapper AVERAGES gradients over a mesh that includes the CP ranks (DDP or FSDP2 over the
    flattened dp x cp mesh) instead of summing them over CP, pass grad_average_world=cp.world_size: the average
    divides each sequence's gradient by its CP ranks as well, and this factor undoes that. One all-reduce of the
    token count over the CP group (no gradient flows through it).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"fastattn.distributed: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "must match in every dim but the last")
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),  # (..., V) -> (N, V)
                            ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().to(torch.float32).reshape(1)
    count = cp.comm.all_reduce(count)
    return total * grad_average_world / count.clamp_min(1.0)[0]


def global_loss(local: torch.Tensor, cp: CPConfig, *, grad_average_world: int = 1) -> torch.Tensor:
    """The global mean loss from each rank's cp_cross_entropy value (detached; for logging). Pass the
    grad_average_world given to cp_cross_entropy: its factor scales the gradients, not the loss to log (a logged
    loss W times too large is the classic CP x DP logging bug)."""
    return cp.comm.all_reduce(local.detach().float().reshape(1).clone())[0] / grad_average_world


def cp_replicated_loss(loss: torch.Tensor, cp: CPConfig, *, grad_average_world: int = 1) -> torch.Tensor:
    """loss: a value every CP rank computes identically (e.g. cross entropy of BertForSequenceClassification's
    logits, which every rank holds whole under CP). Returns loss * grad_average_world / W, the same contract as
    cp_cross_entropy: the SUM over CP ranks of the returned values is the loss, and summing the parameter gradients
    over CP ranks gives the single-process gradients. Without the 1 / W the layers after the shared row (pooler,
    classifier) would get W times their gradient, and the [CLS] row's rank would receive the sum of W identical
    gradients. Add it to a cp_cross_entropy term as is (both are per-rank shares of a global loss). No
    communication."""
    if loss.dim() != 0:
        raise ValueError(f"fastattn.distributed: cp_replicated_loss takes a scalar loss, got shape "
                         f"{tuple(loss.shape)} (reduce it first: the same reduction on every rank)")
    return loss * (grad_average_world / cp.world_size)
