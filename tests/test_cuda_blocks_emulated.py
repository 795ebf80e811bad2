"""Block calls (issue #14) on fastattn's CUDA kernels, executed by the CPU emulator (tests/cuda_emu, see
test_cuda_emulated.py): q and k/v split into blocks, every block pair computed with its global positions
(q_start/k_start) and out_fp32, the pairs merged in fp32 by log-sum-exp, must equal the unsplit call and the float64
oracle (tolerance rule); bwd_acc over every pair with the merged out/lse must add up to the unsplit gradients. The
dropout mask is keyed on global positions: checked against an independent Python Philox (and the CPU op's mask when
the CPU kernels implement block coordinates). The merge is tests/support/blocks.py reference_merge_, written apart
from the library's fastattn/blocks.py merge_."""
import pytest
import torch

from support.blocks import INF, cuts, reference_merge_
from support.cuda_emu import emu, needs_cuda_headers
from support.oracle import assert_rule, oracle_attention
from support.philox import keep_mask_at

pytestmark = needs_cuda_headers

# Dense: B, H, Hkv, Sq, Sk, D. Varlen: seqlens ((sq, sk) per sequence). window (left, right), -1 unlimited, causal
# is right = 0; br: the unsplit call is bottom-right aligned, so the blocks sit at q_start = C + (Sk - Sq) + q0,
# k_start = C + k0 (C >= 0 shifts every position: the result must not depend on it). q_cuts / k_cuts: block
# boundaries (per sequence for varlen, clipped to its length).
CASES = {
    "causal_br_gqa_fp16": dict(B=2, H=4, Hkv=2, Sq=50, Sk=90, D=64, window=(-1, 0), br=True, C=0,
                               q_cuts=[17, 33], k_cuts=[30, 61], dt=torch.float16),
    "causal_br_sq_gt_sk_empty_rows_bf16": dict(B=1, H=2, Hkv=1, Sq=70, Sk=40, D=32, window=(-1, 0), br=True, C=30,
                                               q_cuts=[20, 45], k_cuts=[9], dt=torch.bfloat16),
    "window_tl_d40_bf16": dict(B=1, H=2, Hkv=2, Sq=60, Sk=70, D=40, window=(9, 4), br=False, C=1003,
                               q_cuts=[25], k_cuts=[13, 40], dt=torch.bfloat16),
    "varlen_causal_per_seq_offsets_fp16": dict(H=2, Hkv=1, D=64, seqlens=((30, 45), (0, 7), (20, 20), (41, 9)),
                                               window=(-1, 0), br=True, C=32, q_cuts=[10, 25], k_cuts=[6, 30],
                                               dt=torch.float16),
    "dropout_causal_tl_gqa_bf16": dict(B=2, H=2, Hkv=1, Sq=40, Sk=50, D=32, window=(-1, 0), br=False, C=0,
                                       q_cuts=[13], k_cuts=[21, 35], dt=torch.bfloat16, p=0.2),
}
SEED, OFFSET = 1234, 5


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def _layout(c):
    """Per sequence (rows of q in the tensor, rows of k, global position of its first query, of its first key)."""
    T = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    seqs = c.get("seqlens") or [(c["Sq"], c["Sk"])] * c["B"]
    out, oq, ok = [], 0, 0
    for sq, sk in seqs:
        base = (sk - sq) if c["br"] else 0
        out.append((range(oq, oq + sq), range(ok, ok + sk), c["C"] + base, c["C"]))
        if "seqlens" in c:
            oq, ok = oq + sq, ok + sk
    return out, T


def _block_calls(c):
    """Every (q block, k block) pair: (q rows, k rows, cu_q, cu_k, max_q, max_k, q_start, k_start), rows as index
    tensors into the (packed) sequence dim."""
    seqs, T = _layout(c)
    varlen = "seqlens" in c
    nq = max(len(r) for r, _, _, _ in seqs)
    nk = max(len(r) for _, r, _, _ in seqs)
    qb, kb = cuts(nq, c["q_cuts"]), cuts(nk, c["k_cuts"])
    calls = []
    for a0, a1 in qb:
        for b0, b1 in kb:
            qr, kr, ql, kl, qs, ks = [], [], [], [], [], []
            for rq, rk, q0, k0 in seqs:
                sq_rows, sk_rows = list(rq)[a0:a1], list(rk)[b0:b1]
                qr += sq_rows
                kr += sk_rows
                ql.append(len(sq_rows))
                kl.append(len(sk_rows))
                qs.append(q0 + a0)
                ks.append(k0 + b0)
                if not varlen:
                    break  # dense: every batch row has the same rows
            if not varlen:
                qs, ks = qs * c["B"], ks * c["B"]
            var = (_cu(ql), _cu(kl), max(ql), max(kl)) if varlen else (None, None, 0, 0)
            calls.append((torch.tensor(qr), torch.tensor(kr), *var, T(qs), T(ks)))
    whole = [(T([s[2] for s in seqs]), T([s[3] for s in seqs]))]
    return calls, whole[0]


