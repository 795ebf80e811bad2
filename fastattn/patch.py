"""Two supported ways to put fastattn under existing PyTorch code.

1. The global swap, one line: every later call of torch.nn.functional.scaled_dot_product_attention (your code,
   nn.MultiheadAttention's functional path, transformers' "sdpa" attention, CausalBias) runs fastattn's drop-in:

       torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention
       # undo: torch.nn.functional.scaled_dot_product_attention = fastattn.backends.sdpa.TORCH_SDPA

   It is safe: fastattn's `sdpa` backend calls PyTorch's function captured at import (TORCH_SDPA), never the
   patched name, so calls routed there (float64, mask gradients) do not recurse. Modules that bound the name
   earlier (`from torch.nn.functional import scaled_dot_product_attention`) keep PyTorch's. What still differs from
   PyTorch is listed in the README (API section).

2. fastattn.patch(model) / fastattn.unpatch(model): swap every torch.nn.MultiheadAttention for fastattn's, in place.

The swap changes each module's class to fastattn.nn.MultiheadAttention (a subclass with the same attributes), so
parameters, buffers, hooks, devices and optimizer references stay exactly as they were; only forward changes.
nn.TransformerEncoder(Layer) would otherwise bypass forward through its fused inference fast path, which reads
self_attn's weights directly: the swapped module carries a no-op forward pre-hook (the layer skips its fast path
when hooks are present) and each TransformerEncoder containing it gets use_nested_tensor=False (restored by
unpatch)."""
from __future__ import annotations

from typing import List, Optional

import torch

_NESTED_FLAG = "_fastattn_saved_use_nested_tensor"


def patch(model: torch.nn.Module, backend: Optional[str] = None) -> List[str]:
    """Replaces every torch.nn.MultiheadAttention inside `model` (the model itself included) by
    fastattn.nn.MultiheadAttention, in place, keeping weights. Returns the qualified names replaced ("" = model).

    Subclasses of nn.MultiheadAttention with their own forward are left alone (their forward may differ).
    backend: a fastattn backend name for the swapped modules (None = auto). Undo with fastattn.unpatch(model)."""
    from .dispatch import requested_backend
    from .nn import MultiheadAttention, _keep_off_torch_fast_path

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastattn.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        requested_backend(backend)  # unknown names raise here, not at the first forward
    replaced = []
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.MultiheadAttention:
            mod.__class__ = MultiheadAttention
            mod.backend = backend
            mod.register_forward_pre_hook(_keep_off_torch_fast_path)
            replaced.append(name)
        elif isinstance(mod, MultiheadAttention) and backend is not None:
            mod.backend = backend
    for mod in model.modules():
        if isinstance(mod, torch.nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False) and \
                any(isinstance(m, MultiheadAttention) for m in mod.modules()):
            setattr(mod, _NESTED_FLAG, True)
            mod.use_nested_tensor = False
    return replaced


def unpatch(model: torch.nn.Module) -> List[str]:
    """Turns every fastattn.nn.MultiheadAttention inside `model` back into torch.nn.MultiheadAttention (in place,
    weights kept; also ones built directly as fastattn modules). Returns the qualified names restored."""
    from .nn import MultiheadAttention, _keep_off_torch_fast_path

    restored = []
    for name, mod in model.named_modules():
        if type(mod) is MultiheadAttention:
            for key, hook in list(mod._forward_pre_hooks.items()):
                if hook is _keep_off_torch_fast_path:
                    del mod._forward_pre_hooks[key]
            mod.__dict__.pop("backend", None)
            mod.__class__ = torch.nn.MultiheadAttention
            restored.append(name)
    for mod in model.modules():
        if isinstance(mod, torch.nn.TransformerEncoder) and getattr(mod, _NESTED_FLAG, False):
            mod.use_nested_tensor = True
            delattr(mod, _NESTED_FLAG)
    return restored


__all__ = ["patch", "unpatch"]
