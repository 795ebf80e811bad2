"""The CPU kernels' vector paths that this CPU does not pick by itself, run on it anyway.

The kernels pick AVX-512, AVX2 or scalar code at run time (csrc/cpu/vec.h, vec512.h, mm.cpp), so a test run only
exercises the paths of the CPU it runs on. FASTATTN_CPU_ISA=avx2 (or =scalar) holds them below what the CPU has
(`isa_cap` in csrc/cpu/vec512.h); each case here runs a subset of the kernel tests in a subprocess held there: the
decode kernel's oracle, split and same-bits cases (its block helpers), the forward/backward kernels' masked,
multi-tile and strided cells against the float64 oracle, and the one-pass backward of few rows (its rule's calls and
the decode switch's 16 rows too). A level the CPU runs by itself is skipped: the main run covers it."""
import os
import subprocess
import sys

import pytest

from fastattn import ops

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="needs the C++ extension (cpu backend)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = {"scalar": 0, "avx2": 1}
SUBSET = ["tests/test_decode.py", "-k", "matches_oracle or same_bits or splits",
          "tests/test_cpu_kernels.py", "-k", "several_tiles or climb or key_padding_bias or expanded",
          "tests/test_cpu_few_rows.py", "-k", "one_pass or bwd_rule or decode_switch"]


def _native_level() -> int:
    r = ops.cpu_matmul_report()
    return 2 if r.get("avx512") == "1" else 1 if r.get("avx2") == "1" else 0


def _run(cap: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTATTN_CPU_ISA=cap, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.parametrize("cap", list(LEVELS))
def test_kernels_held_below_the_native_isa(cap):
    if LEVELS[cap] >= _native_level():
        pytest.skip(f"this CPU runs the {cap} paths by itself ({ops.cpu_matmul().split(';')[1].strip()})")
    report = _run(cap, "-c", "from fastattn import ops; print(ops.cpu_matmul(), ops.cpu_matmul_report()['avx512'])")
    assert report.returncode == 0, report.stderr
    assert f"held there by FASTATTN_CPU_ISA={cap}" in report.stdout and report.stdout.split()[-1] == "0", report.stdout
    # pytest -k applies once per run: one run per file
    for i in range(0, len(SUBSET), 3):
        r = _run(cap, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET[i:i + 3])
        assert r.returncode == 0, f"{SUBSET[i]} held at {cap}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
        assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


def test_unknown_switch_values_and_the_planted_bug_switch_are_named():
    """The C++ kernels take a misspelt value (FASTATTN_CPU_ISA=AVX2) as unset, and FASTATTN_CPU_PLANT (the tests'
    planted bugs) makes results wrong on purpose: both were silent; import warns and `info` lists them."""
    env = dict(os.environ, FASTATTN_CPU_ISA="AVX2", FASTATTN_CPU_PLANT="kt_swap", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastattn.info"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "FASTATTN_CPU_ISA='AVX2' is not one of avx2, scalar and is ignored" in r.stderr
    assert "WARNING" in r.stdout and "FASTATTN_CPU_PLANT='kt_swap' is set" in r.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTATTN_CPU")}
    r = subprocess.run([sys.executable, "-W", "error", "-c", "import fastattn"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
