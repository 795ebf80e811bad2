"""`cuda`: fastattn's ahead-of-time compiled tensor-core kernels (csrc/cuda), through torch.ops.fastattn.fwd/bwd."""
from __future__ import annotations

import torch

from .. import ops
from ..params import AttnParams
from .base import Backend


class CudaBackend(Backend):
    name = "cuda"
    description = "FlashAttention-2-style CUDA C++ kernels on tensor cores (csrc/cuda), sm_80+"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = (1, 256)
    features = frozenset({"causal", "bottom_right", "gqa", "varlen", "grad", "lse"})
    min_capability = (8, 0)

    def unavailable(self):
        if not ops.loaded():
            return [f"C++ extension fastattn._C not loaded ({ops.LOAD_ERROR})"]
        if not ops.cuda_built():
            return ["fastattn._C was built without CUDA (FASTATTN_BUILD_CUDA=0, no nvcc, or CPU-only torch)"]
        if not ops.has_kernel("CUDA"):
            return ["no CUDA kernel registered for fastattn::fwd in this build"]
        if not torch.cuda.is_available():
            return ["no CUDA device available"]
        return []

    def forward(self, p: AttnParams):
        return ops.cpp_attention(p)
