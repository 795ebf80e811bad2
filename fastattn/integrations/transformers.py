"""HuggingFace transformers integration: attn_implementation="fastattn" (transformers >= 5).

    import fastattn.integrations.transformers          # registers "fastattn" on import
    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")
    model.set_attn_implementation("fastattn")          # or switch a loaded model

transformers 5 builds each model's mask with the function registered under the same name in AttentionMaskInterface,
and hands that mask to the attention function registered in AttentionInterface. A name missing from the mask
interface makes transformers pass attention_mask=None (padding and causality silently lost), so register() fills
both. Our mask function returns the cheapest form the kernels can use:

    None                    no mask: causal (top-left, as SDPA) when the layer is causal and Sq > 1, else full.
    bool (B, 1, 1, L)       a key mask for a causal mask function, marked by stride 0 in its size-1 dims (_key_mask):
                            key j is visible iff j < L and mask[b, 0, 0, j]; keys past L are cut off (static caches,
                            prefill of a pre-allocated cache); a causal layer aligns its diagonal bottom-right against
                            L (query i sits at L - Sq + i). Padding costs one bias row.
    bool (B, 1, 1, Sk)      a bidirectional mask function's padding: complete as given, as every mask not marked.
    bool (B, 1|H, Sq, Sk)   anything else (sliding windows, packed sequences, custom mask functions, a mask the
                            model will concatenate): transformers' own dense SDPA mask, used as is, no extra causal.

A mask the attention function gets that is not marked (a user's 4-D mask, another mask function's) is read as SDPA
reads it: complete, never made causal by the layer's flag, and it must cover the layer's keys.

The attention function also takes what some models pass beyond SDPA's arguments: attention sinks (`s_aux`, GPT-OSS;
`sinks`), `softcap` (Gemma 2) and `position_bias` (T5); keywords no kernel implements raise (hf_kwargs.py).

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
from ..params import no_values
from .hf_kwargs import refuse_models_without_interface, refuse_unsupported

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


def _key_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> the key mask (B, 1, 1, L), marked as this mask function's own by stride 0 in its two size-1
    dims: the attention function reads causality from the layer for these alone. Another (B, 1, 1, L) bool mask (a
    user's, a bidirectional one, transformers' own) is complete as given, as SDPA reads it. Contiguous, so that the
    .contiguous() generate() applies to masks for static caches keeps it as it is (and the mark with it)."""
    keep = keep.contiguous()  # (B, L)
    return keep.as_strided((keep.shape[0], 1, 1, keep.shape[1]), (keep.shape[1], 0, 0, 1))  # (B, L) -> (B, 1, 1, L)


def _is_key_mask(mask: torch.Tensor) -> bool:
    return mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[1] == mask.shape[2] == 1 and \
        mask.stride(1) == 0 and mask.stride(2) == 0


def fastattn_mask(batch_size: int, **kw):
    """AttentionMaskInterface entry for "fastattn": see the module docstring for the three forms returned.

    Takes transformers' keyword arguments as given (q_length/q_offset in recent 5.x, cache_position in earlier
    5.x) and forwards them unchanged to transformers' sdpa_mask when it falls back to a dense mask."""
    refuse_models_without_interface("attn_implementation='fastattn'")
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
    # While torch.compile traces, no shortcut may read tensor values (`padding.all()`, a tensor q_offset): the
    # forms below stay the same, only the cases that would drop the mask on its values keep it.
    compiling = no_values(attention_mask, cache_position)  # (fake tensors have no values either)
    windowed = local_size is not None and kv_length >= local_size
    # The caller asks for a materialised mask (e.g. to concatenate it): give transformers' dense one.
    must_materialise = (kind == "causal" and not allow_causal_skip and q_length > 1) or \
                       (kind == "bidirectional" and not allow_bidir_skip)
    if kind is None or windowed or must_materialise:
        return _mu.sdpa_mask(batch_size, **kw)
    padding = _padding(attention_mask, kv_offset, kv_length, device)  # (B, Sk) or None
    if kind == "bidirectional":
        if padding is None or not compiling and bool(padding.all()):
            return None
        return padding[:, None, None, :]  # (B, Sk) -> (B, 1, 1, Sk)

    # Causal: query i sits at absolute position q_offset + i, key j at kv_offset + j.
    if q_length == 1:
        # Decode: keep the full width (stable shapes for compiled static-cache decoding); the single query sees
        # every key up to its own position.
        if allow_causal_skip and (padding is None or not compiling and bool(padding.all())) and \
                not isinstance(q_offset, torch.Tensor) and q_offset - kv_offset + 1 >= kv_length:
            return None
        j = torch.arange(kv_length, device=device)
        keep = (j <= (q_offset - kv_offset)).unsqueeze(0)  # (1, Sk)
        keep = keep if padding is None else keep & padding
        return _key_mask(keep.expand(batch_size, kv_length))  # (B, Sk) -> (B, 1, 1, Sk)
    if compiling and isinstance(q_offset, torch.Tensor):  # where the keys stop depends on its value
        return _mu.sdpa_mask(batch_size, **kw)
    visible = min(int(q_offset) - kv_offset + q_length, kv_length)  # keys at or past this are everyone's future
    if visible <= 0:  # nothing visible: all rows 0
        return _key_mask(torch.zeros(batch_size, 1, dtype=torch.bool, device=device))  # (B, 1) -> (B, 1, 1, 1)
    if padding is not None:
        padding = padding[:, :visible]  # (B, visible)
    if allow_causal_skip and int(q_offset) == kv_offset and (padding is None or not compiling and
                                                             bool(padding.all())):
        return None  # queries and keys start together: plain top-left causal (keys past Sq are cut by attention)
    if padding is None:
        padding = torch.ones(batch_size, visible, dtype=torch.bool, device=device)
    return _key_mask(padding)  # (B, visible) -> (B, 1, 1, visible)


