"""The project's tolerance rule, written once: the tests (tests/support/oracle.py) and the benchmark's correctness
flag (check.py) both call it.

For an output or gradient X of a kernel computing in precision p, with X_ref from naive attention in float64 and
X_base from the same naive attention run entirely in p:
    fp16/bf16:  max|X - X_ref| <= 2 * max|X_base - X_ref| + eps(p) * max|X_ref| [+ inherent]
    fp32/fp64:  max|X - X_ref| <= max(1e-5 * max|X_ref|, 2 * max|X_base - X_ref|) [+ inherent]
The fp32 bound is 1e-5 relative unless the naive fp32 computation itself errs by more than half of it (X_base given):
a near one-hot softmax of large logits (fp32, D=256, scale 1.29: scores ~80, whose fp32 ulp is 7.6e-6) cost the
naive fp32 forward 1.41e-5 of max|O| and the cpu backend 1.01e-5; a bound the naive computation fails judges no
kernel. Ordinary inputs stay under 1e-5 (the naive error is ~1e-7 there).
`inherent` is an error the backward's inputs force, computed exactly by the caller: a backward receives O in p with
its forward's error (checked on its own), and every FlashAttention-style backward forms delta = rowsum(dO * O) from
it, so dQ and dK inherit that error through delta (large when delta nearly cancels; the naive backward never reads O,
so X_base lacks it). In fp32 too: with near one-hot rows (fp32, D=256, scale 1.33, ALiBi, 489 keys) the O an fp32
forward returns (5.7e-6 relative error) alone forced 1.15e-5 of max|dQ| on the cpu backend's dQ (1.21e-5 in all;
the naive fp32 backward, which never reads O, 0.80e-5).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}
FP32_REL = 1e-5


def tolerance(dtype: torch.dtype, ref_scale: float, base_err: Optional[float] = None,
              fp32_rel: float = FP32_REL, inherent: float = 0.0, factor: float = 2.0) -> Tuple[float, str]:
    """(allowed max error, the rule spelled out) for a result whose reference has max magnitude ref_scale;
    base_err = max|X_base - X_ref| (needed for fp16/bf16; optional for fp32); inherent: see the module docstring;
    factor: the multiple of base_err allowed, 2 for every fastattn kernel."""
    scale = max(ref_scale, 1e-6)
    extra = f" + inherent ({inherent:.3g})" if inherent else ""
    if dtype in (torch.float32, torch.float64):
        if base_err is not None and factor * base_err > fp32_rel * scale:  # the naive fp32 error rules (docstring)
            return factor * base_err + inherent, f"{factor:g} * base_err ({base_err:.3g})" + extra
        return fp32_rel * scale + inherent, f"{fp32_rel:g} * max|ref| ({ref_scale:.3g})" + extra
    floor = EPS[dtype] * scale
    return factor * base_err + floor + inherent, f"{factor:g} * base_err ({base_err:.3g}) + floor ({floor:.3g})" + extra
