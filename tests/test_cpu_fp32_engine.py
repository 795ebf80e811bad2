"""The CPU kernels' two engines for fp32 products: MKL's sgemm or oneDNN's fp32 batch-reduce GEMM (brgemm), timed
once at start-up (csrc/cpu/blas.cpp). test_matrix runs the engine this machine chose; here the fp32 cells run on each
engine forced, brgemm with each of the backward's two forms for its packed key blocks (csrc/cpu/bwd.cpp: transposed
on CPUs with AVX-512, plain without) and with every sequence's score tiles on K's rows (scores_on_rows, which CPUs
without AVX-512 take for short query runs), with cells long enough for the packed key tiles (four query blocks and
more), and planted packing and scaling bugs must fail them."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import ops
from support.cases import Case, cell_id, matrix, run_case
from support.checks import check_dropout_backward_uses_forward_mask
from support.oracle import oracle_attention

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

ENGINES = {1: "sgemm", 2: "brgemm"}
# (engine, the backward's form on brgemm: 1 plain, 2 transposed (cpu_bwd_form_force); score tiles on K's rows: 1 never,
# 2 always (cpu_scores_on_rows_force))
SETTINGS = {"sgemm": (1, 0, 0), "brgemm_plain": (2, 1, 1), "brgemm_transposed": (2, 2, 1), "brgemm_rows": (2, 0, 2)}
# Long enough for MKL's packed key tiles (>= 4 query blocks of 64 rows meet a key block, over the group's heads),
# forward and backward; on brgemm (which packs from one block) they carry each feature through both of the backward's
# forms (csrc/cpu/bwd.cpp).
LONG = [Case("packed_600", B=1, Hq=2, Hkv=2, Sq=600, Sk=600, D=64),
        Case("packed_gqa_hd40", B=2, Hq=4, Hkv=2, Sq=530, Sk=700, D=40, mask="float_kpad"),
        Case("packed_cap_alibi_causal", surface="flash", B=1, Hq=2, Hkv=1, Sq=300, Sk=300, D=48, causal=True,
             softcap=5.0, alibi="h"),
        Case("packed_window_noncontig_dv", surface="flash", B=1, Hq=2, Hkv=2, Sq=400, Sk=450, D=80, Dv=32,
             window=(180, 40), noncontig=True),
        Case("packed_varlen_causal", surface="varlen", Hq=2, Hkv=2, D=64, causal=True,
             seqlens=((300, 280), (5, 9), (260, 400)))]
CELLS = [c for c in matrix() if c[0] == "cpu" and c[2] == torch.float32] + \
        [("cpu", c, dt, "cpu") for c in LONG for dt in (torch.float32, torch.float16)]


@pytest.fixture(params=sorted(SETTINGS))
def engine(request):
    engine, form, rows = SETTINGS[request.param]
    ops._C.cpu_fp32_gemm_force(engine)
    ops._C.cpu_bwd_form_force(form)
    ops._C.cpu_scores_on_rows_force(rows)
    try:
        got = ops.cpu_matmul_report().get("fp32")
        if got != ENGINES[engine]:
            pytest.skip(f"this torch has no fp32 brgemm: the engine stays {got} ({ops.cpu_matmul()})")
        yield request.param
    finally:
        ops._C.cpu_fp32_gemm_force(0)
        ops._C.cpu_bwd_form_force(0)
        ops._C.cpu_scores_on_rows_force(0)


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_matrix_on_each_fp32_engine(cell, engine):
    results = run_case(*cell)
    bad = [m for ok, m in results if not ok]
    assert not bad, f"{engine}: " + " | ".join(bad)


def test_dropout_on_each_fp32_engine(engine):
    """The backward regenerates the forward's dropout mask in packed key blocks too (either form on brgemm)."""
    check_dropout_backward_uses_forward_mask("cpu", "cpu", torch.float32, Sq=200)