def _inputs(c):
    dt, H, Hkv, D = c["dt"], c["H"], c["Hkv"], c["D"]
    if "seqlens" in c:
        B, tq, tk = 1, sum(s for s, _ in c["seqlens"]), sum(s for _, s in c["seqlens"])
    else:
        B, tq, tk = c["B"], c["Sq"], c["Sk"]
    q, k, v = torch.randn(B, H, tq, D, dtype=dt), torch.randn(B, Hkv, tk, D, dtype=dt), torch.randn(B, Hkv, tk, D,
                                                                                                   dtype=dt)
    return q, k, v, torch.randn(B, H, tq, D, dtype=dt)


def _whole_var(c):
    if "seqlens" not in c:
        return (None, None, 0, 0)
    sq, sk = [s for s, _ in c["seqlens"]], [s for _, s in c["seqlens"]]
    return _cu(sq), _cu(sk), max(sq), max(sk)


def _dropout_masks(c, H, qs, ks):
    """Keep mask (B, H, Sq, Sk) of the unsplit (dense) call at global positions q_start + i, k_start + j."""
    return torch.stack([torch.stack([keep_mask_at(SEED, OFFSET, c["p"], b, h, range(int(qs[b]), int(qs[b]) + c["Sq"]),
                                                  range(int(ks[b]), int(ks[b]) + c["Sk"])) for h in range(H)])
                        for b in range(c["B"])])


