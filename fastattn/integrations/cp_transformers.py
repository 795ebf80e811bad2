"""attn_implementation="fastattn_cp": transformers attention under context parallelism (registered on import of
fastattn.integrations.transformers, in AttentionInterface AND AttentionMaskInterface like "fastattn").

    import fastattn.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn_cp")
    cp = CPConfig(group, balance="zigzag")
    local = shard_batch(batch, cp, shift_labels=True)          # input_ids, labels, GLOBAL position_ids: (B, S/W)
    with fastattn.distributed.context_parallel(cp):
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits   # (B, S/W, V)
    loss = cp_cross_entropy(logits, local["labels"], cp)

Each layer's attention is fastattn.distributed.cp_attention over the whole sequence (causal = the layer's
is_causal), so the logits are this rank's rows of the single-process logits. A 2-D padding mask (shard it with the
batch) becomes the key padding mask that travels with its keys. Outside `context_parallel` both functions raise.

Sliding-window layers (Mistral, Qwen2, Gemma2/3, Cohere2, ModernBERT, ...): the layer's `sliding_window` keyword, the
one transformers' flash-attention path reads, becomes cp_attention's window_size exactly as that path maps it:
(sliding_window - 1, sliding_window - 1), so a causal layer sees its sliding_window most recent keys (itself
included: transformers' mask keeps key j for query i iff i - sliding_window < j <= i) and a bidirectional one
(ModernBERT passes its config's sliding_window + 1) the keys within config.sliding_window either side; applied at
global positions, across shards. The mask function checks that the mask transformers asked for is that sliding
window (local_size = its width, evaluated on this rank's indices); chunked attention (Llama 4's
attention_chunk_size, also a local_size) is refused. The window itself comes from the keyword, as in the flash path:
a model that built a windowed mask but passed no sliding_window would get full attention (transformers' models that
support flash attention pass it; tested: Qwen2, Mistral, ModernBERT).

Refused, on every rank alike (one rank refusing alone would leave its peers waiting in a collective): KV caches /
generation, chunked attention, packed documents and other custom mask functions, and position_ids that are not the
global positions of the shard (a model would embed the wrong positions silently).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers import masking_utils as _mu

from ..distributed import cp_attention
from ..distributed.context import require_cp
from .hf_kwargs import UNSUPPORTED, refuse_models_without_interface, refuse_unsupported

CP_NAME = "fastattn_cp"
_WHO = f'attn_implementation="{CP_NAME}"'


# What a rank may refuse, by code: the codes travel (one all-gather), so every rank raises the same message.
_PROBLEMS = {
    1: "a KV cache (generation: queries at an offset, or a mask over other keys than the queries') is not context "
       "parallel; generate on one rank with another implementation",
    2: "a windowed mask that is not a sliding window (chunked attention, or a custom function given local_size) "
       "is not supported under context parallelism",
    3: "the model built a custom mask (packed documents, position_ids that are not the global positions of the "
       "shard, or a custom mask function), which cannot be split across ranks",
    4: "position_ids are not the global positions of the ranks' tokens (in the CPConfig's layout): pass "
       "position_ids=shard_batch(batch, cp)['position_ids']",
}


def _agree(cp, code: int, device, padded: bool = False) -> bool:
    """One all-gather of every rank's (code, padded): raises the same ValueError on every rank when any rank found
    a problem (code > 0); else returns whether any rank has padding (then every rank passes its key mask: the
    ranks' calls must match)."""
    mine = torch.tensor([code, int(padded)], dtype=torch.int64, device=device)
    got = cp.comm.all_gather(mine).tolist()  # (W, 2)
    bad = [(r, c) for r, (c, _) in enumerate(got) if c]
    if bad:
        r, c = bad[0]
        where = f"rank {r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        raise ValueError(f"fastattn {_WHO}: {_PROBLEMS[c]} (found on {where} of {cp.world_size})")
    return any(p for _, p in got)


# Query rows per step when checking a mask function: (B, rows, S/W) bools at a time, never (S/W)^2.
_CHECK_ROWS = 1024


def _matches(mask_function, batch_size: int, length: int, cp, device, window=None, causal=True) -> bool:
    """True when mask_function, on this rank's local indices, is transformers' own mask of this kind: causal (within
    a sliding window of `window` keys, itself included: i - window < j <= i, when window is given) or bidirectional
    within `window` (|i - j| <= window). A causal one may also be cut at the runs of consecutive global positions of
    this rank's shard: the local mask transformers builds when the zigzag global position_ids make it see "packed
    sequences" (a position jump between a rank's two chunks). Evaluated by broadcasting indices, as transformers'
    non-vmap path does, a block of query rows at a time. Only the kind is checked: cp_attention applies it at
    global positions."""
    seg = torch.zeros(length, dtype=torch.long, device=device)
    for n, s in enumerate(cp.segments(length)):  # the config's own layout (1-D or the hybrid's 2-D one)
        seg[s.local:s.local + s.length] = n
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    kv = torch.arange(length, device=device)
    cut_ok = plain_ok = True  # which causal variant matches every block of rows so far
    for start in range(0, length, _CHECK_ROWS):
        q = torch.arange(start, min(start + _CHECK_ROWS, length), device=device)
        try:
            got = mask_function(b, h, q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1))  # (B|1, 1, rows, S/W)
        except (RuntimeError, IndexError, TypeError):  # not an index-based function: not transformers' own
            return False
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            return False
        d = q.view(-1, 1) - kv.view(1, -1)  # (rows, S/W): query index - key index
        if not causal:
            if not bool((got == (d.abs() <= window)).all()):
                return False
            continue
        plain = (d >= 0) if window is None else (d >= 0) & (d < window)  # (rows, S/W)
        plain_ok = plain_ok and window is not None and bool((got == plain).all())
        cut_ok = cut_ok and bool((got == (plain & (seg[q].view(-1, 1) == seg.view(1, -1)))).all())
        if not (plain_ok or cut_ok):
            return False
    return True


