"""Launchers for the Triton kernels and their registration as torch ops fastattn::triton_fwd / triton_bwd.

On GPUs the ops are `torch.library.triton_op`s whose kernels are launched through `wrap_triton` while torch traces
them (kernels/launch.py), so torch.compile(fullgraph=True) traces into them. Under TRITON_INTERPRET=1 (CPU tensors)
the kernels are Python objects that fake tensors cannot run, so the same functions are registered as opaque
`custom_op`s with fake functions instead. Either way autograd is registered on triton_fwd, and the schemas mirror
fastattn::fwd/bwd/bwd_acc (csrc/ops.cpp): q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) with any strides
(last dim stride 1), out in q's memory order, lse fp32 (B, Hq, Sq) natural log with +inf for rows that see no key.

Block calls (fastattn/blocks.py): q_start/k_start (int32 (N,)) put each sequence's queries and keys at global
positions (kernels/common.py), out_fp32 returns the forward's fp32 accumulator unrounded, and
fastattn::triton_bwd_acc adds the gradients into caller-given fp32 buffers. head_start (last argument of the three
ops, default 0) keys dropout by the global query head head_start + h; with dropout it needs block coordinates (the
plain dropout stream is keyed on the call's linear element index, which depends on its head count)."""
from __future__ import annotations

import inspect
import os
import threading
from typing import Optional, Tuple

import torch
import triton
from torch._subclasses import fake_tensor

from . import configs as C
from .launch import INTERPRET, define as _define, launcher as _wrap
from ....ops import autograd_pair, eager_function
from ....params import InputValueError
from .bwd_dkdv import attn_bwd_dkdv
from .bwd_dq import attn_bwd_dq
from .bwd_preprocess import attn_bwd_preprocess
from .fwd import attn_fwd

LOG2E = 1.4426950408889634

# FASTATTN_TRITON_AUTOTUNE=0: no timing runs; each new key takes one config from the prune predicate's survivors
# (the largest tile, preferring 3 stages) — fast first calls for tests and short jobs, at some cost in speed.
AUTOTUNE = os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"
# Autotune timings are kept on disk next to Triton's kernel cache, so a new process does not retune (triton >= 3.2).
_CACHE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _tuning(prune):
    if AUTOTUNE:
        return {"early_config_prune": prune}

    def one(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        return [max(kept, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -abs(c.num_stages - 3)))]
    return {"early_config_prune": one}


if not INTERPRET:
    _fwd_tuned = triton.autotune(C.FWD_CONFIGS, key=C.KEY, prune_configs_by=_tuning(C.prune_fwd), **_CACHE_KW)(attn_fwd)
    _dkdv_tuned = triton.autotune(C.DKDV_CONFIGS, key=C.KEY, prune_configs_by=_tuning(C.prune_dkdv),
                                  **_CACHE_KW)(attn_bwd_dkdv)
    _dq_tuned = triton.autotune(C.DQ_CONFIGS, key=C.KEY, prune_configs_by=_tuning(C.prune_dq), **_CACHE_KW)(attn_bwd_dq)
    # Accumulating backward (triton_bwd_acc): timing runs would add into the caller's buffers again and again, so
    # these tuners restore them after each trial (their own caches: the plain tuners pay no copies).
    _dkdv_acc_tuned = triton.autotune(C.DKDV_CONFIGS, key=C.KEY, prune_configs_by=_tuning(C.prune_dkdv),
                                      restore_value=["DK", "DV"], **_CACHE_KW)(attn_bwd_dkdv)
    _dq_acc_tuned = triton.autotune(C.DQ_CONFIGS, key=C.KEY, prune_configs_by=_tuning(C.prune_dq),
                                    restore_value=["DQ"], **_CACHE_KW)(attn_bwd_dq)


