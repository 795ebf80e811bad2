"""Checks that both a test module and a planted-bug test (test_checks_catch_bugs.py) run, and the fresh process a
planted bug of the CPU kernels (FASTATTN_CPU_PLANT, read once) needs."""
import os
import subprocess
import sys

import pytest
import torch

import fastattn

from .oracle import assert_fwd_bwd, assert_rule, fwd_bwd_inherent, oracle_attention


def check_dropout_backward_uses_forward_mask(backend, device, dtype, Sq=17):
    """With V = identity, out = P∘M/(1-p) exposes the forward's mask M; the gradients must match the oracle run
    with that same mask, which fails if the backward regenerates a different one. Sq: query rows (from 193 on, the
    cpu backend's key blocks meet four query blocks, so MKL packs them too; brgemm packs from one)."""
    p_drop, B, H, Sk = 0.25, 1, 2, 32
    q = torch.randn(B, H, Sq, Sk, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, H, Sk, Sk, device=device).to(dtype).requires_grad_()
    v = torch.eye(Sk, device=device).expand(B, H, Sk, Sk).to(dtype).contiguous().requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, backend=backend)
    mask = out.detach() != 0  # (B, H, Sq, Sk): softmax probabilities are never exactly 0 here
    assert 0.6 < mask.float().mean().item() < 0.9
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_fwd_bwd("", (out, *grads), q, k, v, dout, dtype, scale=Sk ** -0.5, dropout_mask=mask, dropout_p=p_drop)


def check_mask_grad(backend, device, dtype, mask_shape, causal):
    """The gradient with respect to a float attn_mask (and q, k, v) against the float64 oracle, tolerance rule."""
    B, H, Sq, Sk, D = 2, 3, 13, 21, 16
    q, k, v = (torch.randn(B, H, s, D, device=device).to(dtype) for s in (Sq, Sk, Sk))
    mask = torch.randn(*mask_shape, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out = fastattn.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], is_causal=causal, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    window = (-1, 0) if causal else (-1, -1)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    ref = oracle_attention(*ref_leaves[:3], scale=D ** -0.5, mask=ref_leaves[3], window=window)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    base_grads = [None] * 4
    if dtype != torch.float32:
        base_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mask)]
        base = oracle_attention(*base_leaves[:3], scale=D ** -0.5, mask=base_leaves[3], window=window, dtype=dtype)
        base_grads = torch.autograd.grad(base, base_leaves, dout)
    assert grads[3] is not None and grads[3].shape == mask.shape
    attend = lambda q_, k_, v_: oracle_attention(q_, k_, v_, scale=D ** -0.5, mask=mask, window=window)  # noqa: E731
    inherent = (*fwd_bwd_inherent(attend, q, k, dout, out, ref, D ** -0.5)[1:], 0.0)
    for name, g, r, bg, e in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, base_grads, inherent):
        assert_rule(name, g, r, bg, dtype, inherent=e)


def run_planted(script: str, plant: str = "", timeout: float = 300, args=()) -> subprocess.CompletedProcess:
    """`python -c script args...` in a fresh process on one thread, from tests/ with it and the repository on
    PYTHONPATH, and FASTATTN_CPU_PLANT=plant where plant is given (else unset)."""
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
    env.pop("FASTATTN_CPU_PLANT", None)
    if plant:
        env["FASTATTN_CPU_PLANT"] = plant
    return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=tests, capture_output=True, text=True,
                          timeout=timeout)


def run_on_forced_fp16_pairs(*pytest_args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """pytest on `pytest_args` (from the repository root) in a fresh process with every fp16 call on bf16 pairs
    (FASTATTN_CPU_FP16_PAIRS=1, read once per process), env added; skips where bf16 has no matrix units to pair fp16
    on, or fp16 has its own."""
    report = fastattn.ops.cpu_matmul_report()
    if not (report.get("bf16") == "brgemm" and report.get("fp16") == "fp32"):
        pytest.skip(f"no bf16 matrix units to pair fp16 on here, or fp16 has its own ({report})")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                          env=dict(os.environ, FASTATTN_CPU_FP16_PAIRS="1", **env), cwd=root, capture_output=True,
                          text=True, timeout=timeout)
