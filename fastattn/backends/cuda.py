"""`cuda`: fastattn's ahead-of-time compiled tensor-core kernels (csrc/cuda), through torch.ops.fastattn.fwd/bwd.

FlashAttention-2-style forward and a three-pass backward (delta, dK/dV, dQ) that uses no atomics, so every
backward is bitwise reproducible and `deterministic` costs nothing. Head dims up to 256 run the 32/64/96/128/256
kernel that fits (masked loads/stores); D or Dv not a multiple of 8, or inputs whose rows are not 16-byte
aligned, are first copied into an aligned buffer by the C++ entry point. Dropout runs separately compiled kernel
variants (the plain kernels carry no RNG code) with the Philox counters of csrc/philox.h: for the same (seed,
offset, dropout_p) the CUDA and CPU kernels drop exactly the same elements, and the backward regenerates the
forward's mask instead of storing it. Block calls ("block", fastattn/blocks.py): q_start/k_start shift the
causal/window band per sequence (fully hidden tiles still skipped) and key dropout on global positions (and
head_start + h on global query heads), out_fp32
stores the unrounded accumulator, and fastattn::bwd_acc adds the fp32 gradients into the caller's buffers."""
from __future__ import annotations

import torch

from .. import ops
from ..params import AttnParams, symbolic
from .base import Backend
from .cpp_decode import CUDA_DECODE

_GRID_LIMIT = 65535  # gridDim.y / gridDim.z: heads and batch entries (sequences in varlen mode)


def _unavailable():
    if not ops.loaded():
        return [f"C++ extension fastattn._C not loaded ({ops.LOAD_ERROR})"]
    if not ops.cuda_built():
        return ["fastattn._C was built without CUDA (FASTATTN_BUILD_CUDA=0, no nvcc, or CPU-only torch)"]
    if not ops.has_kernel("CUDA"):
        return ["no CUDA kernel registered for fastattn::fwd in this build"]
    if not torch.cuda.is_available():
        return ["no CUDA device available"]
    return []


# Checked once at import: the dispatcher query cannot be traced by torch.compile (fullgraph would break).
_UNAVAILABLE = _unavailable()


def _over(n, limit: int) -> bool:
    """n > limit for a plain size. A symbolic one (a dynamic dim, exported) is not compared: that would guard the
    graph, which an export with an unbounded Dim refuses; the op checks these limits itself (csrc/cuda/attn_host.h)."""
    return not symbolic(n) and n > limit


class CudaBackend(Backend):
    name = "cuda"
    description = "FlashAttention-2-style CUDA C++ kernels on tensor cores (csrc/cuda), sm_80+"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = (1, 256)
    features = frozenset({"causal", "bottom_right", "window", "gqa", "varlen", "grad", "deterministic", "lse",
                          "dv_ne_d", "dropout", "block"})
    min_capability = (8, 0)
    decode = CUDA_DECODE

    def unavailable(self):
        return list(_UNAVAILABLE)

    def extra_reasons(self, p: AttnParams):
        r = []
        heads = p.q.shape[1]
        batch = p.cu_seqlens_q.numel() - 1 if p.is_varlen else p.q.shape[0]
        if _over(heads, _GRID_LIMIT):
            r.append(f"{heads} query heads exceed the kernel grid limit of {_GRID_LIMIT}")
        if _over(batch, _GRID_LIMIT):
            r.append(f"batch {batch} exceeds the kernel grid limit of {_GRID_LIMIT}")
        if _over(p.seqlen_q, 2**31 - 1) or _over(p.seqlen_k, 2**31 - 1):
            r.append("sequence lengths must be < 2^31")
        return r

    def forward(self, p: AttnParams):
        return ops.cpp_attention(p)

    def block_backward(self, p: AttnParams, dout, out, lse, dq_acc, dk_acc, dv_acc) -> None:
        ops.cpp_block_backward(p, dout, out, lse, dq_acc, dk_acc, dv_acc)