def test_report_names_the_fp32_engine():
    """info names the engine and, where both were timed, sgemm is chosen exactly when 1.25x faster (brgemm always on
    CPUs without AVX-512)."""
    report = ops.cpu_matmul()
    print(report)
    assert "fp32: sgemm" in report or "fp32: brgemm" in report, report
    chosen = ops.cpu_matmul_report()["fp32"]
    assert chosen in ENGINES.values()
    timed = re.search(r"fp32: \w+ \(measured oneDNN's brgemm (\d+) GFLOP/s against MKL's sgemm (\d+)", report)
    if "no AVX-512: brgemm kept" in report:  # the tiles' timing is not the rule on AVX2-only CPUs (csrc/cpu/blas.cpp)
        assert chosen == "brgemm", report
    elif timed and "forced" not in report:
        dnnl, mkl = float(timed.group(1)), float(timed.group(2))
        if abs(mkl / dnnl - 1.25) > 0.02:  # the printed rates are rounded
            assert chosen == ("sgemm" if mkl >= 1.25 * dnnl else "brgemm"), report


def test_report_names_the_backward_form():
    """On brgemm info names the form the fp32 backward's packed key blocks take, and the test switch moves it."""
    ops._C.cpu_fp32_gemm_force(2)
    try:
        if ops.cpu_matmul_report().get("fp32") != "brgemm":
            pytest.skip(f"this torch has no fp32 brgemm ({ops.cpu_matmul()})")
        assert re.search(r"backward key blocks (plain|transposed)", ops.cpu_matmul()), ops.cpu_matmul()
        for form, name in ((1, "plain"), (2, "transposed")):
            ops._C.cpu_bwd_form_force(form)
            assert f"backward key blocks {name}" in ops.cpu_matmul(), ops.cpu_matmul()
    finally:
        ops._C.cpu_bwd_form_force(0)
        ops._C.cpu_fp32_gemm_force(0)


_PLANT = r"""
import sys, torch
sys.path.insert(0, "tests")
from support.cases import Case, run_case
from fastattn import ops
cells = [(Case("packed_600", B=1, Hq=2, Hkv=2, Sq=600, Sk=600, D=64), torch.float32),
         (Case("packed_1k", B=1, Hq=1, Hkv=1, Sq=1000, Sk=1000, D=32, grad=False), torch.float32),
         # one query block a head: fp16 K packed from its own rows (csrc/cpu/fwd.cpp, pack_kt_rows)
         (Case("step_rows", B=1, Hq=2, Hkv=2, Sq=8, Sk=600, D=64, grad=False), torch.float16)]
bad = sum(not all(ok for ok, _ in run_case("cpu", c, dt, "cpu")) for c, dt in cells)
print(ops.cpu_matmul_report()["fp32"], f"{bad} of {len(cells)} cells failed")
"""


@pytest.mark.parametrize("plant", ["", "kt_swap"], ids=["clean", "planted"])
def test_planted_key_packing_bug_fails_on_brgemm(plant):
    """brgemm's packed key tiles with neighbouring keys swapped (FASTATTN_CPU_PLANT=kt_swap) fail every cell, the fp16
    step whose key tiles pack from the fp16 rows too; the same cells pass clean."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTATTN_CPU_FP32_GEMM="brgemm", FASTATTN_CPU_PLANT=plant)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PLANT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    if not r.stdout.startswith("brgemm"):
        pytest.skip(f"this torch has no fp32 brgemm ({r.stdout.strip()})")
    assert ("3 of 3" if plant else "0 of 3") + " cells failed" in r.stdout, r.stdout


_PLANT_ROWS = r"""
import sys, torch
sys.path.insert(0, "tests")
from support.cases import Case, run_case
from fastattn import ops
ops._C.cpu_scores_on_rows_force(int(sys.argv[1]))
cells = [Case("rows_step", B=1, Hq=2, Hkv=2, Sq=8, Sk=600, D=64),
         Case("rows_gqa_kpad", B=2, Hq=4, Hkv=2, Sq=20, Sk=300, D=40, mask="float_kpad"),
         Case("rows_causal", surface="flash", B=1, Hq=2, Hkv=2, Sq=32, Sk=256, D=64, causal=True)]
