"""fastattn's CUDA kernels (csrc/cuda), EXECUTED on the CPU: the exact kernel source compiled as host C++ against a
CUDA emulator (tests/cuda_emu/emu.h: fiber threads, block barriers, warp shuffles, cp.async, ldmatrix and mma.sync
implemented from the PTX ISA fragment layouts), with the host-side parameter planning of the real ops, compared with
the float64 oracle under the project's tolerance rule. Index math, masking, splits, pipelines, shuffles and fragment
layouts are really run here, without a GPU; divergent warp collectives, __syncthreads that not every thread
reaches, reads of unwritten shared memory (poisoned with NaN bytes before every block) and cp.async reads outside
the input tensors fail loudly. What it cannot show: timing-dependent races between warps beyond the two schedules
tried here, and the tensor cores' exact summation order (fp32 here). Besides the fixed cases, a seeded fuzz (the
last section) draws random calls of both kernels on every run."""
import os
import random

import pytest
import torch

from support.cases import _oracle_lse
from support.cuda_emu import emu, needs_cuda_headers
from support.oracle import assert_rule, check_rule, delta_error, lse_magnitude, lse_reference, oracle_attention

pytestmark = needs_cuda_headers


@pytest.fixture(autouse=True)
def _default_schedule():
    emu().set_options(reverse_warps=False, delay_copies=False)
    yield
    emu().set_options(reverse_warps=False, delay_copies=False)


# ================================================================ decode (csrc/cuda/decode_kernel.cuh)
# lens: valid keys per batch row (0 allowed); cap: slots per row; layout dense | paged<page> | batch_idx.
DECODE = {
    "dense_mha_ragged0_fp32": dict(B=3, Hq=2, Hkv=2, Sq=1, D=64, Dv=64, lens=[0, 17, 300], cap=304, layout="dense",
                                   dtype=torch.float32),
    "paged16_mqa_q2_causal_fp16": dict(B=2, Hq=4, Hkv=1, Sq=2, D=64, Dv=64, lens=[298, 151], cap=304,
                                       layout="paged16", dtype=torch.float16, window=(-1, 0)),
    "paged256_gqa_q4_window_dv48_fp32": dict(B=2, Hq=4, Hkv=2, Sq=4, D=32, Dv=48, lens=[296, 40], cap=512,
                                             layout="paged256", dtype=torch.float32, window=(100, 0)),
    "batchidx_q3_softcap_alibi_d80_bf16": dict(B=2, Hq=4, Hkv=2, Sq=3, D=80, Dv=80, lens=[200, 13], cap=256,
                                               layout="batch_idx", dtype=torch.bfloat16, window=(-1, 0), softcap=3.0,
                                               alibi="per_batch"),
    "dense_gqa4_d256_window_bf16": dict(B=1, Hq=8, Hkv=2, Sq=1, D=256, Dv=256, lens=[333], cap=340, layout="dense",
                                        dtype=torch.bfloat16, window=(50, -1)),
    "paged32_d40_ragged0_q1_alibi_fp16": dict(B=3, Hq=6, Hkv=3, Sq=1, D=40, Dv=40, lens=[77, 0, 130], cap=160,
                                              layout="paged32", dtype=torch.float16, alibi="per_head",
                                              noncontig=True),
    "dense_q4_two_sided_window_d128_fp16": dict(B=2, Hq=2, Hkv=1, Sq=4, D=128, Dv=128, lens=[90, 4], cap=96,
                                                layout="dense", dtype=torch.float16, window=(3, 1)),
    "dense_all_empty_fp32": dict(B=2, Hq=2, Hkv=1, Sq=2, D=32, Dv=32, lens=[0, 0], cap=8, layout="dense",
                                 dtype=torch.float32),
}


