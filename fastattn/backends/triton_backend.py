"""`triton`: fastattn's Triton kernels (fastattn/kernels/triton). On CPU tensors they run through Triton's
interpreter when TRITON_INTERPRET=1 is set before triton is imported (how CI tests them)."""
from __future__ import annotations

import os

import torch

from ..params import AttnParams
from .base import Backend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels (GPU; CPU through TRITON_INTERPRET=1)"
    devices = frozenset({"cuda", "cpu"} if interpreting() else {"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_dims = (16, 256)
    features = frozenset()

    def unavailable(self):
        return ["Triton kernels not implemented yet"]

    def forward(self, p: AttnParams):
        raise NotImplementedError
