"""Block sizes: autotune configs for sm80/sm90 with prune predicates, and the single config the interpreter uses.

The autotune key holds the *bucketed* lengths (next power of two) plus the head dims and feature switches, so a
BERT batch with a new padded length reuses the tuned config instead of retuning. Triton caches compiled kernels
on disk (~/.triton/cache, TRITON_CACHE_DIR) and reuses them across processes by default; autotune results are cached
on disk too where triton.autotune takes `cache_results` (triton >= 3.2; op.py passes it)."""
from __future__ import annotations

import functools

import torch
import triton

# Under TRITON_INTERPRET=1 every tl op is a numpy call: one small config, no tuning.
INTERP_FWD = dict(BLOCK_M=32, BLOCK_N=32)
INTERP_DKDV = dict(BLOCK_M=32, BLOCK_N=32)
INTERP_DQ = dict(BLOCK_M=32, BLOCK_N=32)
PRE_BLOCK_M = 64  # backward preprocess rows per program

KEY = ["BUCKET_Q", "BUCKET_K", "HEAD_D", "HEAD_DV", "IS_VARLEN", "BOTTOM_RIGHT", "WINDOW_LEFT", "WINDOW_RIGHT",
       "SOFTCAP", "ALIBI", "BIAS", "DROPOUT", "PRECISION", "HAS_START"]


def pow2(n: int) -> int:
    """triton.next_power_of_2 for n >= 1 in plain Python (that one costs 1-2 us a call, several per launch)."""
    return 1 << (n - 1).bit_length()


def bucket(n: int) -> int:
    return pow2(max(int(n), 16))


@functools.lru_cache(maxsize=None)
def _device_smem() -> tuple:
    """(capability, usable shared memory bytes per block) of the current CUDA device."""
    if not torch.cuda.is_available():
        return (0, 0), 0
    cap = torch.cuda.get_device_capability()
    try:
        dev = torch.cuda.current_device()
        smem = triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"]
    except Exception:  # older drivers API: known values for sm90 / sm80 / consumer parts
        smem = {(9, 0): 232448, (8, 0): 166912}.get(cap, 101376)
    return cap, smem


def _cfgs(block_ms, block_ns, stages):
    # 4 warps for 64-row tiles, 8 for 128-row tiles (16 rows per warp, as FlashAttention-2)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=8 if max(bm, bn) >= 128 else 4, num_stages=s)
            for bm in block_ms for bn in block_ns for s in stages]


FWD_CONFIGS = _cfgs((64, 128), (32, 64, 128), (2, 3, 4))
DKDV_CONFIGS = _cfgs((32, 64), (32, 64, 128), (2, 3))
DQ_CONFIGS = _cfgs((64, 128), (32, 64), (2, 3))


# Measured with benchmarks/triton_static.py (triton 3.8, sm_90 fp16/bf16 and sm_80, the arguments op.py passes;
# benchmarks/results/triton-static-*): (kernel, BLOCK_D, BLOCK_M, BLOCK_N[, num_stages]) tiles whose ptxas output
# spills registers to local memory (LDL/STL in the SASS), which would cost every inner-loop iteration. Without
# num_stages the entry holds for every depth. Measured for fp16/bf16. fp32 (IEEE dots on the FMA units) spills on
# sm_90 at D >= 64 whatever the tile (triton 3.8, causal): fwd D=64 128x128 6.5 KB, 64x64 2.7 KB, 64x32 0.9 KB;
# fwd D=128 128x64 11 KB but 64x64 55 KB (ptxas gives up at 32 registers); dK/dV D=128 32x128 98 KB, D=64 32x32
# 4 B. Smaller tiles do not fix it, so fp32 keeps the fp16 rules: a correctness dtype on GPUs, not a fast one.
SPILLS = {
    "sm90": {("fwd", 256, 64, 64), ("fwd", 256, 64, 128), ("fwd", 256, 128, 128),  # 255 regs + 8..272 B spilled
             ("dkdv", 128, 64, 64), ("dkdv", 128, 64, 128),  # 255 regs + 24..88 B (dK, dV, S^T, dP^T in registers)
             # D=256 backward (triton 3.8; 3.6 alike where checked): every wgmma dK/dV tile spills 2.5-2.7 KB, 64x32
             # 364-416 B; only 32x32 (mma.sync) stays in registers. dQ: 64-wide tiles 8-112 B, 128x32 12 B at 3 stages.
             ("dkdv", 256, 32, 64), ("dkdv", 256, 32, 128), ("dkdv", 256, 64, 32), ("dkdv", 256, 64, 64),
             ("dkdv", 256, 64, 128), ("dq", 256, 64, 32), ("dq", 256, 64, 64), ("dq", 256, 128, 32, 3)},
    "sm80": {("fwd", 128, 128, 128),  # 255 regs + 8 B (2 stages), 64 B (3 stages)
             ("dkdv", 128, 32, 64), ("dkdv", 128, 64, 64),  # 8 B, 132..308 B spilled
             ("dkdv", 128, 32, 128), ("dkdv", 128, 64, 128),  # 3.8..15.9 KB spilled (ptxas gives up: ~32 regs)
             ("dq", 128, 128, 64)},  # 3 stages: 255 regs + 16 B
}


