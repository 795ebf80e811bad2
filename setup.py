"""Builds fastattn and its C++/CUDA extension `fastattn._C`.

Install with `pip install --no-build-isolation -e .` (or `.`) after `pip install -r requirements.txt`: the
extension is compiled against the torch already installed, so setup.py imports torch (pyproject.toml declares the
build system, which every pip since 21.3 then runs through PEP 517/660).

Knobs (environment):
  FASTATTN_BUILD_CUDA   auto (default) | 0 | 1
                        auto builds the CUDA kernels only where they can be used or were asked for: torch has CUDA,
                        a toolkit is found, and either FASTATTN_CUDA_ARCHS is set or a GPU (sm_80+) is visible
                        (then for the visible GPUs' archs only). 1 builds them or fails; 0 never builds them.
  FASTATTN_CUDA_ARCHS   the archs to compile for, e.g. "8.0;9.0" (passed on as TORCH_CUDA_ARCH_LIST, which is read
                        when this is unset); default: the visible GPUs' archs, or "8.0;8.6;8.9;9.0+PTX" with
                        FASTATTN_BUILD_CUDA=1 and no GPU
  FASTATTN_SKIP_EXT=1   install the pure-Python package only (Triton and reference backends still work)
  MAX_JOBS              parallel compile jobs (ninja)
  CUDA_HOME             CUDA toolkit root; guessed from nvcc when unset (see _find_cuda_home)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit root: the folder holding include/cuda_runtime.h.

    torch guesses CUDA_HOME as dirname(dirname(which nvcc)); when nvcc on PATH is a wrapper script
    (e.g. /usr/local/bin/nvcc) that guess is wrong, so check the candidates ourselves."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# Measured: 593 s for two archs on 2 cores (CI, 40 translation units); time scales with archs / MAX_JOBS.
SECONDS_PER_ARCH_2_CORES = 300

NO_TORCH = """fastattn: torch is not importable in the build environment.
fastattn compiles its C++ extension against the torch you run it with, so install torch first and build
without isolation:
    pip install -r requirements.txt          (or only torch: see README, "CPU-only install")
    pip install --no-build-isolation -e .
To install the pure-Python package without the extension (Triton, sdpa and reference backends only):
    FASTATTN_SKIP_EXT=1 pip install --no-build-isolation -e ."""


def _say(msg):
    # pip shows a PEP 517 backend's output only with -v or when the build fails; README states the same facts.
    print(f"fastattn: {msg}", file=sys.stderr, flush=True)


def _visible_archs(torch):
    """"8.0;9.0" for the visible sm_80+ GPUs (sorted, deduplicated), "" when none; and a note on older GPUs."""
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(n)})
    except Exception as e:  # a broken driver must not stop a CPU build
        return "", f"could not query GPUs ({type(e).__name__}: {e})"
    old = [f"sm_{a}{b}" for a, b in caps if a < 8]
    archs = ";".join(f"{a}.{b}" for a, b in caps if a >= 8)
    return archs, (f"GPU {', '.join(old)} is older than sm_80, which the CUDA kernels need" if old else "")


def _cuda_plan(mode, torch, cuda_home):
    """(build CUDA?, archs, why not). Raises SystemExit for an impossible FASTATTN_BUILD_CUDA=1."""
    if mode == "0":
        return False, "", "FASTATTN_BUILD_CUDA=0"
    explicit = (os.environ.get("FASTATTN_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if mode == "1":
        if cuda_home is None:
            raise SystemExit("FASTATTN_BUILD_CUDA=1 but no CUDA toolkit found: set CUDA_HOME to the folder holding "
                             "include/cuda_runtime.h and bin/nvcc")
        if torch.version.cuda is None:
            raise SystemExit("FASTATTN_BUILD_CUDA=1 but this torch is a CPU-only build")
        return True, explicit or _visible_archs(torch)[0] or DEFAULT_ARCHS, ""
    if torch.version.cuda is None:
        return False, "", "this torch is a CPU-only build"
    if cuda_home is None:
        return False, "", "no CUDA toolkit found (nvcc, CUDA_HOME)"
    if explicit:
        return True, explicit, ""
    archs, note = _visible_archs(torch)
    if archs:
        return True, archs, ""
    return False, "", ((note or "no GPU is visible") + "; FASTATTN_CUDA_ARCHS=\"8.0;9.0\" (or FASTATTN_BUILD_CUDA=1) "
                       "builds them anyway")


def _extensions():
    if os.environ.get("FASTATTN_SKIP_EXT") == "1":
        _say("FASTATTN_SKIP_EXT=1: pure-Python install, no C++/CUDA extension")
        return [], {}
    mode = os.environ.get("FASTATTN_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTATTN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = _find_cuda_home() if mode != "0" else None
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

    try:
        import torch
    except ImportError:
        raise SystemExit(NO_TORCH) from None
    if "pip-build-env-" in torch.__file__:
        _say(f"building in an isolated environment against a temporary torch {torch.__version__}; if your "
             "environment's torch differs the extension will not load: install with --no-build-isolation")

    with_cuda, archs, why_not = _cuda_plan(mode, torch, cuda_home)
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    else:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 for torch 2.11, C++20 for 2.14)
    extra = {"cxx": cxx}
    macros = []
    ext_cls = CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp") +
                          glob.glob("csrc/cuda/instantiations/*.cu"))
        extra["nvcc"] = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr",
                         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                         "-lineinfo"]
        macros.append(("FASTATTN_WITH_CUDA", None))
        ext_cls = CUDAExtension
    ext = ext_cls(
        name="fastattn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        n_archs = len(archs.replace(",", " ").replace(";", " ").split())
        jobs = min(int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1), os.cpu_count() or 1)
        minutes = max(1, round(SECONDS_PER_ARCH_2_CORES * n_archs * 2 / max(jobs, 1) / 60))
        _say(f"building _C with CUDA=yes ({cuda_home}), archs={archs}: the CUDA kernels take roughly "
             f"{minutes} min here ({n_archs} arch(s), {jobs} job(s)); FASTATTN_BUILD_CUDA=0 skips them, "
             f"FASTATTN_CUDA_ARCHS picks fewer archs")
    else:
        _say(f"building _C with CUDA=no ({why_not}), CPU kernels only (about 2-3 min on 2 cores)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _readme():
    path = os.path.join(ROOT, "README.md")
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


def main():
    ext_modules, cmdclass = _extensions()
    setup(
        name="fastattn",
        version="0.1.0",
        description="Fused attention kernels (Triton, CUDA C++, C++ CPU) behind drop-in PyTorch APIs",
        long_description=_readme(),
        long_description_content_type="text/markdown",
        packages=find_packages(include=["fastattn", "fastattn.*"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.5", "numpy"],
        extras_require={
            "triton": ["triton"],
            "test": ["pytest", "pytest-benchmark", "numpy", "transformers>=5", "accelerate"],
            "transformers": ["transformers>=5", "accelerate"],
            "bench": ["matplotlib", "tqdm"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# setuptools' PEP 517 backend runs this file as __main__ too; tests import it to check _cuda_plan.
if __name__ == "__main__":
    main()
