"""The split-KV decode kernels of the C++ extension (torch.ops.fastattn.decode_fwd): csrc/cpu/decode.cpp for the
`cpu` backend, csrc/cuda/decode_kernel.cuh for the `cuda` backend. Each backend declares one as its `decode`."""
from __future__ import annotations

from typing import List

from .. import ops
from ..params import DecodeCall
from .base import DecodeKernel


class CppDecode(DecodeKernel):
    """fastattn::decode_fwd with a kernel registered for one dispatch key (CPU, CUDA)."""
    takes_sdpa_layout = True  # the op reads caches in SDPA's layout and without seqlens_k too (DecodeCall.kv_bhsd)

    def __init__(self, name: str, dispatch_key: str, max_rows: int):
        self.name, self.dispatch_key, self.max_rows = name, dispatch_key, max_rows
        # Looked up once: torch.compile cannot trace the dispatcher query.
        self._unavailable = ([f"C++ extension fastattn._C not loaded ({ops.LOAD_ERROR})"] if not ops.loaded() else
                             [] if ops.has_kernel(dispatch_key, "decode_fwd") else
                             [f"no {dispatch_key} kernel registered for fastattn::decode_fwd in this build"])

    def unavailable(self) -> List[str]:
        return list(self._unavailable)

    def run(self, c: DecodeCall):
        return ops.cpp_decode(c)


class CudaCppDecode(CppDecode):
    """csrc/cuda/decode_kernel.cuh: CUDA-core split-KV kernel reading the cache with 16-byte loads, so the cache's
    base, row/slot/head strides and head dims must be multiples of 16 bytes; at most 8 query rows per KV head."""

    def extra_reasons(self, c: DecodeCall) -> List[str]:
        r = []
        vec = 16 // c.q.element_size()
        for nm, t in (("k_cache", c.k_cache), ("v_cache", c.v_cache)):
            if t.shape[-1] % vec:
                r.append(f"{nm} head dim {t.shape[-1]} is not a multiple of {vec} ({str(t.dtype)[6:]}: 16-byte loads)")
            elif t.data_ptr() % 16 or any(t.stride(i) % vec for i in range(3) if t.shape[i] > 1):
                r.append(f"{nm} rows are not 16-byte aligned (strides {tuple(t.stride())})")
        return r


# CPU: past ~16 query rows per KV head the tiled prefill kernel (generic path) is faster (bench on 1 core).
CPU_DECODE = CppDecode("cpu.decode_fwd", "CPU", max_rows=16)
# CUDA: q rows live in registers; 8 rows already take ~240 of them (csrc/cuda/decode_kernel.cuh).
CUDA_DECODE = CudaCppDecode("cuda.decode_fwd", "CUDA", max_rows=8)
