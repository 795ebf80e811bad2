"""The CUDA kernels (csrc/cuda) compiled as host C++ against the CPU emulator in tests/cuda_emu, for the emulated
test files (test_cuda_emulated.py, test_cuda_blocks_emulated.py): emu() builds and loads it once per process."""
import functools
import os
import sys
import tempfile

import pytest
import torch

from .toolchain import cuda_home_candidates

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU = os.path.join(ROOT, "tests", "cuda_emu")


def _cuda_include():
    """The CUDA toolkit's include dir (cuda_fp16.h / cuda_bf16.h / cuda_runtime.h), found like setup.py finds
    CUDA_HOME, without needing nvcc: only the headers are used."""
    for c in cuda_home_candidates():
        if c and all(os.path.exists(os.path.join(c, "include", h)) for h in ("cuda_runtime.h", "cuda_fp16.h",
                                                                             "cuda_bf16.h")):
            return os.path.join(c, "include")
    return None


CUDA_INCLUDE = _cuda_include()
needs_cuda_headers = pytest.mark.skipif(
    CUDA_INCLUDE is None, reason="CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) not found: set "
    "CUDA_HOME; the emulated kernels compile against them")


@functools.lru_cache(maxsize=None)
def emu():
    """The emulated kernels, JIT-built once per source change (cached under the temp dir, ~1-3 min cold)."""
    from torch.utils import cpp_extension
    # One folder per Python and torch: a module built for another is not loadable (and would not be rebuilt).
    stack = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.replace('+', '_')}"
    build = os.environ.get("FASTATTN_CUDA_EMU_BUILD",
                           os.path.join(tempfile.gettempdir(), f"fastattn_cuda_emu_{os.getuid()}_{stack}"))
    os.makedirs(build, exist_ok=True)
    sources = [os.path.join(EMU, f) for f in ("bind.cpp", "decode_emu.cpp", "fwd_emu.cpp", "bwd_emu.cpp")]
    return cpp_extension.load(
        name="fastattn_cuda_emu", sources=sources, build_directory=build,
        extra_include_paths=[os.path.join(ROOT, "csrc"), EMU, CUDA_INCLUDE],
        # -fno-strict-aliasing: the kernels type-pun registers through reinterpret_cast as CUDA code does (nvcc
        # does not exploit it; g++ -O2 would, e.g. reading bwd_delta_kernel's uint4 as __half gave zeros)
        extra_cflags=["-O2", "-fno-strict-aliasing", "-DFASTATTN_CUDA_EMULATE"], verbose=False)
