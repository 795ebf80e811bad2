"""What every backend declares, and the generic check of a call against those declarations.

A backend is a class with class-level declarations (what it supports) and two methods:
  `unavailable()` -> reasons it cannot run at all here (not built, no GPU, ...), empty when it can;
  `forward(p: AttnParams)` -> (out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32 or None), differentiable.
`reasons(p)` combines the declarations with `extra_reasons(p)`; the dispatcher takes the first preferred
backend whose reasons are empty, and shows every backend's reasons when none can take a call.
"""
from __future__ import annotations

from typing import FrozenSet, List, Optional, Tuple

import torch

from ..params import AttnParams

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
})


class Backend:
    name: str = "?"
    description: str = ""
    devices: FrozenSet[str] = frozenset()
    dtypes: FrozenSet[torch.dtype] = frozenset()
    head_dims: Tuple[int, int] = (1, 256)   # inclusive range of D (and Dv)
    features: FrozenSet[str] = frozenset()
    min_capability: Optional[Tuple[int, int]] = None  # CUDA compute capability

    def unavailable(self) -> List[str]:
        return []

    def extra_reasons(self, p: AttnParams) -> List[str]:
        return []

    def forward(self, p: AttnParams):
        raise NotImplementedError

    def supports(self, feature: str) -> bool:
        return feature in self.features

    def reasons(self, p: AttnParams) -> List[str]:
        """Human-readable reasons this backend cannot take the call; empty when it can."""
        r = list(self.unavailable())
        if r:
            return r
        dev = p.device.type
        if dev not in self.devices:
            r.append(f"device {dev} not supported (supports {', '.join(sorted(self.devices))})")
        if p.dtype not in self.dtypes:
            r.append(f"dtype {str(p.dtype)[6:]} not supported (supports "
                     f"{', '.join(sorted(str(d)[6:] for d in self.dtypes))})")
        lo, hi = self.head_dims
        for nm, d in (("head dim", p.head_dim), ("value head dim", p.head_dim_v)):
            if not lo <= d <= hi:
                r.append(f"{nm} {d} outside supported range [{lo}, {hi}]")
        if p.head_dim != p.head_dim_v and "dv_ne_d" not in self.features:
            r.append(f"value head dim {p.head_dim_v} != query head dim {p.head_dim}")
        if dev == "cuda" and self.min_capability is not None and torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(p.device)
            if cap < self.min_capability:
                r.append(f"GPU capability {cap[0]}.{cap[1]} below required "
                         f"{self.min_capability[0]}.{self.min_capability[1]}")
        need = []
        if p.causal:
            need.append("causal")
            if p.bottom_right and p.seqlen_q != p.seqlen_k or p.bottom_right and p.is_varlen:
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
        for f in dict.fromkeys(need):
            if f not in self.features:
                r.append(f"{f.replace('_', ' ')} not supported")
        if not r:
            r += self.extra_reasons(p)
        return r
