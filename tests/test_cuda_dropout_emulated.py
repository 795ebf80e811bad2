"""The CUDA dropout kernels EXECUTED on the CPU, no GPU needed: tests/cuda_emu/dropout_check.cpp compiles the real
kernel source (fwd, delta, dK/dV and dQ kernels with kDropout) against the CUDA emulator tests/cuda_emu/emu.h with
g++, runs them on small odd shapes (GQA, causal, sliding window, kernel head dims 64/128/256, two warp schedules)
and checks that the forward's keep mask is bitwise the CPU kernels' mask for the same (seed, offset, p), and that
out, lse, delta and dQ/dK/dV match a float64 reference that uses that mask. Its control mode gives the backward a
different Philox offset and must fail every dropout case, so the check can tell a wrong mask."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
N_DROPOUT_CASES = 8  # 4 dropout cases x 2 schedules in dropout_check.cpp's main()


def _cuda_include():
    """CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h): only headers are used, no nvcc."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


CXX = shutil.which("g++")
INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CXX is None or INCLUDE is None,
                                reason="needs g++ and the CUDA headers (set CUDA_HOME) to build the emulated kernels")


@pytest.fixture(scope="module")
def check_exe(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("dropout_emu") / "dropout_check")
    cmd = [CXX, "-std=c++20", "-O2", "-DFASTATTN_CUDA_EMULATE", f"-I{EMU}", f"-I{os.path.join(ROOT, 'csrc')}",
           f"-I{INCLUDE}", os.path.join(EMU, "dropout_check.cpp"), "-o", exe, "-ldl"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"building the emulated dropout check failed:\n{r.stderr[-4000:]}"
    return exe


def test_cuda_dropout_kernels_emulated(check_exe):
    r = subprocess.run([check_exe], capture_output=True, text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0 and "0 failing cases" in r.stdout, f"{r.stdout[-4000:]}\n{r.stderr[-2000:]}"


def test_emulated_check_catches_a_wrong_backward_mask(check_exe):
    r = subprocess.run([check_exe, "control"], capture_output=True, text=True, timeout=900)
    print(r.stdout)
    assert f"{N_DROPOUT_CASES} failing cases" in r.stdout, f"control run: {r.stdout[-4000:]}\n{r.stderr[-2000:]}"
