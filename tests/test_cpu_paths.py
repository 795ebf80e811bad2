"""The CPU kernels' two ways to multiply bf16/fp16 tiles: on the matrix units (oneDNN brgemm: AMX tiles,
AVX512-BF16 or AVX512-FP16 dot products, chosen by a run-time probe) or converted to fp32 (sgemm), the fallback
for older CPUs. The correctness matrix (test_matrix.py) runs the path this machine picks; here the same cells run
the fp32 fallback, the path choice is checked against the CPU's ISA, and a planted packing bug must fail."""
import os
import re
import subprocess
import sys

import pytest
import torch

from fastattn import ops
from support.cases import cell_id, matrix, run_case

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

LOWP = (torch.bfloat16, torch.float16)
REPORT = ops.cpu_matmul()


def _flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def on_matrix_units(dtype) -> bool:
    """What the probe chose for this dtype, read from the report (`bf16: matrix units (...)`)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return f"{name}: matrix units" in REPORT


def fp16_pairs() -> bool:
    """fp16's forward and backward run on bf16 matrix units as exact pairs here (`fp16 forward and backward: matrix
    units as exact bf16 pairs`), from 64 / 128 query rows a KV head."""
    return ops.cpu_matmul_report().get("fp16_forward") == "bf16_pairs"


def forward_on_matrix_units(dtype) -> bool:
    return on_matrix_units(dtype) or (dtype == torch.float16 and fp16_pairs())


CELLS = [c for c in matrix() if c[0] == "cpu" and c[2] in LOWP]


@pytest.fixture
def fp32_tiles():
    ops._C.cpu_matmul_force_fp32(True)
    yield
    ops._C.cpu_matmul_force_fp32(False)


@pytest.mark.parametrize("cell", CELLS, ids=["fp32tiles-" + cell_id(c) for c in CELLS])
def test_matrix_on_fp32_fallback(cell, fp32_tiles):
    if not forward_on_matrix_units(cell[2]):
        pytest.skip(f"this CPU has no matrix-unit path for {cell[2]}, so test_matrix already ran the fp32 tiles "
                    f"({REPORT})")
    results = run_case(*cell)
    for _, msg in results:
        print(msg)
    bad = [m for ok, m in results if not ok]
    assert not bad, " | ".join(bad)


def test_report_names_cpu_isa_and_paths():
    print(REPORT)
    assert REPORT.startswith("CPU: ") and "; ISA:" in REPORT
    assert "bf16: " in REPORT and "fp16: " in REPORT and ("fp32: sgemm" in REPORT or "fp32: brgemm" in REPORT)


def test_tile_rate_probe():
    """ops.cpu_tile_gflops (the benchmark's CPU ceiling) times the path each dtype takes, and names a bad dtype."""
    rates = {dt: ops.cpu_tile_gflops(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    print(rates)
    assert all(r > 0 for r in rates.values()), rates
    with pytest.raises(RuntimeError, match="float64"):
        ops._C.cpu_tile_gflops("float64")


@pytest.mark.parametrize("dtype,isa", [(torch.bfloat16, ("amx_bf16", "avx512_bf16")),
                                       (torch.float16, ("amx_fp16",))])
def test_matrix_units_used_where_the_isa_has_them(dtype, isa):
    """A CPU with native bf16/fp16 dot products must not silently run the slower path: with AMX usable the matrix
    units; without, whichever path the timed score tile found faster (brgemm by the 1.2x margin), its rates named."""
    if os.environ.get("FASTATTN_CPU_MATMUL") in ("fp32", "brgemm"):
        pytest.skip("FASTATTN_CPU_MATMUL forces a path in this run")
    flags = _flags()
    if not any(f in flags for f in isa) or "avx512f" not in flags:
        pytest.skip(f"this CPU lacks {' and '.join(isa)}: the fp32 tiles are the right path for {dtype}")
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    data = ops.cpu_matmul_report()
    if data[f"amx_{name}_usable"] == "1":
        assert on_matrix_units(dtype), REPORT
        return
    brgemm, fp32 = float(data[f"{name}_brgemm_gflops"]), float(data[f"{name}_fp32_gflops"])
    if brgemm == 0:  # timed only once the exactness probe passed
        assert not on_matrix_units(dtype), (data, REPORT)
        pytest.skip(f"oneDNN's brgemm cannot take {name} here ({REPORT})")
    assert fp32 > 0, data
    assert on_matrix_units(dtype) == (brgemm >= 1.2 * fp32), (data, REPORT)
    assert f"{brgemm:.0f} GFLOP/s" in REPORT, REPORT


def test_without_amx_the_path_is_timed():
    """oneDNN held to AVX-512 without AMX (what it finds on AMD Zen 4/5): the bf16 path is timed, not assumed, and
    `auto` sends no bf16 call to sdpa on the grounds that torch multiplies on AMX."""
    code = ("import fastattn, torch; from fastattn import ops; from fastattn.backends import cpu; "
            "d = ops.cpu_matmul_report(); print(d); print(ops.cpu_matmul()); "
            "print('RULE', torch.bfloat16 in cpu._AUTO_RULE, cpu._BF16_AMX)")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16", MKL_ENABLE_INSTRUCTIONS="AVX512",
               OMP_NUM_THREADS="1")
    env.pop("FASTATTN_CPU_MATMUL", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    data = eval(r.stdout.splitlines()[0])  # noqa: S307 - our own printed dict
    if "avx512_bf16" not in _flags() or data.get("amx_bf16_usable") != "0":
        pytest.skip(f"no AVX512-BF16 here, or this oneDNN ignores ONEDNN_MAX_CPU_ISA ({data})")
    brgemm, fp32 = float(data["bf16_brgemm_gflops"]), float(data["bf16_fp32_gflops"])
    assert brgemm > 0 and fp32 > 0, data
    assert data["bf16"] == ("brgemm" if brgemm >= 1.2 * fp32 else "fp32"), data
    assert "RULE False False" in r.stdout, r.stdout


_PLANT = r"""
import os, sys, torch
sys.path.insert(0, "tests")
from support.cases import matrix, run_case
MATRIX = matrix()
dtype = getattr(torch, os.environ.get("PLANT_DTYPE", "bfloat16"))
cells = [c for c in MATRIX if c[0] == "cpu" and c[2] == dtype and (os.environ.get("PLANT_CELLS") == "all" or
         c[1].name in ("basic", "causal_square_257", "gqa", "flash_window_left", "varlen_causal", "hd80"))]
bad = sum(not all(ok for ok, _ in run_case(*c)) for c in cells)
from fastattn import ops
print(ops.cpu_matmul())
print(f"{bad} of {len(cells)} cells failed")
"""


def _brgemm_exact() -> bool:
    """bf16 takes brgemm here, or could (exact, but timed slower than the fp32 tiles without AMX)."""
    return on_matrix_units(torch.bfloat16) or float(ops.cpu_matmul_report().get("bf16_brgemm_gflops", 0)) > 0


def _run_cells(ran_on="bf16: matrix units", unset=(), **env_extra):
    """_PLANT in a fresh process on one thread with env_extra (bf16 on brgemm unless told otherwise; `unset`: variables
    to drop); its output, whose report must name `ran_on` (the path the cells ran)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"FASTATTN_CPU_MATMUL": "brgemm"} | env_extra))
    for k in unset:
        env.pop(k, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PLANT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ran_on in r.stdout, r.stdout
    return r.stdout


def test_brgemm_path_holds_the_rule_even_where_not_chosen():
    """FASTATTN_CPU_MATMUL=brgemm: the brgemm path stays correct on a machine whose timing chose the fp32 tiles
    (there test_matrix runs only those)."""
    if not _brgemm_exact():
        pytest.skip(f"oneDNN's brgemm cannot take bf16 here ({REPORT})")
    assert "0 of 6 cells failed" in _run_cells()


def test_planted_vnni_packing_bug_fails_the_matrix():
    if not _brgemm_exact():
        pytest.skip(f"oneDNN's brgemm cannot take bf16 here ({REPORT})")
    assert "6 of 6 cells failed" in _run_cells(FASTATTN_CPU_PLANT="vnni_swap")


# The bound on |lse - exact| each path's exponential keeps (csrc/cpu/vec512.h, kExpDegree): P is rounded to the
# tile dtype before it multiplies V, so the matrix units take a shorter polynomial (degree 4, relative error
# 3.0e-6); the fp32 tiles keep degree 5 (1.4e-7). Each bound is its polynomial's error with room for the fp32 sum
# and log (AVX2's exp included), beside the rounding of lse itself (half an fp32 ulp).
EXP_BOUND = {"matrix units": 6e-6, "fp32 tiles": 1e-6}


@pytest.mark.parametrize("forced", [False, True], ids=["machine_path", "fp32tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_softmax_exponential_accuracy(dtype, forced):
    """lse against float64 on scores the tiles compute exactly (small integers times 1/8), so its error is the
    exponential's and the row sum's alone: the output's own rounding would hide a P wrong by a fraction of a bf16
    ulp (a 1% error in the polynomial's linear term passed the whole matrix). 600 keys: two key blocks on every
    path, so the lazily rescaled rows are covered; 77 query rows: a row tail."""
    if forced:
        ops._C.cpu_matmul_force_fp32(True)
    try:
        on_units = dtype != torch.float32 and forward_on_matrix_units(dtype) and not forced
        path = "matrix units" if on_units else "fp32 tiles"
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randint(-2, 3, (2, 3, s, 64), generator=g).to(dtype) for s in (77, 600, 600))
        with torch.no_grad():
            _, lse = torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, 0.125, -1, -1, False, 0.0, None, 0.0,
                                            0, 0, False)
    finally:
        ops._C.cpu_matmul_force_fp32(False)
    exact = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.125, dim=-1)
    bound = EXP_BOUND[path]
    err = ((lse.double() - exact).abs() - 2.0**-24 * exact.abs()).max().item()
    print(f"{dtype} on {path}: max |lse error| beyond half an ulp {err:.2e} (bound {bound:.0e})")
    assert err <= bound, f"{dtype} on {path}: lse off by {err:.2e} > {bound:.0e} beyond half an fp32 ulp"


def test_fp16_pairs_where_bf16_has_amx_and_fp16_not():
    """fp16's forward takes bf16 matrix units as exact pairs exactly where bf16 multiplies on AMX and fp16 itself
    has no matrix-unit path (Intel Sapphire / Emerald Rapids); FASTATTN_CPU_FP16_PAIRS=0 turns them off."""
    if os.environ.get("FASTATTN_CPU_MATMUL") or os.environ.get("FASTATTN_CPU_FP16_PAIRS"):
        pytest.skip("a switch forces a path in this run")
    data = ops.cpu_matmul_report()
    want = data["bf16"] == "brgemm" and data["fp16"] == "fp32" and data["amx_bf16_usable"] == "1"
    print(data["fp16_forward"], REPORT)
    for key in ("fp16_forward", "fp16_backward"):
        assert data[key] == ("bf16_pairs" if want else data["fp16"] if data["fp16"] == "brgemm" else "fp32"), data
    assert ("fp16 forward and backward: matrix units as exact bf16 pairs" in REPORT) == want, REPORT
    if not want:
        return
    code = "from fastattn import ops; print(ops.cpu_matmul_report()['fp16_forward']); print(ops.cpu_matmul())"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTATTN_CPU_FP16_PAIRS="0"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "fp32" and "turned off by FASTATTN_CPU_FP16_PAIRS=0" in r.stdout, r.stdout


def _run_fp16_pair_cells(**env_extra):
    return _run_cells("fp16 forward and backward: matrix units as exact bf16 pairs", unset=("FASTATTN_CPU_MATMUL",),
                      FASTATTN_CPU_FP16_PAIRS="1", PLANT_DTYPE="float16", **env_extra)


def test_fp16_pairs_hold_the_rule_on_every_cell():
    """FASTATTN_CPU_FP16_PAIRS=1: every fp16 cell of the matrix with its forward and backward on pairs, whatever its
    size (by default only calls of 64 query rows a KV head and more take them forward, 128 backward, so test_matrix
    runs few cells there), and where bf16 takes brgemm without AMX (AVX512-BF16 dot products), where the default
    leaves fp16 on the fp32 tiles."""
    if not _brgemm_exact() or on_matrix_units(torch.float16):
        pytest.skip(f"no bf16 brgemm to pair on, or fp16 multiplies on the matrix units itself ({REPORT})")
    out = _run_fp16_pair_cells(PLANT_CELLS="all")
    assert re.search(r"\b0 of [1-9][0-9]* cells failed", out), out


def test_planted_pairs_bug_fails_the_matrix():
    """Every pair's lo dropped (fp16 operands cut to bf16's 8 bits): the fp16 cells' tolerance must catch it."""
    if not _brgemm_exact() or on_matrix_units(torch.float16):
        pytest.skip(f"no bf16 brgemm to pair on, or fp16 multiplies on the matrix units itself ({REPORT})")
    assert "6 of 6 cells failed" in _run_fp16_pair_cells(FASTATTN_CPU_PLANT="pairs_lo")


def test_planted_backward_pairs_bug_fails_the_matrix():
    """Every lo dropped in the backward's pairs alone (its K, V, Q, dO, P and dS cut to bf16's 8 bits; the forward
    exact): the gradients' checks by themselves must catch it."""
    if not _brgemm_exact() or on_matrix_units(torch.float16):
        pytest.skip(f"no bf16 brgemm to pair on, or fp16 multiplies on the matrix units itself ({REPORT})")
    assert "6 of 6 cells failed" in _run_fp16_pair_cells(FASTATTN_CPU_PLANT="pairs_lo_bwd")
