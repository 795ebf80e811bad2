"""`sdpa`: PyTorch's own torch.nn.functional.scaled_dot_product_attention, for comparison and as a last resort.

Bottom-right causal alignment and sliding windows are expressed as a bool mask; rows whose keys are all masked
are unmasked for the call and their outputs zeroed, so they give 0 output and 0 gradient, never NaN.

TORCH_SDPA is PyTorch's function itself (the C++ binding F.scaled_dot_product_attention is bound to), captured at
import: after the global swap `F.scaled_dot_product_attention = fastattn.scaled_dot_product_attention` (see
fastattn/nn.py) this backend still calls PyTorch, not fastattn again."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import ops
from ..params import AttnParams, no_values, symbolic
from .base import Backend, Lean
from .reference import visibility

TORCH_SDPA = getattr(torch._C._nn, "scaled_dot_product_attention", F.scaled_dot_product_attention)


def native_causal(p: AttnParams) -> bool:
    """SDPA's own (top-left) is_causal serves p: causal without window or mask, bottom-right only where Sq == Sk,
    Sq <= Sk (every row sees key 0), and scale > 0: PyTorch's CPU kernels (torch 2.14, fp64 included) return all-NaN
    for is_causal with scale <= 0. Otherwise forward builds the visibility as an additive mask."""
    if not p.causal or p.has_window or p.attn_bias is not None or not p.scale > 0:  # flags first: every call asks
        return False
    Sq, Sk = p.q.shape[2], p.k.shape[2]
    if symbolic(Sq) or symbolic(Sk):  # exported: only where the lengths' relation is known (no guard; else the mask)
        from torch.fx.experimental.symbolic_shapes import statically_known_true  # (loaded by the trace)
        return statically_known_true(Sq == Sk if p.bottom_right else Sq <= Sk)
    return (not p.bottom_right or Sq == Sk) and Sq <= Sk


def pytorch_fused(p: AttnParams, mask: bool = False) -> bool:
    """True when this backend takes p as PyTorch's own fused call, the calls `auto`'s hand-over rules were measured
    on (backends/cpu.py, backends/triton): no dense (Sq, Sk) mask built here (windows, bottom-right causal), no
    dropout from torch's RNG in place of fastattn's Philox stream, and nothing this backend refuses (softcap, alibi,
    varlen, lse, deterministic: the naive reference would get the call). mask: the call's own mask is allowed (not
    with causal: forward would fold the diagonal into it). Plain field reads: this runs on every call it is asked for."""
    if (p.attn_bias is not None and not mask or p.cu_seqlens_q is not None or p.softcap > 0
            or p.alibi_slopes is not None or p.return_lse or p.deterministic or p.dropout_p > 0 or p.window_left >= 0
            or p.window_right > 0):
        return False
    return not p.causal or native_causal(p)  # (native_causal refuses a mask)


class SdpaBackend(Backend):
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention (PyTorch picks its own kernel)"
    devices = frozenset({"cpu", "cuda", "mps", "xpu"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims = (1, 1024)
    features = frozenset({"causal", "bottom_right", "window", "mask", "mask_grad", "dropout", "gqa", "grad",
                          "dv_ne_d", "func_transform"})

    def length_breaks(self, Sq: int):
        """native_causal's Sq <= Sk."""
        return (Sq - 1,)

    def lean(self, p: AttnParams):
        """PyTorch's function on q, k, v as they come, where forward would call it without a mask of its own; with a
        mask (the call's 4-D attn_mask, a fourth argument), on the mask itself, where that gives forward's result."""
        if p.dropout_p > 0 or p.has_window or p.causal and not native_causal(p):
            return None
        is_causal, scale, kw = p.causal, p.scale, {"enable_gqa": True} if p.is_gqa else {}
        # torch's function itself, called from C++ where the extension has the routes (csrc/lean_routes.cpp)
        if p.attn_bias is None:
            if ops._ROUTES:
                return Lean(self.name, ops._C.SdpaRoute(is_causal, scale, p.is_gqa).out, records_grad=True)
            return Lean(self.name, lambda q, k, v: TORCH_SDPA(q, k, v, is_causal=is_causal, scale=scale, **kw),
                        records_grad=True)

        if not p.q.is_cpu or not _zeroes_unseen_rows():
            return None
        # The mask itself (bool, or the inputs' dtype): torch turns a bool mask into the bias forward passes, and
        # zeroes rows that see no key as forward does (probed once). No tensor is made here: any small allocation
        # between calls cost torch's own kernel 10-15 us at 16-32 tokens (its scratch then page-faults).
        if ops._ROUTES:
            return Lean(self.name, ops._C.SdpaRoute(False, scale, p.is_gqa).out, records_grad=True)
        return Lean(self.name, lambda q, k, v, mask: TORCH_SDPA(q, k, v, attn_mask=mask, scale=scale, **kw),
                    records_grad=True)

    def forward(self, p: AttnParams):
        q, k, v = p.q, p.k, p.v
        Sq, Sk = q.shape[2], k.shape[2]
        bias = p.attn_bias
        is_causal = False
        vis = None
        if native_causal(p):
            is_causal = True
        elif p.window_left >= 0 or p.window_right >= 0:
            vis = visibility(Sq, Sk, p.window_left, p.window_right, p.bottom_right, q.device)
        if vis is not None:
            bias = torch.where(vis, 0.0, float("-inf")).to(q.dtype) if bias is None else bias.masked_fill(~vis, float("-inf"))
        row_ok = None
        if bias is not None:
            # Dims the mask repeats along (stride 0: broadcast over heads or queries, as a key-padding mask) go to
            # torch at size 1, which it broadcasts itself: the row check and fix-up below then run on the mask,
            # not on (B, H, Sq, Sk), and torch reads no dense bias (a (B, 1, 1, Sk) mask had cost 2-3x the call).
            for d in range(bias.dim() - 1):
                if bias.stride(d) == 0 and bias.shape[d] > 1:
                    bias = bias.narrow(d, 0, 1)
            bias, row_ok = _rows_seen(bias)
        kw = {"enable_gqa": True} if p.is_gqa else {}
        out = TORCH_SDPA(q, k, v, attn_mask=bias, dropout_p=p.dropout_p, is_causal=is_causal, scale=p.scale, **kw)
        if row_ok is not None:
            out = torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out, None


