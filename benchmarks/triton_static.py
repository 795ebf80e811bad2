"""Static (no-GPU) report on what the Triton kernels compile to for sm_90 / sm_80.

For every autotune config in fastattn/backends/triton/kernels/configs.py (forward, dK/dV, dQ) and the split-KV decode kernel,
compile for a GPU target with Triton's own compiler (no GPU, no TRITON_INTERPRET) using exactly the arguments the
launchers in op.py / decode.py pass: the launchers are run on fake CUDA tensors with their `_wrap` replaced by a
recorder, so constexprs (BLOCK_D, HEAD_D, feature switches, PRECISION, ...) and Triton's argument specialisation
(16-divisible ints and pointers, ints equal to 1 become constants) match a real launch. Per compile it records
registers and spills (the `ptxas -v` log of the very ptxas run Triton does), shared memory (metadata.shared),
whether the prune predicate keeps the config on an H200 (sm_90, 227 KiB) / A100 (sm_80, 163 KiB), the tensor-core
instructions in the SASS (HGMMA = wgmma, HMMA = mma.sync) and local-memory traffic (LDL/STL).

    python benchmarks/triton_static.py            # full set, 2 processes
    python benchmarks/triton_static.py --quick    # fp16 + bf16 at D=128 only, non-causal

    python benchmarks/triton_static.py --full     # every dtype x head dim x causal (~2x longer)
    python benchmarks/triton_static.py --picks    # only the config FASTATTN_TRITON_AUTOTUNE=0
                                                                 # takes on sm_90, fp16/bf16/fp32 x D 64/128/256

The default set is reduced to stay within ~15 minutes on 2 busy cores (see `selected`); the 4-stage configs are
never compiled for sm_80 (the prune predicate drops them on Ampere by policy).

Writes benchmarks/results/triton-static-<date>/{triton_static.json, triton_static.md}."""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the compiled path; must happen before triton is imported anywhere

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
import multiprocessing as mp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM = {90: 232448, 80: 166912}  # usable shared memory per block: H200 227 KiB, A100 163 KiB
B, H, S = 2, 16, 4096  # the plain call: long enough that no config is pruned for being larger than the sequence


# ---------------------------------------------------------------------------------------------------------------
# Recording the launchers' arguments

class _Recorder:
    """Stands in for wrap_triton(kernel): kernel[grid](*args, **kwargs) records instead of launching."""
    calls: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Recorder.calls.append((self.kernel, args, kwargs))
        return launch