def _decode_inputs(c):
    B, Hq, Hkv, Sq, D, Dv, cap, dt = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["D"], c["Dv"], c["cap"], c["dtype"]
    if c.get("noncontig"):  # the flash-attn surface: q stored (B, Sq, Hq, D)
        q = torch.randn(B, Sq, Hq, D, dtype=dt).transpose(1, 2)  # (B, Sq, Hq, D) -> (B, Hq, Sq, D)
    else:
        q = torch.randn(B, Hq, Sq, D, dtype=dt)
    kw = dict(block_table=None, cache_batch_idx=None)
    if c["layout"].startswith("paged"):
        page = int(c["layout"][5:])
        nb = -(-cap // page)
        pages = B * nb + 3  # spare pages nobody uses
        kc, vc = torch.randn(pages, page, Hkv, D, dtype=dt), torch.randn(pages, page, Hkv, Dv, dtype=dt)
        bt = torch.randperm(pages)[:B * nb].view(B, nb).int()  # shuffled physical pages
        kw["block_table"] = bt
        logical = lambda x: x[bt.long()].reshape(B, nb * page, *x.shape[2:])  # (B, nb, page, ..) -> (B, cap', ..)
    elif c["layout"] == "batch_idx":
        kc, vc = torch.randn(B + 2, cap, Hkv, D, dtype=dt), torch.randn(B + 2, cap, Hkv, Dv, dtype=dt)
        idx = torch.randperm(B + 2)[:B].int()
        kw["cache_batch_idx"] = idx
        logical = lambda x: x[idx.long()]
    else:
        kc, vc = torch.randn(B, cap, Hkv, D, dtype=dt), torch.randn(B, cap, Hkv, Dv, dtype=dt)
        logical = lambda x: x
    alibi = None
    if c.get("alibi") == "per_head":
        alibi = torch.rand(Hq) * 0.5
    elif c.get("alibi") == "per_batch":
        alibi = torch.rand(B, Hq) * 0.5
    lens = torch.tensor(c["lens"], dtype=torch.int32)
    return q, kc, vc, lens, kw, logical, alibi


def _check_decode(c, out, lse, q, kc, vc, lens, logical, alibi):
    B, Hq, Sq, D, Dv, dt = c["B"], c["Hq"], c["Sq"], c["D"], c["Dv"], c["dtype"]
    assert out.shape == (B, Hq, Sq, Dv) and lse.shape == (B, Hq, Sq)
    K, V = logical(kc), logical(vc)
    window, softcap = tuple(c.get("window", (-1, -1))), c.get("softcap", 0.0)
    for b in range(B):
        L = int(lens[b])
        kb, vb = K[b:b + 1, :L].transpose(1, 2), V[b:b + 1, :L].transpose(1, 2)  # (1, L, Hkv, D) -> (1, Hkv, L, D)
        qb = q[b:b + 1]
        ab = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        args = dict(scale=D ** -0.5, window=window, bottom_right=True, softcap=softcap, alibi_slopes=ab)
        ref = oracle_attention(qb, kb, vb, **args)
        base = oracle_attention(qb, kb, vb, dtype=dt, **args) if dt != torch.float32 else None
        assert_rule(f"out[{b}]", out[b:b + 1], ref, base, dt)
        lref = lse_reference(qb, kb, D ** -0.5, window, softcap, ab)
        lbase = lse_reference(qb, kb, D ** -0.5, window, softcap, ab, dtype=dt) if base is not None else None
        assert_rule(f"lse[{b}]", lse[b:b + 1], lref, lbase, dt, magnitude=lse_magnitude(qb, kb, D ** -0.5))


def _run_decode(c, num_splits, sms=132):
    q, kc, vc, lens, kw, logical, alibi = _decode_inputs(c)
    window = c.get("window", (-1, -1))
    out, lse = emu().decode_fwd(q, kc, vc, lens, kw["block_table"], kw["cache_batch_idx"], c["D"] ** -0.5,
                                window[0], window[1], c.get("softcap", 0.0), alibi, num_splits, sms)
    _check_decode(c, out, lse, q, kc, vc, lens, logical, alibi)
    return out, lse


@pytest.mark.parametrize("num_splits", [1, 3, 0])  # 0: the heuristic (132 SMs: several splits for these shapes)
@pytest.mark.parametrize("case", list(DECODE))
def test_decode_kernel_matches_oracle(case, num_splits):
    _run_decode(DECODE[case], num_splits)


def test_decode_more_splits_than_key_units():
    """64 splits over 300 keys (5 units of 64): most splits see no key and must not disturb the combine."""
    _run_decode(DECODE["dense_mha_ragged0_fp32"], 64)


@pytest.mark.parametrize("sched", ["reverse_warps"])
def test_decode_schedule_independent(sched):
    """Same bits with the warps run in the opposite order: no race between warps through shared memory."""
    c = DECODE["batchidx_q3_softcap_alibi_d80_bf16"]
    q, kc, vc, lens, kw, _, alibi = _decode_inputs(c)
    args = (q, kc, vc, lens, kw["block_table"], kw["cache_batch_idx"], c["D"] ** -0.5, -1, 0, 3.0, alibi, 3, 132)
    a = emu().decode_fwd(*args)
    emu().set_options(reverse_warps=True, delay_copies=False)
    b = emu().decode_fwd(*args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_decode_refuses_caches_it_cannot_read():
    """The op's own checks (decode_host.h): a cache without stride 1 along D (16-byte loads would read the wrong
    elements) and a misaligned head dim raise instead of computing garbage."""
    c = DECODE["dense_mha_ragged0_fp32"]
    q, kc, vc, lens, kw, _, alibi = _decode_inputs(c)
    tail = (lens, None, None, 0.125, -1, -1, 0.0, None, 1, 132)
    wide_k = torch.randn(*kc.shape[:3], 2 * kc.shape[3]).to(kc.dtype)[..., ::2]  # stride 2 along D
    with pytest.raises(RuntimeError, match="stride 1 along the head dim"):
        emu().decode_fwd(q, wide_k, vc, *tail)
    with pytest.raises(RuntimeError, match="multiple of"):
        emu().decode_fwd(q[..., :-1], kc[..., :-1], vc, *tail)


def test_decode_shared_memory_is_poisoned():
    """The emulator found the kernels' __shared__ statics (it fills them with NaN bytes before every block)."""
    assert emu().shared_statics() >= 5


# ================================================================ FlashAttention-2 forward / backward
# (csrc/cuda/fwd_kernel.cuh, bwd_kernel.cuh). window: (left, right), -1 unlimited; causal is right = 0.
# seqlens: varlen ((sq, sk) per sequence). layout "bshd": q/k/v/dout stored (B, S, H, D) (the flash-attn surface).
ATTN = {
    "sq1_sk97_d32": dict(B=2, H=2, Hkv=2, Sq=1, Sk=97, D=32),
    "gqa_sq97_sk17_causal_br_d40": dict(B=1, H=4, Hkv=2, Sq=97, Sk=17, D=40, window=(-1, 0), br=True),
    "sq17_sk97_causal_tl_d64": dict(B=2, H=2, Hkv=1, Sq=17, Sk=97, D=64, window=(-1, 0), br=False),
    "sq97_sk17_causal_tl_d64": dict(B=1, H=2, Hkv=2, Sq=97, Sk=17, D=64, window=(-1, 0), br=False),
    "window_both_d80_bshd": dict(B=1, H=2, Hkv=2, Sq=97, Sk=97, D=80, window=(20, 5), br=True, layout="bshd"),
    "causal_br_d96_sq65_sk130": dict(B=1, H=2, Hkv=1, Sq=65, Sk=130, D=96, window=(-1, 0), br=True),
    "window_tl_d128_sq80_sk48": dict(B=1, H=2, Hkv=2, Sq=80, Sk=48, D=128, window=(10, 10), br=False),
    "gqa_causal_d256_sq40_sk70": dict(B=1, H=2, Hkv=1, Sq=40, Sk=70, D=256, window=(-1, 0), br=True),
    "d20_padded_dv48": dict(B=1, H=1, Hkv=1, Sq=33, Sk=65, D=20, Dv=48),
    "varlen_empty_causal_d64": dict(H=2, Hkv=1, D=64, seqlens=((17, 33), (0, 5), (33, 0), (65, 17)),
                                    window=(-1, 0), br=True),
}
LOW = (torch.float16, torch.bfloat16)


def _attn_inputs(c, dt):
    H, Hkv, D = c["H"], c["Hkv"], c["D"]
    Dv = c.get("Dv", D)
    if "seqlens" in c:  # packed sequences: (1, H, total, D)
        tq, tk = sum(s for s, _ in c["seqlens"]), sum(s for _, s in c["seqlens"])
        q, k, v = torch.randn(1, H, tq, D, dtype=dt), torch.randn(1, Hkv, tk, D, dtype=dt), \
            torch.randn(1, Hkv, tk, Dv, dtype=dt)
        return q, k, v
    B, Sq, Sk = c["B"], c["Sq"], c["Sk"]
    if c.get("layout") == "bshd":
        mk = lambda h, s, d: torch.randn(B, s, h, d, dtype=dt).transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)
    else:
        mk = lambda h, s, d: torch.randn(B, h, s, d, dtype=dt)
    return mk(H, Sq, D), mk(Hkv, Sk, D), mk(Hkv, Sk, Dv)


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def _emu_fwd_bwd(c, q, k, v, dout, dropout_p=0.0, seed=0, offset=0):
    win, br, scale = c.get("window", (-1, -1)), c.get("br", True), c["D"] ** -0.5
    if "seqlens" in c:
        sq, sk = [s for s, _ in c["seqlens"]], [s for _, s in c["seqlens"]]
        var = (_cu(sq), _cu(sk), max(sq), max(sk))
    else:
        var = (None, None, 0, 0)
    out, lse = emu().fwd(q, k, v, *var, scale, win[0], win[1], br, dropout_p, seed, offset)
    grads = emu().bwd(dout, q, k, v, out, lse, *var, scale, win[0], win[1], br, dropout_p, seed, offset)
    return out, lse, grads


def _sequences(c, q, k, v):
    """(n, q, k, v) of each sequence: the call itself, or varlen's packed (1, H, total, D) sequence by sequence."""
    if "seqlens" not in c:
        yield 0, q, k, v
        return
    oq = ok = 0
    for n, (sq, sk) in enumerate(c["seqlens"]):
        yield n, q[:, :, oq:oq + sq], k[:, :, ok:ok + sk], v[:, :, ok:ok + sk]
        oq, ok = oq + sq, ok + sk


def _oracle_out(c, q, k, v, dtype=torch.float64, mask=None, dropout_p=0.0):
    """The oracle's output (in dtype) on q, k, v as given, gradients flowing (delta_error differentiates it). mask:
    dropout keep mask (B, H, Sq, Sk) or, varlen, a list per sequence."""
    win, br, scale = c.get("window", (-1, -1)), c.get("br", True), c["D"] ** -0.5
    outs = [oracle_attention(qs, ks, vs, scale=scale, window=win, bottom_right=br, dtype=dtype, dropout_p=dropout_p,
                             dropout_mask=mask if mask is None or "seqlens" not in c else mask[n])
            for n, qs, ks, vs in _sequences(c, q, k, v)]
    return torch.cat(outs, 2)


def _oracle_fwd_bwd(c, q, k, v, dout, dtype, mask=None, dropout_p=0.0):
    """Oracle (in dtype) out, lse and grads; varlen sequence by sequence (mask as _oracle_out's)."""
    win, br, scale = c.get("window", (-1, -1)), c.get("br", True), c["D"] ** -0.5
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = _oracle_out(c, *leaves, dtype=dtype, mask=mask, dropout_p=dropout_p)
    lse = torch.cat([_oracle_lse(qs, ks, scale, win, br, 0.0, None, dtype) for _, qs, ks, _ in
                     _sequences(c, *leaves)], 2)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return out.detach(), lse, grads


def _check_attn(c, dt, q, k, v, dout, got, mask=None, dropout_p=0.0):
    out, lse, grads = got
    ref = _oracle_fwd_bwd(c, q, k, v, dout, torch.float64, mask, dropout_p)
    base = _oracle_fwd_bwd(c, q, k, v, dout, dt, mask, dropout_p)
    assert_rule("out", out, ref[0], base[0], dt)
    assert_rule("lse", lse, ref[1], base[1], dt)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref[2], base[2]):
        assert_rule(name, g, r, b, dt)


