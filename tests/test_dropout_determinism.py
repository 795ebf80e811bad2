"""Dropout and determinism, for every backend that declares them (generated from the declarations)."""
import pytest
import torch

import fastattn

from support.checks import check_dropout_backward_uses_forward_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends(feature):
    out = []
    for name, b in fastattn.BACKENDS.items():
        if b.unavailable() or feature not in b.features:
            continue
        for dev in DEVICES:
            if dev in b.devices:
                dt = torch.float32 if torch.float32 in b.dtypes else torch.float16
                out.append(pytest.param(name, dev, dt, id=f"{name}-{dev}"))
    return out


@pytest.mark.parametrize("backend,device,dtype", _backends("dropout"))
def test_dropout_keep_rate_and_reproducible(backend, device, dtype):
    p_drop, B, H, Sq, Sk, D = 0.3, 2, 2, 64, 128, 32
    q = torch.randn(B, H, Sq, D, device=device).to(dtype)
    k = torch.randn(B, H, Sk, D, device=device).to(dtype)
    v = torch.ones(B, H, Sk, D, device=device).to(dtype)
    # scale 0 makes every probability 1/Sk, so each output is (kept keys / Sk) / (1 - p)
    run = lambda: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, scale=0.0, backend=backend)
    torch.manual_seed(1234)
    a = run()
    torch.manual_seed(1234)
    b = run()
    c = run()
    assert torch.equal(a, b), "same torch.manual_seed must reproduce the dropout mask"
    assert not torch.equal(b, c), "a new draw must change the mask"
    kept = (a[..., 0].double() * (1 - p_drop)).mean().item()  # fraction of kept probabilities
    sigma = (p_drop * (1 - p_drop) / (B * H * Sq * Sk)) ** 0.5
    assert abs(kept - (1 - p_drop)) < 6 * sigma + 2e-3, f"keep rate {kept:.4f}, expected {1 - p_drop}"


@pytest.mark.parametrize("backend,device,dtype", _backends("dropout"))
def test_dropout_backward_uses_forward_mask(backend, device, dtype):
    check_dropout_backward_uses_forward_mask(backend, device, dtype)


@pytest.mark.parametrize("backend,device,dtype", _backends("deterministic"))
def test_deterministic_backward_is_bitwise_reproducible(backend, device, dtype):
    B, S, H, D = 2, 97, 4, 64
    q, k, v = (torch.randn(B, S, H, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, S, H, D, device=device).to(dtype)
    grads = []
    for _ in range(3):
        out = fastattn.flash_attn_func(q, k, v, causal=True, deterministic=True, backend=backend)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert torch.equal(a, b)


def test_exported_dropout_draws_a_fresh_mask_per_call_reproducibly():
    """torch.export (non-strict, torch's default) of a call with dropout: the seed is a traced draw, not a constant
    (it had failed: the seed was turned into a Python int, a guard on a data-dependent value), so the program draws
    a new mask each call, the same as eager under the same torch.manual_seed."""
    class Attn(torch.nn.Module):
        def forward(self, q):
            return fastattn.scaled_dot_product_attention(q, q, q, dropout_p=0.3, is_causal=True)

    q = torch.randn(2, 3, 17, 8)
    prog = torch.export.export(Attn(), (q,)).module()
    assert not torch.equal(prog(q), prog(q))
    torch.manual_seed(5)
    got = prog(q)
    torch.manual_seed(5)
    assert torch.equal(got, Attn()(q))

