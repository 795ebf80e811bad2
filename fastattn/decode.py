"""Decode router: which split-KV kernel (if any) serves a few query tokens against a KV cache.

Two callers:
  * `flash_attn_with_kvcache` (fastattn/kvcache.py) appends the new keys/values, builds a `DecodeCall` on the cache
    in its own layout (dense or paged) and asks `run_decode` for a kernel; with none it takes the generic path.
  * `decode_route(p, backend_name)` (called by the dispatcher) sends dense short-query calls — HF GPT-2 decode:
    q (B, H, 1, D) against k (B, H, N, D), no mask, no grad — to the same kernels, viewing k/v as a cache.

Backend choice is the dispatcher's (explicit backend= > use_backend > FASTATTN_BACKEND > auto over PREFERENCE).
Each backend has at most one decode kernel (DECODE_KERNELS); a backend without one, or a call its kernel cannot
take (autograd, dtype, head dim, too many query rows), runs the generic path on the same backend — only the kernel
shape changes, never the backend. `explain_kvcache` / `DecodeExplanation` say which path runs and why.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import ops
from .backends import BACKENDS, PREFERENCE
from .params import AttnParams

# Calls served by each decode kernel in this process (tests check routing through it).
COUNTS: collections.Counter = collections.Counter()

MAX_ROUTE_Q = 8  # dense calls with at most this many query tokens go to a decode kernel


@dataclass
class DecodeCall:
    """The canonical decode call (same contract as torch.ops.fastattn.decode_fwd, csrc/ops.cpp).

    q (B, Hq, Sq, D) any strides with stride 1 along D; k_cache/v_cache (Bc, Smax, Hkv, D|Dv) or paged
    (num_blocks, page, Hkv, D|Dv) with block_table int32 (B, max_blocks); cache_batch_idx int32 (B,) or None;
    seqlens_k int32 (B,) valid keys per row (after the append); visibility bottom-right aligned per row."""
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seqlens_k: torch.Tensor
    block_table: Optional[torch.Tensor] = None
    cache_batch_idx: Optional[torch.Tensor] = None
    scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    num_splits: int = 0

    @property
    def device(self) -> torch.device:
        return self.q.device

    def describe(self) -> str:
        B, Hq, Sq, D = self.q.shape
        Hkv, Dv = self.k_cache.shape[2], self.v_cache.shape[3]
        lay = (f"paged {self.k_cache.shape[0]}x{self.k_cache.shape[1]}" if self.block_table is not None
               else f"dense cache {tuple(self.k_cache.shape[:2])}")
        parts = [f"decode q(B={B}, Hq={Hq}, Sq={Sq}, D={D}) Hkv={Hkv} Dv={Dv} {str(self.q.dtype)[6:]} on "
                 f"{self.device.type}", lay]
        if self.cache_batch_idx is not None:
            parts.append("cache_batch_idx")
        if self.window_right == 0:
            parts.append("causal")
        if self.window_left >= 0 or self.window_right > 0:
            parts.append(f"window ({self.window_left}, {self.window_right})")
        if self.softcap > 0:
            parts.append(f"softcap {self.softcap}")
        if self.alibi_slopes is not None:
            parts.append("alibi")
        return ", ".join(parts)

    def windows(self) -> Tuple[int, int]:
        """(window_left, window_right) with a window wider than the cache plus the queries made unlimited (-1), as
        csrc/decode_checks.h does: the same visibility, and no int64 overflow in a kernel's i + off + window."""
        cap = (self.block_table.shape[1] * self.k_cache.shape[1] if self.block_table is not None
               else self.k_cache.shape[1])
        wide = cap + self.q.shape[2]
        return tuple(-1 if w > wide else w for w in (self.window_left, self.window_right))

    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k_cache, self.v_cache))


