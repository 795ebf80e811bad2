"""Compiles the Triton kernels ahead of time for sm90 and sm80 (PTX + cubin through Triton's bundled ptxas), with
no GPU: the interpreter never runs Triton's compiler, so this is what catches code that only the compiled path
rejects (non-constexpr globals, type mismatches across branches, shared-memory overflows). Slow (~1-3 min per
kernel on 2 busy cores): marked `slow`; run with `pytest tests/test_triton_aot.py -m slow`."""
import os
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(SCRIPT))


@pytest.mark.slow
@pytest.mark.parametrize("cap,variant", [(90, "fp16"), (80, "bf16-all-features"), (90, "fp32-bias-debug")])
def test_kernels_compile_for_gpu_targets(cap, variant):
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled path, not the interpreter
    r = subprocess.run([sys.executable, SCRIPT, str(cap), variant], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# The subprocess: builds each kernel's signature from its parameter names and compiles it for the target.

PTRS = {"Q": "q", "K": "q", "V": "q", "Out": "q", "DO": "q", "DK": "q", "DV": "q", "DQ": "q", "Bias": "q",
        "Lse": "fp32", "Delta": "fp32", "Alibi": "fp32", "CuQ": "i32", "CuK": "i32", "Stats": "i32"}
FLOATS = {"qk_scale2", "cap_in", "cap_out2", "dropout_p", "scale"}
I64 = {"seed", "rng_offset"}


def _compile(fn, const, dt, cap, none, warps, stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, cx = {}, {}
    for name in fn.arg_names:
        if name in const or name in none:
            sig[name] = "constexpr"
            cx[name] = const.get(name)
        elif name in PTRS:
            sig[name] = "*" + (dt if PTRS[name] == "q" else PTRS[name])
        else:
            sig[name] = "fp32" if name in FLOATS else ("i64" if name in I64 else "i32")
    t = time.time()
    k = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    print(f"{fn.__name__} sm{cap} {dt}: {time.time() - t:.0f}s, shared memory {k.metadata.shared} B", flush=True)


def _main(cap, variant):
    sys.path.insert(0, ROOT)
    from fastattn.kernels.triton.bwd_dkdv import attn_bwd_dkdv
    from fastattn.kernels.triton.bwd_dq import attn_bwd_dq
    from fastattn.kernels.triton.bwd_preprocess import attn_bwd_preprocess
    from fastattn.kernels.triton.fwd import attn_fwd
    base = dict(HEAD_D=80, HEAD_DV=80, BLOCK_D=128, BLOCK_DV=128, IS_VARLEN=False, BOTTOM_RIGHT=True,
                WINDOW_LEFT=False, WINDOW_RIGHT=True, SOFTCAP=False, ALIBI=False, BIAS=0, DROPOUT=False,
                PRECISION="tf32", UPCAST=False, DEBUG=False)
    none = ["Alibi", "CuQ", "CuK", "Stats", "Bias"]
    if variant == "fp16":
        dt, const = "fp16", base
    elif variant == "bf16-all-features":
        dt = "bf16"
        const = dict(base, IS_VARLEN=True, WINDOW_LEFT=True, SOFTCAP=True, ALIBI=True, DROPOUT=True)
        none = ["Stats", "Bias"]
    else:
        dt = "fp32"
        const = dict(base, HEAD_D=64, HEAD_DV=64, BLOCK_D=64, BLOCK_DV=64, BIAS=2, DEBUG=True, PRECISION="ieee")
        none = ["Alibi", "CuQ", "CuK"]
    _compile(attn_fwd, dict(const, BLOCK_M=128, BLOCK_N=64), dt, cap, none, 8, 3)
    _compile(attn_bwd_dkdv, dict(const, BLOCK_M=32, BLOCK_N=128), dt, cap, none, 8, 2)
    _compile(attn_bwd_dq, dict(const, BLOCK_M=64, BLOCK_N=64), dt, cap, none, 4, 2)
    _compile(attn_bwd_preprocess, dict(BLOCK_M=64, BLOCK_DV=128, HEAD_DV=80), dt, cap, [], 4, 1)


if __name__ == "__main__":
    _main(int(sys.argv[1]), sys.argv[2])