@pytest.mark.parametrize("dt", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(ATTN))
def test_attention_kernels_match_oracle(case, dt):
    c = ATTN[case]
    q, k, v = _attn_inputs(c, dt)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=dt)
    got = _emu_fwd_bwd(c, q, k, v, dout)
    assert got[0].shape == dout.shape
    _check_attn(c, dt, q, k, v, dout, got)


@pytest.mark.parametrize("sched", ["reverse_warps", "delay_copies"])
def test_attention_schedule_independent(sched):
    """Bitwise the same results with the warps run last-to-first (a missing __syncthreads between warps sharing
    shared memory shows) and with cp.async landing only at the wait_group that retires it (a read of a stage
    before its wait shows)."""
    c = ATTN["causal_br_d96_sq65_sk130"]
    q, k, v = _attn_inputs(c, torch.float16)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float16)
    a = _emu_fwd_bwd(c, q, k, v, dout)
    emu().set_options(**{sched: True})
    b = _emu_fwd_bwd(c, q, k, v, dout)
    for x, y in zip((a[0], a[1]) + tuple(a[2]), (b[0], b[1]) + tuple(b[2])):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- dropout
def _cpu_keep_masks(B, H, seqs, dropout_p, seed, offset):
    """The CPU kernel's keep masks (torch.ops.fastattn.fwd), one (B, H, sq, sk) bool tensor per (sq, sk) in seqs
    (several: a varlen call, B = 1). With V = identity, out = P * M / (1 - p) exposes M (no window: P > 0)."""
    import fastattn  # noqa: F401  (loads fastattn._C, which registers the CPU kernels)
    if not hasattr(torch.ops.fastattn, "fwd"):
        pytest.skip("fastattn._C (the CPU kernels) not built: no reference dropout mask")
    dv = max(sk for _, sk in seqs)
    q = torch.randn(B, H, sum(sq for sq, _ in seqs), 16)
    k = torch.randn(B, H, sum(sk for _, sk in seqs), 16)
    v = torch.cat([torch.eye(sk, dv) for _, sk in seqs]).expand(B, H, -1, dv).contiguous()  # V_n = I (sk_n rows)
    var = (None, None, 0, 0)
    if len(seqs) > 1:
        var = (_cu([s for s, _ in seqs]), _cu([s for _, s in seqs]), max(s for s, _ in seqs), dv)
    out, _ = torch.ops.fastattn.fwd(q, k, v, None, *var, 0.05, -1, -1, True, 0.0, None, dropout_p, seed, offset,
                                    False)
    masks, row = [], 0
    for sq, sk in seqs:
        masks.append(out[:, :, row:row + sq, :sk] != 0)
        row += sq
    return masks


