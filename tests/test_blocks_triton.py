"""The block contract (issue #14) on the Triton kernels: a call split into query and key/value blocks, every pair
computed with its global offsets (q_start/k_start) and out_fp32, merged by log-sum-exp, equals the unsplit call and
the float64 oracle; fastattn::triton_bwd_acc over the pairs equals the unsplit backward; dropout drops the same
elements however the call is split. On CPU the kernels run through TRITON_INTERPRET=1 (tests/conftest.py).

The merge here is a small test-local copy of the safe formula (fastattn/blocks.py merge_ is the library's), so these
tests depend on the kernels only."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn.params import AttnParams, InputValueError
from support.oracle import EPS, assert_rule, fwd_bwd_inherent, oracle_attention

TRITON = fastattn.get_backend("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(TRITON.unavailable()) or DEV not in TRITON.devices,
                                reason=f"triton backend unavailable here: {TRITON.unavailable()}")
BIG = 2 ** 31 - 1


@pytest.fixture(scope="module")
def op():
    from fastattn.backends.triton.kernels import op  # noqa: F401  (imports triton, registers the ops)
    return op


def i32(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEV)


def merge_(out_acc, lse_acc, out_b, lse_b):
    """In place, fp32: (out_acc, lse_acc) <- the softmax-weighted union of both parts. lse +inf = empty part."""
    la = torch.where(lse_acc == float("inf"), float("-inf"), lse_acc)
    lb = torch.where(lse_b == float("inf"), float("-inf"), lse_b)
    new = torch.logaddexp(la, lb)
    safe = torch.where(new == float("-inf"), 0.0, new)  # both empty: weights exp(-inf) = 0, no NaN
    out_acc.mul_(torch.exp(la - safe).unsqueeze(-1)).add_(out_b * torch.exp(lb - safe).unsqueeze(-1))
    lse_acc.copy_(torch.where(new == float("-inf"), float("inf"), new))


def cuts(n, parts):
    """[(start, length)] of `parts` uneven blocks covering range(n)."""
    edges = [0] + [round(n * (i + 1) / parts + (3 if i % 2 else -3)) for i in range(parts - 1)] + [n]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


def pad_bias(kpad, q):
    """Key padding (bool (B, Sk), True = attend) as the ops take it: q's dtype, (B, Hq, Sq, Sk) with strides
    (sB, 0, 0, 1)."""
    B, Hq, Sq, _ = q.shape
    bias = torch.zeros(kpad.shape, device=DEV).masked_fill(~kpad, float("-inf")).to(q.dtype)
    return bias.view(B, 1, 1, -1).expand(B, Hq, Sq, kpad.shape[1])


def oracle(q, k, v, qpos, kpos, *, scale, window=(-1, -1), alibi=None, softcap=0.0, keep=None, dropout_p=0.0,
           kpad=None, dtype=torch.float64):
    """Attention of queries at global positions qpos against keys at kpos (int64 (Sq,), (Sk,)): visibility and ALiBi
    from the positions (and key padding), passed to the shared oracle as an additive mask."""
    d = kpos.view(1, -1) - qpos.view(-1, 1)  # k_pos - q_pos, (Sq, Sk)
    vis = torch.ones_like(d, dtype=torch.bool)
    if window[0] >= 0:
        vis &= d >= -window[0]
    if window[1] >= 0:
        vis &= d <= window[1]
    bias = torch.zeros(d.shape, dtype=torch.float64, device=q.device)
    if alibi is not None:
        bias = -alibi.double().view(1, -1, 1, 1) * d.abs().double()  # (1, Hq, Sq, Sk)
    bias = bias.masked_fill(~vis, float("-inf"))
    if kpad is not None:
        pad = torch.zeros(kpad.shape, dtype=torch.float64, device=kpad.device).masked_fill(~kpad, float("-inf"))
        bias = bias + pad[:, None, None]  # (B, Sk) -> (B, 1, 1, Sk)
    return oracle_attention(q, k, v, scale=scale, mask=bias, softcap=softcap, dropout_mask=keep,
                            dropout_p=dropout_p, dtype=dtype)


def oracle_lse(q, k, qpos, kpos, *, scale, window=(-1, -1), alibi=None, kpad=None):
    Hq = q.shape[1]
    kk = k.double()[:, torch.arange(Hq, device=k.device) // (Hq // k.shape[1])]
    s = torch.einsum("bhid,bhjd->bhij", q.double(), kk) * scale
    d = kpos.view(1, -1) - qpos.view(-1, 1)
    if alibi is not None:
        s = s - alibi.double().view(1, -1, 1, 1) * d.abs().double()
    vis = torch.ones_like(d, dtype=torch.bool)
    if window[0] >= 0:
        vis &= d >= -window[0]
    if window[1] >= 0:
        vis &= d <= window[1]
    s = s.masked_fill(~vis, float("-inf"))
    if kpad is not None:
        s = s.masked_fill(~kpad[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def block_forward(op, q, k, v, q0, k0, qparts, kparts, *, scale, wl=-1, wr=-1, alibi=None, softcap=0.0,
                  dropout_p=0.0, rng=(0, 0), bias=None, blocks=None):
    """Every (query block, key block) pair with its offsets and out_fp32, merged in fp32. q0/k0: global position of
    row 0 of q and k (ints, same for every batch row)."""
    B, H, Sq, _ = q.shape
    out = torch.zeros(B, H, Sq, v.shape[-1], device=DEV)
    lse = torch.full((B, H, Sq), float("inf"), device=DEV)
    for qs, ql in cuts(Sq, qparts):
        for ks, kl in cuts(k.shape[2], kparts):
            bb = bias[:, :, qs:qs + ql, ks:ks + kl] if bias is not None else None
            o, l = op.launch_fwd(q[:, :, qs:qs + ql], k[:, :, ks:ks + kl], v[:, :, ks:ks + kl], bb, None, None, 0,
                                 0, scale, wl, wr, False, softcap, alibi, dropout_p, *rng, i32(*[q0 + qs] * B),
                                 i32(*[k0 + ks] * B), True, blocks=blocks)
            assert o.dtype == torch.float32
            merge_(out[:, :, qs:qs + ql], lse[:, :, qs:qs + ql], o, l)
    return out, lse


def block_backward(op, dout, q, k, v, out, lse, q0, k0, qparts, kparts, acc, *, scale, wl=-1, wr=-1, alibi=None,
                   softcap=0.0, dropout_p=0.0, rng=(0, 0), bias=None):
    """triton_bwd_acc over every pair, with the merged global out (q's dtype) and lse."""
    B = q.shape[0]
    dq, dk, dv = acc
    for qs, ql in cuts(q.shape[2], qparts):
        for ks, kl in cuts(k.shape[2], kparts):
            qb, kb = slice(qs, qs + ql), slice(ks, ks + kl)
            torch.ops.fastattn.triton_bwd_acc(
                dout[:, :, qb], q[:, :, qb], k[:, :, kb], v[:, :, kb], out[:, :, qb], lse[:, :, qb],
                bias[:, :, qb, kb] if bias is not None else None, None, None,
                0, 0, scale, wl, wr, False, softcap, alibi, dropout_p, *rng, False, i32(*[q0 + qs] * B),
                i32(*[k0 + ks] * B), dq[:, :, qb], dk[:, :, kb], dv[:, :, kb])
    return acc


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Forward and backward block decomposition against the unsplit call and the oracle

CASES = {  # name: (B, Hq, Hkv, Sq, Sk, window, alibi, softcap, key padding, parts (q, k))
    "causal_bottom_right": (1, 2, 2, 40, 64, (-1, 0), False, 0.0, False, (2, 3)),
    "window_gqa_key_padding": (2, 4, 2, 48, 48, (9, 5), False, 0.0, True, (3, 2)),
    "alibi_causal_softcap": (1, 2, 1, 56, 40, (-1, 0), True, 4.0, False, (2, 2)),  # Sq > Sk: 16 rows see nothing
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_merge_to_the_unsplit_call_and_the_oracle(op, case, dtype):
    B, Hq, Hkv, Sq, Sk, (wl, wr), use_alibi, softcap, use_pad, (qp, kp) = CASES[case]
    D = 16
    q, k, v = rnd(B, Hq, Sq, D, dtype=dtype), rnd(B, Hkv, Sk, D, dtype=dtype), rnd(B, Hkv, Sk, D, dtype=dtype)
    alibi = torch.rand(Hq, device=DEV) * 0.3 if use_alibi else None
    kpad = torch.rand(B, Sk, device=DEV) > 0.25 if use_pad else None
    bias = pad_bias(kpad, q) if use_pad else None
    scale = D ** -0.5
    k0 = 1000  # bottom-right alignment as global positions: q_start = k_start + Sk - Sq (all >= 0)
    q0 = k0 + Sk - Sq
    out_b, lse_b = block_forward(op, q, k, v, q0, k0, qp, kp, scale=scale, wl=wl, wr=wr, alibi=alibi,
                                 softcap=softcap, bias=bias, blocks=(16, 16))
    # the unsplit call: the dense op (bottom-right; ALiBi aligned at Sk - Sq) rounded as usual, and as one block
    out_u, lse_u = op.launch_fwd(q, k, v, bias, None, None, 0, 0, scale, wl, wr, True, softcap, alibi, 0.0, 0, 0)
    out_u32, lse_u32 = op.launch_fwd(q, k, v, bias, None, None, 0, 0, scale, wl, wr, False, softcap, alibi, 0.0, 0, 0,
                                     i32(*[q0] * B), i32(*[k0] * B), True)
    assert torch.equal(lse_u32, lse_u) and torch.equal(out_u32.to(dtype), out_u)  # one block == the dense call
    # fp16/bf16 round P to the input dtype before P @ V, against each block's own running max: the merged blocks
    # then differ from the unsplit call by that rounding (the oracle check below bounds both)
    atol = 2e-6 if dtype == torch.float32 else 2 * EPS[dtype] * float(out_u32.abs().max())
    torch.testing.assert_close(out_b, out_u32, rtol=0, atol=atol)
    torch.testing.assert_close(lse_b, lse_u32, rtol=2e-6, atol=2e-6)
    qpos, kpos = torch.arange(Sq, device=DEV) + q0, torch.arange(Sk, device=DEV) + k0
    kw = dict(scale=scale, window=(wl, wr), alibi=alibi, softcap=softcap, kpad=kpad)
    ref = oracle(q, k, v, qpos, kpos, **kw)
    base = oracle(q, k, v, qpos, kpos, dtype=dtype, **kw) if dtype != torch.float32 else None
    assert_rule("out (blocks merged, rounded once)", out_b.to(dtype), ref, base, dtype)
    ref_lse = oracle_lse(q, k, qpos, kpos, scale=scale, window=(wl, wr), alibi=alibi, kpad=kpad)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse_b), empty) and (out_b[empty] == 0).all()  # rows that see no key at all
    if softcap == 0:
        assert_rule("lse", lse_b, ref_lse, None, torch.float32, fp32_rel=1e-5 if dtype == torch.float32 else 1e-3)

    # backward: triton_bwd_acc over every pair with the merged output, added onto non-zero accumulators
    out_g, lse_g = out_b.to(dtype), lse_b
    dout = rnd(*out_g.shape, dtype=dtype)
    init = [torch.randn(t.shape, device=DEV) for t in (q, k, v)]
    acc = [t.clone() for t in init]
    block_backward(op, dout, q, k, v, out_g, lse_g, q0, k0, qp, kp, acc, scale=scale, wl=wl, wr=wr, alibi=alibi,
                   softcap=softcap, bias=bias)
    grads_b = [a - i for a, i in zip(acc, init)]
    grads_u = op.launch_bwd(dout, q, k, v, out_g, lse_g, bias, None, None, 0, 0, scale, wl, wr, True, softcap,
                            alibi, 0.0, 0, 0)  # the unsplit dense backward
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(oracle(*leaves, qpos, kpos, **kw), leaves, dout.double())
    base_grads = [None] * 3
    if dtype != torch.float32:
        bl = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        base_grads = torch.autograd.grad(oracle(*bl, qpos, kpos, dtype=dtype, **kw), bl, dout)
    attend = lambda q_, k_, v_: oracle(q_, k_, v_, qpos, kpos, **kw)  # noqa: E731 (float64)
    inherent = fwd_bwd_inherent(attend, q, k, dout, out_g, ref, scale)[1:]
    for name, gb, gu, r, bg, e in zip(("dq", "dk", "dv"), grads_b, grads_u, ref_grads, base_grads, inherent):
        # fp16: the unsplit backward rounds its result once; the accumulated one stays fp32 (and holds init + g)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(gb, gu.float(), **tol)
        assert_rule(name + " (blocks, accumulated)", gb.to(dtype), r, bg, dtype, inherent=e)


