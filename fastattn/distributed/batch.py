"""Sharding a whole batch for context parallelism: every sequence-indexed tensor in the SAME layout.

    batch = pad_batch(batch, cp)                                  # only if S may not divide by 2W (zigzag) / W
    local = shard_batch(batch, cp, shift_labels=True)             # input_ids, labels, position_ids, masks: S -> S/W
    logits = model(local["input_ids"], position_ids=local["position_ids"])
    loss = cp_cross_entropy(logits, local["labels"], cp)

The zigzag order is PyTorch's head-tail order (layout.py), so a batch sharded here interoperates with buffers
sharded by torch's context parallel. Tensors the helper does not know about are refused when they look
sequence-indexed (a tensor left whole next to sharded ones is silently wrong), unless named in `keep`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from . import layout
from .config import CPConfig

# Keys sharded along the sequence dim by default (transformers' and the reference models' names).
SEQ_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "token_type_ids", "inputs_embeds",
            "loss_mask")
# What pad_batch appends to each key by default (position_ids continue each row instead).
PAD_DEFAULTS = {"input_ids": 0, "labels": -100, "attention_mask": 0, "token_type_ids": 0, "inputs_embeds": 0.0,
                "loss_mask": 0}


def _seq_tensors(batch: Mapping[str, Any], seq_keys: Sequence[str], seq_dim: int, keep: Sequence[str],
                 who: str) -> tuple:
    """-> (names of the tensors to shard, the sequence length S). Checks they agree on S, and that no other tensor
    of the batch has S along seq_dim without being named in keep."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"fastattn.distributed.{who}: batch must be a dict of tensors, got {type(batch).__name__}")
    names = [n for n in seq_keys if isinstance(batch.get(n), torch.Tensor) and batch[n].dim() > seq_dim]
    if not names:
        raise ValueError(f"fastattn.distributed.{who}: no sequence tensor in the batch (looked for {tuple(seq_keys)} "
                         f"with a dim {seq_dim}); keys present: {sorted(batch)}")
    first = names[0]
    S = batch[first].shape[seq_dim]
    for n in names:
        t = batch[n]
        if n == "attention_mask" and t.dim() > 2:
            raise ValueError(f"fastattn.distributed.{who}: batch['attention_mask'] {tuple(t.shape)} is a "
                             f"{t.dim()}-D mask; context parallelism takes the 2-D (B, S) padding mask only (a "
                             f"dense (.., S, S) mask cannot be split by query and key rows alike)")
        if t.shape[seq_dim] != S:
            raise ValueError(f"fastattn.distributed.{who}: batch[{n!r}] {tuple(t.shape)} and batch[{first!r}] "
                             f"{tuple(batch[first].shape)} differ in the sequence dim {seq_dim}")
    for n, t in batch.items():
        if n in names or n in keep or not isinstance(t, torch.Tensor) or t.dim() <= seq_dim:
            continue
        if t.shape[seq_dim] == S:
            raise ValueError(f"fastattn.distributed.{who}: batch[{n!r}] {tuple(t.shape)} has the sequence length "
                             f"{S} in dim {seq_dim} but is not a known sequence key: add it to seq_keys to shard "
                             f"it, or to keep to pass it whole")
    return names, S


