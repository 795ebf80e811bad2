"""flash_attn_with_kvcache under `auto` on a GPU hands a step that is PyTorch's own SDPA call to `sdpa`
(fastattn/kvcache.py GPU_STEP_HANDOVER: every row the same length, no window, alibi, softcap or lse). There is no GPU
here, so the hand-over's path runs on CPU: the tests add "cpu" to the hand-over's devices and have the dispatcher
answer `sdpa` where PyTorch runs the call fused, as `auto` does on a GPU (backends/triton gpu_handover)."""
import pytest
import torch

import fastattn
from fastattn import dispatch, kvcache
from fastattn.backends import BACKENDS
from fastattn.backends.sdpa import pytorch_fused
from support.oracle import oracle_attention


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The hand-over's path on CPU; returns the list of decode kernels that ran."""
    monkeypatch.setattr(kvcache, "STEP_HANDOVER_DEVICES", ("cuda", "cpu"))
    real_select = dispatch.select

    def select(p, backend=None):
        if dispatch.requested_backend(backend) == "auto" and pytorch_fused(p, mask=True):
            return BACKENDS["sdpa"]
        return real_select(p, backend)
    monkeypatch.setattr(dispatch, "select", select)
    ran = []
    for b in BACKENDS.values():
        if b.decode is not None:
            real = b.decode.run
            monkeypatch.setattr(b.decode, "run", lambda c, _r=real, _n=b.decode.name: ran.append(_n) or _r(c))
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    return ran


def _step(B=3, Hq=4, Hkv=2, Sq=1, D=32, cap=48, lens=(30, 30, 30), snew=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, generator=g)  # (B, Sq, Hq, D)
    kc, vc = (torch.randn(B, cap, Hkv, D, generator=g) for _ in range(2))  # (B, cap, Hkv, D)
    k, v = (torch.randn(B, snew, Hkv, D, generator=g) for _ in range(2)) if snew else (None, None)
    return q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32)


def _expected(q, kc, vc, k, v, lens, causal):
    """float64 attention of each row over its keys after the append (bottom-right causal)."""
    outs = []
    for b in range(q.shape[0]):
        L = int(lens[b])
        kb, vb = kc[b, :L], vc[b, :L]
        if k is not None:
            kb, vb = torch.cat([kb, k[b]]), torch.cat([vb, v[b]])
        o = oracle_attention(q[b:b + 1].transpose(1, 2), kb[None].transpose(1, 2), vb[None].transpose(1, 2),
                             scale=q.shape[-1] ** -0.5, window=(-1, 0) if causal else (-1, -1), bottom_right=True)
        outs.append(o.transpose(1, 2))  # (1, Hq, Sq, D) -> (1, Sq, Hq, D)
    return torch.cat(outs).float()


@pytest.mark.parametrize("Sq,causal,snew", [(1, True, 1), (1, False, 0), (3, False, 3)])
def test_same_length_step_goes_to_sdpa(as_on_a_gpu, monkeypatch, Sq, causal, snew):
    """The step runs as a plain call (no bias) over each row's first 30 + snew keys, no decode kernel; on a GPU the
    dispatcher gives that call to sdpa (here the CPU's own dispatch runs it)."""
    q, kc, vc, k, v, lens = _step(Sq=Sq, snew=snew)
    want = _expected(q, kc, vc, k, v, lens, causal)
    ex = fastattn.explain_kvcache(q, kc, vc, cache_seqlens=lens, causal=causal)
    assert ex.kernel is None and kvcache.GPU_STEP_HANDOVER in sum(ex.declined.values(), []), str(ex)
    assert ex.generic is not None and "path: generic" in str(ex), str(ex)
    calls = []
    real_run = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda p, *a, **kw: calls.append(p) or real_run(p, *a, **kw))
    kc0 = kc.clone()
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=causal)
    assert not as_on_a_gpu, f"a decode kernel ran: {as_on_a_gpu}"
    (p,) = calls
    assert p.attn_bias is None and p.k.shape[2] == 30 + snew and not p.causal, p.describe()
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    if snew:  # the append landed, and nothing else moved
        assert torch.equal(kc[:, 30:30 + snew], k) and torch.equal(kc[:, :30], kc0[:, :30])
        assert torch.equal(kc[:, 30 + snew:], kc0[:, 30 + snew:])


@pytest.mark.parametrize("why", ["ragged lengths", "lse", "softcap", "window", "causal with 3 tokens",
                                 "explicit backend"])
def test_steps_sdpa_cannot_take_keep_the_decode_kernel(as_on_a_gpu, why):
    lens = (30, 12, 30) if why == "ragged lengths" else (30, 30, 30)
    q, kc, vc, k, v, lens = _step(Sq=3 if why == "causal with 3 tokens" else 1, lens=lens,
                                  snew=3 if why == "causal with 3 tokens" else 1)
    kw = {"ragged lengths": {}, "lse": dict(return_softmax_lse=True), "softcap": dict(softcap=5.0),
          "window": dict(window_size=(8, 0)), "causal with 3 tokens": dict(causal=True),
          "explicit backend": dict(backend="cpu")}[why]
    ex = fastattn.explain_kvcache(q, kc, vc, cache_seqlens=lens, **kw)
    assert ex.kernel is not None and not ex.declined, str(ex)
    fastattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, **kw)
    assert as_on_a_gpu == [ex.kernel]


def test_no_handover_on_cpu_itself():
    """Without the fixture: a CPU step stays on the cpu split-KV kernel (the hand-over is a GPU rule)."""
    q, kc, vc, k, v, lens = _step()
    ex = fastattn.explain_kvcache(q, kc, vc, cache_seqlens=lens)
    assert ex.kernel is not None and not ex.declined, str(ex)