def test_bwd_acc_adds_unrounded_fp32_gradients(op):
    """One block: bwd_acc onto zeros equals triton_bwd's fp32 values before rounding (triton_bwd in fp16 is their
    rounding), and onto X it adds exactly the same values."""
    q, k, v = rnd(1, 2, 33, 16, dtype=torch.float16), rnd(1, 2, 40, 16, dtype=torch.float16), rnd(1, 2, 40, 16,
                                                                                                   dtype=torch.float16)
    qs, ks = i32(50), i32(45)
    out, lse = op.launch_fwd(q, k, v, None, None, None, 0, 0, 0.25, 7, 0, False, 0.0, None, 0.0, 0, 0, qs, ks)
    dout = torch.randn_like(out)
    g16 = op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, 0.25, 7, 0, False, 0.0, None, 0.0, 0, 0,
                        qs, ks)
    zeros = [torch.zeros(t.shape, device=DEV) for t in (q, k, v)]
    g32 = op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, 0.25, 7, 0, False, 0.0, None, 0.0, 0, 0,
                        qs, ks, acc=zeros)
    for a, b in zip(g32, g16):
        assert a.dtype == torch.float32 and torch.equal(a.half(), b)
        assert not torch.equal(a, a.half().float()), "accumulated gradient was rounded to fp16"
    x = [torch.randn(t.shape, device=DEV) for t in (q, k, v)]
    # accumulators with padded strides (stride 1 on the last dim only)
    xs = [torch.zeros(*t.shape[:-1], t.shape[-1] + 3, device=DEV)[..., :t.shape[-1]].copy_(t) for t in x]
    op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, 0.25, 7, 0, False, 0.0, None, 0.0, 0, 0, qs, ks,
                  acc=xs)
    for a, b, c in zip(xs, x, g32):
        assert torch.equal(a, b + c)