@pytest.mark.parametrize("dt", LOW, ids=["fp16", "bf16"])
def test_dropout_mask_is_the_cpu_kernels(dt):
    """Same (seed, offset, p): the CUDA kernel drops exactly the elements the CPU kernel drops (72 keys: two key
    tiles, one partial; 33 queries; GQA)."""
    B, H, Hkv, Sq, Sk, D, p_drop, seed, offset = 2, 4, 2, 33, 72, 64, 0.25, 1234, 7
    (want,) = _cpu_keep_masks(B, H, [(Sq, Sk)], p_drop, seed, offset)
    q, k = torch.randn(B, H, Sq, D, dtype=dt), torch.randn(B, Hkv, Sk, D, dtype=dt)
    v = torch.eye(Sk, dtype=dt).expand(B, Hkv, Sk, Sk).contiguous()
    out, _ = emu().fwd(q, k, v, None, None, 0, 0, 0.05, -1, -1, True, p_drop, seed, offset)  # no P underflows
    got = out != 0
    assert 0.6 < got.float().mean().item() < 0.9
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} keep decisions differ"


@pytest.mark.parametrize("case", ["gqa_sq97_sk17_causal_br_d40", "window_tl_d128_sq80_sk48",
                                  "gqa_causal_d256_sq40_sk70", "varlen_empty_causal_d64"])