def _raw(kernel):
    """The @triton.jit function under an Autotuner (or the function itself)."""
    from triton.runtime.autotuner import Autotuner
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def record(kind: str, dtype: str, d: int, causal: bool, rows: int = 8, paged: bool = False):
    """[(jit fn, {arg name: value}, autotuner configs or None)] for one launcher call on fake CUDA tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    sys.path.insert(0, ROOT)
    from fastattn.backends.triton.kernels import decode as dec
    from fastattn.backends.triton.kernels import op
    dt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype])
    _Recorder.calls = []
    saved = op._wrap, dec._wrap
    op._wrap = dec._wrap = _Recorder
    wr = 0 if causal else -1
    try:
        with FakeTensorMode():
            cu = dict(device="cuda", dtype=dt)
            if kind == "decode":  # rows = G * Sq query rows per KV head, one new token each
                hkv, sq = 4, 1
                q = torch.empty(4, hkv * rows, sq, d, **cu)
                lens = torch.empty(4, device="cuda", dtype=torch.int32)
                if paged:
                    kc = torch.empty(64, 256, hkv, d, **cu)
                    bt = torch.empty(4, 16, device="cuda", dtype=torch.int32)
                else:
                    kc, bt = torch.empty(4, S, hkv, d, **cu), None
                dec.launch_decode(q, kc, kc, lens, bt, None, d ** -0.5, -1, wr, 0.0, None, 4)
            else:
                q = torch.empty(B, H, S, d, **cu)
                if kind == "fwd":
                    op.launch_fwd(q, q, q, None, None, None, S, S, d ** -0.5, -1, wr, True, 0.0, None, 0.0, 0, 0)
                else:
                    lse = torch.empty(B, H, S, device="cuda", dtype=torch.float32)
                    op.launch_bwd(q, q, q, q, q, lse, None, None, None, S, S, d ** -0.5, -1, wr, True, 0.0, None,
                                  0.0, 0, 0)
    finally:
        op._wrap, dec._wrap = saved
    out = []
    for kernel, args, kwargs in _Recorder.calls:
        fn = _raw(kernel)
        named = dict(zip(fn.arg_names, args), **kwargs)
        out.append((fn, named, getattr(kernel, "configs", None)))
    return out


def signature(fn, named: dict, extra: dict):
    """(signature, constexprs, attrs) as Triton's launcher would specialise these argument values."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    tys = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64"}
    sig, cx, attrs = {}, {}, {}
    vals = dict(named, **extra)
    for i, p in enumerate(fn.params):
        v = vals[p.name]
        if p.is_constexpr or v is None:
            sig[p.name], cx[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + tys[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # caching-allocator pointers are 256-byte aligned
        else:
            ty, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            if ty == "constexpr":  # an int equal to 1
                sig[p.name], cx[p.name] = "constexpr", spec
            else:
                sig[p.name] = ty
                if spec and "D" in spec:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


# ---------------------------------------------------------------------------------------------------------------
# One compile

_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _bin(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_counts(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(f.name)
    ops: dict = {}
    for m in _OPCODE.finditer(sass):
        ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    return {k: ops.get(k, 0) for k in ("HGMMA", "HMMA", "LDL", "STL", "LDGSTS", "UTMALDG", "LDSM")}


def parse_ptxas(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(regs=int(regs[-1]) if regs else None,
                spill_stores=int(spill[-1][0]) if spill else None, spill_loads=int(spill[-1][1]) if spill else None,
                stack=int(stack[-1]) if stack else None)


def compile_job(job: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its own `ptxas -v` run
    calls = record(job["kind"] if job["kind"] == "decode" else ("fwd" if job["kind"] == "fwd" else "bwd"),
                   job["dtype"], job["d"], job["causal"], job.get("rows", 8), job.get("paged", False))
    name = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq", "decode": "decode_split"}[job["kind"]]
    fn, named, _ = next(c for c in calls if c[0].__name__ == name)
    extra = dict(job.get("meta", {}))
    opts = dict(num_warps=named.pop("num_warps", job.get("num_warps")),
                num_stages=named.pop("num_stages", job.get("num_stages")))
    sig, cx, attrs = signature(fn, named, extra)
    res = dict(job, triton=triton.__version__)
    buf = io.StringIO()
    t = time.time()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", job["cap"], 32),
                               options=opts)
    except Exception as e:  # noqa: BLE001 - recorded: e.g. out of shared memory at compile time
        res.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   seconds=round(time.time() - t, 1))
        return res
    res["seconds"] = round(time.time() - t, 1)
    res.update(parse_ptxas(buf.getvalue()))
    res["smem"] = k.metadata.shared
    res["ptx_wgmma"] = k.asm["ptx"].count("wgmma.mma_async")
    res["ptx_mma_sync"] = len(re.findall(r"\bmma\.sync", k.asm["ptx"]))
    res.update(sass_counts(k.asm["cubin"]))
    res["constexprs"] = {n: v for n, v in cx.items() if v is not None and not n.startswith("BLOCK_")}
    return res


# ---------------------------------------------------------------------------------------------------------------
# The job list and the prune predicates

def pruned_keep(kind, cap, dtype, d, causal) -> list:
    """Indices of the configs the early_config_prune predicate keeps on that GPU (its _device_smem faked)."""
    sys.path.insert(0, ROOT)
    from fastattn.backends.triton.kernels import configs as C
    calls = record("fwd" if kind == "fwd" else "bwd", dtype, d, causal)
    fn_name = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}[kind]
    _, named, configs = next(c for c in calls if c[0].__name__ == fn_name)
    prune = {"fwd": C.prune_fwd, "dkdv": C.prune_dkdv, "dq": C.prune_dq}[kind]
    saved = C._device_smem
    C._device_smem = lambda: ((cap // 10, cap % 10), SMEM[cap])
    try:
        kept = prune(configs, named)
    finally:
        C._device_smem = saved
    return [configs.index(c) for c in kept]


def selected(cap: int, dtype: str, kind: str, d: int, causal: bool, full: bool) -> bool:
    """The default set (~200 compiles; measured ~20 min on 2 cores shared with other jobs): everything for sm_90 fp16
    except causal outside the forward at D=128 (causal changes the masked bands, not the tiles), D=128 non-causal
    for sm_90 bf16 (bf16 and fp16 compile alike) and sm_80 fp16. --full: every dtype, D and causal flag."""
    if full:
        return True
    if causal:
        return cap == 90 and dtype == "fp16" and d == 128 and kind == "fwd"
    if cap == 90 and dtype == "fp16":
        return True
    return d == 128 and (cap == 90 or dtype == "fp16")


def jobs(quick: bool, full: bool = False) -> list:
    sys.path.insert(0, ROOT)
    from fastattn.backends.triton.kernels import configs as C
    lists = {"fwd": C.FWD_CONFIGS, "dkdv": C.DKDV_CONFIGS, "dq": C.DQ_CONFIGS}
    out = []
    for cap in (90, 80):
        for dtype in ("fp16", "bf16"):
            for kind, cfgs in lists.items():
                dims = (128,) if quick else ((64, 128, 256) if kind == "fwd" else (64, 128))
                for d in dims:
                    for causal in ((False,) if quick else (False, True)):
                        if not selected(cap, dtype, kind, d, causal, full):
                            continue
                        keep = pruned_keep(kind, cap, dtype, d, causal)
                        for i, c in enumerate(cfgs):
                            if cap < 90 and c.num_stages >= 4:  # _prune drops these on Ampere by policy: skipped
                                continue
                            out.append(dict(kind=kind, cap=cap, dtype=dtype, d=d, causal=causal, cfg=i,
                                            meta=dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                                            kept=i in keep))
            # decode rows 8 and 16 both give BLOCK_M = 16 (launch_decode pads to >= 16): one compile covers both
            for paged in ((False, True) if full or dtype == "fp16" else ()):
                out.append(dict(kind="decode", cap=cap, dtype=dtype, d=128, causal=True, rows=8, paged=paged,
                                cfg=0, kept=True))
    return out


def pick_jobs() -> list:
    """The one config FASTATTN_TRITON_AUTOTUNE=0 takes on an H200 (sm_90) per kernel, dtype and head dim: the
    configs a cold first GPU session runs, which must not spill."""
    sys.path.insert(0, ROOT)
    from fastattn.backends.triton.kernels import configs as C
    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for kind, cfgs in (("fwd", C.FWD_CONFIGS), ("dkdv", C.DKDV_CONFIGS), ("dq", C.DQ_CONFIGS)):
            for d in (64, 128, 256):
                kept = pruned_keep(kind, 90, dtype, d, False)
                i = max(kept, key=lambda i: (cfgs[i].kwargs["BLOCK_M"] * cfgs[i].kwargs["BLOCK_N"],
                                             -abs(cfgs[i].num_stages - 3)))  # as op._tuning with AUTOTUNE off
                c = cfgs[i]
                out.append(dict(kind=kind, cap=90, dtype=dtype, d=d, causal=False, cfg=i, meta=dict(c.kwargs),
                                num_warps=c.num_warps, num_stages=c.num_stages, kept=True))
    return out


def _key(j: dict) -> str:
    return json.dumps([j[k] if k != "meta" else sorted(j.get(k, {}).items())
                       for k in ("kind", "cap", "dtype", "d", "causal", "cfg", "paged", "num_warps", "num_stages",
                                 "meta") if k in j or k == "meta"])


def _worker_init(cache):
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every job really compiles (and logs ptxas)


def table(results: list) -> str:
    head = ("| kernel | sm | dtype | D | causal | BM | BN | warps | stages | kept | regs | spill st/ld | smem B "
            "| HGMMA | HMMA | LDL/STL | s |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        m = r.get("meta") or {}
        bm = m.get("BLOCK_M", "") if r["kind"] != "decode" else "16 (rows 8 or 16)"
        bn = m.get("BLOCK_N", "") if r["kind"] != "decode" else ("64 paged" if r.get("paged") else "64")
        if "error" in r:
            rows.append(f"| {r['kind']} | {r['cap']} | {r['dtype']} | {r['d']} | {r['causal']} | {bm} | {bn} "
                        f"| {r.get('num_warps', '')} | {r.get('num_stages', '')} | {r['kept']} | ERROR: "
                        f"{r['error'][:80]} | | | | | | {r['seconds']} |")
            continue
        rows.append(f"| {r['kind']} | {r['cap']} | {r['dtype']} | {r['d']} | {r['causal']} | {bm} | {bn} "
                    f"| {r.get('num_warps', '')} | {r.get('num_stages', '')} | {'yes' if r['kept'] else 'no'} "
                    f"| {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {r['HGMMA']} "
                    f"| {r['HMMA']} | {r['LDL']}/{r['STL']} | {r['seconds']} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="D=128, non-causal only")
    ap.add_argument("--full", action="store_true", help="every dtype, head dim and causal flag")
    ap.add_argument("--picks", action="store_true",
                    help="only the config FASTATTN_TRITON_AUTOTUNE=0 takes on sm_90 (fp16/bf16/fp32, D 64/128/256)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse compiles from an existing triton_static.json (configs.py predicates changed only)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/triton-static-<date>)")
    ap.add_argument("--limit", type=int, default=0, help="first N jobs only (debugging)")
    a = ap.parse_args()
    import triton
    t0 = time.time()
    todo = pick_jobs() if a.picks else jobs(a.quick, a.full)
    if a.limit:
        todo = todo[:a.limit]
    print(f"{len(todo)} compiles on {a.procs} processes", flush=True)
    date = time.strftime("%Y%m%d")
    out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                f"triton-static-{'picks-' if a.picks else ''}{date}")
    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, "partial.jsonl")  # results as they come; a rerun skips jobs already there
    done = {}
    final = os.path.join(out, "triton_static.json")
    if a.reuse and os.path.exists(final):  # e.g. after a change to the prune predicates only
        done.update({_key(r): r for r in json.load(open(final))["results"]})
    if os.path.exists(partial):
        for line in open(partial):
            r = json.loads(line)
            done[_key(r)] = r
    # kept is always recomputed from the current predicates
    results = [dict(done[_key(j)], kept=j["kept"]) for j in todo if _key(j) in done]
    todo = [j for j in todo if _key(j) not in done]
    print(f"{len(results)} compiles reused from {partial}", flush=True)
    with tempfile.TemporaryDirectory() as cache, open(partial, "a") as pf, ProcessPoolExecutor(
            a.procs, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(cache,)) as ex:
        for i, r in enumerate(ex.map(compile_job, todo)):
            results.append(r)
            pf.write(json.dumps(r) + "\n")
            pf.flush()
            print(f"[{i + 1}/{len(todo)}] {r['kind']} sm{r['cap']} {r['dtype']} D{r['d']} causal={r['causal']} "
                  f"{r.get('meta', '')} w{r.get('num_warps')} s{r.get('num_stages')}: regs {r.get('regs')} spills "
                  f"{r.get('spill_stores')} smem {r.get('smem')} HGMMA {r.get('HGMMA')} HMMA {r.get('HMMA')} "
                  f"LDL/STL {r.get('LDL')}/{r.get('STL')} kept {r['kept']} {r.get('error', '')} {r['seconds']}s",
                  flush=True)
    wall = time.time() - t0
    os.remove(partial)
    order = {_key(j): i for i, j in enumerate(pick_jobs() if a.picks else jobs(a.quick, a.full))}
    results.sort(key=lambda r: order.get(_key(r), 0))
    cmd = "python benchmarks/triton_static.py" + (" --quick" if a.quick else "") + (
        " --full" if a.full else "") + (" --picks" if a.picks else "")
    meta = dict(triton=triton.__version__, date=date, wall_seconds_this_run=round(wall), procs=a.procs, command=cmd,
                compile_seconds_sum=round(sum(r.get("seconds", 0) for r in results)),
                call=f"q/k/v (B={B}, H={H}, S={S}, D) contiguous, no bias/dropout/softcap/alibi, bottom_right=True; "
                     "causal = window (-1, 0); decode: 4 seqs, Hkv=4, Sq=1, 4 splits, dense S=4096 or paged 256",
                smem_limits=SMEM)
    with open(final, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(os.path.join(out, "triton_static.md"), "w") as f:
        f.write(f"# Triton kernels compiled for sm_90 / sm_80 without a GPU\n\ntriton {triton.__version__}, "
                f"{date}, {len(results)} compiles ({meta['compile_seconds_sum']} s of compile time summed over the "
                f"processes; this run's wall clock {wall:.0f} s on {a.procs} processes).\n\nRerun: `{cmd}`\n\n"
                f"Call: {meta['call']}. kept = the prune predicate keeps it on H200 (sm_90, 227 KiB) / A100 "
                f"(sm_80, 163 KiB). regs/spills from Triton's `ptxas -v`; HGMMA/HMMA/LDL/STL counted in the "
                f"cuobjdump SASS.\n\n{table(results)}\n")
    print(f"wrote {out} in {wall:.0f} s")


if __name__ == "__main__":
    main()
