"""A test that cannot fail is a defect: show that the matrix's checks catch planted bugs.

Each planted backend is the reference backend with one deliberate defect, registered under a temporary name
and run through the same `run_case` the matrix uses. Every defect must be reported."""
import dataclasses

import pytest
import torch

import fastattn
from fastattn.backends.reference import ReferenceBackend

from support.cases import CASES, run_case
from support.checks import check_dropout_backward_uses_forward_mask, check_mask_grad
from support.oracle import assert_fwd_bwd

CASE = {c.name: c for c in CASES}


class Planted(ReferenceBackend):
    def __init__(self, name, bug):
        self.name, self.bug = name, bug

    def forward(self, p):
        if self.bug == "scale_1pct":
            # bf16 keeps 8 bits: a 1% error in a 17-key row hides in its rounding, so plant 4% there.
            p.scale *= 1.04 if p.dtype == torch.bfloat16 else 1.01
        if self.bug == "ignore_mask":
            p.attn_bias = None
        if self.bug == "topleft_alignment":
            p.bottom_right = False
        if self.bug == "softcap_off":
            p.softcap = 0.0
        out, lse = super().forward(p)
        if self.bug == "unwritten_element":
            out = out.clone()
            out.view(-1)[out.numel() // 2] = float("nan")  # what a poisoned, never-written element looks like
        if self.bug == "dk_scaled":
            out = _ScaleGradK.apply(out, p.k, 0.04 if p.dtype == torch.bfloat16 else 0.01)
        if self.bug == "lse_shifted":
            lse = lse + 1e-3
        return out, lse


class _ScaleGradK(torch.autograd.Function):
    """Identity on out, but adds `frac` of max|k| to every dK element: a backward-only defect (4% in bf16,
    whose 8-bit mantissa hides 1% at dK's magnitude, as with the scale plant)."""

    @staticmethod
    def forward(ctx, out, k, frac):
        ctx.save_for_backward(k)
        ctx.frac = frac
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        (k,) = ctx.saved_tensors
        return g, ctx.frac * k.abs().max() * torch.ones_like(k), None


PLANTS = [
    ("scale_1pct", "basic", "out"),
    ("ignore_mask", "mask_float_2d", "out"),
    ("topleft_alignment", "flash_causal_br", "out"),
    ("softcap_off", "flash_softcap", "out"),
    ("unwritten_element", "hd40", "out"),
    ("dk_scaled", "basic", "dk"),
    ("lse_shifted", "flash_lse", "lse"),
]


@pytest.mark.parametrize("bug,case,field", PLANTS, ids=[p[0] for p in PLANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_planted_bug_is_caught(monkeypatch, bug, case, field, dtype):
    if bug == "lse_shifted" and dtype != torch.float32:
        pytest.skip("a 1e-3 lse shift is below bf16/fp16 rounding of the scores; checked in fp32")
    name = f"planted_{bug}"
    monkeypatch.setitem(fastattn.BACKENDS, name, Planted(name, bug))
    results = run_case(name, CASE[case], dtype, "cpu")
    failed = [m for ok, m in results if not ok]
    print("\n".join(m for _, m in results))
    assert any(m.startswith(field) for m in failed), f"planted bug {bug} was not caught: {results}"


def test_clean_reference_passes_same_cases():
    for _, case, _ in PLANTS:
        for dtype in (torch.float32, torch.float16):
            results = run_case("reference", CASE[case], dtype, "cpu")
            assert all(ok for ok, _ in results), results


class PlantedDropout(ReferenceBackend):
    """Forward values from one dropout draw, gradients from another: a backward that regenerates the wrong mask."""
    name = "planted_dropout"

    def forward(self, p):
        out1, lse = super().forward(p)
        out2, _ = super().forward(p)
        return out1.detach() + (out2 - out2.detach()), lse


def test_planted_dropout_mask_mismatch_is_caught(monkeypatch):
    monkeypatch.setitem(fastattn.BACKENDS, "planted_dropout", PlantedDropout())
    with pytest.raises(AssertionError, match="d[qkv]: max_err"):
        check_dropout_backward_uses_forward_mask("planted_dropout", "cpu", torch.float32)


class PlantedMaskGrad(ReferenceBackend):
    """Declares mask_grad but lets no gradient reach the mask."""
    name = "planted_mask_grad"

    def forward(self, p):
        if p.attn_bias is not None:
            p = dataclasses.replace(p, attn_bias=p.attn_bias.detach())
        return super().forward(p)


def test_planted_mask_grad_is_caught(monkeypatch):
    monkeypatch.setitem(fastattn.BACKENDS, "planted_mask_grad", PlantedMaskGrad())
    with pytest.raises((AssertionError, RuntimeError)):
        check_mask_grad("planted_mask_grad", "cpu", torch.float32, (2, 3, 13, 21), False)


@pytest.mark.parametrize("grad", ["dq", "dk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_assert_fwd_bwd_delta_term_still_catches_a_wrong_gradient(grad, dtype):
    """assert_fwd_bwd widens dQ's and dK's bound by the share of O's error (delta_error) only: the clean call passes,
    and the same gradient with 1% of its largest value added everywhere (bf16: 4%, as dk_scaled above) fails."""
    q, k, v = torch.randn(2, 4, 33, 16).to(dtype), torch.randn(2, 2, 47, 16).to(dtype), torch.randn(2, 2, 47, 16)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fastattn.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True, backend="reference")
    dout = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    kw = dict(scale=0.25, window=(-1, 0), bottom_right=False)
    assert_fwd_bwd("clean", got, q, k, v, dout, dtype, **kw)
    i = ("dq", "dk").index(grad) + 1
    got[i] = got[i] + (0.04 if dtype == torch.bfloat16 else 0.01) * got[i].abs().max()
    with pytest.raises(AssertionError, match=f"planted {grad}: max_err"):
        assert_fwd_bwd("planted", got, q, k, v, dout, dtype, **kw)