def test_dropout_fwd_bwd_match_oracle(case):
    """Forward and gradients with dropout against the oracle run with the CPU kernel's mask."""
    c, dt, p_drop, seed, offset = ATTN[case], torch.bfloat16, 0.2, 99, 3
    q, k, v = _attn_inputs(c, dt)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=dt)
    if "seqlens" in c:
        mask = _cpu_keep_masks(1, c["H"], list(c["seqlens"]), p_drop, seed, offset)
    else:
        (mask,) = _cpu_keep_masks(c["B"], c["H"], [(c["Sq"], c["Sk"])], p_drop, seed, offset)
    got = _emu_fwd_bwd(c, q, k, v, dout, p_drop, seed, offset)
    _check_attn(c, dt, q, k, v, dout, got, mask, p_drop)


# ================================================================ bad varlen values stay inside the tensors
BAD_CU = {  # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) over q, k with 40 rows
    "first_negative": ([-30, 10, 40], [0, 20, 40], 64, 64),
    "first_far_negative": ([0, 20, 40], [-(2 ** 30), 20, 40], 64, 64),
    "decreasing": ([0, 30, 10, 40], [0, 5, 30, 40], 40, 40),
    "past_the_end": ([0, 20, 1000], [0, 39, 2 ** 31 - 1], 2000, 2 ** 31 - 1),
    "max_seqlen_too_small": ([0, 20, 40], [0, 20, 40], 5, 3),
}


