"""Keywords transformers hands every attention implementation that change the result and that no fastattn kernel
implements: a call that sets one raises instead of silently dropping it (a model would run, and answer wrong)."""
from __future__ import annotations

import sys

import torch

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


_ROUTES = {}  # a transformers modeling module's name -> whether its attention reaches AttentionInterface


def refuse_models_without_interface(who: str) -> None:
    """Called by our mask functions: raises ValueError when the model building the mask is one of transformers'
    models whose attention is its own code, not AttentionInterface's (Bloom, MPT, XGLM, RoFormer, BigBird, ...:
    their modules never read ALL_ATTENTION_FUNCTIONS). transformers accepts any registered name for them, and they
    add our compact masks (None, a key mask) to their scores as numbers: causality and padding silently lost. The
    caller is the first frame outside transformers.masking_utils; eager calls only (frames cannot be read under
    torch.compile; the first eager call has refused)."""
    if torch.compiler.is_compiling():
        return
    frame = sys._getframe(2)  # past this function and the mask function
    for _ in range(8):
        if frame is None:
            return
        name = frame.f_globals.get("__name__", "")
        if name != "transformers.masking_utils" and not name.startswith("transformers.utils"):
            break
        frame = frame.f_back
    else:
        return
    if not name.startswith("transformers.models."):
        return  # a user's model or code: not ours to judge
    if name not in _ROUTES:
        _ROUTES[name] = "ALL_ATTENTION_FUNCTIONS" in frame.f_globals
    if not _ROUTES[name]:
        raise ValueError(f"fastattn {who}: {name} computes attention in its own code, not through transformers' "
                         f"AttentionInterface, so it would never call fastattn and would add fastattn's compact "
                         f"masks to its scores (causality and padding lost). Use attn_implementation='eager' (or "
                         f"'sdpa' where the model offers it) for this model")
