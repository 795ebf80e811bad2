"""Keywords transformers hands every attention implementation that change the result and that no fastattn kernel
implements: a call that sets one raises instead of silently dropping it (a model would run, and answer wrong)."""
from __future__ import annotations

UNSUPPORTED = {"indices": "top-k sparse attention (DeepSeek V3.2's indexer)",
               "block_indices": "block-sparse attention",
               "s_aux": "attention sinks", "sinks": "attention sinks",
               "position_bias": "an additive position bias"}


def refuse_unsupported(kwargs, who: str, names) -> None:
    """Raises ValueError naming the first of `names` set (not None) in kwargs."""
    for name in names:
        if kwargs.get(name) is not None:
            raise ValueError(f"fastattn {who}: `{name}` ({UNSUPPORTED[name]}) is not supported here; dropping it "
                             f"would change the model's output. Use attn_implementation='eager' (or 'sdpa' where "
                             f"the model offers it)")