def _oracle(c, q, k, v, dout, dtype, mask):
    """Out, lse, grads of the unsplit call in dtype (varlen: sequence by sequence)."""
    win, br, scale, p = c["window"], c["br"], c["D"] ** -0.5, c.get("p", 0.0)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    seqs, _ = _layout(c)
    outs, lses = [], []
    for n, (rq, rk, _, _) in enumerate(seqs if "seqlens" in c else seqs[:1]):
        sl = (lambda t, r: t[:, :, r.start:r.stop]) if "seqlens" in c else (lambda t, r: t)
        qs, ks, vs = sl(leaves[0], rq), sl(leaves[1], rk), sl(leaves[2], rk)
        outs.append(oracle_attention(qs, ks, vs, scale=scale, window=win, bottom_right=br, dtype=dtype,
                                     dropout_mask=mask, dropout_p=p))
        kk = ks[:, torch.arange(c["H"]) // (c["H"] // c["Hkv"])]  # (B, H, sk, D)
        s = torch.einsum("bhid,bhjd->bhij", qs, kk).double() * scale
        i, j = torch.arange(s.shape[2]).view(-1, 1), torch.arange(s.shape[3]).view(1, -1)
        d = i + (s.shape[3] - s.shape[2] if br else 0)
        ok = torch.ones_like(s, dtype=torch.bool) & (j >= d - win[0] if win[0] >= 0 else True) & \
            (j <= d + win[1] if win[1] >= 0 else True)
        lse = torch.logsumexp(s.masked_fill(~ok, -INF), -1)
        lses.append(lse.masked_fill(torch.isneginf(lse), INF))
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return out.detach(), lse, grads


def _run_blocks(c, q, k, v, dout, shift_k_start=0):
    """Merged (out fp32, lse) over all block pairs and the bwd_acc sums (minus their random initial values)."""
    calls, _ = _block_calls(c)
    win, scale, p = c["window"], c["D"] ** -0.5, c.get("p", 0.0)
    o_acc = torch.zeros(q.shape[:3] + (v.shape[3],))
    l_acc = torch.full(q.shape[:3], INF)
    for qr, kr, cq, ck, mq, mk, qs, ks in calls:
        o, l = emu().fwd(q[:, :, qr], k[:, :, kr], v[:, :, kr], cq, ck, mq, mk, scale, win[0], win[1], False, p,
                         SEED, OFFSET, qs, ks + shift_k_start, True)
        assert o.dtype == torch.float32
        ob, lb = o_acc[:, :, qr], l_acc[:, :, qr]
        reference_merge_(ob, lb, o, l)
        o_acc[:, :, qr], l_acc[:, :, qr] = ob, lb
    out = o_acc.to(q.dtype)  # rounded once
    init = [torch.randn(t.shape) for t in (q, k, v)]  # bwd_acc must add to these
    acc = [t.clone() for t in init]
    for qr, kr, cq, ck, mq, mk, qs, ks in calls:
        bufs = [acc[0][:, :, qr], acc[1][:, :, kr], acc[2][:, :, kr]]
        emu().bwd_acc(dout[:, :, qr], q[:, :, qr], k[:, :, kr], v[:, :, kr], out[:, :, qr], l_acc[:, :, qr], cq, ck,
                      mq, mk, scale, win[0], win[1], False, p, SEED, OFFSET, qs, ks + shift_k_start, *bufs)
        acc[0][:, :, qr], acc[1][:, :, kr], acc[2][:, :, kr] = bufs
    return out, l_acc, [a - i for a, i in zip(acc, init)]


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_merge_to_the_unsplit_call(case):
    c = CASES[case]
    dt, scale, win = c["dt"], c["D"] ** -0.5, c["window"]
    q, k, v, dout = _inputs(c)
    _, (qs, ks) = _block_calls(c)
    var = _whole_var(c)
    # The unsplit call at the same global positions; without dropout also bit for bit the plain aligned call.
    whole = emu().fwd(q, k, v, *var, scale, win[0], win[1], False, c.get("p", 0.0), SEED, OFFSET, qs, ks)
    if "p" not in c:
        plain = emu().fwd(q, k, v, *var, scale, win[0], win[1], c["br"], 0.0, 0, 0)
        assert torch.equal(whole[0], plain[0]) and torch.equal(whole[1], plain[1])
    mask = _dropout_masks(c, c["H"], qs, ks) if "p" in c else None
    out, lse, grads = _run_blocks(c, q, k, v, dout)
    ref, base = _oracle(c, q, k, v, dout, torch.float64, mask), _oracle(c, q, k, v, dout, dt, mask)
    assert_rule("unsplit out", whole[0], ref[0], base[0], dt)
    assert_rule("merged out", out, ref[0], base[0], dt)
    assert_rule("merged lse", lse, ref[1], base[1].float(), dt)
    assert torch.equal(torch.isinf(lse), torch.isinf(whole[1])), "empty rows differ from the unsplit call"
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref[2], base[2]):
        assert_rule(name + " (bwd_acc sum)", g, r, b, dt)


def test_planted_k_start_off_by_one_fails():
    """Control: the same block calls with every k_start one too large must fail the check above."""
    c = CASES["causal_br_gqa_fp16"]
    q, k, v, dout = _inputs(c)
    ref, base = _oracle(c, q, k, v, dout, torch.float64, None), _oracle(c, q, k, v, dout, c["dt"], None)
    out, _, _ = _run_blocks(c, q, k, v, dout, shift_k_start=1)
    with pytest.raises(AssertionError):
        assert_rule("merged out", out, ref[0], base[0], c["dt"])


