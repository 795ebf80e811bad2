"""What every backend declares, and the generic check of a call against those declarations.

A backend is a class with class-level declarations (what it supports) and two methods:
  `unavailable()` -> reasons it cannot run at all here (not built, no GPU, ...), empty when it can;
  `forward(p: AttnParams)` -> (out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32 or None), differentiable;
  backends that declare "block" also implement `block_backward` (fastattn/blocks.py).
`reasons(p)` combines the declarations with `extra_reasons(p)`; the dispatcher takes the first preferred
backend whose reasons are empty, and shows every backend's reasons when none can take a call.

Split-KV decode (few query rows against a long KV cache) is a capability: a backend that has such a kernel sets
`decode` to a `DecodeKernel` (its own dtypes, head dims and row limit; the backend's devices), and
`decode_reasons(c)` checks a `DecodeCall` against it with the same rules as `reasons`.

`auto_reasons(p)` is consulted only when the backend is being chosen by `auto`: a backend that can run a call
but should not be picked for it automatically (another is faster there) says why; requested explicitly, it runs.

The dispatcher caches `static_reasons` / `static_decode_reasons` on a key of the call's declared facts
(fastattn/dispatch.py `_key`); `extra_reasons`, `extra_decode_reasons` and `auto_reasons` run on every call.
Those may read the lengths only at the key lengths `length_breaks` declares: the SDPA surface's lean path
(fastattn/lean.py) replays one call's route for every key length between two breaks, through the `Lean` runner
that `lean(p)` (or the decode kernel's `lean(c)`) returns.
"""
from __future__ import annotations

from typing import Callable, FrozenSet, List, NamedTuple, Optional, Tuple

import torch

from ..params import AttnParams, DecodeCall, forward_ad, func_transform, symbolic

# Features a backend may declare. The test matrix is generated from these.
FEATURES = frozenset({
    "causal",         # window_right == 0, top-left alignment
    "bottom_right",   # causal/window aligned bottom-right (flash-attn) when Sq != Sk
    "window",         # sliding window (left and/or right)
    "mask",           # additive/bool attn_mask broadcast to (B, H, Sq, Sk)
    "mask_grad",      # gradient with respect to a float attn_mask
    "dropout",
    "gqa",            # fewer K/V heads than query heads
    "varlen",         # packed sequences with cu_seqlens
    "softcap",
    "alibi",
    "grad",           # backward pass
    "deterministic",  # bitwise reproducible backward
    "lse",            # returns log-sum-exp
    "dv_ne_d",        # value head dim different from query/key head dim
    "forward_ad",     # forward-mode AD (torch.func.jvp, jacfwd, forward_ad.dual_level): tangents carried
    "func_transform",  # runs under torch.func transforms (grad, vmap, jacrev, ...), eager and compiled
    "block",          # block calls: q_start/k_start global positions, fp32 out, accumulating backward, and
                      # dropout keyed by the global head head_start + h (AttnParams.head_start)
})


class Lean(NamedTuple):
    """A route the SDPA surface replays (fastattn/lean.py): run(q, k, v) -> out does what the backend does for the
    call it was made from, for any call with the same lean key (dtype, shapes but the key length's class, flags);
    run(q, k, v, attn_mask) for a call made with a mask (Backend.lean of a p with attn_bias).
    flash_attn_with_kvcache's routes (DecodeKernel.cache_lean) take (q, k_cache, v_cache, seqlens_k) instead and
    return (out, lse)."""
    name: str  # the backend or decode kernel, as explain() names it
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    records_grad: bool = False  # run records the gradient of a call whose inputs require one (calls that record one
    # replay only such routes)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt)[6:]


def shown(n) -> str:
    """A size for a reason's text. While torch.compile traces it is not printed: formatting a symbolic size would
    specialise the graph on its value (one graph per query length)."""
    return "N" if torch.compiler.is_compiling() else str(n)


def _unequal(Sq, Sk) -> bool:
    """Sq != Sk; exported with symbolic lengths, unless the trace knows them equal (no guard on it)."""
    if symbolic(Sq) or symbolic(Sk):
        from torch.fx.experimental.symbolic_shapes import statically_known_true  # (loaded by the trace)
        return not statically_known_true(Sq == Sk)
    return Sq != Sk


