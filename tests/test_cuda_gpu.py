"""CUDA-specific GPU tests for the `cuda` backend (csrc/cuda). The shared matrix (test_matrix.py) already runs
every declared feature on small odd shapes; here: realistic sizes against the float64 oracle (several key
tiles, ragged tile ends, every kernel head dim), bitwise determinism of the backward, unaligned inputs, dropout
(the CUDA keep mask is bitwise the CPU one for the same seed/offset; gradients with the forward's mask), block
calls (q_start/k_start, out_fp32, bwd_acc: a call cut into block pairs and merged equals the unsplit call, dropout
mask included), and a compute-sanitizer memcheck/racecheck run on tiny shapes."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from support.blocks import cuts, reference_merge_
from support.cases import Case, run_case
from support.oracle import assert_fwd_bwd, assert_rule, fwd_bwd_inherent, oracle_attention

import fastattn

HAS_CUDA = torch.cuda.is_available()
CUDA_REASONS = [] if not HAS_CUDA else fastattn.get_backend("cuda").unavailable()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (the cuda backend runs only on GPUs)"),
    pytest.mark.skipif(bool(CUDA_REASONS), reason=f"cuda backend unavailable: {'; '.join(CUDA_REASONS)}"),
]

LOW = (torch.float16, torch.bfloat16)

BIG = [
    Case("big_causal_d128", B=2, Hq=8, Hkv=2, Sq=1025, Sk=1025, D=128, causal=True),
    Case("big_d64_sq_ne_sk", B=2, Hq=4, Hkv=4, Sq=513, Sk=1000, D=64),
    Case("big_flash_br_d96", surface="flash", B=1, Hq=6, Hkv=3, Sq=300, Sk=777, D=96, causal=True),
    Case("big_flash_window_d32", surface="flash", B=2, Hq=4, Hkv=1, Sq=700, Sk=700, D=32, window=(100, 20)),
    Case("big_d256", B=1, Hq=4, Hkv=4, Sq=333, Sk=517, D=256, causal=True),
    Case("big_d40_dv72", surface="flash", B=2, Hq=4, Hkv=2, Sq=257, Sk=255, D=40, Dv=72),
    Case("big_varlen_causal", surface="varlen", Hq=8, Hkv=2, D=128, causal=True,
         seqlens=((1000, 1000), (1, 300), (257, 63), (0, 5), (64, 64))),
    Case("big_noncontig_d80", B=2, Hq=4, Hkv=4, Sq=400, Sk=400, D=80, noncontig=True, causal=True),
]


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", BIG, ids=[c.name for c in BIG])
def test_large_vs_oracle(case, dtype):
    results = run_case("cuda", case, dtype, "cuda")
    for ok, msg in results:
        print(msg)
    bad = [m for ok, m in results if not ok]
    assert not bad, f"cuda {case.name} {dtype}: " + " | ".join(bad)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_backward_bitwise_deterministic(dtype):
    # GQA + causal + several key and query tiles: any atomics in the gradients would show here.
    B, S, Hq, Hkv, D = 2, 777, 8, 2, 128
    q, k, v = (torch.randn(B, S, h, D, device="cuda", dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype)
    grads = []
    for _ in range(3):
        out = fastattn.flash_attn_func(q, k, v, causal=True, deterministic=True, backend="cuda")
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for rerun in grads[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), grads[0], rerun):
            assert torch.equal(a, b), f"{name} differs between identical runs: max diff {(a - b).abs().max()}"


def test_unaligned_inputs_vs_oracle():
    # Base pointers off by one element and an odd head dim take the entry point's aligned-copy path; the
    # gradients must still land in the caller's (strided) layout.
    base = torch.randn(2, 4, 130, 45, device="cuda", dtype=torch.float16)
    q = base[:, :, 1:129, 1:38].detach().requires_grad_()  # (2, 4, 128, 37), rows not 16-byte aligned
    k = base[:, :, :100, 3:40].detach().requires_grad_()
    v = base[:, :, 30:130, 4:45].detach().requires_grad_()  # Dv = 41
    dout = torch.randn(2, 4, 128, 41, device="cuda", dtype=torch.float16)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    scale = 37 ** -0.5
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves16 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves64, scale=scale, window=(-1, 0))
    low = oracle_attention(*leaves16, scale=scale, window=(-1, 0), dtype=torch.float16)
    assert_rule("out", out, ref, low, torch.float16)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves64, dout.double()),
                             torch.autograd.grad(low, leaves16, dout)):
        assert g.shape == r.shape
        assert_rule(name, g, r, b, torch.float16)


def _sanitizer():
    cands = [shutil.which("compute-sanitizer")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            cands.append(os.path.join(root, "bin", "compute-sanitizer"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, fastattn
    torch.manual_seed(0)
    for dt, d in ((torch.float16, 64), (torch.bfloat16, 40), (torch.float16, 256)):
        q = torch.randn(1, 37, 4, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(1, 21, 2, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(1, 21, 2, d, device="cuda", dtype=dt, requires_grad=True)
        for causal in (False, True):
            out = fastattn.flash_attn_func(q, k, v, causal=causal, backend="cuda")
            out.sum().backward()
            out = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=causal, backend="cuda")
            out.sum().backward()
        cu = torch.tensor([0, 5, 5, 37], dtype=torch.int32, device="cuda")
        cuk = torch.tensor([0, 9, 12, 21], dtype=torch.int32, device="cuda")
        out = fastattn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cuk, 32, 9, causal=True, backend="cuda")
        out.sum().backward()
    # split-KV decode kernels (csrc/cuda/decode_kernel.cuh): paged cache with ragged lengths, GQA, 1 and 3 splits
    for dt in (torch.float16, torch.float32):
        kc = torch.randn(9, 16, 2, 64, device="cuda", dtype=dt)
        vc = torch.randn(9, 16, 2, 64, device="cuda", dtype=dt)
        bt = torch.randperm(9, device="cuda")[:8].view(2, 4).int()
        lens = torch.tensor([50, 0], dtype=torch.int32, device="cuda")
        qd = torch.randn(2, 4, 2, 64, device="cuda", dtype=dt)  # (B, Hq, Sq, D): 4 query rows per kv head
        for splits in (1, 3):
            torch.ops.fastattn.decode_fwd(qd, kc, vc, lens, bt, None, 0.125, -1, 0, 0.0, None, splits)
    torch.cuda.synchronize()
    print("sanitizer workload done")
""")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool, tmp_path):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (CUDA toolkit bin/ not on PATH and CUDA_HOME unset)")
    script = tmp_path / "workload.py"
    script.write_text(SANITIZER_SCRIPT)
    # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past a
    # tensor's end (inside a cached block it would land in memory the tool counts as allocated).
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    r = subprocess.run([exe, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=900, env=env)
    log = r.stdout + r.stderr
    print(log[-4000:])
    assert "sanitizer workload done" in log, f"workload did not finish under {tool}"
    # memcheck ends with "ERROR SUMMARY: 0 errors", racecheck with "RACECHECK SUMMARY: 0 hazards displayed (0
    # errors, 0 warnings)" (compute-sanitizer 2025.3, seen on an H200)
    clean = "ERROR SUMMARY: 0 errors" in log or "SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" in log
    assert r.returncode == 0 and clean, f"{tool} reported errors:\n{log[-4000:]}"


# Dropout: V = identity makes out[..., i, j] = P_ij * keep_ij / (1 - p), so out != 0 is the keep mask (every
# visible P is well above fp16's smallest subnormal at these sizes). Dv = Sk picks the kernel head dim.
DROP_CASES = [  # (name, B, Hq, Hkv, Sq, Sk, D, causal): kernel head dims 64, 128, 256; several query/key tiles
    ("d64_gqa", 2, 4, 2, 200, 37, 16, False),
    ("d128_causal", 1, 3, 1, 150, 100, 40, True),
    ("d256", 1, 2, 2, 97, 200, 64, False),
]


def _drop_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (0.5 * torch.randn(B, Hq, Sq, D, generator=g)).to(device=device, dtype=dtype)
    k = (0.5 * torch.randn(B, Hkv, Sk, D, generator=g)).to(device=device, dtype=dtype)
    v = torch.eye(Sk).expand(B, Hkv, Sk, Sk).to(device=device, dtype=dtype).contiguous()
    return q, k, v


def _fwd(q, k, v, causal, p, seed, offset):
    return torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, q.shape[-1] ** -0.5, -1, 0 if causal else -1,
                                  False, 0.0, None, p, seed, offset, False)


