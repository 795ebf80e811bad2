"""Input validation and the normalised description of one attention call.

Every public surface (SDPA-style, flash-attn-style, modules) turns its arguments into an `AttnParams`
before any backend sees them, so that bad input raises one clear error naming the argument and shapes,
and backends only ever see the canonical form:

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)     any strides but stride 1 along the head dims
        (last_dim_contiguous copies the rare input without it; the dispatcher relies on it), no other copies
    attn_bias: None or additive bias in q.dtype expanded to (B, Hq, Sq, Sk) (stride 0 on broadcast dims)
    visibility of key j to query i:  off = Sk - Sq if bottom_right else 0,
        (window_left < 0 or j >= i + off - window_left) and (window_right < 0 or j <= i + off + window_right)
    varlen: B == 1, cu_seqlens_q/k int32 (N+1,), q (1, Hq, total_q, D); the rules apply per sequence.

A `DecodeCall` is the same for a few query rows against a KV cache in its own layout (split-KV decode kernels).
"""
from __future__ import annotations

import math
import numbers
import operator
import struct
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.autograd import forward_ad as _fwad
from torch._subclasses.fake_tensor import FakeTensor  # (import torch loads it already)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputValueError(ValueError, RuntimeError):
    """Bad argument values or shapes. Also a RuntimeError, which is what PyTorch's own functions raise for bad
    input, so code written for either (`except ValueError` or `except RuntimeError`) catches it."""


class InputTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype; also a RuntimeError, like InputValueError."""


@dataclass
class AttnParams:
    # functional._sdpa_call passes the first twelve fields positionally (cheaper): keep their order.
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    attn_bias: Optional[torch.Tensor] = None
    mask_kind: Optional[str] = None  # None | "key_padding" (B,1,1,Sk) | "dense"
    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    deterministic: bool = False
    return_lse: bool = False
    # Block calls (fastattn/blocks.py): global positions of this block's first query/key per sequence, int32 (N,)
    # (N = B, or the number of varlen sequences). They replace bottom_right; see csrc/ops.cpp.
    q_start: Optional[torch.Tensor] = None
    k_start: Optional[torch.Tensor] = None
    out_fp32: bool = False  # out unrounded in float32 (block calls)
    rng: Optional[Tuple[int, int]] = None  # dropout (seed, offset); None draws one per call
    # The query heads of this call are heads head_start.. of a larger call split over heads (Ulysses context
    # parallelism): dropout is keyed by head_start + h. Only backends declaring "block" honour it with dropout
    # (base.needed_features); set by fastattn/blocks.py.
    head_start: int = 0

    # Derived facts the dispatcher and backends read.
    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[-1]

    @property
    def causal(self) -> bool:
        return self.window_right == 0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right > 0

    @property
    def is_gqa(self) -> bool:
        return self.q.shape[1] != self.k.shape[1]

    @property
    def is_block(self) -> bool:
        return self.q_start is not None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad or (
            self.attn_bias is not None and self.attn_bias.requires_grad))

    @property
    def seqlen_q(self) -> int:  # is_varlen spelled out: the backends' speed rules read these on every call
        return self.max_seqlen_q if self.cu_seqlens_q is not None else self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.max_seqlen_k if self.cu_seqlens_q is not None else self.k.shape[2]

    def describe(self) -> str:
        B, Hq, Sq, D = self.q.shape
        parts = [f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} v{tuple(self.v.shape)} {str(self.dtype)[6:]}",
                 f"on {self.device.type}"]
        if self.causal:
            parts.append("causal " + ("bottom-right" if self.bottom_right else "top-left"))
        elif self.has_window:
            parts.append(f"window ({self.window_left}, {self.window_right})")
        if self.mask_kind:
            parts.append(f"{self.mask_kind} mask")
        if self.is_varlen:
            parts.append(f"varlen x{self.cu_seqlens_q.numel() - 1}")
        if self.dropout_p:
            parts.append(f"dropout {self.dropout_p}")
        if self.softcap:
            parts.append(f"softcap {self.softcap}")
        if self.alibi_slopes is not None:
            parts.append("alibi")
        if self.is_block:
            parts.append("block offsets" + (", fp32 out" if self.out_fp32 else ""))
        if self.head_start:
            parts.append(f"head_start {self.head_start}")
        return ", ".join(parts)


@dataclass
class DecodeCall:
    """The canonical decode call (same contract as torch.ops.fastattn.decode_fwd, csrc/ops.cpp).

    q (B, Hq, Sq, D) any strides with stride 1 along D; k_cache/v_cache (Bc, Smax, Hkv, D|Dv) or paged
    (num_blocks, page, Hkv, D|Dv) with block_table int32 (B, max_blocks); cache_batch_idx int32 (B,) or None;
    seqlens_k int32 (B,) valid keys per row (after the append); visibility bottom-right aligned per row.

    kv_bhsd=True: k_cache/v_cache are given in SDPA's (B, Hkv, S, D|Dv) layout instead (the same cache seen through
    transpose(1, 2)) and seqlens_k may be None (every row sees the whole cache). Only the dispatcher builds such
    calls (a dense call's k/v passed through without views or a lengths tensor: fastattn/dispatch.py `run`), and
    only for kernels that declare `takes_sdpa_layout` (the C++ op takes both forms, csrc/ops.cpp).
    Built positionally on the hot paths (dispatch._as_decode, kvcache._decode_call): keep the field order."""
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seqlens_k: Optional[torch.Tensor]
    block_table: Optional[torch.Tensor] = None
    cache_batch_idx: Optional[torch.Tensor] = None
    scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    num_splits: int = 0
    kv_bhsd: bool = False
    # A dense call's additive bias (its attn_mask as fwd takes it), expanded to (B, Hq, Sq, Smax) over the cache's
    # slots; only on dense caches without cache_batch_idx, and only for kernels that declare `takes_bias`.
    attn_bias: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def kv_heads(self) -> int:
        return self.k_cache.shape[1 if self.kv_bhsd else 2]

    @property
    def slots(self) -> int:
        """Keys per cache row (dense) or per page (paged)."""
        return self.k_cache.shape[2 if self.kv_bhsd else 1]

    def describe(self) -> str:
        B, Hq, Sq, D = self.q.shape
        Hkv, Dv = self.kv_heads, self.v_cache.shape[3]
        lay = (f"paged {self.k_cache.shape[0]}x{self.slots}" if self.block_table is not None
               else f"dense cache {(self.k_cache.shape[0], self.slots)}")
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
        if self.attn_bias is not None:
            parts.append("attn_mask")
        return ", ".join(parts)

    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k_cache.requires_grad
                                            or self.v_cache.requires_grad
                                            or self.attn_bias is not None and self.attn_bias.requires_grad)

    def windows(self) -> Tuple[int, int]:
        """(window_left, window_right) with a window wider than the cache plus the queries made unlimited (-1), as
        csrc/decode_checks.h does: the same visibility, and no int64 overflow in a kernel's i + off + window."""
        if self.window_left <= 0 and self.window_right <= 0:  # none, or causal: nothing to clamp
            return self.window_left, self.window_right
        cap = self.block_table.shape[1] * self.slots if self.block_table is not None else self.slots
        wide = cap + self.q.shape[2]
        return tuple(-1 if w > wide else w for w in (self.window_left, self.window_right))


def _shape(t) -> str:
    return "None" if t is None else f"{tuple(t.shape)}"


_STRIDED = torch.strided


_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
functorch_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)
_functorch_stack = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


