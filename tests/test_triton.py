"""Triton-specific tests: block skipping (visited-block counters), head-dim padding, autotune bucketing/pruning,
op registration under torch.compile, availability reasons. Correctness of every feature x dtype is in
test_matrix.py; dropout and determinism in test_dropout_determinism.py. On CPU the kernels run through
TRITON_INTERPRET=1 (tests/conftest.py); tests marked `gpu` need CUDA and run realistic sizes."""
import math

import pytest
import torch

import fastattn
from fastattn.backends.triton import TritonBackend
from fastattn.params import AttnParams
from support.oracle import assert_fwd_bwd, assert_rule, oracle_attention

triton_ok = not fastattn.get_backend("triton").unavailable()
pytestmark = pytest.mark.skipif(not triton_ok, reason="triton backend unavailable here: "
                                + "; ".join(fastattn.get_backend("triton").unavailable()))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (realistic sizes; compiled "
                         "Triton rather than the interpreter)")


def _op():
    from fastattn.backends.triton.kernels import op
    return op


# ---------------------------------------------------------------------------------------------------------------
# Block skipping: the kernels' debug counters must equal the counts derived from the visibility rule.

def _visibility(Sq, Sk, wl, wr, br):
    off = Sk - Sq if br else 0
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Sk).view(1, Sk)
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    if wl >= 0:
        vis &= j >= i + off - wl
    if wr >= 0:
        vis &= j <= i + off + wr
    return vis


def _expected_blocks(vis, BM, BN):
    """[fwd/dq masked, fwd/dq unmasked, dkdv masked, dkdv unmasked] for one (sequence, query head).
    A block is visited iff it holds a visible (i, j); it runs unmasked iff every in-range element is visible and
    the block does not cross the other operand's end (keys for the forward/dQ, queries for dK/dV)."""
    Sq, Sk = vis.shape
    c = [0, 0, 0, 0]
    for m0 in range(0, Sq, BM):
        for n0 in range(0, Sk, BN):
            blk = vis[m0:m0 + BM, n0:n0 + BN]
            if not blk.any():
                continue
            c[1 if (blk.all() and n0 + BN <= Sk) else 0] += 1
            c[3 if (blk.all() and m0 + BM <= Sq) else 2] += 1
    return c


SKIP_CASES = [  # (Sq, Sk, window_left, window_right, bottom_right)
    (70, 70, -1, -1, False),   # no mask: only the key tail block is masked
    (70, 70, -1, 0, False),    # causal square
    (40, 100, -1, 0, False),   # causal top-left, Sq < Sk
    (40, 100, -1, 0, True),    # causal bottom-right, Sq < Sk
    (100, 40, -1, 0, True),    # bottom-right, Sq > Sk: the first 60 rows see no key
    (96, 96, 20, 0, True),     # sliding window (left)
    (80, 112, 9, 17, True),    # window both sides
    (64, 64, 2, 1, False),     # narrow band around the diagonal
    (100, 40, 5, -1, False),   # left window only, top-left, Sq > Sk: rows past 44 see nothing (no tile visited)
]


@pytest.mark.parametrize("Sq,Sk,wl,wr,br", SKIP_CASES)
def test_block_skipping_counts_and_results(Sq, Sk, wl, wr, br):
    op = _op()
    BM, BN = 16, 16
    B, Hq, Hkv, D = 1, 2, 1, 32
    q = torch.randn(B, Hq, Sq, D, device=DEV)
    k = torch.randn(B, Hkv, Sk, D, device=DEV)
    v = torch.randn(B, Hkv, Sk, D, device=DEV)
    scale = D ** -0.5
    stats = torch.zeros(2, dtype=torch.int32, device=DEV)
    out, lse = op.launch_fwd(q, k, v, None, None, None, 0, 0, scale, wl, wr, br, 0.0, None, 0.0, 0, 0,
                             blocks=(BM, BN), stats=stats)
    dout = torch.randn_like(out)
    bstats = torch.zeros(4, dtype=torch.int32, device=DEV)
    dq, dk, dv = op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, scale, wl, wr, br, 0.0, None,
                               0.0, 0, 0, blocks=(BM, BN), stats=bstats)
    exp = _expected_blocks(_visibility(Sq, Sk, wl, wr, br), BM, BN)
    n = B * Hq
    total = math.ceil(Sq / BM) * math.ceil(Sk / BN)
    print(f"visited fwd {stats.tolist()} expected {[exp[0] * n, exp[1] * n]} of {total * n}")
    assert stats.tolist() == [exp[0] * n, exp[1] * n]
    assert bstats.tolist() == [exp[2] * n, exp[3] * n, exp[0] * n, exp[1] * n]
    if wl >= 0 or wr >= 0:
        assert exp[0] + exp[1] < total, "case should skip blocks"

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves, scale=scale, window=(wl, wr), bottom_right=br)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert_rule("out", out, ref, None, torch.float32)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert_rule(name, g, r, None, torch.float32)
    empty = ~_visibility(Sq, Sk, wl, wr, br).any(-1)
    assert torch.isinf(lse[..., empty.to(DEV)]).all() and torch.isfinite(lse[..., ~empty.to(DEV)]).all()


