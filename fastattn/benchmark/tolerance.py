"""The project's tolerance rule, written once: the tests (tests/support/oracle.py) and the benchmark's correctness
flag (check.py) both call it.

For an output or gradient X of a kernel computing in precision p, with X_ref from naive attention in float64 and
X_base from the same naive attention run entirely in p:
    fp16/bf16:  max|X - X_ref| <= 2 * max|X_base - X_ref| + eps(p) * max|X_ref| [+ inherent]
    fp32/fp64:  max|X - X_ref| <= 1e-5 * max|X_ref|
`inherent` is an error the backward's inputs force, computed exactly by the caller: a backward receives O in p with
its forward's error (checked on its own), and every FlashAttention-style backward forms delta = rowsum(dO * O) from
it, so dQ and dK inherit that error through delta (large when delta nearly cancels; the naive backward never reads O,
so X_base lacks it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}
FP32_REL = 1e-5


def tolerance(dtype: torch.dtype, ref_scale: float, base_err: Optional[float] = None,
              fp32_rel: float = FP32_REL, inherent: float = 0.0, factor: float = 2.0) -> Tuple[float, str]:
    """(allowed max error, the rule spelled out) for a result whose reference has max magnitude ref_scale;
    base_err = max|X_base - X_ref| (needed for fp16/bf16); inherent: see the module docstring (fp16/bf16 only);
    factor: the multiple of base_err allowed, 2 for every fastattn kernel."""
    scale = max(ref_scale, 1e-6)
    if dtype in (torch.float32, torch.float64):
        return fp32_rel * scale, f"{fp32_rel:g} * max|ref| ({ref_scale:.3g})"
    floor = EPS[dtype] * scale
    rule = f"{factor:g} * base_err ({base_err:.3g}) + floor ({floor:.3g})"
    if inherent:
        rule += f" + inherent ({inherent:.3g})"
    return factor * base_err + floor + inherent, rule