def test_out_fp32_and_bwd_acc_are_the_plain_results_unrounded():
    """out_fp32 rounded to q.dtype is bitwise the plain out (same layout), same lse; bwd_acc into zeros rounded is bitwise bwd, and
    into X it is exactly X + (the same fp32 gradients): it adds, without rounding first."""
    dt, scale = torch.float16, 0.125
    bshd = lambda h, s: torch.randn(2, s, h, 64, dtype=dt).transpose(1, 2)  # noqa: E731  (B, S, H, D) -> (B, H, S, D)
    q, k, v = bshd(2, 33), bshd(1, 47), bshd(1, 47)
    args = (None, None, 0, 0, scale, 12, 0, True, 0.0, 0, 0)
    o16, l16 = emu().fwd(q, k, v, *args)
    o32, l32 = emu().fwd(q, k, v, *args[:7], False, 0.0, 0, 0, torch.tensor([14, 14], dtype=torch.int32),
                         torch.zeros(2, dtype=torch.int32), True)
    assert o32.dtype == torch.float32 and o32.stride() == o16.stride()  # q's (BSHD) memory order
    assert torch.equal(o32.to(dt), o16) and torch.equal(l32, l16)
    assert not torch.equal(o32, o32.to(dt).float())  # really unrounded
    dout = torch.randn_like(o16)
    grads = emu().bwd(dout, q, k, v, o16, l16, *args)
    zeros = [torch.zeros(t.shape) for t in (q, k, v)]
    emu().bwd_acc(dout, q, k, v, o16, l16, *args, None, None, *zeros)
    xs = [torch.randn(t.shape) for t in (q, k, v)]
    acc = [x.clone() for x in xs]
    emu().bwd_acc(dout, q, k, v, o16, l16, *args, None, None, *acc)
    for g, z, x, a in zip(grads, zeros, xs, acc):
        assert torch.equal(z.to(dt), g)
        assert torch.equal(a, x + z)


@pytest.mark.parametrize("name,q0,k0,window,visible", [
    ("far_future_window", 2 ** 31 - 40, 0, (5, 5), lambda d: torch.zeros_like(d, dtype=torch.bool)),
    ("huge_left_window", 2 ** 31 - 40, 0, (2 ** 31 - 51, 0), lambda d: d >= -(2 ** 31 - 51)),
    ("huge_right_window_neg_off", 0, 2 ** 31 - 40, (-1, 2 ** 31 - 31), lambda d: d <= 2 ** 31 - 31),
    ("window_2p31_is_none", 2 ** 31 - 40, 0, (2 ** 31, 2 ** 31 + 7), lambda d: torch.ones_like(d, dtype=torch.bool)),
])
def test_large_offsets_and_windows(name, q0, k0, window, visible):
    """Positions near 2^31 with finite windows: i + off -/+ w must not overflow, and a block entirely outside the
    window gives empty rows (out 0, lse +inf). d = k_pos - q_pos, computed here in Python ints."""
    dt, scale = torch.bfloat16, 0.25
    q, k, v = torch.randn(1, 2, 24, 32, dtype=dt), torch.randn(1, 2, 30, 32, dtype=dt), torch.randn(1, 2, 30, 32,
                                                                                                   dtype=dt)
    T = lambda x: torch.tensor([x], dtype=torch.int32)  # noqa: E731
    out, lse = emu().fwd(q, k, v, None, None, 0, 0, scale, window[0], window[1], False, 0.0, 0, 0, T(q0), T(k0),
                         True)
    d = (k0 + torch.arange(30, dtype=torch.int64)).view(1, -1) - (q0 + torch.arange(24, dtype=torch.int64)).view(-1, 1)
    ok = visible(d)
    ref = oracle_attention(q, k, v, scale=scale, mask=ok)
    base = oracle_attention(q, k, v, scale=scale, mask=ok, dtype=dt)
    assert_rule("out", out, ref, base, dt)
    lses = []
    for dtype in (torch.float64, dt):  # the reference and the naive baseline of the tolerance rule
        s = torch.einsum("bhid,bhjd->bhij", q.to(dtype), k.to(dtype)).double() * scale
        lse_ = torch.logsumexp(s.masked_fill(~ok, -INF), -1)
        lses.append(lse_.masked_fill(torch.isneginf(lse_), INF))
    assert_rule("lse", lse, lses[0], lses[1], dt)
    if not ok.any():
        assert (out == 0).all() and (lse == INF).all()


# ---------------------------------------------------------------- dropout keyed on global positions
# Per batch row (q_start, k_start): k_start % 4 != 0 takes the kernels' per-element draw path, == 0 the shuffle path.
DROP_STARTS = [(5, 3), (1000, 64)]


def _emu_keep_mask(dt, B, H, Sq, Sk, p, starts):
    """The emulated CUDA forward's keep mask: V = I and a small scale (no P underflows), so out != 0 is the mask."""
    q, k = torch.randn(B, H, Sq, 16, dtype=dt), torch.randn(B, H, Sk, 16, dtype=dt)
    v = torch.eye(Sk, dtype=dt).expand(B, H, Sk, Sk).contiguous()
    qs, ks = (torch.tensor([s[i] for s in starts], dtype=torch.int32) for i in (0, 1))
    out, _ = emu().fwd(q, k, v, None, None, 0, 0, 0.05, -1, -1, False, p, SEED, OFFSET, qs, ks, True)
    return out != 0, qs, ks


