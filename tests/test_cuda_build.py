"""CI check of the CUDA kernels' machine code, no GPU needed.

Compiles representative kernel instantiations (csrc/cuda/instantiations) to cubin for sm_80 and sm_90 with
nvcc and inspects them: ptxas must report no spills and no stack frame, and the SASS main loop of every
attention kernel (the backward branch's body) must issue tensor-core MMAs (HMMA) fed by ldmatrix (LDSM) and
cp.async copies (LDGSTS), with no local-memory traffic (LDL/STL) anywhere in the kernel. The dropout variants
(separate instantiations, *_dropout.cu) get the same checks, plus: they run Philox, the plain kernels do not."""
import filecmp
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
INST = os.path.join(CSRC, "cuda", "instantiations")
ARCHS = ("sm_80", "sm_90")
# The largest register footprints (fwd 256 and both backward kernels at 128/256), both dtypes covered, without
# and with dropout.
TUS = ("fwd_hdim128_fp16", "fwd_hdim256_bf16", "bwd_hdim128_bf16", "bwd_hdim256_fp16",
       "fwd_hdim128_fp16_dropout", "fwd_hdim256_bf16_dropout", "bwd_hdim128_bf16_dropout", "bwd_hdim256_fp16_dropout")
KERNELS = {"fwd": ("fwd_kernel",), "bwd": ("bwd_dkdv_kernel", "bwd_dq_kernel")}
# Philox4x32's first multiplier 0xD2511F53 (SASS prints the immediate signed: -0x2daee0ad).
PHILOX_MUL = re.compile(r"IMAD\.WIDE\.U32\b.*(-0x2daee0ad|0xd2511f53)\b", re.I)


def _expected_kernels(tu):
    """Short names (see _short_name) of the attention kernels a TU must contain."""
    suffix = "+dropout" if tu.endswith("_dropout") else ""
    return [k + suffix for k in KERNELS[tu[:3]]]


def _short_name(mangled):
    """fwd_kernel / fwd_kernel+dropout from a mangled name: the kDropout template argument is `Lb1E`."""
    name = re.match(r"_ZN8fastattn4cuda\d+(\w+?)I", mangled).group(1)
    return name + "+dropout" if re.search(r"Lb1EE", mangled) else name


