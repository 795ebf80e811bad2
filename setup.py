"""Builds fastattn and its C++/CUDA extension `fastattn._C`.

Knobs (environment):
  FASTATTN_BUILD_CUDA   auto (default) | 0 | 1   auto builds CUDA when torch has CUDA and nvcc is found
  FASTATTN_CUDA_ARCHS   default "8.0;8.6;8.9;9.0+PTX" (passed on as TORCH_CUDA_ARCH_LIST)
  FASTATTN_SKIP_EXT=1   install the pure-Python package only (Triton and reference backends still work)
  MAX_JOBS              parallel compile jobs (ninja)
  CUDA_HOME             CUDA toolkit root; guessed from nvcc when unset (see _find_cuda_home)
"""
import glob
import os
import shutil

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


def _extensions():
    if os.environ.get("FASTATTN_SKIP_EXT") == "1":
        return [], {}
    mode = os.environ.get("FASTATTN_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTATTN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = _find_cuda_home() if mode != "0" else None
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FASTATTN_CUDA_ARCHS", "8.0;8.6;8.9;9.0+PTX"))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = mode == "1" or (mode == "auto" and torch.version.cuda is not None and cuda_home is not None)
    if mode == "1" and cuda_home is None:
        raise SystemExit("FASTATTN_BUILD_CUDA=1 but no CUDA toolkit found: set CUDA_HOME to the folder holding "
                         "include/cuda_runtime.h and bin/nvcc")
    if with_cuda and torch.version.cuda is None:
        raise SystemExit("FASTATTN_BUILD_CUDA=1 but this torch is a CPU-only build")

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
    print(f"fastattn: building _C with CUDA={'yes (' + cuda_home + ')' if with_cuda else 'no'}, "
          f"archs={os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention kernels (Triton, CUDA C++, C++ CPU) behind drop-in PyTorch APIs",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
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