def _mask_problem(batch_size: int, cp, kw) -> int:
    """0, or the _PROBLEMS code of what this rank cannot compute."""
    mask_function = kw.get("mask_function", _mu.causal_mask_function)
    cache_position = kw.get("cache_position")
    if cache_position is not None:  # earlier 5.x
        q_length, q_offset = cache_position.shape[0], int(cache_position[0])
    else:
        q_length, q_offset = kw["q_length"], kw.get("q_offset", 0)
    kv_length, kv_offset = kw["kv_length"], kw.get("kv_offset", 0)
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    attention_mask = kw.get("attention_mask")
    if q_offset or kv_offset or kv_length != q_length or (attention_mask is not None and
                                                          attention_mask.shape[-1] != kv_length):
        return 1
    device = kw.get("device") or "cpu"
    local_size = kw.get("local_size")
    if local_size is not None:  # a sliding window (applied by the attention function) or chunked attention
        config = kw.get("config")
        chunk = getattr(config, "attention_chunk_size", None)
        if kw.get("use_vmap") or (chunk is not None and chunk == local_size
                                  and getattr(config, "sliding_window", None) != local_size):
            return 2
        # Without a position jump on this rank, the sliding causal function can look plain causal (a window wider
        # than the shard): cp_attention still applies the layer's window at global positions.
        if any(_matches(mask_function, batch_size, q_length, cp, device, local_size, causal)
               for causal in (True, False)):
            return 0
        return 2
    if mask_function in (_mu.causal_mask_function, _mu.bidirectional_mask_function):
        return 0
    # Not the plain function: accept it only if it is what zigzag position_ids make transformers build (use_vmap:
    # transformers' flag for user-supplied or/and mask functions, never the packed-sequence one).
    if not kw.get("use_vmap") and _matches(mask_function, batch_size, q_length, cp, device):
        return 0
    return 3


def fastattn_cp_mask(batch_size: int, **kw):
    """AttentionMaskInterface entry for "fastattn_cp": None (causality is the layer's, at global positions) or,
    when some rank has padding, this rank's key mask bool (B, 1, 1, S/W); or a ValueError on every rank (see the
    module docstring)."""
    refuse_models_without_interface(_WHO)
    cp = require_cp(f"fastattn {_WHO}")
    device = kw.get("device") or "cpu"
    attention_mask = kw.get("attention_mask")
    keys = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)  # (B, S/W)
    problem = _mask_problem(batch_size, cp, kw)
    if not _agree(cp, problem, device, padded=keys is not None and not problem and not bool(keys.all())):
        return None
    if keys is None:  # another rank has padding: the ranks' calls must match
        keys = torch.ones(batch_size, kw["kv_length"], dtype=torch.bool, device=device)
    return keys[:, None, None, :]  # (B, S/W) -> (B, 1, 1, S/W)