def test_block_skipping_varlen_counts():
    op = _op()
    BM, BN = 16, 16
    lens = [(17, 33), (50, 20), (1, 64), (40, 40)]
    H, D = 2, 16
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[:n + 1]) for n in range(len(lens))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(b for _, b in lens[:n + 1]) for n in range(len(lens))], dtype=torch.int32)
    q = torch.randn(1, H, int(cu_q[-1]), D, device=DEV)
    k = torch.randn(1, H, int(cu_k[-1]), D, device=DEV)
    v = torch.randn(1, H, int(cu_k[-1]), D, device=DEV)
    stats = torch.zeros(2, dtype=torch.int32, device=DEV)
    mq, mk = max(a for a, _ in lens), max(b for _, b in lens)
    op.launch_fwd(q, k, v, None, cu_q.to(DEV), cu_k.to(DEV), mq, mk, 0.25, -1, 0, True, 0.0, None, 0.0, 0, 0,
                  blocks=(BM, BN), stats=stats)
    exp = [0, 0]
    for a, b in lens:
        e = _expected_blocks(_visibility(a, b, -1, 0, True), BM, BN)
        exp = [exp[0] + e[0] * H, exp[1] + e[1] * H]
    assert stats.tolist() == exp


# ---------------------------------------------------------------------------------------------------------------
# Head-dim padding (BLOCK_D = next power of two, masked loads) with small blocks and strided inputs

@pytest.mark.parametrize("D,Dv", [(24, 40), (72, 16), (100, 100), (160, 96)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dim_padding(D, Dv, dtype):
    op = _op()
    B, H, Sq, Sk = 2, 3, 37, 45
    # (B, S, H, D) memory seen as (B, H, S, D) views, with an extra slice so strides are not packed
    q = torch.randn(B, Sq, H + 1, D, device=DEV).to(dtype)[:, :, 1:].transpose(1, 2)
    k = torch.randn(B, Sk, H, D + 8, device=DEV).to(dtype)[..., :D].transpose(1, 2)
    v = torch.randn(B, Sk, H, Dv, device=DEV).to(dtype).transpose(1, 2)
    scale = D ** -0.5
    out, lse = op.launch_fwd(q, k, v, None, None, None, 0, 0, scale, -1, 0, True, 0.0, None, 0.0, 0, 0,
                             blocks=(16, 32))
    assert out.stride(1) < out.stride(2), "out follows q's (B, S, H, D) memory order"
    dout = torch.randn(out.shape, device=DEV).to(dtype)
    grads = op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, scale, -1, 0, True, 0.0, None, 0.0, 0,
                          0, blocks=(32, 16))
    assert_fwd_bwd("", (out, *grads), q, k, v, dout, dtype, scale=scale, window=(-1, 0), bottom_right=True)


# ---------------------------------------------------------------------------------------------------------------
# Dropout with GQA + varlen (the generic dropout tests use plain batches), determinism with dropout

def test_dropout_varlen_gqa_backward_uses_forward_mask():
    """V = identity exposes the kept mask (out = P∘M/(1-p)); the gradients must match the oracle with that mask."""
    p_drop, Hq, Hkv, S = 0.2, 4, 2, 32
    lens = [19, 32, 7]
    cu = torch.tensor([0, 19, 51, 58], dtype=torch.int32, device=DEV)
    q = torch.randn(58, Hq, S, device=DEV).requires_grad_()
    k = torch.randn(58, Hkv, S, device=DEV).requires_grad_()
    # key j of each sequence has value e_j, so out[i, :L] = P[i, :]∘M[i, :]/(1-p)
    v = torch.cat([torch.eye(S, device=DEV)[:n] for n in lens]).unsqueeze(1).expand(58, Hkv, S).contiguous()
    v.requires_grad_()
    out = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, 32, 32, dropout_p=p_drop, causal=True, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    start = 0
    for n, L in enumerate(lens):
        sl = slice(start, start + L)
        start += L
        o = out[sl].detach().transpose(0, 1).unsqueeze(0)  # (L, H, S) -> (1, H, L, S)
        mask = o[..., :L] != 0
        causal_vis = torch.ones(L, L, dtype=torch.bool, device=DEV).tril()
        assert not (mask & ~causal_vis).any(), "dropout kept an invisible key"
        leaves = [t[sl].detach().double().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v)]
        ref = oracle_attention(*leaves, scale=S ** -0.5, window=(-1, 0), bottom_right=True,
                               dropout_mask=mask | ~causal_vis, dropout_p=p_drop)
        ref_grads = torch.autograd.grad(ref, leaves, dout[sl].double().transpose(0, 1).unsqueeze(0))
        assert_rule(f"out[{n}]", out[sl].transpose(0, 1).unsqueeze(0), ref, None, torch.float32)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_rule(f"{name}[{n}]", g[sl].transpose(0, 1).unsqueeze(0), r, None, torch.float32)