# Triton's Autotuner keeps per-call state on itself (its nargs, set and cleared around each launch): two threads
# launching one tuned kernel at once (context-parallel ranks as threads, a threaded server) failed inside triton
# 3.6 ("'NoneType' object is not a mapping", seen on an H200). Launches are asynchronous, so the lock is held for
# the host side of a launch only (and for a first call's compile or tuning, which other threads would wait for).
_LAUNCH_LOCK = threading.Lock()


def _launch(kernel, grid, *args, **kwargs):
    if INTERPRET:  # no autotuner there; the interpreter runs the kernel in this call
        return _wrap(kernel)[grid](*args, **kwargs)
    with _LAUNCH_LOCK:
        return _wrap(kernel)[grid](*args, **kwargs)


def _poison(t: torch.Tensor) -> torch.Tensor:
    """FASTATTN_POISON_OUTPUTS=1 (the tests) fills fresh outputs with NaN, as csrc/common.h alloc_output."""
    if os.environ.get("FASTATTN_POISON_OUTPUTS") == "1":
        t.fill_(float("nan"))
    return t


def _out_like_q(q: torch.Tensor, dv: int, dtype=None) -> torch.Tensor:
    B, H, S, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty(B, S, H, dv, dtype=dtype).transpose(1, 2)  # (B, S, H, Dv) memory -> (B, H, S, Dv) view
    return q.new_empty(B, H, S, dv, dtype=dtype)


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _meta(q, k, v, bias, alibi, cu_q, max_q, max_k, scale, wl, wr, br, softcap, dropout_p, has_start):
    """Scalar arguments and compile-time switches shared by the three main kernels."""
    # Positions are < 2^31, so a window of 2^31 or more covers every key (and would not fit the int32 argument).
    wl, wr = (-1 if wl >= 2 ** 31 else wl), (-1 if wr >= 2 ** 31 else wr)
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    varlen = cu_q is not None
    if varlen:  # no sequence is longer than its tensor: a larger max_seqlen would only grow the grid
        max_q, max_k = torch.sym_min(torch.sym_max(max_q, 0), Sq), torch.sym_min(torch.sym_max(max_k, 0), Sk)
    if bias is None:
        bias_kind, bstr = 0, (0, 0, 0, 0)
    else:
        bstr = tuple(bias.stride())
        bias_kind = 1 if bstr[1] == 0 and bstr[2] == 0 else 2  # key padding (sB, 0, 0, sN): load one row per block
    scal = dict(
        stride_bb=bstr[0], stride_bh=bstr[1], stride_bm=bstr[2], stride_bn=bstr[3],
        stride_ab=(alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0),
        seqlen_q_arg=max_q if varlen else Sq, seqlen_k_arg=max_k if varlen else Sk, rows_q=Sq, rows_k=Sk,
        head_ratio=Hq // Hkv,
        qk_scale2=scale * LOG2E, cap_in=scale / softcap if softcap > 0 else 0.0, cap_out2=softcap * LOG2E,
        window_left=wl, window_right=wr, dropout_p=dropout_p,
        BUCKET_Q=C.bucket(max_q if varlen else Sq), BUCKET_K=C.bucket(max_k if varlen else Sk),
    )
    const = dict(
        BLOCK_D=max(16, C.pow2(D)), BLOCK_DV=max(16, C.pow2(Dv)), HEAD_D=D,
        HEAD_DV=Dv, IS_VARLEN=varlen, BOTTOM_RIGHT=bool(br), WINDOW_LEFT=wl >= 0, WINDOW_RIGHT=wr >= 0,
        SOFTCAP=softcap > 0, ALIBI=alibi is not None, BIAS=bias_kind, DROPOUT=dropout_p > 0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,  # see common.mm: interpreter bf16 tl.dot bug
        HAS_START=has_start,
    )
    nb = cu_q.numel() - 1 if varlen else B
    return scal, const, nb


def _pick(tuned, raw, blocks, interp_blocks):
    """(kernel, extra launch kwargs): explicit blocks (tests, debug counters) or the interpreter's single config
    launch the raw kernel; otherwise the autotuner picks."""
    if blocks is None and INTERPRET:
        blocks = (interp_blocks["BLOCK_M"], interp_blocks["BLOCK_N"])
    if blocks is not None:
        return raw, dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1], num_warps=4, num_stages=2)
    return tuned, {}


