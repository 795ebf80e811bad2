"""The CUDA toolchain for the compile-and-inspect tests (no GPU needed): finding nvcc and cuobjdump, compiling one
instantiation to cubin, and reading ptxas reports and SASS back."""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
INST = os.path.join(CSRC, "cuda", "instantiations")


def _short_name(mangled):
    """fwd_kernel / fwd_kernel+dropout from a mangled name: the kDropout template argument is `Lb1E`."""
    name = re.match(r"_ZN8fastattn4cuda\d+(\w+?)I", mangled).group(1)
    return name + "+dropout" if re.search(r"Lb1EE", mangled) else name


def cuda_home_candidates():
    """Folders that may hold the CUDA toolkit, most specific first: $CUDA_HOME, $CUDA_PATH, nvcc's (its wrapper
    may live elsewhere: realpath), /usr/local/cuda, /usr/local/cuda-* newest first (may contain None)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return cands + ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def _cuda_home():
    for c in cuda_home_candidates():
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