# ---------------------------------------------------------------------------------------------------------------
# Offsets far from the lengths: windows are not clamped by length, i + off +- w does not overflow, tiles are skipped

def _expected_blocks(vis, BM, BN):
    """[fwd masked, fwd unmasked, dkdv masked, dkdv unmasked] visited blocks for one (sequence, head)."""
    Sq, Sk = vis.shape
    c = [0, 0, 0, 0]
    for m0 in range(0, Sq, BM):
        for n0 in range(0, Sk, BN):
            blk = vis[m0:m0 + BM, n0:n0 + BN]
            if blk.any():
                c[1 if (blk.all() and n0 + BN <= Sk) else 0] += 1
                c[3 if (blk.all() and m0 + BM <= Sq) else 2] += 1
    return c


FAR = [  # (q_start, k_start, window): off = q_start - k_start far beyond Sq + Sk, or bands in the middle
    (BIG - 60, 0, (5, 0)),              # keys far in the past, finite window: nothing visible (no clamping)
    (BIG - 60, 0, (BIG, BIG)),          # windows >= 2^31 cover everything (off + wr would overflow int32)
    (BIG - 60, 0, (BIG - 85, -1)),      # off - wl = 25 with wl near 2^31: a band, rows past 30 empty
    (0, BIG - 60, (BIG - 1, 0)),        # keys in the future, causal: nothing; off - wl below -2^31 (saturated)
    (0, BIG - 60, (-1, BIG - 40)),      # off + wr = 20 with wr near 2^31: a band
    (500, 480, (10, 4)),                # a band crossing the block pair: masked and unmasked tiles, skipped ones
    (480, 500, (-1, 3)),                # negative off, causal-like band
    (700, 620, (-1, 0)),                # off-diagonal block under causal: all visible but the tails
    (516, 500, (0, 0)),                 # a diagonal on tile edges: one more or one less key moves a tile
]