def shard_batch(batch: Mapping[str, Any], cp: CPConfig, *, shift_labels: bool = False, ignore_index: int = -100,
                add_position_ids: bool = True, seq_keys: Sequence[str] = SEQ_KEYS, keep: Sequence[str] = (),
                seq_dim: int = 1) -> Dict[str, Any]:
    """This rank's part of a whole batch: every tensor of seq_keys sharded along seq_dim in cp.balance's layout,
    the others passed through (as are seq_keys tensors without a seq_dim, e.g. classification labels (B,)).

    shift_labels: labels hold the inputs (transformers' convention, the model shifts internally): shift them to
        next-token labels on the WHOLE sequence first (labels[t] = labels[t + 1], the last one ignore_index) — after
        sharding, a token's successor usually lives on another rank. Then compute the loss with cp_cross_entropy,
        not a model's built-in shifting loss.
    add_position_ids: without a position_ids entry, add this rank's global positions (B, S/W) int64: absolute-
        position models (GPT-2, BERT) must embed the global position of each local token.
    A sequence length that does not divide evenly raises a ValueError naming the tensor and its shape; pad_batch
    pads a batch first."""
    names, S = _seq_tensors(batch, seq_keys, seq_dim, keep, "shard_batch")
    W, n = cp.world_size, cp.world_size * layout.chunks_per_rank(cp.balance)
    if S % n:
        t = batch[names[0]]
        raise ValueError(f"fastattn.distributed.shard_batch: batch[{names[0]!r}] {tuple(t.shape)}: the sequence "
                         f"length {S} (dim {seq_dim}) is not divisible by {n} ({cp.balance} layout over {W} ranks); "
                         f"pad_batch(batch, cp) pads every sequence tensor by {(-S) % n} (labels with "
                         f"ignore_index, attention_mask with 0)")
    out = dict(batch)
    for name in names:
        t = batch[name]
        if name == "labels" and shift_labels:
            shifted = torch.full_like(t, ignore_index)
            shifted.narrow(seq_dim, 0, S - 1).copy_(t.narrow(seq_dim, 1, S - 1))  # next token, before sharding
            t = shifted
        out[name] = cp.shard(t, seq_dim)
    if add_position_ids and "position_ids" not in batch:
        ref = batch[names[0]]
        pos = cp.global_positions(S, device=ref.device)  # (S/W,)
        out["position_ids"] = pos.expand(*ref.shape[:seq_dim], pos.shape[0]).contiguous()  # (B, S/W)
    return out


def pad_batch(batch: Mapping[str, Any], cp: CPConfig, *, pad_values: Optional[Mapping[str, Any]] = None,
              seq_keys: Sequence[str] = SEQ_KEYS, keep: Sequence[str] = (), seq_dim: int = 1) -> Dict[str, Any]:
    """Right-pads every sequence tensor of the batch to the next length shard_batch accepts (a multiple of 2W for
    zigzag, W for contiguous). Defaults (PAD_DEFAULTS, overridden by pad_values): input_ids 0, labels -100,
    attention_mask 0, token_type_ids 0; position_ids continue each row. Without an attention_mask the pads stay
    visible as keys: harmless for causal models (right padding never reaches a real token, and the pads' labels are
    ignored); give bidirectional models an attention_mask, which then masks them (cp_attention's key padding mask).
    Returns the batch unchanged when no padding is needed."""
    names, S = _seq_tensors(batch, seq_keys, seq_dim, keep, "pad_batch")
    pad = (-S) % (cp.world_size * layout.chunks_per_rank(cp.balance))
    if pad == 0:
        return dict(batch)
    values = dict(PAD_DEFAULTS, **(pad_values or {}))
    out = dict(batch)
    for name in names:
        t = batch[name]
        if name == "position_ids":
            step = torch.arange(1, pad + 1, device=t.device, dtype=t.dtype)
            step = step.view([pad if d == seq_dim else 1 for d in range(t.dim())])  # (pad,) -> broadcast over dims
            extra = t.narrow(seq_dim, S - 1, 1) + step
        else:
            if name not in values:
                raise ValueError(f"fastattn.distributed.pad_batch: no pad value for batch[{name!r}] "
                                 f"{tuple(t.shape)}: pass pad_values={{{name!r}: ...}}")
            shape = list(t.shape)
            shape[seq_dim] = pad
            extra = torch.full(shape, values[name], dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, extra], dim=seq_dim)
    return out


__all__ = ["shard_batch", "pad_batch", "SEQ_KEYS", "PAD_DEFAULTS"]