class DecodeKernel:
    """A split-KV decode kernel belonging to one backend; declares what it takes, like a Backend."""
    name = "?"
    backend = "?"
    devices: frozenset = frozenset()
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_dims = (1, 256)
    max_rows = 1 << 30  # (Hq / Hkv) * Sq rows per program tile

    def unavailable(self) -> List[str]:
        return []

    def reasons(self, c: DecodeCall) -> List[str]:
        r = list(self.unavailable())
        if r:
            return r
        if c.device.type not in self.devices:
            r.append(f"device {c.device.type} not supported (supports {', '.join(sorted(self.devices))})")
        if c.q.dtype not in self.dtypes:
            r.append(f"dtype {str(c.q.dtype)[6:]} not supported")
        lo, hi = self.head_dims
        for nm, d in (("head dim", c.q.shape[-1]), ("value head dim", c.v_cache.shape[-1])):
            if not lo <= d <= hi:
                r.append(f"{nm} {d} outside supported range [{lo}, {hi}]")
        if c.requires_grad():
            r.append("autograd needed (decode kernels are inference-only)")
        if c.q.numel() == 0:
            r.append("empty query")
        rows = (c.q.shape[1] // c.k_cache.shape[2]) * c.q.shape[2]
        if rows > self.max_rows:
            r.append(f"{rows} query rows per KV head (Hq/Hkv x Sq) exceed {self.max_rows}: "
                     "a prefill kernel fits better")
        if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (c.q, c.k_cache, c.v_cache)):
            r.append("q or cache not contiguous along the head dim")
        return r

    def run(self, c: DecodeCall) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TritonDecode(DecodeKernel):
    name = "triton.decode_split"
    backend = "triton"
    devices = frozenset({"cuda", "cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else {"cuda"})
    head_dims = (16, 256)
    max_rows = 128

    def unavailable(self):
        try:
            from .kernels.triton import decode  # noqa: F401
        except Exception as e:  # noqa: BLE001  (no triton, or an incompatible one)
            return [f"triton decode kernel not importable ({type(e).__name__}: {e})"]
        return []

    def run(self, c):
        from .kernels.triton import decode  # noqa: F401  (registers torch.ops.fastattn.triton_decode_fwd)
        return torch.ops.fastattn.triton_decode_fwd(c.q, c.k_cache, c.v_cache, c.seqlens_k, c.block_table,
                                                    c.cache_batch_idx, c.scale, c.window_left, c.window_right,
                                                    c.softcap, c.alibi_slopes, c.num_splits)


class OpDecode(DecodeKernel):
    """torch.ops.fastattn.decode_fwd with a kernel registered for one dispatch key (csrc/cpu/decode.cpp, ...)."""

    def __init__(self, backend: str, key: str, device: str, max_rows: int):
        self.backend, self.key, self.name = backend, key, f"{backend}.decode_fwd"
        self.devices = frozenset({device})
        self.max_rows = max_rows

    def unavailable(self):
        if not ops.loaded():
            return [f"C++ extension fastattn._C not loaded ({ops.LOAD_ERROR})"]
        if not _REGISTERED.get(self.key):
            return [f"no {self.key} kernel registered for fastattn::decode_fwd in this build"]
        return []

    def run(self, c):
        wl, wr = c.windows()
        return torch.ops.fastattn.decode_fwd(c.q, c.k_cache, c.v_cache, c.seqlens_k, c.block_table,
                                             c.cache_batch_idx, c.scale, wl, wr, c.softcap, c.alibi_slopes,
                                             c.num_splits)


class CudaOpDecode(OpDecode):
    """csrc/cuda/decode_kernel.cuh: CUDA-core split-KV kernel reading the cache with 16-byte loads, so the cache's
    base, row/slot/head strides and head dims must be multiples of 16 bytes; at most 8 query rows per KV head."""

    def reasons(self, c: DecodeCall) -> List[str]:
        r = super().reasons(c)
        if r:
            return r
        vec = 16 // c.q.element_size()
        for nm, t in (("k_cache", c.k_cache), ("v_cache", c.v_cache)):
            if t.shape[-1] % vec:
                r.append(f"{nm} head dim {t.shape[-1]} is not a multiple of {vec} ({str(t.dtype)[6:]}: 16-byte loads)")
            elif t.data_ptr() % 16 or any(t.stride(i) % vec for i in range(3) if t.shape[i] > 1):
                r.append(f"{nm} rows are not 16-byte aligned (strides {tuple(t.stride())})")
        return r


DECODE_KERNELS: Dict[str, DecodeKernel] = {
    "triton": TritonDecode(),
    # CPU: past ~16 query rows per KV head the tiled prefill kernel (generic path) is faster (bench on 1 core).
    "cpu": OpDecode("cpu", "CPU", "cpu", max_rows=16),
    # CUDA: q rows live in registers; 8 rows already take ~240 of them (csrc/cuda/decode_kernel.cuh).
    "cuda": CudaOpDecode("cuda", "CUDA", "cuda", max_rows=8),
}


def _has_op() -> bool:
    return ops.loaded() and hasattr(torch.ops.fastattn, "decode_fwd")


# Looked up once (fastattn._C registered its kernels when .ops was imported): torch.compile cannot trace the query.
_REGISTERED = {key: _has_op() and torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::decode_fwd", key)
               for key in ("CPU", "CUDA")}


@dataclass
class DecodeExplanation:
    call: str
    requested: str
    kernel: Optional[str] = None  # decode kernel that runs, or None for the generic path
    backend: Optional[str] = None  # backend that owns it
    refused: Dict[str, List[str]] = field(default_factory=dict)  # backend -> why its decode kernel was not used
    generic: Optional[str] = None  # the generic path's dispatcher explanation, when it runs

    def __str__(self) -> str:
        lines = [f"call: {self.call}", f"requested: {self.requested}",
                 "path: " + (f"split-KV decode kernel {self.kernel} (backend {self.backend})" if self.kernel
                             else "generic (cache viewed/gathered to (B, Skv, Hkv, D), lengths/window/alibi as one "
                                  "additive bias, then the dispatcher)")]
        for name, why in self.refused.items():
            lines.append(f"  {name}: no decode kernel used — " + "; ".join(why))
        if self.kernel:
            lines.append(f"  {self.backend}: takes the call with {self.kernel}")
        if self.generic:
            lines.append("generic path dispatch:")
            lines += ["  " + ln for ln in self.generic.splitlines()]
        return "\n".join(lines)


def _order(requested: str, device_type: str) -> List[str]:
    if requested != "auto":
        return [requested]
    return list(PREFERENCE.get(device_type, PREFERENCE["default"]))


def choose(c: DecodeCall, backend: Optional[str] = None, *, describe: bool = True) -> DecodeExplanation:
    """Which decode kernel serves c. Under auto: the first backend in PREFERENCE whose decode kernel takes it
    (the prefill dispatcher would also prefer that backend); explicitly requested: that backend's kernel or none.
    describe=False skips the call's description (the per-token hot path)."""
    from .dispatch import requested_backend  # lazy: dispatch imports this module

    requested = requested_backend(backend)
    ex = DecodeExplanation(call=c.describe() if describe else "", requested=requested)
    for name in _order(requested, c.device.type):
        kern = DECODE_KERNELS.get(name)
        if kern is None:
            ex.refused[name] = ["backend has no split-KV decode kernel"]
            continue
        why = kern.reasons(c)
        if why:
            ex.refused[name] = why
            continue
        ex.kernel, ex.backend = kern.name, name
        break
    return ex


def run_chosen(ex: DecodeExplanation, c: DecodeCall):
    """(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32) from the decode kernel `choose` picked for c (ex.kernel set)."""
    COUNTS[ex.kernel] += 1
    return DECODE_KERNELS[ex.backend].run(c)


def run_decode(c: DecodeCall, backend: Optional[str] = None):
    """(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32) from a decode kernel, or None when none takes the call."""
    ex = choose(c, backend, describe=False)
    return None if ex.kernel is None else run_chosen(ex, c)


def dense_call(p: AttnParams) -> Optional[DecodeCall]:
    """A dense short-query call as a decode call on k/v viewed as a cache, or None when it is not one: masks,
    dropout, varlen, autograd, many query tokens, or top-left causal/window with Sq != Sk (decode kernels align
    bottom-right)."""
    if (p.attn_bias is not None or p.dropout_p > 0 or p.is_varlen or p.requires_grad
            or not p.extras.get("decode_route", True)):
        return None
    B, Hq, Sq, D = p.q.shape
    Sk = p.k.shape[2]
    if Sq > MAX_ROUTE_Q or Sq == 0 or Sk == 0 or B == 0:
        return None
    if (p.window_left >= 0 or p.window_right >= 0) and not p.bottom_right and Sq != Sk:
        return None
    return DecodeCall(q=p.q, k_cache=p.k.transpose(1, 2), v_cache=p.v.transpose(1, 2),  # (B,H,S,D)->(B,S,H,D)
                      seqlens_k=torch.full((B,), Sk, dtype=torch.int32, device=p.device), scale=p.scale,
                      window_left=p.window_left, window_right=p.window_right, softcap=p.softcap,
                      alibi_slopes=p.alibi_slopes, num_splits=int(p.extras.get("num_splits", 0)))


def decode_route(p: AttnParams, backend_name: str) -> Optional[Callable[[AttnParams], tuple]]:
    """For the dispatcher: given validated params and the backend it selected (or 'auto'), a function p ->
    (out, lse) running that backend's decode kernel, or None when the normal forward should run."""
    c = dense_call(p)
    if c is None:
        return None
    ex = choose(c, backend_name, describe=False)
    if ex.kernel is None:
        return None
    kern = DECODE_KERNELS[ex.backend]

    def fn(_p: AttnParams):
        COUNTS[kern.name] += 1
        return kern.run(c)

    return fn


def explain_dense(p: AttnParams, backend: Optional[str] = None) -> Optional[DecodeExplanation]:
    """How decode_route treats a dense call (None when it is not a short-query call at all)."""
    c = dense_call(p)
    return None if c is None else choose(c, backend)


if _has_op():

    @torch.library.register_fake("fastattn::decode_fwd")
    def _decode_fwd_fake(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left,
                         window_right, softcap, alibi_slopes, num_splits):
        B, H, S, _ = q.shape
        return ops._out_like_q(q, v_cache.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)
