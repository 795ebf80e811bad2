"""Drop-in modules: fastattn.nn.MultiheadAttention, and patch/unpatch to swap it into existing models.

Two supported ways to put fastattn under existing PyTorch code:
1. The global swap, one line: every later call of torch.nn.functional.scaled_dot_product_attention (your code,
   nn.MultiheadAttention's functional path, transformers' "sdpa" attention, CausalBias) runs fastattn's drop-in:
       torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention
       # undo: torch.nn.functional.scaled_dot_product_attention = fastattn.backends.sdpa.TORCH_SDPA
   fastattn's `sdpa` backend calls PyTorch's function captured at import (TORCH_SDPA), never the patched name, so
   calls routed there (float64, mask gradients) do not recurse. Modules that bound the name earlier (`from
   torch.nn.functional import scaled_dot_product_attention`) keep PyTorch's.
2. fastattn.patch(model) / fastattn.unpatch(model): swap every torch.nn.MultiheadAttention for the one below, in
   place (the bottom of this file).

MultiheadAttention subclasses torch.nn.MultiheadAttention, so the constructor, the parameters (in_proj_weight or
q/k/v_proj_weight, in_proj_bias, out_proj, bias_k/bias_v) and therefore the state_dict keys are PyTorch's own: a
checkpoint loads unchanged, and code that reads its attributes (nn.TransformerEncoderLayer does) keeps working.
Only forward changes: attention runs through fastattn.scaled_dot_product_attention."""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional
from .backends import get_backend


def _keep_off_torch_fast_path(module, args):
    """A no-op forward pre-hook. nn.TransformerEncoderLayer skips its fused fast path (which would read our weights
    and never call our forward) whenever a submodule has hooks; this one is how we opt out of it."""
    return None