def test_backward_bitwise_deterministic_with_gqa_dropout_mask():
    B, H, S, D = 2, 4, 45, 32
    q = torch.randn(B, H, S, D, device=DEV, dtype=torch.float16, requires_grad=True)
    k = torch.randn(B, 1, S, D, device=DEV, dtype=torch.float16, requires_grad=True)
    v = torch.randn(B, 1, S, D, device=DEV, dtype=torch.float16, requires_grad=True)
    mask = torch.rand(B, 1, 1, S, device=DEV) > 0.2
    dout = torch.randn(B, H, S, D, device=DEV, dtype=torch.float16)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1, enable_gqa=True,
                                                    backend="triton")
        runs.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Autotune key bucketing and the prune predicate; registration; availability

def test_autotune_key_buckets_lengths_and_prune_keeps_a_config():
    from fastattn.backends.triton.kernels import configs as C
    assert C.bucket(65) == C.bucket(97) == C.bucket(128) == 128 and C.bucket(129) == 256 and C.bucket(3) == 16
    assert "BUCKET_Q" in C.KEY and "BUCKET_K" in C.KEY
    q = torch.empty(1, 1, 1, 256, dtype=torch.float16)
    for prune, cfgs in ((C.prune_fwd, C.FWD_CONFIGS), (C.prune_dkdv, C.DKDV_CONFIGS), (C.prune_dq, C.DQ_CONFIGS)):
        small = prune(cfgs, dict(Q=q, BUCKET_Q=16, BUCKET_K=16), BLOCK_D=256, BLOCK_DV=256)
        big = prune(cfgs, dict(Q=q, BUCKET_Q=4096, BUCKET_K=4096), BLOCK_D=64, BLOCK_DV=64)
        assert small and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 32 for c in small)
        assert len(big) >= len(small)
        _, smem = C._device_smem()
        if smem:  # on a GPU every kept hd256 config fits in shared memory
            assert all(c.kwargs["BLOCK_N"] * 256 * 2 * 2 <= smem for c in small)


def test_unavailable_reasons(monkeypatch):
    b = TritonBackend()
    monkeypatch.setattr("fastattn.backends.triton.TRITON_INSTALLED", False)
    assert b.unavailable() == ["triton is not installed"]
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert any("no CUDA device" in r for r in b.unavailable())


def test_refuses_mask_with_varlen_and_mask_grad():
    q = torch.randn(1, 2, 8, 16, device=DEV)  # on the backend's device: only these reasons remain
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    p = AttnParams(q=q, k=q, v=q, scale=0.25, attn_bias=torch.zeros(1, 2, 8, 8, device=DEV), mask_kind="dense",
                   cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)
    assert "attn_mask together with varlen" in TritonBackend().reasons(p)
    p = AttnParams(q=q, k=q, v=q, scale=0.25, attn_bias=torch.zeros(1, 2, 8, 8, device=DEV, requires_grad=True))
    assert "mask grad not supported" in TritonBackend().reasons(p)