@pytest.mark.parametrize("case", DROP_CASES, ids=[c[0] for c in DROP_CASES])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_dropout_mask_bitwise_equals_cpu(case, dtype):
    """Same (seed, offset, p): the CUDA kernels drop exactly the elements the CPU kernels drop (csrc/philox.h)."""
    _, B, Hq, Hkv, Sq, Sk, D, causal = case
    q, k, v = _drop_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, "cuda")
    for p, seed, offset in ((0.3, 2**62 - 5, 17), (0.75, 1, 0)):
        out_cuda, lse_cuda = _fwd(q, k, v, causal, p, seed, offset)
        out_cpu, lse_cpu = _fwd(q.float().cpu(), k.float().cpu(), v.float().cpu(), causal, p, seed, offset)
        mask_cuda, mask_cpu = out_cuda.cpu() != 0, out_cpu != 0
        assert 0.1 < mask_cpu.float().mean().item() < 0.9
        assert torch.equal(mask_cuda, mask_cpu), f"{(mask_cuda != mask_cpu).sum().item()} keep decisions differ"
        # kept values carry 1 / (1 - p); lse ignores dropout
        torch.testing.assert_close(out_cuda.float().cpu(), out_cpu, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(lse_cuda.cpu(), lse_cpu, rtol=1e-3, atol=1e-3)


def test_dropout_mask_varlen_equals_cpu():
    """Varlen: the counters use the sequence index and in-sequence positions on both devices."""
    cu_q = torch.tensor([0, 70, 71, 201], dtype=torch.int32)  # sequences (Sq, Sk): (70, 40), (1, 9), (130, 33)
    cu_k = torch.tensor([0, 40, 49, 82], dtype=torch.int32)
    q, k, v = _drop_inputs(1, 2, 2, 201, 82, 32, torch.float16, "cuda")
    args = (130, 40, 32 ** -0.5, -1, 0, False, 0.0, None, 0.4, 123, 45, False)  # causal, p = 0.4
    out_cuda, _ = torch.ops.fastattn.fwd(q, k, v, None, cu_q.cuda(), cu_k.cuda(), *args)
    out_cpu, _ = torch.ops.fastattn.fwd(q.float().cpu(), k.float().cpu(), v.float().cpu(), None, cu_q, cu_k, *args)
    mask_cuda, mask_cpu = out_cuda.cpu() != 0, out_cpu != 0
    assert mask_cpu.any()
    assert torch.equal(mask_cuda, mask_cpu), f"{(mask_cuda != mask_cpu).sum().item()} keep decisions differ"


@pytest.mark.parametrize("case", DROP_CASES, ids=[c[0] for c in DROP_CASES])
def test_dropout_grads_vs_oracle(case):
    """dQ, dK, dV with dropout against the float64 oracle run with the forward's mask (read off out): the dK/dV
    and dQ kernels must regenerate that mask, in both of their tile layouts."""
    _, B, Hq, Hkv, Sq, Sk, D, causal = case
    dtype, p = torch.float16, 0.25
    q, k, v = (t.requires_grad_() for t in _drop_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, "cuda", seed=1))
    out, _ = _fwd(q, k, v, causal, p, 987654321, 3)
    mask = out.detach() != 0
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    window = (-1, 0) if causal else (-1, -1)
    assert_fwd_bwd("", (out, *grads), q, k, v, dout, dtype, scale=D ** -0.5, window=window, dropout_mask=mask,
                   dropout_p=p)