def trace_constant(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo, which was ~0.7 s of `import fastattn`'s
    ~1 s: on torch 2.11-2.14 that decorator only sets this mark, which dynamo reads when a trace meets fn
    (tests/test_compile_paths.py checks that torch's decorator still sets nothing else)."""
    fn._dynamo_marked_constant = True
    return fn


@trace_constant
def _transform_open_at_trace() -> bool:
    """Whether a torch.func transform is open while dynamo traces: run as plain Python at trace time and kept in the
    graph (dynamo stops at the two calls above, and traces peek_interpreter_stack into an object that is never
    None). A graph traced inside a transform is only ever run inside it."""
    return _functorch_stack() is not None


def func_transform(*tensors) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) wraps one of `tensors`. The fused ops' autograd is
    an autograd.Function without the separate setup_context functorch requires (torch.library's own has none
    either). While torch.compile traces, the tensors cannot be asked: any open transform counts (the graph is
    traced inside it)."""
    if torch.compiler.is_compiling():
        return _transform_open_at_trace()
    if functorch_level() is None:
        return False
    return any(t is not None and _functorch_wrapped(t) for t in tensors)


def forward_ad(*tensors) -> bool:
    """Whether forward-mode AD carries a tangent on one of `tensors`: a dual tensor of torch.autograd.forward_ad, or
    one that torch.func.jvp / jacfwd / hessian wrapped (conservatively, any functorch-wrapped tensor while a level is
    open). With no tensors: whether a forward-AD level is open at all (torch keeps one for every thread). The fused
    kernels' ops have no forward-mode rule: under it they would give a zero tangent, silently."""
    if getattr(_fwad, "_current_level", -1) < 0:
        return False
    if len(tensors) == 0 or torch.compiler.is_compiling():  # (a trace cannot look at tangents: assume one)
        return True
    return any(t is not None and (_functorch_wrapped(t) or _fwad.unpack_dual(t).tangent is not None)
               for t in tensors)


def check_tensors(q, k, v, *, names=("query", "key", "value")):
    """Types, dtypes and device of q, k, v (no shapes)."""
    if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and q.dtype in FLOAT_DTYPES and k.dtype is q.dtype and v.dtype is q.dtype  # dtypes are singletons
            and not (q.is_nested or k.is_nested or v.is_nested)
            and q.layout is _STRIDED and k.layout is _STRIDED and v.layout is _STRIDED
            and (q.is_cpu and k.is_cpu and v.is_cpu or q.device == k.device == v.device)):  # is_cpu: no objects
        return  # the common case, in one expression; a failing call takes the checks below for its message
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"fastattn: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise InputTypeError(f"fastattn: {name} must be a floating tensor (fp16, bf16, fp32, fp64), "
                                 f"got {t.dtype}")
        if t.is_nested:
            raise InputValueError(f"fastattn: {name} is a nested tensor; pass padded tensors (and a mask)")
        if t.layout is not _STRIDED:
            raise InputTypeError(f"fastattn: {name} must be a dense (strided) tensor, got layout {t.layout} "
                                 f"(shape {_shape(t)}); call .to_dense() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputTypeError(f"fastattn: {nq}, {nk}, {nv} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputValueError(f"fastattn: {nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, "
                              f"{v.device}")


def check_qkv(q, k, v, *, layout: str, names=("query", "key", "value"), varlen: bool = False, same_batch: bool = True):
    """Checks types, ranks, devices, dtypes and dims of q, k, v. layout is 'bhsd' or 'bshd' (or 'thd' for varlen).
    Returns their shapes (callers need not read them again: ~0.15 us a read)."""
    nq, nk, nv = names
    check_tensors(q, k, v, names=names)
    rank = 3 if varlen else 4
    qs, ks, vs = q.shape, k.shape, v.shape
    if not len(qs) == len(ks) == len(vs) == rank:
        for name, t in zip(names, (q, k, v)):
            if t.dim() != rank:
                lay = "(total, H, D)" if varlen else ("(B, H, S, D)" if layout == "bhsd" else "(B, S, H, D)")
                raise InputValueError(f"fastattn: {name} must be {rank}-D {lay}, got shape {_shape(t)}")
    ax_h, ax_s = (1, 2) if layout == "bhsd" else ((1, 0) if varlen else (2, 1))
    msg = None
    if not varlen and ks[0] != vs[0]:
        msg = f"{nk} and {nv} batch sizes differ"
    elif not varlen and same_batch and not (qs[0] == ks[0] == vs[0]):
        msg = "batch sizes differ"
    elif ks[ax_s] != vs[ax_s]:
        msg = f"{nk} and {nv} must have the same sequence length"
    elif ks[ax_h] != vs[ax_h]:
        msg = f"{nk} and {nv} must have the same number of heads"
    elif qs[-1] != ks[-1]:
        msg = f"{nq} and {nk} must have the same head dim"
    elif ks[ax_h] == 0 or qs[ax_h] % ks[ax_h] != 0:
        msg = f"query heads ({qs[ax_h]}) must be a multiple of key/value heads ({ks[ax_h]})"
    elif qs[-1] == 0:
        msg = "head dim must be positive"
    if msg is not None:  # the shapes are formatted only for the error
        raise InputValueError(f"fastattn: {msg}: {nq} {_shape(q)}, {nk} {_shape(k)}, {nv} {_shape(v)}")
    return qs, ks, vs


def last_dim_contiguous(*ts):
    """Kernels need stride 1 along the head dim; copy the rare input that lacks it (differentiable)."""
    for t in ts:
        if t.stride()[-1] != 1 and t.shape[-1] != 1:  # stride()[-1]: cheaper than stride(-1)
            return tuple(t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in ts)
    return ts


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def check_dropout(p) -> float:
    if type(p) is float and 0.0 <= p <= 0.5:  # the common case (0.0); far from the float32 rounding edge below
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) < 1.0):  # numpy scalars too
        raise InputValueError(f"fastattn: dropout_p must be a number in [0, 1), got {p!r}")
    if _float32(float(p)) >= 1.0:  # kernels keep p in float32: the 1 / (1 - p) rescale would be inf
        raise InputValueError(f"fastattn: dropout_p={p!r} rounds to 1 in float32; use a value below 1 - 2**-25")
    return float(p)