def _to_additive(mask: Tensor, dtype) -> Tensor:
    """PyTorch MHA mask (bool: True = do NOT attend; float: added) -> float additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    r"""torch.nn.MultiheadAttention with fastattn underneath; same constructor, forward, masks and state_dict.

    Args: as torch.nn.MultiheadAttention (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
    vdim, batch_first, device, dtype), plus keyword-only ``backend`` (a fastattn backend name; None = auto).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None), as PyTorch:
        key_padding_mask (N, S) or (S,): bool True = ignore that key, or float added to the scores.
        attn_mask (L, S) or (N*num_heads, L, S): bool True = not allowed, or float added to the scores.
        is_causal: a hint that attn_mask is the causal mask; it requires attn_mask (as PyTorch) and lets the
            kernel apply causality itself instead of reading the mask.
        dropout on the attention probabilities applies in training mode only.

    Weights: like PyTorch, need_weights defaults to True. The fused kernels never form the probability matrix, so
    need_weights=True runs the naive reference computation (softmax(QK^T)V, materialising (L, S) per head) and
    returns its weights, averaged over heads unless average_attn_weights=False. Pass need_weights=False (as
    nn.TransformerEncoderLayer does) to get the fused path.

    Differences from PyTorch: query rows whose keys are all masked give output 0 (and weights 0) instead of NaN;
    NestedTensor inputs only as nn.TransformerEncoder passes them (self-attention, no masks); with is_causal=True and
    need_weights=False the hint is trusted even beside a key_padding_mask (PyTorch then reads attn_mask instead: the
    two differ only when attn_mask is not the causal mask); torch.jit.script refuses the module (unpatch first).
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.register_forward_pre_hook(_keep_off_torch_fast_path)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if isinstance(query, torch.fx.Proxy):  # torch.fx.symbolic_trace: one call of this module, as torch's MHA
            tracer = query.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (query, key, value), dict(
                key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal))
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"fastattn.nn.MultiheadAttention: {name} must be a Tensor, got {type(t).__name__}")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal)
        self_attention = query is key and key is value  # before the transposes below make new tensors
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"fastattn.nn.MultiheadAttention: query, key, value must all be 3-D (batched) or 2-D "
                             f"(unbatched), got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if is_causal and attn_mask is None:
            raise RuntimeError("fastattn.nn.MultiheadAttention: is_causal=True is a hint that attn_mask is the causal "
                               "mask and needs attn_mask (as in PyTorch); see "
                               "nn.Transformer.generate_square_subsequent_mask")
        # Work batch-first: (N, L, E).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)  # (L, E) -> (1, L, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (S,) -> (1, S)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (L, N, E) -> (N, L, E)
        N, L, E = query.shape
        S = key.shape[1]
        H, Dh = self.num_heads, self.head_dim
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"fastattn.nn.MultiheadAttention: expected query/key/value feature sizes "
                             f"({self.embed_dim}, {self.kdim}, {self.vdim}), got ({E}, {key.shape[-1]}, "
                             f"{value.shape[-1]})")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise ValueError(f"fastattn.nn.MultiheadAttention: batch/sequence sizes disagree: query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} "
                             f"(batch-first view)")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                # torch's module asserts the same; read as additive, an int mask would add +1 to the "padded" keys
                raise TypeError(f"fastattn.nn.MultiheadAttention: {name} must be bool (True = do not attend) or "
                                f"floating (added to the scores), got {m.dtype} {tuple(m.shape)}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"fastattn.nn.MultiheadAttention: key_padding_mask must be ({N}, {S}) (or ({S},) "
                             f"unbatched), got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
                attn_mask = attn_mask.view(1, 1, L, S)  # (L, S) -> (1, 1, L, S)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (N * H, L, S):
                attn_mask = attn_mask.view(N, H, L, S)  # (N*H, L, S) -> (N, H, L, S)
            else:
                raise ValueError(f"fastattn.nn.MultiheadAttention: attn_mask must be ({L}, {S}) or ({N * H}, {L}, "
                                 f"{S}), got {tuple(attn_mask.shape)}")

        q, k, v = self._project(query, key, value, self_attention)  # (N, L, E), (N, S, E), (N, S, E)
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)  # (N, S+1, E)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)  # (N, S'+1, E)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            extra += 1
        Sk = k.shape[1]
        q = q.view(N, L, H, Dh).transpose(1, 2)  # (N, L, E) -> (N, H, L, Dh)
        k = k.view(N, Sk, H, Dh).transpose(1, 2)  # (N, Sk, E) -> (N, H, Sk, Dh)
        v = v.view(N, Sk, H, Dh).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0

        # Masks, in fastattn's SDPA convention (bool True = attend, or additive float), widened by `extra` keys.
        kpm = None
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(N, 1, 1, S)  # (N, S) -> (N, 1, 1, S)
            if extra:
                kpm = F.pad(kpm, (0, extra), value=False if kpm.dtype == torch.bool else 0.0)
        am = attn_mask
        if am is not None and extra:
            am = F.pad(am, (0, extra), value=False if am.dtype == torch.bool else 0.0)
        # Trust the hint (as PyTorch does without a key_padding_mask): the kernel applies causality itself.
        use_causal = is_causal and not need_weights and (key_padding_mask is None or extra == 0)
        if use_causal:
            am = None
        mask = self._merge(am, kpm, q.dtype)

        if need_weights:
            out, weights = self._reference(q, k, v, mask, dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights  # (N, H, L, Sk) -> (N, L, Sk)
        else:
            out = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                          is_causal=use_causal, backend=self.backend)
            weights = None
        if batched and not self.batch_first:  # contiguous in the caller's layout, as PyTorch returns it
            out = out.permute(2, 0, 1, 3).reshape(L, N, E)  # (N, H, L, Dh) -> (L, N, H, Dh) -> (L, N, E)
        else:
            out = out.transpose(1, 2).reshape(N, L, E)  # (N, H, L, Dh) -> (N, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)  # (1, L, E) -> (L, E)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                        is_causal):
        """NestedTensor self-attention, as nn.TransformerEncoder passes it (eval, no_grad, src_key_padding_mask, no
        mask; it does so to modules patched or built before the encoder): padded, run with a key-padding mask,
        returned nested in the same lengths, so padded rows stay out of the encoder's output (0 there, as PyTorch)."""
        if not (query is key and key is value and query.is_nested and self.batch_first and attn_mask is None
                and key_padding_mask is None and not is_causal and not need_weights and query.dim() == 3):
            raise ValueError("fastattn.nn.MultiheadAttention: NestedTensor inputs are supported only as "
                             "nn.TransformerEncoder passes them: self-attention (query is key is value), batch_first, "
                             "need_weights=False, no attn_mask, key_padding_mask or is_causal")
        lengths = [t.shape[0] for t in query.unbind()]
        x = query.to_padded_tensor(0.0)  # (N, max L, E)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= torch.tensor(lengths, device=x.device)[:, None]
        out, _ = self.forward(x, x, x, key_padding_mask=pad, need_weights=False)  # (N, max L, E)
        return torch.nested.nested_tensor([out[i, :n] for i, n in enumerate(lengths)]), None

    def _project(self, query, key, value, self_attention):
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            if self_attention:  # one GEMM, q/k/v are views of its output
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(E, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(E, dim=0)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(E)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    @staticmethod
    def _merge(am, kpm, dtype):
        """Two PyTorch-convention masks -> one fastattn mask (bool True = attend, or additive float), or None."""
        masks = [m for m in (am, kpm) if m is not None]
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            keep = ~masks[0]
            for m in masks[1:]:
                keep = keep & ~m
            return keep  # bool; a key-padding mask alone stays (N, 1, 1, S) so kernels can skip padded keys
        bias = _to_additive(masks[0], dtype)
        for m in masks[1:]:
            bias = bias + _to_additive(m, dtype)
        return bias

    @staticmethod
    def _reference(q, k, v, mask, dropout_p):
        """Naive attention that also returns the probabilities (N, H, L, Sk); empty rows give 0, not NaN."""
        s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, H, L, Sk)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        empty = torch.isneginf(s).all(dim=-1, keepdim=True)
        p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        return torch.matmul(p, v), p


# ------------------------------------------------------------------------------------------------- patch / unpatch
# fastattn.patch(model) / fastattn.unpatch(model): swap every torch.nn.MultiheadAttention for fastattn's, in place.
#
# The swap changes each module's class to fastattn.nn.MultiheadAttention (a subclass with the same attributes), so
# parameters, buffers, hooks, devices and optimizer references stay exactly as they were; only forward changes.
# nn.TransformerEncoderLayer would otherwise bypass forward through its fused inference fast path, which reads
# self_attn's weights directly: the swapped module carries a no-op forward pre-hook (the layer skips its fast path
# when hooks are present). nn.TransformerEncoder's nested-tensor path stays on: the layers then run PyTorch's
# Python path on nested tensors and the swapped module takes them (MultiheadAttention._forward_nested).


def patch(model: torch.nn.Module, backend: Optional[str] = None) -> List[str]:
    """Replaces every torch.nn.MultiheadAttention inside `model` (the model itself included) by
    fastattn.nn.MultiheadAttention, in place, keeping weights. Returns the qualified names replaced ("" = model).

    Subclasses of nn.MultiheadAttention are left alone (their forward or attributes may differ). A model with no
    nn.MultiheadAttention gets a warning (transformers models: use attn_implementation="fastattn").
    backend: a fastattn backend name for the swapped modules (None = auto; modules already on fastattn keep theirs
    unless one is given). Undo with fastattn.unpatch(model)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastattn.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        if backend != "auto":
            get_backend(backend)  # unknown names raise here, not at the first forward
    replaced = []
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.MultiheadAttention:
            mod.__class__ = MultiheadAttention
            mod.backend = backend
            mod.register_forward_pre_hook(_keep_off_torch_fast_path)
            replaced.append(name)
        elif isinstance(mod, MultiheadAttention) and backend is not None:
            mod.backend = backend
    if not replaced and not any(isinstance(m, MultiheadAttention) for m in model.modules()):
        # A silent no-op would leave the user believing the model runs on fastattn.
        subclasses = sum(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
        hint = f" ({subclasses} subclass(es) of it, left alone)" if subclasses else ""
        if any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
            hint += ("; transformers models compute attention in their own modules: load them with "
                    "attn_implementation=\"fastattn\" (after import fastattn.integrations.transformers)")
        warnings.warn(f"fastattn.patch: no torch.nn.MultiheadAttention in this {type(model).__name__}, nothing was "
                      f"replaced{hint}", UserWarning, stacklevel=2)
    return replaced


def unpatch(model: torch.nn.Module) -> List[str]:
    """Turns every fastattn.nn.MultiheadAttention inside `model` back into torch.nn.MultiheadAttention (in place,
    weights kept; also ones built directly as fastattn modules). Returns the qualified names restored."""
    restored = []
    for name, mod in model.named_modules():
        if type(mod) is MultiheadAttention:
            for key, hook in list(mod._forward_pre_hooks.items()):
                if hook is _keep_off_torch_fast_path:
                    del mod._forward_pre_hooks[key]
            mod.__dict__.pop("backend", None)
            mod.__class__ = torch.nn.MultiheadAttention
            restored.append(name)
    return restored


__all__ = ["MultiheadAttention", "patch", "unpatch"]