def _check_blocks(op, q, k, cu_q, cu_k, br, q_start, k_start):
    """q_start/k_start as csrc/ops.cpp checks them (values only where they can be read without a host sync)."""
    def need(ok, msg):
        if not ok:
            raise InputValueError(f"fastattn: {op}: {msg}")

    if q_start is None and k_start is None:
        return False
    need(q_start is not None and k_start is not None, "q_start and k_start must be given together")
    n = cu_q.shape[0] - 1 if cu_q is not None else q.shape[0]
    for name, t in (("q_start", q_start), ("k_start", k_start)):
        need(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
        need(t.dim() == 1 and t.shape[0] == n, f"{name} must have shape ({n},) (one entry per "
             f"{'sequence' if cu_q is not None else 'batch row'}), got {tuple(t.shape)}")
        need(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
        need(t.is_contiguous(), f"{name} must be contiguous")
    need(not br, "bottom_right must be False with q_start/k_start (the offsets align the blocks)")
    if q_start.device.type == "cpu":  # on a GPU this would be a host sync: the Python layer checks in eager mode
        for name, t, cu, rows in (("q_start", q_start, cu_q, q.shape[2]), ("k_start", k_start, cu_k, k.shape[2])):
            length = (cu[1:] - cu[:-1]).clamp(0, rows) if cu is not None else rows  # (N,) per sequence, or one
            need(bool(((t >= 0) & (t.long() + length < 2 ** 31)).all()),
                 f"{name} values must be >= 0 with {name} + length < 2^31, got {t.tolist()[:8]}")
    return True


def _check_head_start(op, head_start, heads_q, dropout_p, has_start):
    """head_start as csrc/ops.cpp checks it, and (here only) block coordinates when dropout uses it."""
    if isinstance(head_start, bool) or not isinstance(head_start, int) or head_start < 0 \
            or head_start + heads_q > 2 ** 31:
        raise InputValueError(f"fastattn: {op}: head_start must be an int >= 0 with head_start + Hq ({heads_q}) "
                              f"<= 2^31, got {head_start!r}")
    if head_start and dropout_p > 0 and not has_start:
        raise InputValueError(f"fastattn: {op}: dropout with head_start={head_start} needs block coordinates "
                              "(q_start/k_start): the plain dropout stream is keyed on the call's linear index")


def launch_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, softcap, alibi, dropout_p, seed, offset,
               q_start=None, k_start=None, out_fp32=False, head_start=0, *,
               blocks: Optional[Tuple[int, int]] = None, stats: Optional[torch.Tensor] = None):
    """Forward. q_start/k_start: block coordinates (int32 (N,)); out_fp32: out in float32, unrounded; head_start:
    dropout keyed by the global head head_start + h. blocks=(BLOCK_M, BLOCK_N) bypasses autotuning; stats
    (int32 (2,)) counts visited key blocks [masked, unmasked] (debug)."""
    B, Hq, Sq, D = q.shape
    has_start = _check_blocks("triton_fwd", q, k, cu_q, cu_k, br, q_start, k_start)
    _check_head_start("triton_fwd", head_start, Hq, dropout_p, has_start)
    out = _poison(_out_like_q(q, v.shape[-1], torch.float32 if out_fp32 else None))
    lse = _poison(q.new_empty(B, Hq, Sq, dtype=torch.float32))
    if Sq == 0 or k.shape[2] == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    scal, const, nb = _meta(q, k, v, bias, alibi, cu_q, max_q, max_k, scale, wl, wr, br, softcap, dropout_p,
                            has_start)
    kernel, launch = _pick(_fwd_tuned if not INTERPRET else None, attn_fwd, blocks, C.INTERP_FWD)
    rows = scal["seqlen_q_arg"]
    grid = lambda META: (triton.cdiv(rows, META["BLOCK_M"]), nb * Hq)  # noqa: E731
    _launch(kernel, grid,
        q, k, v, out, lse, bias, alibi, cu_q, cu_k, q_start, k_start, stats, *_strides3(q), *_strides3(k),
        *_strides3(v), *_strides3(out), lse.stride(0), lse.stride(1), num_heads=Hq, seed=seed, rng_offset=offset,
        head_start=head_start, DEBUG=stats is not None, **scal, **const, **launch)
    return out, lse


def _check_grad_io(op, dout, q, v, out, lse):
    """The tensors the backward reads besides q/k/v: a wrong dtype would fail inside the kernel's dots."""
    B, Hq, Sq = q.shape[:3]
    for name, t in (("dout", dout), ("out", out)):
        if t.dtype != q.dtype or tuple(t.shape) != (B, Hq, Sq, v.shape[-1]):
            raise InputValueError(f"fastattn: {op}: {name} must be {q.dtype} {(B, Hq, Sq, v.shape[-1])} like q, "
                                  f"got {t.dtype} {tuple(t.shape)}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq, Sq):
        raise InputValueError(f"fastattn: {op}: lse must be float32 {(B, Hq, Sq)}, got {lse.dtype} "
                              f"{tuple(lse.shape)}")


def _span(t: torch.Tensor):
    """(first byte, end byte) t's elements lie in (strides >= 0), None when empty."""
    if t.numel() == 0:
        return None
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _reaches(dims, delta: int) -> bool:
    """csrc/block_checks.h reaches: delta = sum of e_d * stride_d with lo_d <= e_d <= hi_d (floor or the next)."""
    if not dims:
        return delta == 0
    st, lo, hi = dims[-1]
    e = delta // st
    return any(lo <= c <= hi and _reaches(dims[:-1], delta - c * st) for c in (e, e + 1))


def _decided_by_strides(a: torch.Tensor, b: torch.Tensor):
    """csrc/block_checks.h decided_by_strides: [(stride, lowest, highest index difference)] by stride, or None."""
    dims = sorted((st, 1 - nb, na - 1) for st, na, nb in zip(a.stride(), a.shape, b.shape) if na > 1 or nb > 1)
    reach = 0
    for st, lo, hi in dims:
        if st <= reach:
            return None
        reach += st * max(-lo, hi)
    return dims


def _strides_disjoint(t: torch.Tensor) -> bool:
    """csrc/block_checks.h strides_disjoint: t against itself."""
    return _decided_by_strides(t, t) is not None


def _may_share(a: torch.Tensor, b: torch.Tensor) -> bool:
    """csrc/block_checks.h may_share for views of one storage: exactly where the strides decide it (same strides and
    dtype, any sizes), else whether their byte spans meet (refuses some interleaved views that would not collide).
    Ahead of it, torch's own test answers for dense tensors."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or not a.numel() or not b.numel():
        return False
    elt, delta = a.element_size(), b.data_ptr() - a.data_ptr()
    if a.dim() == b.dim() and a.stride() == b.stride() and b.element_size() == elt and delta % elt == 0:
        dims = _decided_by_strides(a, b)
        if dims is not None:
            return _reaches(dims, delta // elt)
    sa, sb = _span(a), _span(b)
    return sa[0] < sb[1] and sb[0] < sa[1]


def _check_acc(q, k, v, acc, others):
    """Accumulators: float32, q's/k's/v's shapes, stride 1 on the last dim; as csrc's bwd_acc, no element shared
    inside one (an expanded tensor) and no memory shared with another argument: each element has one writer that
    adds into it, and the kernels must not read back what they wrote. others: the other tensor arguments by name."""
    real = not any(fake_tensor.is_fake(t) for t in acc)  # tracing (triton_op under torch.compile): shapes only
    for name, t, like, of in zip(("dq_acc", "dk_acc", "dv_acc"), acc, (q, k, v), "qkv"):
        def need(ok, msg):
            if not ok:
                raise InputValueError(f"fastattn: triton_bwd_acc: {name} {msg}")
        need(t.dtype == torch.float32, f"must be float32, got {t.dtype}")
        need(t.shape == like.shape, f"must have {of}'s shape {tuple(like.shape)}, got {tuple(t.shape)}")
        need(t.device == like.device, f"is on {t.device}, {of} on {like.device}")
        need(t.stride(-1) == 1 or t.shape[-1] <= 1, f"must have stride 1 on the last dim, got strides {t.stride()}")
        if not real:
            continue
        overlap = torch._debug_has_internal_overlap(t)  # 0 no, 1 yes, 2 too hard to tell
        need(overlap == 0 or overlap == 2 and _strides_disjoint(t),
             f"must not have elements sharing memory (e.g. an expanded tensor), got strides {t.stride()}")
        for other_name, o in list(zip(("dq_acc", "dk_acc", "dv_acc"), acc)) + list(others.items()):
            if o is None or other_name == name:
                continue
            need(not _may_share(t, o), f"must not share memory with {other_name} (strides {t.stride()} and "
                                       f"{o.stride()})")


def launch_bwd(dout, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, softcap, alibi,
               dropout_p, seed, offset, q_start=None, k_start=None, head_start=0, *,
               acc: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
               blocks: Optional[Tuple[int, int]] = None, stats: Optional[torch.Tensor] = None):
    """Backward: preprocess (delta), dK/dV, dQ. q_start/k_start: block coordinates; head_start as launch_fwd.
    acc = (dq_acc, dk_acc, dv_acc) float32: the gradients are added into them unrounded (returned) instead of
    allocated in q's dtype. blocks applies to both main kernels as (BLOCK_M, BLOCK_N); stats (int32 (4,)) counts
    [dkdv masked, dkdv unmasked, dq masked, dq unmasked] visited blocks."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    op_name = "triton_bwd" if acc is None else "triton_bwd_acc"
    has_start = _check_blocks(op_name, q, k, cu_q, cu_k, br, q_start, k_start)
    _check_head_start(op_name, head_start, Hq, dropout_p, has_start)
    _check_grad_io(op_name, dout, q, v, out, lse)
    if acc is None:
        dq = _poison(torch.empty_like(q))
        dk = _poison(torch.empty_like(k))
        dv = _poison(torch.empty_like(v))
    else:
        _check_acc(q, k, v, acc, dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse))
        dq, dk, dv = acc
    if Sq == 0 or Sk == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_()) if acc is None else acc
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    scal, const, nb = _meta(q, k, v, bias, alibi, cu_q, max_q, max_k, scale, wl, wr, br, softcap, dropout_p,
                            has_start)
    delta = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)  # rowsum(dO * O), like lse
    _launch(attn_bwd_preprocess, (triton.cdiv(Sq, C.PRE_BLOCK_M), B * Hq),
        out, dout, delta, *_strides3(out), *_strides3(dout), Sq, Hq,
        BLOCK_M=C.PRE_BLOCK_M, BLOCK_DV=const["BLOCK_DV"], HEAD_DV=Dv)
    common = dict(seed=seed, rng_offset=offset, head_start=head_start, scale=scale, ACCUMULATE=acc is not None,
                  **scal, **const)
    kv_stats = stats[:2] if stats is not None else None
    q_stats = stats[2:] if stats is not None else None
    tuned = None if INTERPRET else (_dkdv_tuned if acc is None else _dkdv_acc_tuned)
    kernel, launch = _pick(tuned, attn_bwd_dkdv, blocks, C.INTERP_DKDV)
    cols = scal["seqlen_k_arg"]
    grid = lambda META: (triton.cdiv(cols, META["BLOCK_N"]), nb * Hkv)  # noqa: E731
    _launch(kernel, grid,
        q, k, v, dout, lse, delta, dk, dv, bias, alibi, cu_q, cu_k, q_start, k_start, kv_stats,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk), *_strides3(dv),
        lse.stride(0), lse.stride(1), num_heads=Hq, num_kv_heads=Hkv, DEBUG=stats is not None, **common, **launch)
    tuned = None if INTERPRET else (_dq_tuned if acc is None else _dq_acc_tuned)
    kernel, launch = _pick(tuned, attn_bwd_dq, blocks, C.INTERP_DQ)
    rows = scal["seqlen_q_arg"]
    grid = lambda META: (triton.cdiv(rows, META["BLOCK_M"]), nb * Hq)  # noqa: E731
    _launch(kernel, grid,
        q, k, v, dout, lse, delta, dq, bias, alibi, cu_q, cu_k, q_start, k_start, q_stats,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq),
        lse.stride(0), lse.stride(1), num_heads=Hq, DEBUG=stats is not None, **common, **launch)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration (kernels/launch.py define)