def sink_logits(kwargs, query: torch.Tensor) -> Optional[torch.Tensor]:
    """Attention sinks' logits as (B|1, Hq, Sq|1), or None: `s_aux` (Hq,) as GPT-OSS passes its learned sinks, or
    `sinks` (B, Hq, Sq, 1) per token. A sink is one more logit in each row's softmax whose value is zero: it only
    takes probability mass (the eager models concatenate it to the scores and drop its column after the softmax)."""
    s_aux, sinks = kwargs.get("s_aux"), kwargs.get("sinks")
    B, Hq, Sq, _ = query.shape
    if s_aux is not None and sinks is not None:
        raise ValueError("fastattn: got both `s_aux` and `sinks`; a model passes one of them")
    if s_aux is not None:
        if not isinstance(s_aux, torch.Tensor) or s_aux.dim() != 1 or s_aux.shape[0] != Hq:
            raise ValueError(f"fastattn: `s_aux` must be a tensor of one logit per query head ({Hq},), got "
                             f"{tuple(getattr(s_aux, 'shape', ()))}")
        return s_aux.view(1, Hq, 1)  # (Hq,) -> (1, Hq, 1)
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 4 or sinks.shape[-1] != 1 or \
            any(n not in (1, want) for n, want in zip(sinks.shape[:3], (B, Hq, Sq))) or sinks.shape[1] != Hq:
        raise ValueError(f"fastattn: `sinks` must be (B|1, {Hq}, Sq|1, 1) for query {tuple(query.shape)}, got "
                         f"{tuple(getattr(sinks, 'shape', ()))}")
    return sinks[..., 0]  # (B|1, Hq, Sq|1, 1) -> (B|1, Hq, Sq|1)


def _with_sink_key(key, value, mask, sinks, query):
    """A sink as one more key in front: k = 0 and v = 0, its score (0) plus the sink's logit through a float mask,
    seen by every row (causality aligned bottom-right keeps it visible: it sits one key before the first one).
    Differentiable in every input, the sinks included (the lse route's lse is not)."""
    Hq = query.shape[1]
    key = torch.nn.functional.pad(key, (0, 0, 1, 0))  # (B, Hkv, Sk, D) -> (B, Hkv, 1 + Sk, D)
    value = torch.nn.functional.pad(value, (0, 0, 1, 0))  # (B, Hkv, Sk, Dv) -> (B, Hkv, 1 + Sk, Dv)
    Sk = key.shape[2] - 1
    if mask is None:
        base = query.new_zeros(1, 1, 1, Sk)
    elif mask.dtype == torch.bool:
        base = query.new_zeros(mask.shape).masked_fill(~mask, float("-inf"))
    else:
        base = mask.to(query.dtype)
    base = base.reshape((1,) * (4 - base.dim()) + tuple(base.shape))  # (.., Sq|1, Sk) -> (B|1, H|1, Sq|1, Sk)
    sink = sinks.to(query.dtype)[..., None]  # (B|1, Hq, Sq|1) -> (B|1, Hq, Sq|1, 1)
    rows = (max(base.shape[0], sink.shape[0]), Hq, max(base.shape[2], sink.shape[2]))
    mask = torch.cat([sink.expand(*rows, 1), base.expand(*rows, Sk)], dim=-1)  # (B|1, Hq, Sq|1, 1 + Sk)
    return key, value, mask


def fastattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, *,
                               backend: Optional[str] = None, **kwargs):
    """AttentionInterface entry for "fastattn".

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) views -> (output (B, Sq, Hq, D), None). `scaling` is always
    used as given (GPT-2 may divide it by layer index + 1); dropout applies whenever > 0 (transformers passes 0
    outside training); causality is `is_causal` when given, else module.is_causal. Also takes `softcap` (Gemma 2),
    attention sinks (`s_aux`, GPT-OSS; `sinks`) and `position_bias` (T5); raises for the UNSUPPORTED ones."""
    refuse_unsupported(kwargs, "attn_implementation='fastattn'", ("indices", "block_indices"))
    softcap = float(kwargs.get("softcap") or 0.0)
    sinks = sink_logits(kwargs, query)
    if kwargs.get("output_attentions", False):
        warnings.warn("attn_implementation='fastattn' never forms attention probabilities; output_attentions "
                      "returns None. Use attn_implementation='eager' to get them.", stacklevel=2)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    Sq, Sk = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    mask, causal = attention_mask, False
    position_bias = kwargs.get("position_bias")

    # Below, `causal` is aligned bottom-right: query i sees keys j <= i + Sk - Sq of the keys the call keeps.
    if mask is None:
        causal = bool(is_causal) and Sq > 1
        if causal and Sk > Sq:  # top-left causal: keys past Sq are in every query's future
            key, value = key[:, :, :Sq], value[:, :, :Sq]
        elif causal and Sk < Sq:  # top-left differs from bottom-right here: give it as a mask
            mask = torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).tril()[None, None]  # (1, 1, Sq, Sk)
            causal = False
    elif _is_key_mask(mask):
        # fastattn_mask's key mask (B, 1, 1, L): cut keys to L, causal aligned bottom-right against L.
        L = mask.shape[-1]
        if L > Sk:
            raise ValueError(f"fastattn: attention mask covers {L} keys but the layer has {Sk}")
        key, value = key[:, :, :L], value[:, :, :L]
        causal = bool(is_causal) and Sq > 1
    elif mask.shape[-1] not in (Sk, 1):
        # Dense mask (transformers' own, or a user's): complete as given, no causality added (as SDPA)
        raise ValueError(f"fastattn: attention mask {tuple(mask.shape)} does not cover the layer's {Sk} keys "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if position_bias is not None:  # additive bias (T5-style models); fold the mask into it
        bias = position_bias[..., :key.shape[2]]
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        if causal:
            n = key.shape[2]
            i = torch.arange(Sq, device=bias.device).view(Sq, 1)
            j = torch.arange(n, device=bias.device).view(1, -1)
            bias = bias.masked_fill(j > i + (n - Sq), float("-inf"))
            causal = False
        mask = bias

    args = dict(dropout_p=float(dropout), scale=scaling, enable_gqa=gqa, backend=backend)
    if sinks is not None and torch.is_grad_enabled() and \
            any(t.requires_grad for t in (query, key, value, sinks) + ((mask,) if mask is not None else ())):
        key, value, mask = _with_sink_key(key, value, mask, sinks, query)
        sinks = None
    plain = sinks is None and softcap == 0.0 and (not causal or key.shape[2] == Sq)
    if plain:  # the SDPA function itself (its lean path replays the route of plain CPU calls)
        out = functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, **args)
    elif sinks is None:
        out = functional.attention(query, key, value, mask, is_causal=causal, softcap=softcap, bottom_right=True,
                                   **args)
    else:  # inference with sinks: out * l / (l + exp(sink)) = out * sigmoid(lse - sink), from the kernel's lse
        out, lse = functional.attention(query, key, value, mask, is_causal=causal, softcap=softcap,
                                        bottom_right=True, return_lse=True, **args)
        keep = torch.sigmoid(lse - sinks.float())  # (B, Hq, Sq) fp32
        out = (out.float() * keep[..., None]).to(out.dtype)
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