def _prune(configs, args, smem_bytes, kind):
    cap, smem = _device_smem()
    elt = args["Q"].element_size()
    bd, bdv = args["BLOCK_D"], args["BLOCK_DV"]
    rows, cols = args["BUCKET_Q"], args["BUCKET_K"]
    # A mask/bias tile (BLOCK_M x BLOCK_N) is held once on top of the model below, plus a little: measured on an
    # H200 (triton 3.6) for fp32 D=64 128x128, 3 stages, bool mask: 246016 B = 229376 (model) + 16384 (tile) + 256.
    bias = args.get("Bias")
    bias_elt = bias.element_size() if isinstance(bias, torch.Tensor) else 0
    keep = []
    for c in configs:
        bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        if st >= 4 and cap < (9, 0):  # deep pipelines only pay off with Hopper's larger shared memory
            continue
        if bm > max(64, rows) or bn > max(32, cols):  # tiles far larger than the sequence
            continue
        need = smem_bytes(bm, bn, st, bd, bdv, elt) + (bm * bn * bias_elt + 1024 if bias_elt else 0)
        if smem and need > smem:  # the autotuner would fail it at run time; a single heuristic config would crash
            continue
        spills = SPILLS["sm90" if cap >= (9, 0) else "sm80"]
        if (kind, bd, bm, bn) in spills or (kind, bd, bm, bn, st) in spills:
            continue
        # wgmma works on 64-row slices per warpgroup: the dK/dV dots have BLOCK_N rows, so BLOCK_N = 32 compiles
        # to mma.sync (HMMA, no HGMMA in the SASS) on sm_90. The forward and dQ dots have BLOCK_M >= 64 rows.
        # At D=256 every wgmma dK/dV tile spills (SPILLS): mma.sync without spills is the better choice there.
        if kind == "dkdv" and cap >= (9, 0) and elt <= 2 and bn < 64 and bd <= 128:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


# Shared memory in bytes, as metadata.shared measured for every config (benchmarks/triton_static.py): Triton keeps
# num_stages buffers of each pipelined tile (cp.async), the resident tile once; P / dS stay in registers.
def prune_fwd(configs, named_args, **kwargs):
    # resident Q tile + num_stages buffered K and V tiles (exact for sm_90 and sm_80, fp16/bf16, D 64-256)
    return _prune(configs, {**named_args, **kwargs},
                  lambda bm, bn, st, bd, bdv, elt: (bm * bd + st * bn * (bd + bdv)) * elt, "fwd")


def prune_dkdv(configs, named_args, **kwargs):
    # resident K and V tiles (BLOCK_N rows) + buffered Q and dO tiles (BLOCK_M rows) + buffered fp32 lse and delta
    return _prune(configs, {**named_args, **kwargs},
                  lambda bm, bn, st, bd, bdv, elt: (bn * (bd + bdv) + st * bm * (bd + bdv)) * elt + st * bm * 8, "dkdv")


def prune_dq(configs, named_args, **kwargs):
    # resident Q and dO tiles + buffered K and V tiles
    return _prune(configs, {**named_args, **kwargs},
                  lambda bm, bn, st, bd, bdv, elt: (bm * (bd + bdv) + st * bn * (bd + bdv)) * elt, "dq")