# ---------------------------------------------------------------- block calls (issue #14)
# The unsplit call (bottom-right or top-left) cut into query/key blocks at odd boundaries; every pair runs with its
# global positions (q_start/k_start), out_fp32, and the pairs merge in fp32 (tests/support/blocks.py reference_merge_). (name,
# B, Hq, Hkv, Sq, Sk, D, window, bottom_right, q_cuts, k_cuts): several tiles per block, empty pairs included.
BLOCK_CASES = [
    ("causal_br_gqa_d128", 2, 8, 2, 777, 1001, 128, (-1, 0), True, [200, 517], [301, 555, 803]),
    ("window_tl_d64", 1, 4, 4, 640, 600, 64, (100, 20), False, [129, 387], [63, 250, 421]),
    ("causal_sq_gt_sk_d256", 1, 2, 1, 300, 190, 256, (-1, 0), True, [150], [77]),
]


def _block_pairs(Sq, Sk, q_cuts, k_cuts, base):
    """(q slice, k slice, q_start, k_start) of every block pair; base = the unsplit call's Sk - Sq alignment,
    shifted so that no position is negative."""
    shift = max(0, -base)
    return [(slice(a0, a1), slice(b0, b1), shift + base + a0, shift + b0)
            for a0, a1 in cuts(Sq, q_cuts) for b0, b1 in cuts(Sk, k_cuts)]


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_block_split_equals_unsplit(case, dtype):
    """Merged block pairs == the unsplit call and the float64 oracle (out, lse); bwd_acc over every pair with the
    merged out/lse == the unsplit gradients; the unsplit call with offsets is bitwise the aligned one."""
    _, B, Hq, Hkv, Sq, Sk, D, window, br, q_cuts, k_cuts = case
    scale = D ** -0.5
    q, k, v = (torch.randn(B, h, s, D, device="cuda", dtype=dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    dout = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dtype)
    T = lambda x: torch.full((B,), x, dtype=torch.int32, device="cuda")  # noqa: E731
    common = (None, None, None, 0, 0, scale, window[0], window[1])
    plain = torch.ops.fastattn.fwd(q, k, v, *common, br, 0.0, None, 0.0, 0, 0, False)
    pairs = _block_pairs(Sq, Sk, q_cuts, k_cuts, Sk - Sq if br else 0)
    shift = pairs[0][3]
    offs = torch.ops.fastattn.fwd(q, k, v, *common, False, 0.0, None, 0.0, 0, 0, False, T(pairs[0][2]), T(shift))
    assert torch.equal(plain[0], offs[0]) and torch.equal(plain[1], offs[1])
    o_acc = torch.zeros(B, Hq, Sq, D, device="cuda")
    l_acc = torch.full((B, Hq, Sq), float("inf"), device="cuda")
    for qs, ks, q0, k0 in pairs:
        o, l = torch.ops.fastattn.fwd(q[:, :, qs], k[:, :, ks], v[:, :, ks], *common, False, 0.0, None, 0.0, 0, 0,
                                      False, T(q0), T(k0), True)
        ob, lb = o_acc[:, :, qs], l_acc[:, :, qs]  # views: merged in place
        reference_merge_(ob, lb, o, l)
    out = o_acc.to(dtype)
    acc = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    for qs, ks, q0, k0 in pairs:
        torch.ops.fastattn.bwd_acc(dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                                   l_acc[:, :, qs], *common, False, 0.0, None, 0.0, 0, 0, False, T(q0), T(k0),
                                   acc[0][:, :, qs], acc[1][:, :, ks], acc[2][:, :, ks])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves, scale=scale, window=window, bottom_right=br)
    base = oracle_attention(*low, scale=scale, window=window, bottom_right=br, dtype=dtype)
    assert_rule("merged out", out, ref, base, dtype)
    assert_rule("unsplit out", plain[0], ref, base, dtype)
    torch.testing.assert_close(l_acc, plain[1], rtol=1e-4, atol=1e-4)  # +inf rows must match exactly
    attend = lambda q_, k_, v_: oracle_attention(q_, k_, v_, scale=scale, window=window, bottom_right=br)  # noqa: E731
    inherent = fwd_bwd_inherent(attend, q, k, dout, out, ref, scale)[1:]
    for name, g, r, b, e in zip(("dq", "dk", "dv"), acc, torch.autograd.grad(ref, leaves, dout.double()),
                                torch.autograd.grad(base, low, dout), inherent):
        assert_rule(name + " (bwd_acc sum)", g, r, b, dtype, inherent=e)