def test_compile_fullgraph_traces_the_op():
    """Interpreter: the ops are opaque custom_ops with fake functions (aot_eager checks fake + autograd tracing);
    on a GPU they are triton_ops traced by inductor (see test_gpu_compile_inductor)."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 33, 2, 32, device=DEV, requires_grad=True) for _ in range(3))

    def layer(q, k, v):
        return fastattn.flash_attn_func(q, k, v, causal=True, softcap=3.0, backend="triton").sum(-1)

    backend = "inductor" if DEV == "cuda" else "aot_eager"
    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    ge = torch.autograd.grad(eager.sum(), (q, k, v))
    gc = torch.autograd.grad(compiled(q, k, v).sum(), (q, k, v))
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GPU: realistic sizes through the autotuned kernels

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,causal", [(128, True), (64, False), (80, True), (256, False)])
def test_gpu_realistic(dtype, D, causal):
    B, Hq, Hkv, S = 2, 8, 2, 1543
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype, requires_grad=True)
    out = fastattn.flash_attn_func(q, k, v, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, S, H, D) -> (B, H, S, D)
    assert_fwd_bwd("", (t(out), *map(t, grads)), t(q), t(k), t(v), t(dout), dtype, scale=D ** -0.5,
                   window=(-1, 0 if causal else -1), bottom_right=True)


@gpu
@pytest.mark.gpu
def test_gpu_varlen_bert_batch_and_bucketing():
    from fastattn.backends.triton.kernels import op
    torch.manual_seed(0)
    lens = torch.randint(30, 513, (16,)).tolist()
    H, D, dtype = 12, 64, torch.float16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    out = fastattn.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for n, L in enumerate(lens[:4]):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        t = lambda x: x[sl].transpose(0, 1).unsqueeze(0)  # noqa: E731  (L, H, D) -> (1, H, L, D)
        assert_fwd_bwd("", (t(out), *map(t, grads)), t(q), t(k), t(v), t(dout), dtype, scale=D ** -0.5)
    # a new max length in the same power-of-two bucket reuses the tuned config (no new autotune entry)
    n_cached = len(op._fwd_tuned.cache)
    from fastattn.backends.triton.kernels.configs import bucket
    m2 = max(lens) + 1 if bucket(max(lens) + 1) == bucket(max(lens)) else max(lens)  # >= the longest (checked)
    fastattn.flash_attn_varlen_func(q, k, v, cu, cu, m2, m2, backend="triton")
    assert len(op._fwd_tuned.cache) == n_cached


@gpu
@pytest.mark.gpu
def test_gpu_compile_inductor_dropout_free_mask():
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = torch.rand(2, 1, 1, 1024, device="cuda") > 0.1

    def layer(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton") * 2

    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager)
    ge = torch.autograd.grad(eager.float().sum(), (q, k, v))
    gc = torch.autograd.grad(compiled(q, k, v).float().sum(), (q, k, v))
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a)


def test_autotune_off_takes_one_surviving_config(monkeypatch):
    """FASTATTN_TRITON_AUTOTUNE=0: the prune hook hands the autotuner exactly one config (so it never times any),
    chosen among the prune predicate's survivors."""
    from fastattn.backends.triton.kernels import configs as C
    from fastattn.backends.triton.kernels import op
    q = torch.empty(2, 4, 1000, 128, dtype=torch.float16)
    args = dict(Q=q, BLOCK_D=128, BLOCK_DV=128, BUCKET_Q=1024, BUCKET_K=1024)
    kept = C.prune_fwd(C.FWD_CONFIGS, args)
    monkeypatch.setattr(op, "AUTOTUNE", True)
    assert op._tuning(C.prune_fwd)["early_config_prune"] is C.prune_fwd
    monkeypatch.setattr(op, "AUTOTUNE", False)
    one = op._tuning(C.prune_fwd)["early_config_prune"](C.FWD_CONFIGS, args)
    assert len(one) == 1 and one[0] in kept


