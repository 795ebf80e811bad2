"""`cpu`: fastattn's own fused C++ kernels for CPU tensors (csrc/cpu), through torch.ops.fastattn.fwd/bwd."""
from __future__ import annotations

import torch

from .. import ops
from ..params import AttnParams
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    description = "fused FlashAttention-2-style C++ kernels for CPU (csrc/cpu)"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})
    head_dims = (1, 256)
    features = frozenset({"causal", "bottom_right", "window", "mask", "dropout", "gqa", "varlen", "softcap",
                          "alibi", "grad", "deterministic", "lse", "dv_ne_d"})

    def unavailable(self):
        if not ops.loaded():
            return [f"C++ extension fastattn._C not loaded ({ops.LOAD_ERROR})"]
        if not ops.has_kernel("CPU"):
            return ["no CPU kernel registered for fastattn::fwd in this build"]
        return []

    def forward(self, p: AttnParams):
        return ops.cpp_attention(p)
