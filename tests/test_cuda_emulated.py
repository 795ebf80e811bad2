"""fastattn's CUDA kernels (csrc/cuda), EXECUTED on the CPU: the exact kernel source compiled as host C++ against a
CUDA emulator (tests/cuda_emu/emu.h: fiber threads, block barriers, warp shuffles, cp.async, ldmatrix and mma.sync
implemented from the PTX ISA fragment layouts), with the host-side parameter planning of the real ops, compared with
the float64 oracle under the project's tolerance rule. Index math, masking, splits, pipelines, shuffles and fragment
layouts are really run here, without a GPU; divergent warp collectives, __syncthreads that not every thread
reaches, reads of unwritten shared memory (poisoned with NaN bytes before every block) and cp.async reads outside
the input tensors fail loudly. What it cannot show: timing-dependent races between warps beyond the two schedules
tried here, and the tensor cores' exact summation order (fp32 here)."""
import functools
import glob
import os
import shutil
import tempfile

import pytest
import torch

from oracle import assert_rule, oracle_attention
from test_decode import lse_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")


def _cuda_include():
    """The CUDA toolkit's include dir (cuda_fp16.h / cuda_bf16.h / cuda_runtime.h), found like setup.py finds
    CUDA_HOME, without needing nvcc: only the headers are used."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and all(os.path.exists(os.path.join(c, "include", h)) for h in ("cuda_runtime.h", "cuda_fp16.h",
                                                                             "cuda_bf16.h")):
            return os.path.join(c, "include")
    return None


CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h, "
                                "cuda_bf16.h) not found: set CUDA_HOME; the emulated kernels compile against them")


@functools.lru_cache(maxsize=None)
def emu():
    """The emulated kernels, JIT-built once per source change (cached under the temp dir, ~1-3 min cold)."""
    from torch.utils import cpp_extension
    build = os.path.join(tempfile.gettempdir(), f"fastattn_cuda_emu_{os.getuid()}")
    os.makedirs(build, exist_ok=True)
    sources = [os.path.join(EMU, f) for f in ("bind.cpp", "decode_emu.cpp")]
    return cpp_extension.load(
        name="fastattn_cuda_emu", sources=sources, build_directory=build,
        extra_include_paths=[os.path.join(ROOT, "csrc"), EMU, CUDA_INCLUDE],
        extra_cflags=["-O2", "-DFASTATTN_CUDA_EMULATE"], verbose=False)


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
        assert_rule(f"lse[{b}]", lse[b:b + 1], lref, lbase, dt)


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


def test_decode_shared_memory_is_poisoned():
    """The emulator found the kernels' __shared__ statics (it fills them with NaN bytes before every block)."""
    assert emu().shared_statics() >= 5