@pytest.mark.parametrize("name", list(BAD_CU))
def test_varlen_bad_cu_seqlens_stay_inside_the_tensors(name):
    """The CUDA op does not read cu_seqlens on the host (that would sync every call): the kernels clamp each
    sequence's rows into the tensors, so bad values give wrong rows, never accesses outside them (the emulator
    fails any cp.async read outside the inputs; a stray write would corrupt this process)."""
    cu_q, cu_k, mq, mk = BAD_CU[name]
    T = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.float16) for _ in range(3))
    out, lse = emu().fwd(q, k, v, T(cu_q), T(cu_k), mq, mk, 0.125, -1, 0, True, 0.0, 0, 0)
    dout = torch.randn_like(out)
    dq, dk, dv = emu().bwd(dout, q, k, v, out, lse, T(cu_q), T(cu_k), mq, mk, 0.125, -1, 0, True, 0.0, 0, 0)
    assert out.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape


# ================================================================ the emulator catches each bug class
@pytest.mark.parametrize("name,error", [("divergent_shuffle", "divergent warp collective"),
                                        ("partial_barrier", "divergent warp collective|__syncthreads"),
                                        ("cp_async_outside", "outside every tensor")])
def test_emulator_rejects_planted_bug(name, error):
    with pytest.raises(RuntimeError, match=error):
        emu().selftest(name)


def test_emulator_poisons_unwritten_shared_memory():
    out = emu().selftest("read_unwritten_shared")
    assert (out[:64] == 1).all() and out[64:].isnan().all()