def test_prune_drops_measured_spills(monkeypatch):
    """On sm_90 (faked: the prune predicate only reads the capability and shared memory) neither autotuning nor
    the FASTATTN_TRITON_AUTOTUNE=0 pick sees a tile measured to spill (configs.SPILLS, benchmarks/triton_static.py):
    D=256 backward takes the 32x32 dK/dV tile and the 2-stage 128x32 dQ tile."""
    from fastattn.backends.triton.kernels import configs as C
    from fastattn.backends.triton.kernels import op
    monkeypatch.setattr(C, "_device_smem", lambda: ((9, 0), 232448))
    monkeypatch.setattr(op, "AUTOTUNE", False)
    kinds = {"fwd": (C.prune_fwd, C.FWD_CONFIGS), "dkdv": (C.prune_dkdv, C.DKDV_CONFIGS),
             "dq": (C.prune_dq, C.DQ_CONFIGS)}

    def kept_and_pick(kind, dtype, D):
        prune, cfgs = kinds[kind]
        args = dict(Q=torch.empty(1, 1, 1, D, dtype=dtype), BUCKET_Q=4096, BUCKET_K=4096, BLOCK_D=D, BLOCK_DV=D)
        kept = prune(cfgs, args)
        (one,) = op._tuning(prune)["early_config_prune"](cfgs, args)
        tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)  # noqa: E731
        return [tile(c) for c in kept], tile(one)

    for dtype in (torch.float16, torch.bfloat16):
        for kind in kinds:
            for D in (64, 128, 256):
                kept, _ = kept_and_pick(kind, dtype, D)
                assert not [t for t in kept if (kind, D) + t[:2] in C.SPILLS["sm90"] or (kind, D) + t in
                            C.SPILLS["sm90"]], (kind, dtype, D, kept)
        assert kept_and_pick("dkdv", dtype, 256)[1][:2] == (32, 32)
        assert kept_and_pick("dq", dtype, 256)[1] == (128, 32, 2)
        assert all(bn >= 64 for _, bn, _ in kept_and_pick("dkdv", dtype, 128)[0])  # wgmma tiles up to D=128


def test_tuned_launches_hold_the_launch_lock(monkeypatch):
    """Compiled launches go through op._launch under one lock: triton's Autotuner is not thread-safe (two
    context-parallel ranks as threads failed inside it on an H200). The interpreter has no autotuner: no lock."""
    from fastattn.backends.triton.kernels import op
    held = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: held.append((grid, op._LAUNCH_LOCK.locked()))

    monkeypatch.setattr(op, "_wrap", lambda k: k)
    monkeypatch.setattr(op, "INTERPRET", False)
    op._launch(Kernel(), (1, 2), 3, x=4)
    monkeypatch.setattr(op, "INTERPRET", True)
    op._launch(Kernel(), (5,))
    assert held == [((1, 2), True), ((5,), False)] and not op._LAUNCH_LOCK.locked()