def _cuda_home():
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
                os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def _cuobjdump(cuda_home):
    cands = [os.path.join(cuda_home, "bin", "cuobjdump")] if cuda_home else []
    try:
        import triton  # ships cuobjdump with its NVIDIA backend
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    cands.append(shutil.which("cuobjdump"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


CUDA_HOME = _cuda_home()
CUOBJDUMP = _cuobjdump(CUDA_HOME)
needs_toolchain = pytest.mark.skipif(
    CUDA_HOME is None or CUOBJDUMP is None,
    reason="needs nvcc + CUDA headers (set CUDA_HOME) and cuobjdump (CUDA bin/ or the triton package)")


def test_instantiations_match_generator(tmp_path):
    """The committed instantiations/*.cu are exactly what generate_instantiations.py writes."""
    spec = importlib.util.spec_from_file_location("gen", os.path.join(CSRC, "cuda", "generate_instantiations.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.main(str(tmp_path))
    want = sorted(os.listdir(tmp_path))
    assert sorted(f for f in os.listdir(INST) if f.endswith(".cu")) == want
    _, mismatch, errors = filecmp.cmpfiles(str(tmp_path), INST, want, shallow=False)
    assert not mismatch and not errors, f"stale instantiations (rerun the generator): {mismatch + errors}"


def _compile(tu, arch, out_dir, src_dir=INST):
    """nvcc -cubin of src_dir/<tu>.cu for arch: (ptxas -v log, cuobjdump -sass text)."""
    cubin = os.path.join(out_dir, f"{tu}_{arch}.cubin")
    cmd = [os.path.join(CUDA_HOME, "bin", "nvcc"), "-cubin", f"-arch={arch}", "-O3", "--use_fast_math",
           "--expt-relaxed-constexpr", "-std=c++17", f"-I{CSRC}", "-Xptxas", "-v",
           os.path.join(src_dir, tu + ".cu"), "-o", cubin]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed for {tu} {arch}:\n{r.stderr[-4000:]}"
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return r.stderr, sass


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cubin"))
    jobs = [(tu, arch) for tu in TUS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(lambda j: _compile(*j, out), jobs))
    return dict(zip(jobs, results))


def _ptxas_reports(log):
    """{kernel short name: (registers, spill store bytes, spill load bytes, stack bytes)} from ptxas -v."""
    res = {}
    for m in re.finditer(r"Compiling entry function '(_ZN8fastattn4cuda\d+\w+?I[^']*)'(.*?)Used (\d+) registers",
                         log, re.S):
        body = m.group(2)
        st = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        stack, sst, sld = (int(x) for x in st.groups()) if st else (0, 0, 0)
        res[_short_name(m.group(1))] = (int(m.group(3)), sst, sld, stack)
    return res


def _sass_functions(sass, key=None):
    """{kernel name: list of (address, instruction)} from cuobjdump -sass; names are short (instantiations of one
    kernel pooled) unless key maps the mangled name otherwise (e.g. key=str keeps every instantiation apart)."""
    key = key or _short_name
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fa = re.match(r"_ZN8fastattn4cuda\d+\w+?I\S*", m.group(1))
            cur = funcs.setdefault(key(fa.group(0)), []) if fa else None
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def _loop_bodies(instrs):
    """Instruction lists of each loop: from a backward branch's target to the branch."""
    bodies = []
    for addr, ins in instrs:
        m = re.search(r"\bBRA\s+(?:`\()?(?:\.L_x_\d+|0x([0-9a-f]+))", ins)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            bodies.append([i for a, i in instrs if target <= a <= addr])
    return bodies


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_no_spills(compiled, tu, arch):
    log, _ = compiled[(tu, arch)]
    reports = _ptxas_reports(log)
    for name in _expected_kernels(tu):
        assert name in reports, f"{name} missing from ptxas output for {tu} {arch}:\n{log[-2000:]}"
    print(f"{tu} {arch}: " + ", ".join(f"{k} {v[0]} regs" for k, v in reports.items()))
    for name, (regs, sst, sld, stack) in reports.items():
        assert sst == 0 and sld == 0 and stack == 0, (
            f"{tu} {arch} {name}: {regs} registers, {sst} B spill stores, {sld} B spill loads, {stack} B stack")


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_main_loop_uses_tensor_cores(compiled, tu, arch):
    _, sass = compiled[(tu, arch)]
    funcs = _sass_functions(sass)
    dtype = "BF16" if "_bf16" in tu else "F16"
    for name in _expected_kernels(tu):
        assert name in funcs, f"{name} not in the SASS of {tu} {arch} (have {sorted(funcs)})"
        instrs = [i for _, i in funcs[name]]
        assert not [i for i in instrs if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", i)], f"{name}: local memory"
        hmma = [i for i in instrs if "HMMA.16816.F32" in i]
        assert hmma, f"{name} ({tu} {arch}) has no HMMA.16816.F32"
        if dtype == "BF16":
            assert all(".BF16" in i for i in hmma), f"{name}: bf16 kernel with non-bf16 MMAs"
        else:
            assert not any(".BF16" in i for i in hmma), f"{name}: fp16 kernel with bf16 MMAs"
        loops = _loop_bodies(funcs[name])
        main = [b for b in loops if any("HMMA" in i for i in b)]
        assert main, f"{name} ({tu} {arch}): no loop contains HMMA (loops: {len(loops)})"
        body = max(main, key=len)
        n_hmma = sum("HMMA" in i for i in body)
        n_ldsm = sum(i.split()[0].startswith("LDSM") or " LDSM" in i for i in body)
        n_ldgsts = sum("LDGSTS" in i for i in body)
        print(f"{tu} {arch} {name}: main loop {len(body)} instrs, {n_hmma} HMMA, {n_ldsm} LDSM, {n_ldgsts} LDGSTS")
        assert n_ldsm > 0, f"{name}: main loop loads no fragments with ldmatrix (LDSM)"
        assert any("LDSM" in i and ".MT88" in i for i in body), f"{name}: no transposed ldmatrix in the main loop"
        assert any("LDGSTS" in i for i in instrs), f"{name}: no cp.async (LDGSTS)"


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_philox_only_in_dropout_kernels(compiled, tu, arch):
    """The dropout variants draw Philox numbers; the plain kernels compile it away (if constexpr)."""
    funcs = _sass_functions(compiled[(tu, arch)][1])
    for name in _expected_kernels(tu):
        n_mul = sum(bool(PHILOX_MUL.search(i)) for _, i in funcs[name])
        if name.endswith("+dropout"):
            assert n_mul >= 10, f"{name} ({tu} {arch}): {n_mul} Philox multiplies, expected 10 per draw loop"
        else:
            assert n_mul == 0, f"{name} ({tu} {arch}): {n_mul} Philox multiplies in a kernel without dropout"
