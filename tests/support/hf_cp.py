"""One training step of a transformers causal LM under attn_implementation="fastattn_cp" on W simulated ranks, the
part the HF context-parallel tests share (import only after transformers is known to be installed)."""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple

import torch
from transformers import AttentionInterface

import fastattn.integrations.transformers as fa_hf
from fastattn.distributed import CPConfig, context_parallel, cp_cross_entropy, run_local, shard_batch, unshard_list


def next_token_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels shifted on the whole sequence, -100 where the token or its successor is padding."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    return labels


def cp_lm_step(fast: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor], W: int,
               strategy: str, balance: str, use_cache: bool, on_call: Callable[[torch.nn.Module, dict], None]
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Each of W ranks runs a copy of `fast` on its shard of the batch (shard_batch; the padding mask when given)
    inside context_parallel and backpropagates cp_cross_entropy; on_call(module, kwargs) sees every fastattn_cp
    attention call. -> (logits gathered in global order (B, S, V), parameter gradients summed over ranks)."""
    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance)
        m = copy.deepcopy(fast)
        batch = {"input_ids": ids, "labels": labels} | ({"attention_mask": mask} if mask is not None else {})
        local = shard_batch(batch, cp)
        with context_parallel(cp):
            logits = m(**{k: v for k, v in local.items() if k != "labels"}, use_cache=use_cache).logits
        cp_cross_entropy(logits, local["labels"], cp).backward()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters()}

    real_fn = fa_hf.fastattn_cp_attention_forward

    def spy(module, *a, **kw):
        on_call(module, kw)
        return real_fn(module, *a, **kw)
    AttentionInterface._global_mapping["fastattn_cp"] = spy
    try:
        res = run_local(W, rank)
    finally:
        AttentionInterface._global_mapping["fastattn_cp"] = real_fn
    return unshard_list([r[0] for r in res], 1, balance), {n: sum(r[1][n] for r in res) for n in res[0][1]}