@pytest.mark.parametrize("q0,k0,window", FAR)
def test_far_offsets_windows_and_tile_skipping(op, q0, k0, window):
    Sq, Sk, D, BM, BN = 40, 56, 16, 16, 16
    q, k, v = rnd(1, 1, Sq, D), rnd(1, 1, Sk, D), rnd(1, 1, Sk, D)
    wl, wr = window
    stats = torch.zeros(2, dtype=torch.int32, device=DEV)
    out, lse = op.launch_fwd(q, k, v, None, None, None, 0, 0, 0.25, wl, wr, False, 0.0, None, 0.0, 0, 0, i32(q0),
                             i32(k0), True, blocks=(BM, BN), stats=stats)
    qpos, kpos = torch.arange(Sq, device=DEV) + q0, torch.arange(Sk, device=DEV) + k0
    win = tuple(-1 if w >= 2 ** 31 else w for w in window)
    d = kpos.view(1, -1) - qpos.view(-1, 1)
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=DEV)
    if win[0] >= 0:
        vis &= d >= -win[0]
    if win[1] >= 0:
        vis &= d <= win[1]
    exp = _expected_blocks(vis, BM, BN)
    assert stats.tolist() == exp[:2], f"visited tiles {stats.tolist()}, expected {exp[:2]}"
    assert_rule("out", out, oracle(q, k, v, qpos, kpos, scale=0.25, window=win), None, torch.float32)
    empty = ~vis.any(-1)
    assert torch.equal(torch.isinf(lse[0, 0]), empty) and (out[0, 0][empty] == 0).all()
    dout = torch.randn_like(out)
    bstats = torch.zeros(4, dtype=torch.int32, device=DEV)
    grads = op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, 0.25, wl, wr, False, 0.0, None, 0.0, 0, 0,
                          i32(q0), i32(k0), blocks=(BM, BN), stats=bstats)
    assert bstats.tolist() == [exp[2], exp[3], exp[0], exp[1]]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(oracle(*leaves, qpos, kpos, scale=0.25, window=win), leaves, dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rule(name, g, r, None, torch.float32, magnitude=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Varlen: per-sequence offsets

def test_varlen_per_sequence_offsets(op):
    lens = [(20, 33), (37, 12), (9, 40)]
    starts = [(100, 80), (5, 300), (BIG - 50, BIG - 60)]  # a band; keys in the future (empty); near 2^31
    wl, wr, Hq, Hkv, D = 30, 0, 2, 1, 16
    cu_q = i32(*[sum(a for a, _ in lens[:n]) for n in range(len(lens) + 1)])
    cu_k = i32(*[sum(b for _, b in lens[:n]) for n in range(len(lens) + 1)])
    q, k, v = rnd(1, Hq, int(cu_q[-1]), D), rnd(1, Hkv, int(cu_k[-1]), D), rnd(1, Hkv, int(cu_k[-1]), D)
    alibi = torch.rand(Hq, device=DEV) * 0.2
    qs, ks = i32(*[a for a, _ in starts]), i32(*[b for _, b in starts])
    out, lse = op.launch_fwd(q, k, v, None, cu_q, cu_k, 37, 40, 0.25, wl, wr, False, 0.0, alibi, 0.0, 0, 0, qs, ks,
                             True)
    dout = torch.randn_like(out)
    grads = op.launch_bwd(dout, q, k, v, out, lse, None, cu_q, cu_k, 37, 40, 0.25, wl, wr, False, 0.0, alibi, 0.0, 0,
                          0, qs, ks)
    for n, ((a, b), (q0, k0)) in enumerate(zip(lens, starts)):
        sq, sk = slice(int(cu_q[n]), int(cu_q[n + 1])), slice(int(cu_k[n]), int(cu_k[n + 1]))
        qpos, kpos = torch.arange(a, device=DEV) + q0, torch.arange(b, device=DEV) + k0
        leaves = [t.detach().double().requires_grad_() for t in (q[:, :, sq], k[:, :, sk], v[:, :, sk])]
        ref = oracle(*leaves, qpos, kpos, scale=0.25, window=(wl, wr), alibi=alibi)
        assert_rule(f"out[{n}]", out[:, :, sq], ref, None, torch.float32)
        ref_lse = oracle_lse(q[:, :, sq], k[:, :, sk], qpos, kpos, scale=0.25, window=(wl, wr), alibi=alibi)
        assert torch.equal(torch.isinf(lse[:, :, sq]), torch.isinf(ref_lse))
        ref_grads = torch.autograd.grad(ref, leaves, dout[:, :, sq].double())
        for name, g, r, s in zip(("dq", "dk", "dv"), grads, ref_grads, (sq, sk, sk)):
            assert_rule(f"{name}[{n}]", g[:, :, s], r, None, torch.float32, magnitude=1.0)
    assert torch.isinf(lse[:, :, int(cu_q[1]):int(cu_q[2])]).all()  # sequence 1 sees only future keys


# ---------------------------------------------------------------------------------------------------------------
# Dropout: the keep decision depends on (sequence, head, global positions) only

def test_dropout_same_mask_however_split(op):
    """v = identity exposes the keep mask (out[i, j] = P[i, j] M[i, j] / (1 - p)): the merged blocks drop exactly the
    elements the unsplit call with the same offsets and rng drops; out and grads match the oracle with that mask."""
    B, H, Hkv, Sq, Sk, D, p = 2, 2, 1, 32, 40, 16, 0.3  # GQA: dK/dV regenerates the mask of every query head
    q, k = rnd(B, H, Sq, D), rnd(B, Hkv, Sk, D)
    v = torch.eye(Sk, device=DEV).expand(B, Hkv, Sk, Sk).contiguous()  # Dv = Sk
    q0, k0, rng, scale = 3000, 2990, (12345, 678), 0.1
    kw = dict(scale=scale, wl=25, wr=0, dropout_p=p, rng=rng)
    out_u, lse_u = op.launch_fwd(q, k, v, None, None, None, 0, 0, scale, 25, 0, False, 0.0, None, p, *rng,
                                 i32(*[q0] * B), i32(*[k0] * B), True)
    out_b, lse_b = block_forward(op, q, k, v, q0, k0, 2, 2, blocks=(16, 16), **kw)
    keep_u, keep_b = out_u != 0, out_b != 0
    assert torch.equal(keep_b, keep_u), f"{int((keep_b != keep_u).sum())} keep decisions differ between splits"
    qpos, kpos = torch.arange(Sq, device=DEV) + q0, torch.arange(Sk, device=DEV) + k0
    vis = (kpos.view(1, -1) <= qpos.view(-1, 1)) & (kpos.view(1, -1) >= qpos.view(-1, 1) - 25)
    rate = float(keep_u[..., vis].float().mean())
    assert abs(rate - (1 - p)) < 0.05, rate
    assert not torch.equal(keep_u[0, 0], keep_u[0, 1]) and not torch.equal(keep_u[0, 0], keep_u[1, 0])
    # the mask is a function of global positions: the same pair computed at other row offsets of the tensors
    sub, _ = op.launch_fwd(q[:, :, 8:], k[:, :, 5:], v[:, :, 5:], None, None, None, 0, 0, scale, 25, 0, False, 0.0,
                           None, p, *rng, i32(*[q0 + 8] * B), i32(*[k0 + 5] * B), True)
    assert torch.equal(sub[..., 5:] != 0, keep_u[:, :, 8:, 5:]) and not sub[..., :5].any()
    keep = keep_u | ~vis  # invisible elements: the oracle masks them anyway
    ref = oracle(q, k, v, qpos, kpos, scale=scale, window=(25, 0), keep=keep, dropout_p=p)
    assert_rule("out (dropout, blocks)", out_b, ref, None, torch.float32)
    torch.testing.assert_close(out_b, out_u, rtol=2e-6, atol=2e-6)
    dout = torch.randn_like(out_u)
    acc = [torch.zeros(t.shape, device=DEV) for t in (q, k, v)]
    block_backward(op, dout, q, k, v, out_b, lse_b, q0, k0, 2, 2, acc, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*leaves, qpos, kpos, scale=scale, window=(25, 0), keep=keep, dropout_p=p)
    for name, g, r in zip(("dq", "dk", "dv"), acc, torch.autograd.grad(ref, leaves, dout.double())):
        assert_rule(name + " (dropout, blocks)", g, r, None, torch.float32, magnitude=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Ops, backend, errors

def test_ops_opcheck_and_backend(op):
    q, k, v = rnd(1, 2, 9, 16), rnd(1, 1, 12, 16), rnd(1, 1, 12, 16)
    fwd = (q, k, v, None, None, None, 9, 12, 0.25, 4, 0, False, 0.0, None, 0.0, 0, 0, False, i32(20), i32(15), True)
    torch.library.opcheck(torch.ops.fastattn.triton_fwd.default, fwd, test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.fastattn.triton_fwd(*fwd)
    acc = [torch.randn(t.shape, device=DEV) for t in (q, k, v)]
    bwd = (torch.randn_like(q), q, k, v, out, lse, None, None, None, 9, 12, 0.25, 4, 0, False, 0.0, None, 0.0, 0, 0,
           False, i32(20), i32(15), *acc)
    torch.library.opcheck(torch.ops.fastattn.triton_bwd_acc.default, bwd,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert "block" in TRITON.features
    p = AttnParams(q=q, k=k, v=v, scale=0.25, window_left=4, window_right=0, bottom_right=False, q_start=i32(20),
                   k_start=i32(15), out_fp32=True)
    assert not TRITON.reasons(p), TRITON.reasons(p)
    o2, l2 = TRITON.forward(p)
    assert torch.equal(o2, out) and torch.equal(l2, lse)
    dq, dk, dv = (torch.zeros(t.shape, device=DEV) for t in (q, k, v))
    TRITON.block_backward(p, bwd[0], out, lse, dq, dk, dv)
    ref = op.launch_bwd(bwd[0], q, k, v, out, lse, None, None, None, 9, 12, 0.25, 4, 0, False, 0.0, None, 0.0, 0, 0,
                        i32(20), i32(15))
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), ref))


def test_bad_block_arguments_name_the_argument(op):
    q, k, v = rnd(2, 2, 8, 16), rnd(2, 2, 8, 16), rnd(2, 2, 8, 16)
    good = i32(0, 4)

    def fwd(qs, ks, br=False):
        return op.launch_fwd(q, k, v, None, None, None, 0, 0, 0.25, -1, 0, br, 0.0, None, 0.0, 0, 0, qs, ks)

    for qs, ks, br, msg in [
        (good.long(), good, False, "q_start must be int32"),
        (good, i32(0), False, r"k_start must have shape \(2,\)"),
        (good, None, False, "given together"),
        (good, i32(0, 9, 4, 9)[::2], False, "k_start must be contiguous"),
        (good, good, True, "bottom_right must be False"),
    ] + ([] if DEV == "cuda" else [  # values: read on the host for CPU tensors only (a sync on a GPU)
        (i32(-1, 0), good, False, "q_start values must be >= 0"),
        (good, i32(0, BIG - 3), False, "k_start values"),
    ]):
        with pytest.raises(InputValueError, match=msg):
            fwd(qs, ks, br)
    out, lse = fwd(good, good)
    dout = torch.randn_like(out)

    def bwd(dq, dk, dv):
        return op.launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, 0.25, -1, 0, False, 0.0, None, 0.0,
                             0, 0, good, good, acc=(dq, dk, dv))

    z = lambda t, **kw: torch.zeros(t.shape, device=DEV, **kw)  # noqa: E731
    with pytest.raises(InputValueError, match="dq_acc must be float32"):
        bwd(z(q, dtype=torch.float16), z(k), z(v))
    with pytest.raises(InputValueError, match=r"dk_acc must have k's shape \(2, 2, 8, 16\)"):
        bwd(z(q), torch.zeros(2, 2, 9, 16, device=DEV), z(v))
    with pytest.raises(InputValueError, match="dv_acc must have stride 1 on the last dim"):
        bwd(z(q), z(k), torch.zeros(2, 2, 16, 8, device=DEV).transpose(-1, -2))
    with pytest.raises(InputValueError, match="dk_acc must not have elements sharing memory"):
        bwd(z(q), torch.zeros(2, 1, 8, 16, device=DEV).expand(2, 2, 8, 16), z(v))
    shared = z(q)
    with pytest.raises(InputValueError, match="dq_acc must not share memory with dv_acc"):
        bwd(shared, z(k), shared)
    with pytest.raises(InputValueError, match="dq_acc must not share memory with q"):
        bwd(q, z(k), z(v))
    packed = torch.zeros(2, 8, 3, 2, 16, device=DEV)  # (B, S, 3, H, D): interleaved, not overlapping
    g = bwd(*(packed[:, :, i].transpose(1, 2) for i in range(3)))
    assert all(torch.equal(a, b) for a, b in zip(g, bwd(z(q), z(k), z(v))))
    with pytest.raises(InputValueError, match="triton_bwd_acc: out must be torch.float32"):
        out = out.half()
        bwd(z(q), z(k), z(v))


_BAD_VALUES = textwrap.dedent("""
    import torch
    from fastattn.backends.triton.kernels import op
    check = op._check_blocks
    op._check_blocks = lambda *a: check(*a[:-2], None, None) or True  # keep the checks, not the values (GPU-like)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernels on a GPU, else the interpreter
    T = lambda *x: torch.tensor(x, dtype=torch.int32, device=dev)
    q, alibi = torch.randn(2, 1, 24, 16, device=dev), torch.rand(1, device=dev)
    for qs, ks in ((T(-5, 2**31 - 1), T(2**31 - 1, -2**31)), (T(-2**31, 0), T(2**31 - 1, 2**31 - 1))):
        for wl, wr, p in ((3, 5, 0.2), (2**31 - 1, 2**31 - 1, 0.0)):
            out, lse = op.launch_fwd(q, q, q, None, None, None, 0, 0, 0.25, wl, wr, False, 0.0, alibi, p, 1, 2, qs, ks)
            g = op.launch_bwd(out, q, q, q, out, lse, None, None, None, 0, 0, 0.25, wl, wr, False, 0.0, alibi, p, 1,
                              2, qs, ks)
            assert all(torch.isfinite(t).all() for t in (out, *g))
    print("ok")
""")


def test_bad_start_values_only_shift_masks():
    """On GPUs q_start/k_start values are not read on the host: any int32 values must give finite results, never
    accesses outside the tensors (a subprocess: an out-of-bounds access through the interpreter could crash)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _BAD_VALUES], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"exit code {proc.returncode}:\n{proc.stderr[-3000:]}"


def test_accumulator_overlap_rule_against_brute_force():
    """op.py's _may_share / _strides_disjoint (the mirror of csrc/block_checks.h) on random views of one buffer
    against the elements they address: never "disjoint" where they meet, exact for views with one set of strides."""
    from fastattn.backends.triton.kernels import op as triton_op
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(1 << 12)

    def view():
        sizes = [int(torch.randint(1, 4, (), generator=g)) for _ in range(3)]
        strides = [int(torch.randint(0, 40, (), generator=g)) for _ in range(3)]
        return sizes, strides

    def cells(t):
        idx = torch.arange(buf.numel()).as_strided(t.shape, t.stride(), t.storage_offset())
        return set(idx.flatten().tolist())

    exact = 0
    for _ in range(3000):
        sizes, strides = view()
        a = buf.as_strided(sizes, strides, int(torch.randint(0, 200, (), generator=g)))
        if bool(torch.randint(0, 2, (), generator=g)):  # a's strides, its sizes or others (column ranges)
            sizes_b = sizes if bool(torch.randint(0, 2, (), generator=g)) else view()[0]
            b = buf.as_strided(sizes_b, strides, int(torch.randint(0, 200, (), generator=g)))
        else:
            sizes_b, strides_b = view()
            b = buf.as_strided(sizes_b, strides_b, int(torch.randint(0, 200, (), generator=g)))
        meet = bool(cells(a) & cells(b))
        own = len(cells(a)) == a.numel()
        if not triton_op._may_share(a, b):
            assert not meet, (a.shape, a.stride(), a.storage_offset(), b.shape, b.stride(), b.storage_offset())
        if a.stride() == b.stride() and triton_op._decided_by_strides(a, b) is not None:
            assert triton_op._may_share(a, b) == meet, (a.shape, b.shape, a.stride(), a.storage_offset(),
                                                        b.storage_offset())
            exact += 1
        if triton_op._strides_disjoint(a):
            assert own, (a.shape, a.stride())
    assert exact > 300  # the exact branch was exercised