def test_emulator_delayed_copies_expose_a_missing_wait():
    assert torch.equal(emu().selftest("missing_wait"), torch.arange(128.0))  # copies land at once by default
    emu().set_options(delay_copies=True)
    assert emu().selftest("missing_wait").isnan().all()  # ... or only at their wait_group: none here


def test_dropout_check_fails_with_another_mask():
    """Control: the same comparison with the CPU mask of another offset must fail — the dropout checks above can
    tell a wrong mask (e.g. a backward that regenerates a different one)."""
    c, dt, p_drop, seed = ATTN["window_tl_d128_sq80_sk48"], torch.bfloat16, 0.2, 99
    q, k, v = _attn_inputs(c, dt)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=dt)
    (other,) = _cpu_keep_masks(c["B"], c["H"], [(c["Sq"], c["Sk"])], p_drop, seed, 4)
    got = _emu_fwd_bwd(c, q, k, v, dout, p_drop, seed, 3)
    with pytest.raises(AssertionError):
        _check_attn(c, dt, q, k, v, dout, got, other, p_drop)


# ================================================================ seeded fuzz
# Random FlashAttention-2 forward+backward and split-KV decode calls on the emulator, against the float64 oracle:
# lengths around the kernels' tile edges (63/64/65, 127/128/129), head dims 8-256 (Dv != D too), GQA, causal in both
# alignments, two-sided windows, varlen batches with empty sequences, the (B, S, H, D) layout; for decode dense /
# batch-index / paged caches of 1-1025 keys with ragged lengths, windows, softcap, ALiBi and 1-64 splits on 1-132 SMs.
# The fixed cases above pin chosen corners; no GPU has run these kernels yet, so every configuration checked here is
# one the first GPU session need not debug. The seed is printed and in every failure message; replay with
# FASTATTN_EMU_FUZZ_SEED=<seed> and -k "fuzz and case17-"; FASTATTN_EMU_FUZZ_CASES sets the number of attention
# cases (decode draws twice as many).
FUZZ_SEED = int(os.environ.get("FASTATTN_EMU_FUZZ_SEED", random.SystemRandom().randrange(2 ** 31)))
FUZZ_CASES = int(os.environ.get("FASTATTN_EMU_FUZZ_CASES", "40"))
FUZZ_LENGTHS = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 127, 128, 129, 150, 200)
print(f"[emulated fuzz seed {FUZZ_SEED}] replay with FASTATTN_EMU_FUZZ_SEED={FUZZ_SEED}")


def draw_attention(idx: int):
    """(a case dict like ATTN's, dtype)."""
    r = random.Random(FUZZ_SEED * 1_000_003 + idx)
    Hkv = r.choice([1, 2])
    c = dict(H=Hkv * r.choice([1, 2, 3]), Hkv=Hkv, D=r.choice([8, 16, 20, 32, 40, 64, 72, 80, 96, 128, 160, 256]))
    if r.random() < 0.2:
        c["Dv"] = r.choice([8, 16, 32, 48, 64])
    if r.random() < 0.2:
        lengths = FUZZ_LENGTHS + (0,)
        c["seqlens"] = tuple((r.choice(lengths), r.choice(lengths)) for _ in range(r.randint(1, 3)))
    else:
        c.update(B=r.choice([1, 2]), Sq=r.choice(FUZZ_LENGTHS), Sk=r.choice(FUZZ_LENGTHS))
        if r.random() < 0.3:
            c["layout"] = "bshd"
    w = r.random()
    if w < 0.35:
        c["window"] = (-1, 0)  # causal
    elif w < 0.55:
        c["window"] = (r.randint(0, 100), r.randint(-1, 50))
    c["br"] = r.random() < 0.6
    return c, r.choice([torch.float16, torch.bfloat16])