def _window_size(sliding_window: Optional[int], causal: bool) -> tuple:
    """The layer's `sliding_window` keyword -> cp_attention's (left, right), as transformers' flash-attention path
    maps it: (sliding_window - 1, sliding_window - 1), the right side 0 for a causal layer (its future is masked
    anyway); (-1, -1) without one. That path skips the window when the keys are no more than sliding_window: the same
    mask, since no key is then further than sliding_window - 1 from a query."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"fastattn {_WHO}: sliding_window must be a positive int (the number of keys a causal "
                         f"query sees, itself included), got {sliding_window!r}")
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


_WARNED_POOLING = False


def _warn_encoder_pooling() -> None:
    """Once per process: an encoder under CP returns this rank's rows, and transformers' poolers and classification
    heads (BertModel.pooler_output, ...ForSequenceClassification) read row 0 of what they get, which is the [CLS]
    token only on the rank holding global position 0; fastattn cannot see the model's head from its attention."""
    global _WARNED_POOLING
    if not _WARNED_POOLING:
        _WARNED_POOLING = True
        warnings.warn(f"fastattn {_WHO}: a bidirectional (encoder) layer under context parallelism: hidden states are "
                      f"this rank's rows, so a transformers pooler or classification head that reads token 0 sees the "
                      f"[CLS] token only on the rank holding global position 0 (fastattn.models.Bert shares it with "
                      f"every rank)", stacklevel=3)


def fastattn_cp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                  scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """AttentionInterface entry for "fastattn_cp": query (B, Hq, S/W, D), key/value (B, Hkv, S/W, D), this rank's
    shard -> (output (B, S/W, Hq, D), None), this rank's rows of attention over the whole sequence."""
    refuse_unsupported(kwargs, _WHO, tuple(UNSUPPORTED))
    cp = require_cp(f"fastattn {_WHO}")
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1) \
                or attention_mask.shape[-1] != key.shape[2]:
            raise ValueError(f"fastattn {_WHO}: got an attention mask {attention_mask.dtype} "
                             f"{tuple(attention_mask.shape)}; this implementation takes only its own key mask "
                             f"(B, 1, 1, {key.shape[2]}) bool: was the model's mask built for another "
                             f"attn_implementation?")
        key_padding_mask = attention_mask[:, 0, 0, :]  # (B, 1, 1, S/W) -> (B, S/W)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"fastattn {_WHO}: `softcap` is not supported yet; use attn_implementation='eager'")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"fastattn {_WHO}: {query.shape[2]} queries against {key.shape[2]} keys: context "
                         f"parallelism is self-attention over one sharded sequence (no cache, no cross-attention)")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and getattr(module, "layer_idx", 0) == 0:  # every layer gets the same ones
        # the model embedded these: they must be the shard's global positions
        want = cp.global_positions(query.shape[2] * cp.world_size, device=position_ids.device)
        ok = position_ids.shape[-1] == want.shape[0] and bool((position_ids == want).all())
        _agree(cp, 0 if ok else 4, query.device)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        _warn_encoder_pooling()
    out = cp_attention(query, key, value, cp=cp, causal=bool(is_causal), softmax_scale=scaling,
                       dropout_p=float(dropout), layout="bhsd", key_padding_mask=key_padding_mask,
                       window_size=_window_size(kwargs.get("sliding_window"), bool(is_causal)))
    return out.transpose(1, 2).contiguous(), None  # (B, H, S/W, D) -> (B, S/W, H, D)


def register_cp(name: str = CP_NAME) -> str:
    """Registers the CP implementation under `name` in both of transformers' interfaces. Runs on import."""
    AttentionInterface.register(name, fastattn_cp_attention_forward)
    _mu.AttentionMaskInterface.register(name, fastattn_cp_mask)
    return name


__all__ = ["register_cp", "fastattn_cp_attention_forward", "fastattn_cp_mask", "CP_NAME"]