def test_block_dropout_mask_equals_unsplit():
    """Dropout keyed on global positions: the keep masks of the block pairs (k_start odd and multiple of 4, so both
    kernel draw paths) tile the unsplit call's mask exactly; and equal the CPU op's once it takes block coordinates."""
    B, Hq, Hkv, Sq, Sk, D, p, seed, offset = 2, 4, 2, 150, 200, 40, 0.3, 2**40 + 7, 11
    q, k, v = _drop_inputs(B, Hq, Hkv, Sq, Sk, D, torch.float16, "cuda")
    T = lambda x: torch.full((B,), x, dtype=torch.int32, device="cuda")  # noqa: E731
    args = (None, None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, p, seed, offset, False)
    whole = torch.ops.fastattn.fwd(q, k, v, *args, T(0), T(0), True)[0] != 0
    assert torch.equal(whole, _fwd(q, k, v, False, p, seed, offset)[0] != 0)  # offsets 0: today's mask
    got = torch.zeros_like(whole)
    for qs, ks, q0, k0 in _block_pairs(Sq, Sk, [61], [37, 100, 163], 0):
        # v[:, :, ks] keeps all Sk columns of the identity: out[..., j] is nonzero only for this block's keys
        o, _ = torch.ops.fastattn.fwd(q[:, :, qs], k[:, :, ks], v[:, :, ks], *args, T(q0), T(k0), True)
        got[:, :, qs, ks] = o[:, :, :, ks] != 0
    assert torch.equal(got, whole), f"{(got != whole).sum().item()} keep decisions differ"
    try:
        cpu = torch.ops.fastattn.fwd(q.float().cpu(), k.float().cpu(), v.float().cpu(), *args,
                                     torch.full((B,), 9, dtype=torch.int32), torch.full((B,), 5, dtype=torch.int32))
    except RuntimeError as e:
        if "not yet implemented" in str(e):
            pytest.skip(f"the CPU op does not implement block coordinates yet ({e})")
        raise
    cuda = torch.ops.fastattn.fwd(q, k, v, *args, T(9), T(5))
    assert torch.equal(cuda[0].cpu() != 0, cpu[0] != 0)
