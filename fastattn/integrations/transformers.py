"""HuggingFace transformers integration: attn_implementation="fastattn" (transformers >= 5).

    import fastattn.integrations.transformers          # registers "fastattn" on import
    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")
    model.set_attn_implementation("fastattn")          # or switch a loaded model

transformers 5 builds each model's mask with the function registered under the same name in AttentionMaskInterface,
and hands that mask to the attention function registered in AttentionInterface. A name missing from the mask
interface makes transformers pass attention_mask=None (padding and causality silently lost), so register() fills
both. Our mask function returns the cheapest form the kernels can use:

    None                    no mask: causal (top-left, as SDPA) when the layer is causal and Sq > 1, else full.
    bool (B, 1, 1, L)       a key mask: key j is visible iff j < L and mask[b, 0, 0, j]; keys past L are cut off
                            (static caches, prefill of a pre-allocated cache); a causal layer aligns its diagonal
                            bottom-right against L (query i sits at L - Sq + i). Padding costs one bias row.
    bool (B, 1|H, Sq, Sk)   anything else (sliding windows, packed sequences, custom mask functions, a mask the
                            model will concatenate): transformers' own dense SDPA mask, used as is, no extra causal.

Context parallelism: attn_implementation="fastattn_cp" (cp_transformers.py, registered with "fastattn") runs
each attention over a sequence sharded across the ranks of the CPConfig entered with
`fastattn.distributed.context_parallel(cp)`.

transformers 4.x is refused with an explanation (its BERT/GPT-2 do not route attention through these interfaces).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from .. import functional
from ..backends import get_backend

NAME = "fastattn"

try:
    import transformers
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastattn.integrations.transformers needs HuggingFace transformers >= 5: "
                      "pip install 'fastattn[transformers]' (or 'transformers>=5')") from e

_MAJOR = int(transformers.__version__.split(".")[0])
if _MAJOR < 5:
    raise ImportError(
        f"fastattn.integrations.transformers supports transformers >= 5 (found {transformers.__version__}): 4.x models "
        f"build masks and call attention through older code paths that would drop padding or causality. Upgrade "
        f"with pip install 'transformers>=5', or keep attn_implementation='sdpa' on 4.x.")


def _standard_mask_function(fn) -> Optional[str]:
    if fn is _mu.causal_mask_function:
        return "causal"
    if fn is _mu.bidirectional_mask_function:
        return "bidirectional"
    return None


def _padding(attention_mask, kv_offset: int, kv_length: int, device):
    """2-D mask (B, seen + new) -> bool (B, Sk) for the keys of this call (False past its end: static caches)."""
    if attention_mask is None:
        return None
    am = attention_mask.to(device=device, dtype=torch.bool)
    if am.shape[-1] < kv_offset + kv_length:
        am = torch.nn.functional.pad(am, (0, kv_offset + kv_length - am.shape[-1]))
    return am[:, kv_offset:kv_offset + kv_length]


def fastattn_mask(batch_size: int, **kw):
    """AttentionMaskInterface entry for "fastattn": see the module docstring for the three forms returned.

    Takes transformers' keyword arguments as given (q_length/q_offset in recent 5.x, cache_position in earlier
    5.x) and forwards them unchanged to transformers' sdpa_mask when it falls back to a dense mask."""
    mask_function = kw.get("mask_function", _mu.causal_mask_function)
    kv_length, kv_offset = kw["kv_length"], kw.get("kv_offset", 0)
    attention_mask, local_size = kw.get("attention_mask"), kw.get("local_size")
    allow_causal_skip = kw.get("allow_is_causal_skip", True)
    allow_bidir_skip = kw.get("allow_is_bidirectional_skip", False)
    cache_position = kw.get("cache_position")
    if cache_position is not None:  # earlier 5.x: absolute positions of the queries
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    else:
        q_length, q_offset = kw["q_length"], kw.get("q_offset", 0)
    device = kw.get("device") or (cache_position.device if cache_position is not None else
                                  attention_mask.device if attention_mask is not None else "cpu")

    kind = _standard_mask_function(mask_function)
    windowed = local_size is not None and kv_length >= local_size
    # The caller asks for a materialised mask (e.g. to concatenate it): give transformers' dense one.
    must_materialise = (kind == "causal" and not allow_causal_skip and q_length > 1) or \
                       (kind == "bidirectional" and not allow_bidir_skip)
    if kind is None or windowed or must_materialise:
        return _mu.sdpa_mask(batch_size, **kw)
    padding = _padding(attention_mask, kv_offset, kv_length, device)  # (B, Sk) or None
    if kind == "bidirectional":
        if padding is None or bool(padding.all()):
            return None
        return padding[:, None, None, :]  # (B, Sk) -> (B, 1, 1, Sk)

    # Causal: query i sits at absolute position q_offset + i, key j at kv_offset + j.
    if q_length == 1:
        # Decode: keep the full width (stable shapes for compiled static-cache decoding); the single query sees
        # every key up to its own position.
        if allow_causal_skip and (padding is None or bool(padding.all())) and \
                not isinstance(q_offset, torch.Tensor) and q_offset - kv_offset + 1 >= kv_length:
            return None
        j = torch.arange(kv_length, device=device)
        keep = (j <= (q_offset - kv_offset)).unsqueeze(0)  # (1, Sk)
        keep = keep if padding is None else keep & padding
        return keep.expand(batch_size, kv_length)[:, None, None, :]  # (B, Sk) -> (B, 1, 1, Sk)
    visible = min(int(q_offset) - kv_offset + q_length, kv_length)  # keys at or past this are everyone's future
    if visible <= 0:
        return torch.zeros(batch_size, 1, 1, 1, dtype=torch.bool, device=device)  # nothing visible: all rows 0
    if padding is not None:
        padding = padding[:, :visible]  # (B, visible)
    if allow_causal_skip and int(q_offset) == kv_offset and (padding is None or bool(padding.all())):
        return None  # queries and keys start together: plain top-left causal (keys past Sq are cut by attention)
    if padding is None:
        padding = torch.ones(batch_size, visible, dtype=torch.bool, device=device)
    return padding[:, None, None, :]  # (B, visible) -> (B, 1, 1, visible)


def fastattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, *,
                               backend: Optional[str] = None, **kwargs):
    """AttentionInterface entry for "fastattn".

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) views -> (output (B, Sq, Hq, D), None). `scaling` is always
    used as given (GPT-2 may divide it by layer index + 1); dropout applies whenever > 0 (transformers passes 0
    outside training); causality is `is_causal` when given, else module.is_causal."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fastattn's transformers integration does not support `softcap` yet; use "
                         "attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        warnings.warn("attn_implementation='fastattn' never forms attention probabilities; output_attentions "
                      "returns None. Use attn_implementation='eager' to get them.", stacklevel=2)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    Sq, Sk = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    mask, causal = attention_mask, False
    position_bias = kwargs.get("position_bias")

    if mask is None:
        causal = bool(is_causal) and Sq > 1
        if causal and Sk > Sq:  # top-left causal: keys past Sq are in every query's future
            key, value = key[:, :, :Sq], value[:, :, :Sq]
    elif mask.dim() == 4 and mask.shape[-2] == 1 and mask.dtype == torch.bool:
        # Key mask (B, 1, 1, L): cut keys to L, causal aligned bottom-right against L.
        L = mask.shape[-1]
        if L > Sk:
            raise ValueError(f"fastattn: attention mask covers {L} keys but the layer has {Sk}")
        key, value = key[:, :, :L], value[:, :, :L]
        if is_causal and Sq > 1:
            if Sq == L:
                causal = True  # top-left == bottom-right; the kernel combines causality with the key mask
            else:  # Sq != L (chunked prefill against a cache): fold the bottom-right diagonal into the mask
                i = torch.arange(Sq, device=mask.device).view(Sq, 1)
                j = torch.arange(L, device=mask.device).view(1, L)
                mask = mask & (j <= i + (L - Sq))  # (B, 1, Sq, L)
    else:
        # Dense mask (transformers' own, or a user's 4-D mask): complete as given; it may cover fewer keys.
        L = mask.shape[-1]
        if L < Sk:
            key, value = key[:, :, :L], value[:, :, :L]
    if position_bias is not None:  # additive bias (T5-style models); fold the mask into it
        bias = position_bias[..., :key.shape[2]]
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        if causal:
            i = torch.arange(Sq, device=bias.device).view(Sq, 1)
            j = torch.arange(key.shape[2], device=bias.device).view(1, -1)
            bias = bias.masked_fill(j > i, float("-inf"))
            causal = False
        mask = bias

    out = functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=float(dropout),
                                                  is_causal=causal, scale=scaling, enable_gqa=gqa, backend=backend)
    return out.transpose(1, 2).contiguous(), None  # (B, H, Sq, D) -> (B, Sq, H, D)


def register(name: str = NAME, backend: Optional[str] = None) -> str:
    """Registers `name` in transformers' AttentionInterface AND AttentionMaskInterface (both are needed), with an
    optional fixed fastattn backend (None = auto). Returns the name. Runs with the defaults on import."""
    if not isinstance(name, str) or not name or "flash" in name or "/" in name or name.startswith("paged|"):
        raise ValueError(f"fastattn: attention implementation name {name!r} is invalid: transformers treats names "
                         f"containing 'flash' or '/' (and 'paged|' prefixes) specially")
    if backend is not None and backend != "auto":
        get_backend(backend)  # unknown names raise now
    fn = fastattn_attention_forward if backend is None else functools.partial(fastattn_attention_forward,
                                                                              backend=backend)
    AttentionInterface.register(name, fn)
    _mu.AttentionMaskInterface.register(name, fastattn_mask)
    return name


register()

from .cp_transformers import CP_NAME, fastattn_cp_attention_forward, fastattn_cp_mask, register_cp  # noqa: E402

register_cp()

__all__ = ["register", "fastattn_attention_forward", "fastattn_mask", "NAME", "register_cp",
           "fastattn_cp_attention_forward", "fastattn_cp_mask", "CP_NAME"]