def needed_features(p: AttnParams) -> Tuple[str, ...]:
    """The FEATURES a call uses, in a fixed order (also the refusal order of `reasons`)."""
    need = []
    if p.causal:
        need.append("causal")
        if p.bottom_right and (_unequal(p.seqlen_q, p.seqlen_k) or p.is_varlen):
            need.append("bottom_right")
    if p.has_window:
        need.append("window")
        if p.bottom_right:
            need.append("bottom_right")
    if p.attn_bias is not None:
        need.append("mask")
        if p.attn_bias.requires_grad and torch.is_grad_enabled():
            need.append("mask_grad")
    if p.dropout_p > 0:
        need.append("dropout")
    if p.is_gqa:
        need.append("gqa")
    if p.is_varlen:
        need.append("varlen")
    if p.softcap > 0:
        need.append("softcap")
    if p.alibi_slopes is not None:
        need.append("alibi")
    if p.requires_grad:
        need.append("grad")
        if p.deterministic:
            need.append("deterministic")
    if p.return_lse:
        need.append("lse")
    if forward_ad(p.q, p.k, p.v, p.attn_bias):
        need.append("forward_ad")
    if func_transform(p.q, p.k, p.v, p.attn_bias):
        need.append("func_transform")
    if p.is_block or (p.head_start and p.dropout_p > 0):  # honouring head_start in the dropout key is block
        need.append("block")                               # contract (a backend that cannot, e.g. sdpa, refuses)
    return tuple(dict.fromkeys(need))


