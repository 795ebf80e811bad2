"""The split-KV decode kernels of the C++ extension (torch.ops.fastattn.decode_fwd): csrc/cpu/decode.cpp for the
`cpu` backend, csrc/cuda/decode_kernel.cuh for the `cuda` backend. Each backend declares one as its `decode`."""
from __future__ import annotations

from typing import List

import torch

from .. import ops
from ..params import DecodeCall
from .base import DecodeKernel, Lean, shown


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

    def lean(self, c: DecodeCall):
        run = ops.decode_runner(c)
        return None if run is None else Lean(self.name, run)

    def cache_lean(self, c: DecodeCall):
        run = ops.cache_runner(c)
        return None if run is None else Lean(self.name, run)


def _misaligned(t) -> bool:
    """Whether t's first element is off a 16-byte boundary. While torch.compile traces, neither data_ptr() nor
    storage_offset() can be read (dynamo refuses both): the answer is then "aligned", and a misaligned cache under
    torch.compile meets the op's own check (csrc/cuda/decode_host.h check_cache_aligned), which raises naming it,
    instead of the generic path."""
    if torch.compiler.is_compiling():
        return False
    return t.data_ptr() % 16 != 0


class CudaCppDecode(CppDecode):
    """csrc/cuda/decode_kernel.cuh: CUDA-core split-KV kernel reading the cache with 16-byte loads, so the cache's
    base, row/slot/head strides and head dims must be multiples of 16 bytes; at most 8 query rows per KV head."""

    def extra_reasons(self, c: DecodeCall) -> List[str]:
        r = []
        vec = 16 // c.q.element_size()
        for nm, t in (("k_cache", c.k_cache), ("v_cache", c.v_cache)):
            if t.shape[-1] % vec:
                r.append(f"{nm} head dim {t.shape[-1]} is not a multiple of {vec} ({str(t.dtype)[6:]}: 16-byte loads)")
            elif _misaligned(t) or any(t.stride(i) % vec for i in range(3) if t.shape[i] > 1):
                r.append(f"{nm} rows are not 16-byte aligned (strides {tuple(t.stride())})")
        return r


class CpuCppDecode(CppDecode):
    """csrc/cpu/decode.cpp: query rows against the cache with AVX-512 (AVX512-BF16 dot products for bf16), no matrix
    units. A dense multi-token call (SDPA's layout, Sq >= 2) with more than DENSE_ROWS query rows per KV head goes to
    the tiled prefill kernel instead: one thread, Intel Xeon AMX, ops timed alone against torch's SDPA at 128-2048
    keys, the decode kernel read 0.51-0.68x (bf16) / 0.66-0.67x (fp32) at 8 rows of MHA D=64 and 0.32-0.42x at 16,
    the prefill kernel 0.87-1.30x / 0.84-1.01x there (GQA 16/4 D=128, 12-16 rows: 1.57-2.88x against 1.10-1.47x);
    up to 4 rows the decode kernel was the faster of the two (1.06-1.81x bf16 MHA at 2-4 rows). One-token steps keep
    it at any group size (the prefill kernel read 0.34-0.81x there), and so do cache calls, whose other route reads
    the cache through strided views."""
    DENSE_ROWS = 4
    takes_bias = True  # a dense call's mask, added to the scores of every key (csrc/cpu/decode.cpp add_bias)

    def extra_reasons(self, c: DecodeCall) -> List[str]:
        Sq = c.q.shape[2]
        if c.kv_bhsd and Sq >= 2 and (c.q.shape[1] // c.k_cache.shape[1]) * Sq > self.DENSE_ROWS:
            return [f"a dense call of {shown(Sq)} query tokens with more than {self.DENSE_ROWS} query rows per KV "
                    f"head: the tiled prefill kernel is faster"]
        return []


# CPU: past 16 query rows per KV head the tiled prefill kernel (generic path) is faster (bench on 1 core).
CPU_DECODE = CpuCppDecode("cpu.decode_fwd", "CPU", max_rows=16)
# CUDA: q rows live in registers; 8 rows already take ~240 of them (csrc/cuda/decode_kernel.cuh).
CUDA_DECODE = CudaCppDecode("cuda.decode_fwd", "CUDA", max_rows=8)