bad = sum(not all(ok for ok, _ in run_case("cpu", c, torch.float32, "cpu")) for c in cells)
print(ops.cpu_matmul_report()["fp32"], ops._C.cpu_scores_on_rows(8, 600, 64), f"{bad} of {len(cells)} cells failed")
"""


@pytest.mark.parametrize("plant,rows", [("", 0), ("", 2), ("rows_scale", 2)], ids=["rule", "clean", "planted"])
def test_planted_rows_scale_bug_fails_on_rows(plant, rows):
    """Score tiles on K's rows (scores_on_rows forced on) that drop the score scale (FASTATTN_CPU_PLANT=rows_scale)
    fail every cell, forward and backward; the same cells pass clean, forced on and as this CPU's rule takes them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTATTN_CPU_FP32_GEMM="brgemm", FASTATTN_CPU_PLANT=plant)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _PLANT_ROWS, str(rows)], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0, r.stderr[-2000:]
    if not r.stdout.startswith("brgemm"):
        pytest.skip(f"this torch has no fp32 brgemm ({r.stdout.strip()})")
    if rows == 2:
        assert r.stdout.split()[1] == "True", r.stdout
    assert ("3 of 3" if plant else "0 of 3") + " cells failed" in r.stdout, r.stdout


# Large logits (D=256, scale 1.33: scores up to ~80, where an fp32 ulp is 7.6e-6) with the forward's tiles unpacked
# (3 query blocks of 128) and the backward's packed (5 of 64 over a group of 3): P = exp(S - lse) in the backward is as
# accurate as the naive computation only if its scores round as the forward's did.
def test_backward_scores_round_as_the_forwards(engine):
    """dV's error stays within 3x the naive fp32 computation's (Intel Xeon: 1.0x on either engine; 6.3x on sgemm,
    1.7e-5 of max|dV|, while its packed key tiles carried the scale and its unpacked products applied it afterwards.
    AMD EPYC Zen 4: brgemm 2.0x; sgemm 1.5x, and 3.2x while MKL's packed tiles were used there, which round
    differently from its plain products on that CPU)."""
    g = torch.Generator().manual_seed(22)
    q = torch.randn(1, 6, 257, 256, generator=g)
    k, v = (torch.randn(1, 2, 32, 256, generator=g) for _ in range(2))
    do = torch.randn(1, 6, 257, 256, generator=g, dtype=torch.float64)
    scale = 1.33
    dv = {}
    for name in ("cpu", "naive", "oracle"):
        leaves = [t.clone().double() if name == "oracle" else t.clone() for t in (q, k, v)]
        for t in leaves:
            t.requires_grad_(True)
        if name == "cpu":
            out = fastattn.scaled_dot_product_attention(*leaves, scale=scale, enable_gqa=True, backend="cpu")
        else:  # (the oracle takes grouped-query heads as they are)
            out = oracle_attention(*leaves, scale=scale, dtype=torch.float64 if name == "oracle" else torch.float32)
        out.backward(do.to(out.dtype))
        dv[name] = leaves[2].grad.double()
    err = {name: float((dv[name] - dv["oracle"]).abs().max()) for name in ("cpu", "naive")}
    print(engine, {n: f"{e / float(dv['oracle'].abs().max()):.2e}" for n, e in err.items()})
    assert err["cpu"] <= 3 * err["naive"], (engine, err)


@pytest.mark.parametrize("seed", [7, 9])
def test_long_head_dim_scores_as_accurate_as_naive(engine, seed):
    """fp32 forward at D=256 with large scores: the output stays within 2x the naive fp32 computation's error. oneDNN's
    brgemm sums a score in one chain over the whole head dim; on an AMD EPYC Zen 4 that read 3.1x (seed 7) and 2.05x
    (seed 9) before the score tiles took the head dim in chunks of 128 (csrc/cpu/blas.cpp scores_brgemm), 0.7-1.3x
    after; MKL's sgemm 1.5x / 1.45x there."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, 512, 256, generator=g)
    k, v = (torch.randn(1, 2, 256, 256, generator=g) for _ in range(2))
    scale = 1.107
    ref = oracle_attention(q.double(), k.double(), v.double(), scale=scale, dtype=torch.float64)
    naive = oracle_attention(q, k, v, scale=scale, dtype=torch.float32)
    out = fastattn.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, backend="cpu")
    err = {name: float((x.double() - ref).abs().max()) for name, x in (("cpu", out), ("naive", naive))}
    print(engine, seed, err)
    assert err["cpu"] <= 2 * err["naive"], (engine, err)
