"""Two supported ways to put fastattn under existing PyTorch code.

1. The global swap, one line: every later call of torch.nn.functional.scaled_dot_product_attention (your code,
   nn.MultiheadAttention's functional path, transformers' "sdpa" attention, CausalBias) runs fastattn's drop-in:

       torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention
       # undo: torch.nn.functional.scaled_dot_product_attention = fastattn.backends.sdpa.TORCH_SDPA

   It is safe: fastattn's `sdpa` backend calls PyTorch's function captured at import (TORCH_SDPA), never the
   patched name, so calls routed there (float64, mask gradients) do not recurse. Modules that bound the name
   earlier (`from torch.nn.functional import scaled_dot_product_attention`) keep PyTorch's. What still differs from
   PyTorch is listed in the README (API section).

2. fastattn.patch(model) / fastattn.unpatch(model): swap every torch.nn.MultiheadAttention for fastattn's, in place
   (defined in fastattn/nn.py next to the module they swap in; re-exported here).

The swap changes each module's class to fastattn.nn.MultiheadAttention (a subclass with the same attributes), so
parameters, buffers, hooks, devices and optimizer references stay exactly as they were; only forward changes.
nn.TransformerEncoderLayer would otherwise bypass forward through its fused inference fast path, which reads
self_attn's weights directly: the swapped module carries a no-op forward pre-hook (the layer skips its fast path
when hooks are present). nn.TransformerEncoder's nested-tensor path (eval, no_grad, src_key_padding_mask) stays on:
the swapped module takes the nested tensors it passes, so padded positions come out 0, as in PyTorch."""
from .nn import patch, unpatch

__all__ = ["patch", "unpatch"]