def draw_decode(idx: int):
    """(a case dict like DECODE's, num_splits, SMs); at most 8 query rows per KV head (the kernel's
    limit: wider calls go to the prefill kernels)."""
    r = random.Random(FUZZ_SEED * 2_000_003 + idx)
    Hkv = r.choice([1, 2, 3])
    Sq = r.choice([1, 1, 2, 3, 4, 8])
    group = r.choice([g for g in (1, 2, 4, 8) if g * Sq <= 8])
    D = r.choice([8, 16, 32, 40, 64, 80, 96, 128, 256])
    cap, B = r.choice([1, 8, 31, 64, 65, 127, 256, 300, 511, 700, 1025]), r.choice([1, 2, 3])
    c = dict(B=B, Hq=Hkv * group, Hkv=Hkv, Sq=Sq, D=D, Dv=D if r.random() < 0.8 else r.choice([8, 16, 32, 48]),
             cap=cap, lens=[r.randint(0, cap) for _ in range(B)],
             layout=r.choice(["dense", "batch_idx", "paged16", "paged32", "paged64", "paged256"]),
             dtype=r.choice([torch.float32, torch.float16, torch.bfloat16]), noncontig=r.random() < 0.2)
    w = r.random()
    if w < 0.4:
        c["window"] = (-1, 0)
    elif w < 0.6:
        c["window"] = (r.randint(0, 300), r.choice([-1, 0, r.randint(0, 10)]))
    if r.random() < 0.15:
        c["softcap"] = round(r.uniform(1.0, 10.0), 1)
    if r.random() < 0.2:
        c["alibi"] = r.choice(["per_head", "per_batch"])
    return c, r.choice([0, 1, 3, 7, 64]), r.choice([132, 16, 1])


@pytest.mark.parametrize("idx", range(FUZZ_CASES), ids=lambda i: f"case{i}-")
def test_attention_fuzz(idx):
    c, dt = draw_attention(idx)
    what = f"case {idx} (seed {FUZZ_SEED}): {c} {str(dt)[6:]}"
    print(what)
    torch.manual_seed(FUZZ_SEED * 7 + idx)
    q, k, v = _attn_inputs(c, dt)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=dt)
    out, lse, grads = _emu_fwd_bwd(c, q, k, v, dout)
    ref = _oracle_fwd_bwd(c, q, k, v, dout, torch.float64)
    base = _oracle_fwd_bwd(c, q, k, v, dout, dt)
    results = [check_rule("out", out, ref[0], base[0], dt), check_rule("lse", lse, ref[1], base[1], dt)]
    # dQ / dK of a row or key with one visible partner are exactly 0 (their rounding noise is not): bound them by the
    # largest gradient; and add the error the stored O forces through delta, as tests/test_fuzz.py does
    mag = max((float(r.abs().max()) for r in ref[2] if r.numel()), default=0.0)  # (all empty: no sequence has a token)
    ident = lambda t: t  # noqa: E731
    inherent = delta_error(lambda *t: _oracle_out(c, *t), q, k, ident, ident, dout, out, ref[0], c["D"] ** -0.5) \
        + (0.0,) if q.numel() and k.numel() else (0.0, 0.0, 0.0)
    for name, g, r, b, e in zip(("dq", "dk", "dv"), grads, ref[2], base[2], inherent):
        results.append(check_rule(name, g, r, b, dt, magnitude=mag, inherent=e))
    bad = [m for ok, m in results if not ok]
    assert not bad, what + "\n" + "\n".join(bad)


@pytest.mark.parametrize("idx", range(2 * FUZZ_CASES), ids=lambda i: f"case{i}-")
def test_decode_fuzz(idx):
    c, num_splits, sms = draw_decode(idx)
    print(f"case {idx} (seed {FUZZ_SEED}): {c} num_splits={num_splits} sms={sms}")
    torch.manual_seed(FUZZ_SEED * 11 + idx)
    _run_decode(c, num_splits, sms)