@functools.lru_cache(maxsize=None)
def _zeroes_unseen_rows() -> bool:
    """Whether PyTorch's CPU SDPA gives 0 (not NaN) for a query row whose keys are all masked, with a bool mask and
    with a float -inf one (torch 2.11 and 2.14 do), as forward's fix-up does."""
    q = torch.ones(1, 1, 2, 4)
    keep = torch.tensor([True, True, False, False]).view(1, 1, 2, 2)  # row 1 sees nothing
    with torch.no_grad():
        outs = [TORCH_SDPA(q, q, q, attn_mask=m) for m in (keep, torch.zeros(keep.shape).masked_fill(~keep, -math.inf))]
    return all(bool((o[0, 0, 1] == 0).all()) and bool(torch.isfinite(o).all()) for o in outs)


def _rows_seen(bias):
    """(bias, row_ok): row_ok (B|1, H|1, Sq|1, 1) True where a row of the additive bias sees a key, or None when every
    row does (asked on CPU only, where it costs no host sync, and not while torch.compile traces); the bias with
    unseen rows unmasked for the call (torch may give NaN there; forward then gives 0)."""
    row_ok = (bias > float("-inf")).any(dim=-1, keepdim=True)
    # Traced or fake (torch.export, FakeTensorMode): no values to read, keep the data-independent form.
    if bias.is_cpu and not no_values(bias) and bool(row_ok.all()):
        return bias, None
    return torch.where(row_ok, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)), row_ok