def test_launcher_wraps_only_while_torch_traces(monkeypatch):
    """kernels/launch.py as compiled on a GPU: an eager triton_op call (torch's wrap switch off) launches the kernel
    itself, skipping wrap_triton's bookkeeping (~65 us per tuned launch); while torch traces (the switch on) the
    launch goes through wrap_triton so inductor sees the kernel. Loaded as a GPU process would, without
    TRITON_INTERPRET."""
    import importlib.util
    from torch._library.triton import set_wrap_triton_enabled
    from triton.runtime.jit import JITFunction

    from fastattn.backends.triton.kernels import launch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("fastattn_launch_as_on_gpu", launch.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def kernel(x):
        pass
    k = JITFunction(kernel)
    with set_wrap_triton_enabled(False):
        assert mod.launcher(k) is k
    with set_wrap_triton_enabled(True):
        wrapped = mod.launcher(k)
        assert wrapped is not k and wrapped.kernel is k
    assert launch.launcher(k) is k  # this process interprets: the ops are plain custom ops, never wrapped


def test_decode_skips_the_op_only_in_plain_eager_calls(monkeypatch):
    """TritonDecode.run calls the launcher itself in plain eager calls (the op's dispatch cost ~15-45 us) and the
    registered op otherwise: under a dispatch or torch-function mode, or with a tensor subclass. Both routes give
    the same bits, and each is taken where it should be."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastattn.backends.triton import _plain_eager
    from fastattn.backends.triton.kernels import decode  # noqa: F401  (registers triton_decode_fwd)

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    t = torch.zeros(2)
    assert _plain_eager(t, None) and not _plain_eager(t, t.as_subclass(Sub))
    with Passing():
        assert not _plain_eager(t)
    with TorchFunctionMode():
        assert not _plain_eager(t)

    through_op = []
    op = torch.ops.fastattn.triton_decode_fwd

    class Spy:  # the packet as torch's machinery reads it (.default), counting calls
        default = op.default

        def __call__(self, *a):
            through_op.append(1)
            return op(*a)
    monkeypatch.setattr(torch.ops.fastattn, "triton_decode_fwd", Spy())
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 32, generator=g)  # (B, Sq, Hq, D)
    kc, vc = (torch.randn(2, 40, 2, 32, generator=g) for _ in range(2))  # (B, Sk, Hkv, D)
    lens = torch.tensor([40, 17], dtype=torch.int32)
    call = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="triton")  # noqa: E731
    eager = call()
    assert not through_op, "a plain eager call runs the launcher itself"
    with Passing():
        moded = call()
    assert len(through_op) == 1, "under a dispatch mode the call must go through the registered op"
    assert torch.equal(eager, moded)


def test_prune_counts_the_mask_tile(monkeypatch):
    """A mask tile takes shared memory too: on an H200 the FASTATTN_TRITON_AUTOTUNE=0 pick for an fp32 D=64 call
    with a bool mask (128x128, 3 stages) needed 246016 B of 232448 and failed to launch. The prune predicate now
    drops it; without a mask the same tile still fits."""
    from fastattn.backends.triton.kernels import configs as C
    from fastattn.backends.triton.kernels import op
    monkeypatch.setattr(C, "_device_smem", lambda: ((9, 0), 232448))
    monkeypatch.setattr(op, "AUTOTUNE", False)
    args = dict(Q=torch.empty(1, 1, 1, 64), BUCKET_Q=2048, BUCKET_K=2048, BLOCK_D=64, BLOCK_DV=64)
    tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)  # noqa: E731
    pick = lambda a: tile(op._tuning(C.prune_fwd)["early_config_prune"](C.FWD_CONFIGS, a)[0])  # noqa: E731
    assert pick(args) == (128, 128, 3)
    masked = dict(args, Bias=torch.empty(1, 1, 1, 1, dtype=torch.bool))
    assert (128, 128, 3) not in [tile(c) for c in C.prune_fwd(C.FWD_CONFIGS, masked)]
    bm, bn, st = pick(masked)
    assert (bm * 64 + st * bn * 128) * 4 + bm * bn + 256 <= 232448, (bm, bn, st)


def test_gpu_auto_hands_pytorch_fused_calls_to_sdpa():
    """On a GPU `auto` passes the Triton kernels over for every call PyTorch's SDPA runs fused (measured slower than
    cuDNN on an H200: backends/triton CUDA_HANDOVER) and keeps them for what SDPA cannot run fused."""
    import dataclasses
    from fastattn.backends.triton import gpu_handover, hands_over
    from fastattn.functional import _sdpa_params
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 12, 16)
    mask = torch.rand(1, 1, 8, 8) > 0.3
    plain = _sdpa_params(q, q, q, None, 0.0, False, None, False)
    fused = [plain, _sdpa_params(q, q, q, None, 0.0, True, None, False), _sdpa_params(q, q, q, mask, 0.0, False, None,
                                                                                      False),
             _sdpa_params(q, k, k, None, 0.0, False, None, False)]
    assert all(hands_over(p) for p in fused)
    kept = [_sdpa_params(q, q, q, mask, 0.0, True, None, False),  # causal folded into a mask
            _sdpa_params(q, q, q, None, 0.1, False, None, False),  # dropout: the Philox stream
            dataclasses.replace(plain, softcap=5.0), dataclasses.replace(plain, return_lse=True),
            dataclasses.replace(plain, window_left=3, window_right=0), dataclasses.replace(plain, deterministic=True),
            dataclasses.replace(plain, alibi_slopes=torch.ones(2)),
            dataclasses.replace(plain, q_start=torch.zeros(1, dtype=torch.int32),
                                k_start=torch.zeros(1, dtype=torch.int32))]
    assert not any(hands_over(p) for p in kept)
    assert not gpu_handover(plain)  # a CPU call: the interpreter's, never handed over
    if torch.cuda.is_available() and triton_ok:
        qc = q.cuda().half()
        ex = fastattn.explain(qc, qc, qc)
        assert ex.chosen == "sdpa" and any("faster on this GPU" in r for r in ex.declined.get("triton", [])), str(ex)
        capped = dataclasses.replace(_sdpa_params(qc, qc, qc, None, 0.0, False, None, False), softcap=5.0)
        assert fastattn.dispatch.explain_params(capped).chosen == "triton"