@_define("fastattn::triton_fwd")
def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
               cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
               max_seqlen_k: int, scale: float, window_left: int, window_right: int, bottom_right: bool,
               softcap: float, alibi_slopes: Optional[torch.Tensor], dropout_p: float, seed: int, offset: int,
               deterministic: bool, q_start: Optional[torch.Tensor] = None, k_start: Optional[torch.Tensor] = None,
               out_fp32: bool = False, head_start: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_fwd(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                      window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset,
                      q_start, k_start, out_fp32, head_start)


@_define("fastattn::triton_bwd")
def triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, attn_bias: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
               cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
               window_left: int, window_right: int, bottom_right: bool, softcap: float,
               alibi_slopes: Optional[torch.Tensor], dropout_p: float, seed: int, offset: int,
               deterministic: bool, q_start: Optional[torch.Tensor] = None,
               k_start: Optional[torch.Tensor] = None,
               head_start: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # dQ has its own pass (no atomics), so the result is deterministic whatever `deterministic` says.
    return launch_bwd(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      scale, window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset,
                      q_start, k_start, head_start)


@_define("fastattn::triton_bwd_acc", mutates=("dq_acc", "dk_acc", "dv_acc"))
def triton_bwd_acc(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, attn_bias: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                   window_left: int, window_right: int, bottom_right: bool, softcap: float,
                   alibi_slopes: Optional[torch.Tensor], dropout_p: float, seed: int, offset: int,
                   deterministic: bool, q_start: Optional[torch.Tensor], k_start: Optional[torch.Tensor],
                   dq_acc: torch.Tensor, dk_acc: torch.Tensor, dv_acc: torch.Tensor, head_start: int = 0) -> None:
    """triton_bwd's gradients added into the float32 accumulators, never rounded to q's dtype (block calls: out is
    the merged output in q's dtype, lse the merged lse)."""
    launch_bwd(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
               window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, q_start,
               k_start, head_start, acc=(dq_acc, dk_acc, dv_acc))


if INTERPRET:  # opaque custom ops need fake functions; triton_op derives them by tracing the launchers
    @triton_fwd.register_fake
    def _fwd_fake(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                  window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, deterministic,
                  q_start=None, k_start=None, out_fp32=False, head_start=0):
        B, H, S, _ = q.shape
        out = _out_like_q(q, v.shape[-1], torch.float32 if out_fp32 else None)
        return out, q.new_empty(B, H, S, dtype=torch.float32)

    @triton_bwd.register_fake
    def _bwd_fake(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset,
                  deterministic, q_start=None, k_start=None, head_start=0):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @triton_bwd_acc.register_fake
    def _bwd_acc_fake(*args):
        return None


_bwd, _setup = autograd_pair(lambda: torch.ops.fastattn.triton_bwd)
triton_fwd.register_autograd(_bwd, setup_context=_setup)
# Eager calls' autograd without the registered Python autograd kernel's per-call cost (fastattn/ops.py, call_fwd).
EAGER_FWD = eager_function(torch.ops.fastattn.triton_fwd.default, lambda: torch.ops.fastattn.triton_bwd)
