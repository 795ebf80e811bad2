"""Compiles the Triton kernels ahead of time for sm90 and sm80 (PTX + cubin through Triton's bundled ptxas), with
no GPU: the interpreter never runs Triton's compiler, so this is what catches code that only the compiled path
rejects (non-constexpr globals, type mismatches across branches, shared-memory overflows). Slow (~1-3 min per
kernel on 2 busy cores): marked `slow`; run with `pytest tests/test_triton_aot.py -m slow`."""
import json
import os
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(SCRIPT))


@pytest.mark.slow
@pytest.mark.parametrize("cap,variant", [(90, "fp16"), (80, "bf16-all-features"), (90, "fp32-bias-debug"),
                                         (90, "bf16-block"), (90, "fp32-compiled")])
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


@pytest.mark.slow
def test_tensor_cores_and_no_spills_at_head_dim_128(tmp_path):
    """The largest config the prune predicate keeps (the one most at risk of spilling, and the autotuner's likely
    pick on long sequences) for the forward, dK/dV and dQ kernels at head dim 128, fp16 and bf16, compiled with the
    arguments op.py passes: on sm_90 its SASS must use wgmma (HGMMA) and touch no local memory (LDL/STL = register
    spills); on sm_80 it must use mma.sync (HMMA). Compiles through benchmarks/triton_static.py (~1 min)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: ptxas really runs and logs registers / spills
    r = subprocess.run([sys.executable, SCRIPT, "tensorcores"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 12, r.stdout
    bad = []
    for x in results:
        where = (f"{x['kind']} sm{x['cap']} {x['dtype']} {x['meta']} warps {x['num_warps']} stages "
                 f"{x['num_stages']}: {x.get('error') or ''}regs {x.get('regs')} spill bytes {x.get('spill_stores')} "
                 f"smem {x.get('smem')} HGMMA {x.get('HGMMA')} HMMA {x.get('HMMA')} LDL/STL {x.get('LDL')}/{x.get('STL')}")
        print(where)
        if "error" in x:
            bad.append(where)
        elif x["cap"] == 90 and not (x["HGMMA"] > 0 and x["HMMA"] == 0):
            bad.append("no wgmma: " + where)
        elif x["cap"] == 80 and x["HMMA"] == 0:
            bad.append("no mma.sync: " + where)
        elif x["LDL"] or x["STL"] or x["spill_stores"]:
            bad.append("register spills: " + where)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------------
# The subprocess: builds each kernel's signature from its parameter names and compiles it for the target.

PTRS = {"Q": "q", "K": "q", "V": "q", "Out": "q", "DO": "q", "DK": "q", "DV": "q", "DQ": "q", "Bias": "q",
        "Lse": "fp32", "Delta": "fp32", "Alibi": "fp32", "CuQ": "i32", "CuK": "i32", "QStart": "i32", "KStart": "i32",
        "Stats": "i32", "SeqlensK": "i32", "BlockTable": "i32", "BatchIdx": "i32", "OutP": "fp32", "LseP": "fp32"}
FLOATS = {"qk_scale2", "cap_in", "cap_out2", "dropout_p", "scale"}
I64 = {"seed", "rng_offset"}


def _compile(fn, const, dt, cap, none, warps, stages, fp32=(), floats="fp32"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, cx = {}, {}
    for name in fn.arg_names:
        if name in const or name in none:
            sig[name] = "constexpr"
            cx[name] = const.get(name)
        elif name in PTRS:
            sig[name] = "*" + ("fp32" if name in fp32 else dt if PTRS[name] == "q" else PTRS[name])
        else:
            sig[name] = floats if name in FLOATS else ("i64" if name in I64 else "i32")
    t = time.time()
    k = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    print(f"{fn.__name__} sm{cap} {dt}: {time.time() - t:.0f}s, shared memory {k.metadata.shared} B", flush=True)


def _main(cap, variant):
    sys.path.insert(0, ROOT)
    from fastattn.backends.triton.kernels.bwd_dkdv import attn_bwd_dkdv
    from fastattn.backends.triton.kernels.bwd_dq import attn_bwd_dq
    from fastattn.backends.triton.kernels.bwd_preprocess import attn_bwd_preprocess
    from fastattn.backends.triton.kernels.fwd import attn_fwd
    base = dict(HEAD_D=80, HEAD_DV=80, BLOCK_D=128, BLOCK_DV=128, IS_VARLEN=False, BOTTOM_RIGHT=True,
                WINDOW_LEFT=False, WINDOW_RIGHT=True, SOFTCAP=False, ALIBI=False, BIAS=0, DROPOUT=False,
                PRECISION="tf32", UPCAST=False, HAS_START=False, ACCUMULATE=False, DEBUG=False)
    none = ["Alibi", "CuQ", "CuK", "QStart", "KStart", "Stats", "Bias"]
    fp32, floats = (), "fp32"
    if variant == "fp16":
        dt, const = "fp16", base
    elif variant == "bf16-all-features":
        dt = "bf16"
        const = dict(base, IS_VARLEN=True, WINDOW_LEFT=True, SOFTCAP=True, ALIBI=True, DROPOUT=True)
        none = ["QStart", "KStart", "Stats", "Bias"]
    elif variant == "bf16-block":  # block calls: global offsets (int64 bands), keyed dropout, accumulating backward
        dt = "bf16"
        const = dict(base, IS_VARLEN=True, BOTTOM_RIGHT=False, WINDOW_LEFT=True, ALIBI=True, DROPOUT=True,
                     HAS_START=True, ACCUMULATE=True)
        none = ["Stats", "Bias"]
        fp32 = ("Out", "DQ", "DK", "DV")  # out_fp32 and the float32 accumulators
    elif variant == "fp32-compiled":  # torch.compile's launch: inductor types the float arguments fp64
        dt, floats = "fp32", "fp64"
        const = dict(base, HEAD_D=32, HEAD_DV=32, BLOCK_D=32, BLOCK_DV=32, SOFTCAP=True, DROPOUT=True,
                     PRECISION="ieee")
        from fastattn.backends.triton.kernels.decode import decode_split
        _compile(decode_split, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=32, HEAD_D=32, HEAD_DV=32,
                                    PAGED=False, PAGE=1, BATCH_IDX=False, WINDOW_LEFT=False, WINDOW_RIGHT=True,
                                    SOFTCAP=True, ALIBI=False, SPLIT=True, PRECISION="ieee", UPCAST=False),
                 dt, cap, ["BlockTable", "BatchIdx", "Alibi"], 4, 2, floats=floats)
    else:
        dt = "fp32"
        const = dict(base, HEAD_D=64, HEAD_DV=64, BLOCK_D=64, BLOCK_DV=64, BIAS=2, DEBUG=True, PRECISION="ieee")
        none = ["Alibi", "CuQ", "CuK", "QStart", "KStart"]
    _compile(attn_fwd, dict(const, BLOCK_M=128, BLOCK_N=64), dt, cap, none, 8, 3, fp32, floats)
    _compile(attn_bwd_dkdv, dict(const, BLOCK_M=32, BLOCK_N=128), dt, cap, none, 8, 2, fp32, floats)
    _compile(attn_bwd_dq, dict(const, BLOCK_M=64, BLOCK_N=64), dt, cap, none, 4, 2, fp32, floats)
    _compile(attn_bwd_preprocess, dict(BLOCK_M=64, BLOCK_DV=128, HEAD_DV=80), dt, cap, [], 4, 1)


def _tensorcores():
    """One JSON line per compile: the largest kept config of each main kernel, D=128, sm_90 / sm_80, fp16 / bf16."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("triton_static", os.path.join(ROOT, "benchmarks", "triton_static.py"))
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    sys.path.insert(0, ROOT)
    from fastattn.backends.triton.kernels import configs as C
    lists = {"fwd": C.FWD_CONFIGS, "dkdv": C.DKDV_CONFIGS, "dq": C.DQ_CONFIGS}
    for cap in (90, 80):
        for dtype in ("fp16", "bf16"):
            for kind, cfgs in lists.items():
                kept = [cfgs[i] for i in ts.pruned_keep(kind, cap, dtype, 128, False)]
                c = max(kept, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages,
                                             c.kwargs["BLOCK_M"]))
                res = ts.compile_job(dict(kind=kind, cap=cap, dtype=dtype, d=128, causal=False, cfg=cfgs.index(c),
                                          meta=dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                                          kept=True))
                res.pop("constexprs", None)
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "tensorcores":
        _tensorcores()
    else:
        _main(int(sys.argv[1]), sys.argv[2])