def check_softcap(softcap) -> float:
    """softcap: a finite real number >= 0 (0 = off)."""
    if type(softcap) is float and 0.0 <= softcap < math.inf:  # the common case (0.0)
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise InputTypeError(f"fastattn: softcap must be a number >= 0 (0 = off), got {type(softcap).__name__} "
                        f"{softcap!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise InputValueError(f"fastattn: softcap must be finite and >= 0 (0 = off), got {softcap!r}")
    return float(softcap)


_is_dynamo_compiling = torch.compiler.is_dynamo_compiling  # (is_compiling costs 3x as much)


def symbolic(n) -> bool:
    """Whether a size is a dynamic dim while torch.export traces. Rules that put calls in classes by length (the
    short-query route to a decode kernel, auto's speed rules) leave such a call in its general class instead of
    comparing it: export refuses a guard that narrows a Dim's range. torch.compile keeps the classes (a comparison
    there guards the graph, and each side of a class bound gets its own graph): compiled steps of 2-4 tokens on
    the general route read 20-48% slower (MHA D=64, 1024 keys, one thread). has_static_value, not type(), while
    dynamo traces: it answers type(n) is int for its symbolic sizes too (non-strict export hands over SymInts)."""
    if type(n) is int and not _is_dynamo_compiling():  # eager: ~60 ns
        return False
    from torch.fx.experimental.symbolic_shapes import has_static_value  # (loaded by any trace; not at import)
    return not has_static_value(n) and torch.compiler.is_exporting()


def no_values(*tensors) -> bool:
    """Whether tensor values cannot be read here: torch.compile or torch.export traces, or fake tensors (a plain
    FakeTensorMode, as shape and memory estimators run models). Checks and shortcuts that read values (a mask that
    is all True, sequence lengths) are skipped then; the computation takes the general form."""
    return torch.compiler.is_compiling() or any(isinstance(t, FakeTensor) for t in tensors)


def check_int(x, name: str, lo: int = 0) -> int:
    """An integer argument (int, numpy or 0-d integer tensor; floats are refused, not truncated) in [lo, 2**63).
    Under torch.compile it passes through unchecked (the C++ ops check what their kernels rely on): reading a
    symbolic size here would specialise the graph on its value."""
    if torch.compiler.is_compiling():
        return x
    try:
        i = operator.index(x)
    except TypeError:
        raise InputTypeError(f"fastattn: {name} must be an integer, got {type(x).__name__} {x!r}") from None
    if not lo <= i < 2 ** 63:
        raise InputValueError(f"fastattn: {name} must be an integer in [{lo}, 2**63), got {i}")
    return i


def default_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real):  # Python and NumPy numbers (as PyTorch's function takes)
        raise InputTypeError(f"fastattn: scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise InputValueError(f"fastattn: scale must be finite, got {scale!r}")
    return float(scale)


def causal_bias_alignment(attn_mask, is_causal: bool, Sq: int, Sk: int) -> Optional[bool]:
    """For a torch.nn.attention.bias.CausalBias attn_mask: whether it aligns bottom-right (LOWER_RIGHT) or
    top-left (UPPER_LEFT). None for anything else. Its lengths must be the call's; like PyTorch, it cannot be
    combined with is_causal=True."""
    if attn_mask is None or type(attn_mask) is torch.Tensor:  # the common case; also what torch.compile traces
        return None
    bias_mod = sys.modules.get("torch.nn.attention.bias")  # no CausalBias can exist before torch imports it
    if bias_mod is None or not isinstance(attn_mask, bias_mod.CausalBias):
        return None
    if is_causal:
        raise InputValueError("fastattn: a CausalBias attn_mask cannot be combined with is_causal=True "
                              "(as in PyTorch); pass one or the other")
    variant = bias_mod.CausalVariant
    if attn_mask.variant not in (variant.UPPER_LEFT, variant.LOWER_RIGHT):
        raise InputValueError(f"fastattn: CausalBias variant {attn_mask.variant!r} is not supported")
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (Sq, Sk):
        raise InputValueError(f"fastattn: attn_mask is a CausalBias for (Sq, Sk) = ({attn_mask.seq_len_q}, "
                              f"{attn_mask.seq_len_kv}) but query/key have ({Sq}, {Sk})")
    return attn_mask.variant == variant.LOWER_RIGHT


def _overrides_torch_function(t: torch.Tensor) -> bool:
    """True for tensor subclasses that give torch functions their own meaning (CausalBias, NestedTensor, ...):
    their storage is not what PyTorch's SDPA would read. Parameter, FakeTensor, DTensor and the like disable it."""
    f = getattr(type(t).__torch_function__, "__func__", type(t).__torch_function__)
    return f is not torch.Tensor.__torch_function__.__func__ and f is not torch._C._disabled_torch_function_impl


# (dtype, device) -> 0-d tensors 0 and -inf of that dtype: a bool mask becomes its bias in one torch.where.
_BOOL_BIAS: dict = {}
# dtype -> (integer dtype of its width, the bits of -inf as that integer): True -> 1 - 1 = 0 -> +0.0, False -> -1 ->
# all ones, and-ed down to -inf's bits. Bitwise torch.where's result in three integer passes without branches: a
# (2, 1, 1024, 1024) mask to bf16, one thread, 0.58 ms against 1.04 (causal) and 7.9 (random).
_NEG_INF_BITS = {torch.float32: (torch.int32, -0x800000), torch.bfloat16: (torch.int16, -0x80),
                 torch.float16: (torch.int16, -0x400)}


def _mask_4d(attn_mask, q, target):
    """normalize_mask's common case, or None: a plain 4-D bool or q.dtype CPU tensor, q on the CPU, the mask's dims
    the scores' or 1, in eager mode. Three torch calls where the general path makes six (~4 us warm a masked call).
    CPU only: there the Python is the cost, and bool_bias's cached tensors are never made inside a CUDA graph's
    capture (where a fill is recorded, not run)."""
    if not (type(attn_mask) is torch.Tensor and len(target) == 4 and q.is_cpu and attn_mask.is_cpu) \
            or attn_mask.is_nested or torch.compiler.is_compiling():
        return None
    dt = attn_mask.dtype
    shape = attn_mask.shape
    if len(shape) != 4 or not (dt is torch.bool or dt is q.dtype):
        return None
    b, h, sq, sk = shape
    B, H, Sq, Sk = target
    if not ((b == B or b == 1) and (h == H or h == 1) and (sq == Sq or sq == 1) and (sk == Sk or sk == 1)):
        return None
    bias = bool_bias(attn_mask, q) if dt is torch.bool else attn_mask
    return bias.expand(target), "key_padding" if h == 1 and sq == 1 else "dense"


def bool_bias(attn_mask, q):
    """A bool mask's additive bias in q's dtype: 0 where True (attend), -inf where False; its shape (eager, CPU:
    see _mask_4d)."""
    bits = _NEG_INF_BITS.get(q.dtype)
    if bits is not None and attn_mask.numel() >= 4096:  # below that torch.where's one call costs less
        return attn_mask.to(bits[0]).sub_(1).bitwise_and_(bits[1]).view(q.dtype)
    fill = _BOOL_BIAS.get((q.dtype, q.device))
    if fill is None:
        fill = _BOOL_BIAS[(q.dtype, q.device)] = (torch.zeros((), dtype=q.dtype, device=q.device),
                                                  torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    return torch.where(attn_mask, *fill)


def normalize_mask(attn_mask, q, target):
    """SDPA mask semantics -> (additive bias in q.dtype expanded to `target` (..., H, Sq, Sk) and flattened to
    (B, H, Sq, Sk), kind). bool: True = attend; float: added to the scores. Any shape that broadcasts to `target`
    (extra leading dims of size 1 are dropped). CausalBias is not a dense mask: see causal_bias_alignment."""
    if attn_mask is None:
        return None, None
    fast = _mask_4d(attn_mask, q, target)
    if fast is not None:
        return fast
    if not isinstance(attn_mask, torch.Tensor):
        raise InputTypeError(f"fastattn: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.is_nested or type(attn_mask) is not torch.Tensor and _overrides_torch_function(attn_mask):
        kind = "a nested tensor" if attn_mask.is_nested else f"of type {type(attn_mask).__name__}"
        raise InputTypeError(f"fastattn: attn_mask {kind} is not supported: fastattn reads masks as dense tensors; "
                             f"pass a bool or float torch.Tensor (or a CausalBias)")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise InputTypeError(f"fastattn: attn_mask must be bool (True = attend) or floating (additive), "
                             f"got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise InputValueError(f"fastattn: attn_mask is on {attn_mask.device} but query is on {q.device}")
    target = tuple(target)
    shape = tuple(attn_mask.shape)
    while len(shape) > len(target) and shape[0] == 1:
        shape = shape[1:]
    full = (1,) * (len(target) - len(shape)) + shape  # left-padded to target's rank

    # `have == want` first: with symbolic sizes s0 == s0 is decided statically. (torch._check_with would trade the
    # guard for a runtime assertion, but torch.compile(fullgraph=True) cannot trace its message closure.)
    if attn_mask.dim() == 0 or len(shape) > len(target) or not all(
            have == want or have == 1 for have, want in zip(full, target)):
        raise InputValueError(f"fastattn: attn_mask of shape {_shape(attn_mask)} is not broadcastable to the "
                              f"scores' shape (..., H, Sq, Sk) = {target}")
    m = attn_mask.reshape(full)  # (b|1, ..., h|1, sq|1, sk|1)
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill_(~m, float("-inf"))
    else:
        bias = m.to(q.dtype)
    kind = "key_padding" if (full[-3] == 1 and full[-2] == 1) else "dense"
    bias = bias.expand(target)
    if len(target) > 4:  # (..., H, Sq, Sk) -> (B, H, Sq, Sk): a view unless broadcast batch dims must merge (a copy)
        bias = bias.reshape((math.prod(target[:-3]),) + target[-3:])
    return bias, kind


def check_cu_seqlens(cu, name: str, total: int, device=None) -> torch.Tensor:
    """Checks cu_seqlens (int32 (N+1,) on `device` when given, starting at 0, non-decreasing, ending at `total`);
    returns it contiguous (the ops refuse strided ones)."""
    return check_cu_seqlens_padded(cu, name, total, device, padded=False)[0]


def check_cu_seqlens_padded(cu, name: str, total: int, device=None, padded: bool = True):
    """check_cu_seqlens, the end allowed short of `total` when padded (rows past it are padding, as flash-attn
    takes them): returns (cu, its end), the end None while compiling or fake (its value is not read then)."""
    if not isinstance(cu, torch.Tensor):
        raise InputTypeError(f"fastattn: {name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise InputValueError(f"fastattn: {name} must be a 1-D int32 tensor of length batch+1, got {cu.dtype} {_shape(cu)}")
    if device is not None and cu.device != device:  # before its values are read (a meta one has none)
        raise InputValueError(f"fastattn: {name} must be on q's device {device}, got {cu.device}")
    cu = cu.contiguous()
    if no_values(cu):
        return cu, None  # value checks need a host sync; they ran in eager mode
    c = cu.detach().cpu()
    if int(c[0]) != 0:
        raise InputValueError(f"fastattn: {name}[0] must be 0, got {int(c[0])}")
    if bool((c[1:] < c[:-1]).any()):
        raise InputValueError(f"fastattn: {name} must be non-decreasing, got {c.tolist()}")
    end = int(c[-1])
    if end > total or end != total and not padded:
        raise InputValueError(f"fastattn: {name}[-1] = {end} must equal the packed length {total}"
                              + (" or lie below it (padding rows)" if padded else ""))
    return cu, end


def check_alibi(alibi_slopes, B: int, H: int, device):
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise InputTypeError("fastattn: alibi_slopes must be a float32 tensor of shape (H,) or (B, H)")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise InputValueError(f"fastattn: alibi_slopes must have shape ({H},) or ({B}, {H}), got {_shape(alibi_slopes)}")
    if alibi_slopes.device != device:
        raise InputValueError(f"fastattn: alibi_slopes is on {alibi_slopes.device} but query is on {device}")
    return alibi_slopes.contiguous()  # the kernels index it densely (a strided view is copied, it is tiny)


def clamp_window(left: int, right: int, wide: int):
    """A window entry wider than `wide` (at least every sequence's Sq + Sk) sees everything: make it -1, so no
    backend's index arithmetic (i + Sk - Sq +- window, int64) can overflow on entries up to 2**63 - 1."""
    return (-1 if left > wide else left), (-1 if right > wide else right)


def check_window(window_size):
    if type(window_size) is tuple and len(window_size) == 2:  # the common case: two Python ints
        left, right = window_size
        if type(left) is int and type(right) is int and -1 <= left < 2 ** 63 and -1 <= right < 2 ** 63:
            return left, right
    try:
        left, right = window_size
    except Exception:
        raise InputValueError(f"fastattn: window_size must be a pair (left, right), got {window_size!r}") from None
    try:
        left, right = operator.index(left), operator.index(right)
    except TypeError:
        raise InputTypeError(f"fastattn: window_size entries must be integers (-1 = unlimited), got "
                        f"{window_size!r}") from None
    if not (-1 <= left < 2 ** 63 and -1 <= right < 2 ** 63):
        raise InputValueError(f"fastattn: window_size entries must be integers in [-1, 2**63) (-1 = unlimited), got "
                         f"{window_size!r}")
    return left, right