def test_dropout_mask_is_keyed_on_global_positions():
    B, H, Sq, Sk, p = 2, 2, 20, 72, 0.25
    got, qs, ks = _emu_keep_mask(torch.float16, B, H, Sq, Sk, p, DROP_STARTS)
    want = torch.stack([torch.stack([keep_mask_at(SEED, OFFSET, p, b, h, range(int(qs[b]), int(qs[b]) + Sq),
                                                  range(int(ks[b]), int(ks[b]) + Sk)) for h in range(H)])
                        for b in range(B)])
    assert 0.6 < got.float().mean().item() < 0.9
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} keep decisions differ"
    local = torch.stack([torch.stack([keep_mask_at(SEED, OFFSET, p, b, h, range(Sq), range(Sk)) for h in range(H)])
                         for b in range(B)])
    assert not torch.equal(got, local)  # control: a mask keyed on local positions would be told apart


def test_dropout_mask_is_the_cpu_ops():
    """The same mask as the CPU op's for the same block coordinates (bitwise), once the CPU kernels take them."""
    import fastattn  # noqa: F401  (loads fastattn._C, which registers the CPU kernels)
    if not hasattr(torch.ops.fastattn, "fwd"):
        pytest.skip("fastattn._C (the CPU kernels) not built: no reference dropout mask")
    B, H, Sq, Sk, p = 2, 2, 20, 72, 0.25
    got, qs, ks = _emu_keep_mask(torch.float16, B, H, Sq, Sk, p, DROP_STARTS)
    q, k = torch.randn(B, H, Sq, 16), torch.randn(B, H, Sk, 16)
    v = torch.eye(Sk).expand(B, H, Sk, Sk).contiguous()
    try:
        out, _ = torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, 0.05, -1, -1, False, 0.0, None, p, SEED,
                                        OFFSET, False, qs, ks, False)
    except RuntimeError as e:
        if "not yet implemented" in str(e):
            pytest.skip(f"the CPU op does not implement block coordinates yet ({e})")
        raise
    assert torch.equal(got, out != 0)


def test_block_arguments_are_checked():
    """The op's own checks (attn_host.h, shared with the CUDA op): clear errors naming the argument."""
    q, k, v = (torch.randn(2, 2, 16, 32, dtype=torch.float16) for _ in range(3))
    I = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    for qs, ks, br, msg in [(I(0, 0), None, False, "given together"), (I(0, 0), I(0, 0), True, "bottom_right"),
                            (I(0, 0).long(), I(0, 0), False, "q_start must be int32"),
                            (I(0, 0), I(0, 0, 0), False, r"k_start must have shape \(N,\) with N = 2 \(batch size\)"),
                            (I(0, 0, 0, 0)[::2], I(0, 0), False, "q_start must be contiguous")]:
        with pytest.raises(RuntimeError, match=msg):
            emu().fwd(q, k, v, None, None, 0, 0, 0.1, -1, 0, br, 0.0, 0, 0, qs, ks, True)
    out, lse = emu().fwd(q, k, v, None, None, 0, 0, 0.1, -1, 0, True, 0.0, 0, 0)
    accs = [torch.zeros(t.shape) for t in (q, k, v)]
    for i, bad, msg in [(0, torch.zeros(q.shape, dtype=torch.float16), "dq_acc must be float32"),
                        (1, torch.zeros(2, 2, 15, 32), "dk_acc must have k's shape"),
                        (2, torch.zeros(2, 2, 32, 16).transpose(2, 3), "dv_acc must have stride 1"),
                        # an expanded or aliased accumulator would race: every element must be its own memory
                        (0, torch.zeros(1, 1, 1, 32).expand(q.shape), "dq_acc must not have elements sharing memory"),
                        (2, accs[1], "dk_acc must not share memory with dv_acc")]:
        with pytest.raises(RuntimeError, match=msg):
            emu().bwd_acc(out, q, k, v, out, lse, None, None, 0, 0, 0.1, -1, 0, True, 0.0, 0, 0, None, None,
                          *[bad if j == i else a for j, a in enumerate(accs)])