class DecodeKernel:
    """A backend's split-KV decode kernel: what it takes beyond the backend's devices, and how to run it.

    Contract: torch.ops.fastattn.decode_fwd (csrc/ops.cpp) on a DecodeCall -> (out (B, Hq, Sq, Dv),
    lse (B, Hq, Sq) fp32). Inference only. max_rows bounds (Hq / Hkv) * Sq, the query rows of one program tile."""
    name: str = "?"
    dtypes: FrozenSet[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_dims: Tuple[int, int] = (1, 256)
    max_rows: int = 1 << 30
    # True when run() takes a DecodeCall with kv_bhsd=True (caches in SDPA's (B, Hkv, S, D) layout, seqlens_k None):
    # the dispatcher then passes a dense call's k/v as they are.
    takes_sdpa_layout: bool = False
    # True when run() takes a DecodeCall with an attn_bias (a dense call's mask): the dispatcher then routes masked
    # short-query calls to it as well.
    takes_bias: bool = False

    def unavailable(self) -> List[str]:
        return []

    def extra_reasons(self, c: DecodeCall) -> List[str]:
        """Checks that depend on more than the call's declared facts (alignment, data pointers)."""
        return []

    def run(self, c: DecodeCall):
        raise NotImplementedError

    def lean(self, c: DecodeCall) -> Optional[Lean]:
        """run(c) as a Lean runner for calls like c (fastattn/lean.py), or None."""
        return None

    def cache_lean(self, c: DecodeCall) -> Optional[Lean]:
        """run(c) for flash_attn_with_kvcache calls like c (fastattn/lean.py), as a `Lean` whose run takes
        (q, k_cache, v_cache, seqlens_k) and returns (out, lse); or None."""
        return None


class Backend:
    name: str = "?"
    description: str = ""
    devices: FrozenSet[str] = frozenset()
    dtypes: FrozenSet[torch.dtype] = frozenset()
    head_dims: Tuple[int, int] = (1, 256)   # inclusive range of D (and Dv)
    features: FrozenSet[str] = frozenset()
    min_capability: Optional[Tuple[int, int]] = None  # CUDA compute capability
    decode: Optional[DecodeKernel] = None  # split-KV decode kernel, if the backend has one

    def unavailable(self) -> List[str]:
        return []

    def extra_reasons(self, p: AttnParams) -> List[str]:
        return []

    def auto_reasons(self, p: AttnParams) -> List[str]:
        """Why `auto` should pass this backend over for a call it can run (e.g. another is faster there).
        Never consulted when the backend is requested explicitly."""
        return []

    def length_breaks(self, Sq: int) -> Tuple[int, ...]:
        """The key lengths at which this backend's per-call answers (extra_reasons, auto_reasons, its decode kernel's
        extra_reasons) may change for calls of Sq query tokens: each answer is the same for all Sk in (b_i, b_i+1]."""
        return ()

    def forward(self, p: AttnParams):
        raise NotImplementedError

    def lean(self, p: AttnParams) -> Optional[Lean]:
        """forward(p)'s output as a Lean runner for calls like p (fastattn/lean.py: plain inference calls; with
        p.attn_bias, the runner takes the call's 4-D attn_mask as a fourth argument), or None."""
        return None

    def block_backward(self, p: AttnParams, dout, out, lse, dq_acc, dk_acc, dv_acc) -> None:
        """Backends declaring "block": adds the block's (dq, dk, dv) in fp32 into the fp32 accumulators, with P taken
        against the given (merged) lse and delta = rowsum(dout * out) (out in q.dtype): fastattn::bwd_acc."""
        raise NotImplementedError

    def _declared(self, r: List[str], dev: str, dtype: torch.dtype, dtypes, head_dims, d: int, dv: int):
        """The device, dtype and head-dim rules shared by prefill and decode admission."""
        if dev not in self.devices:
            r.append(f"device {dev} not supported (supports {', '.join(sorted(self.devices))})")
        if dtype not in dtypes:
            r.append(f"dtype {_dtype_name(dtype)} not supported (supports "
                     f"{', '.join(sorted(_dtype_name(x) for x in dtypes))})")
        lo, hi = head_dims
        for nm, x in (("head dim", d), ("value head dim", dv)):
            if not lo <= x <= hi:
                r.append(f"{nm} {x} outside supported range [{lo}, {hi}]")

    def static_reasons(self, p: AttnParams, need: Optional[Tuple[str, ...]] = None) -> List[str]:
        """The reasons that follow from the declarations alone (what the dispatcher caches)."""
        r = list(self.unavailable())
        if r:
            return r
        dev = p.device.type
        self._declared(r, dev, p.dtype, self.dtypes, self.head_dims, p.head_dim, p.head_dim_v)
        if p.head_dim != p.head_dim_v and "dv_ne_d" not in self.features:
            r.append(f"value head dim {p.head_dim_v} != query head dim {p.head_dim}")
        if dev == "cuda" and self.min_capability is not None and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(p.device)
            if cap < self.min_capability:
                r.append(f"GPU capability {cap[0]}.{cap[1]} below required "
                         f"{self.min_capability[0]}.{self.min_capability[1]}")
        for f in needed_features(p) if need is None else need:
            if f not in self.features:
                r.append(f"{f.replace('_', ' ')} not supported")
        return r

    def reasons(self, p: AttnParams) -> List[str]:
        """Human-readable reasons this backend cannot take the call; empty when it can."""
        return self.static_reasons(p) or self.extra_reasons(p)

    def static_decode_reasons(self, c: DecodeCall) -> List[str]:
        """Why this backend's decode kernel cannot take c, from the declarations alone; empty when it can."""
        k = self.decode
        if k is None:
            return ["backend has no split-KV decode kernel"]
        r = list(self.unavailable()) or list(k.unavailable())
        if r:
            return r
        q = c.q
        self._declared(r, q.device.type, q.dtype, k.dtypes, k.head_dims, q.shape[-1], c.v_cache.shape[-1])
        if c.requires_grad():
            r.append("autograd needed (decode kernels are inference-only)")
        if c.attn_bias is not None and not k.takes_bias:
            r.append("attn_mask given (this decode kernel takes none)")
        if q.numel() == 0:
            r.append("empty query")
        rows = (q.shape[1] // c.kv_heads) * q.shape[2]
        if rows > k.max_rows:
            r.append(f"{shown(rows)} query rows per KV head (Hq/Hkv x Sq) exceed {k.max_rows}: "
                     "a prefill kernel fits better")
        return r

    def extra_decode_reasons(self, c: DecodeCall) -> List[str]:
        """Per-call decode checks: strides, and the kernel's own (alignment)."""
        q, k, v = c.q, c.k_cache, c.v_cache
        if (q.stride()[-1] != 1 and q.shape[-1] > 1 or k.stride()[-1] != 1 and k.shape[-1] > 1
                or v.stride()[-1] != 1 and v.shape[-1] > 1):
            return ["q or cache not contiguous along the head dim"]
        return self.decode.extra_reasons(c)

    def decode_reasons(self, c: DecodeCall) -> List[str]:
        """Human-readable reasons this backend's split-KV decode kernel cannot take c; empty when it can."""
        return self.static_decode_reasons(c) or self.extra_decode_reasons(c)
