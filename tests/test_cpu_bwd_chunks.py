"""The CPU backward of few (sequence, kv head) pairs cut into key chunks (csrc/cpu/params.h bwd_key_chunks): with
fewer pairs than bwd_min_tasks (8, or one per CPU of the process where there are more; FASTATTN_CPU_BWD_TASKS sets
it) every backward engine (the fp32 tiles of bwd.cpp, bf16/fp16 on the matrix units in bwd_lowp.cpp) gives each
chunk of a head's keys a task of its own and sums the chunks' dQ partials afterwards, so that one long head keeps
every thread busy. Here: every feature through that path against the float64 oracle, the bits the same on 1, 2 and
3 threads, the switch's target as a many-core machine's, and a planted bug in the chunks' sum that the checks must
catch."""
import os

import pytest
import torch

import fastattn
from support.cases import Case, cell_id, run_case
from support.checks import run_on_forced_fp16_pairs, run_planted

pytestmark = pytest.mark.skipif(fastattn.get_backend("cpu").unavailable() != [],
                                reason="fastattn._C without CPU kernels (extension not built)")

# Fewer than 8 (sequence, kv head) pairs and more keys than one key block (256 keys on the fp32 tiles, 512 on the
# matrix units), so each head runs as 2-8 chunks; "long" has more key blocks than chunks (several blocks a chunk).
CASES = [
    Case("plain", B=1, Hq=1, Hkv=1, Sq=300, Sk=1100, D=40),
    Case("causal", B=2, Hq=1, Hkv=1, Sq=700, Sk=1300, D=64, causal=True),
    Case("gqa_causal", B=1, Hq=4, Hkv=1, Sq=600, Sk=600, D=32, causal=True),
    Case("long", B=1, Hq=2, Hkv=1, Sq=70, Sk=4700, D=16),
    Case("window", surface="flash", B=1, Hq=2, Hkv=2, Sq=900, Sk=1200, D=48, window=(300, 40)),
    Case("bool_keypad", B=2, Hq=2, Hkv=1, Sq=65, Sk=1100, D=64, mask="bool_kpad"),
    Case("float_2d", B=1, Hq=2, Hkv=2, Sq=300, Sk=1030, D=32, mask="float_2d"),
    Case("softcap", surface="flash", B=1, Hq=2, Hkv=1, Sq=200, Sk=1100, D=64, softcap=3.0),
    Case("alibi", surface="flash", B=1, Hq=2, Hkv=2, Sq=300, Sk=1100, D=32, alibi="h", causal=True),
    Case("dv_ne_d", B=1, Hq=3, Hkv=1, Sq=129, Sk=1500, D=64, Dv=40),
    Case("noncontig", B=1, Hq=2, Hkv=2, Sq=257, Sk=1100, D=64, noncontig=True),
    Case("varlen", surface="varlen", Hq=2, Hkv=1, seqlens=((700, 1300), (40, 900), (0, 600)), D=32, causal=True),
]
CELLS = [("cpu", c, dt, "cpu") for c in CASES for dt in (torch.float32, torch.bfloat16, torch.float16)]

# Eight pairs and more: never cut on a machine of 8 CPUs or fewer, cut (2-4 chunks) where a machine has 32, as
# FASTATTN_CPU_BWD_TASKS=32 has it here.
MANY = [
    Case("gqa_8pairs", B=2, Hq=8, Hkv=4, Sq=200, Sk=1100, D=32),
    Case("mha_9pairs_causal", B=1, Hq=9, Hkv=9, Sq=1300, Sk=1300, D=24, causal=True),
]
MANY_CELLS = [("cpu", c, dt, "cpu") for c in MANY for dt in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_key_chunks_against_the_oracle(cell):
    torch.manual_seed(hash(cell_id(cell)) % 2**31)
    failures = [m for ok, m in run_case(*cell) if not ok]
    assert not failures, "\n".join(failures)


def _same_bits_on_1_2_3_threads(dtype, shape, **kw):
    """The cpu backend's output and gradients at shape (B, Hq, Hkv, Sq, Sk, D) are the same bits on 1, 2 and 3
    threads (each call after torch.manual_seed(7), for dropout's mask)."""
    B, Hq, Hkv, Sq, Sk, D = shape
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, Hq, Sq, D, dtype=dtype)
    old = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(7)
            out = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu", **kw)
            return (out,) + torch.autograd.grad(out, (q, k, v), dout)
        finally:
            torch.set_num_threads(old)

    first = run(1)
    for threads in (2, 3):
        for a, b, name in zip(first, run(threads), ("out", "dq", "dk", "dv")):
            assert torch.equal(a, b), f"{name} differs between 1 and {threads} threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_key_chunks_bitwise_across_threads(dtype):
    """One KV head of 4700 keys (5 chunks of 2 key blocks on the matrix units, 8 of 3 on the fp32 tiles) with
    causal dropout: the same bits on 1, 2 and 3 threads (each thread count hands the chunks to the threads
    differently, and a thread runs its run of a head's chunks as one task)."""
    _same_bits_on_1_2_3_threads(dtype, (1, 4, 1, 300, 4700, 24), is_causal=True, dropout_p=0.1)


@pytest.mark.parametrize("cell", MANY_CELLS, ids=[cell_id(c) for c in MANY_CELLS])
def test_a_many_core_target_against_the_oracle(cell, monkeypatch):
    monkeypatch.setenv("FASTATTN_CPU_BWD_TASKS", "32")  # (read per call)
    torch.manual_seed(hash(cell_id(cell)) % 2**31)
    failures = [m for ok, m in run_case(*cell) if not ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_many_core_target_bitwise_across_threads(dtype, monkeypatch):
    """Eight pairs cut for 32 tasks: the same bits on 1, 2 and 3 threads."""
    monkeypatch.setenv("FASTATTN_CPU_BWD_TASKS", "32")
    _same_bits_on_1_2_3_threads(dtype, (2, 8, 4, 130, 1700, 40))


def test_the_task_target_is_the_machines(monkeypatch):
    """The target is 8, or the process's CPUs where more (never torch's thread count), and the partials' cap 8 MB a
    task of it, as `info` reports them; the switch sets the target and a value it cannot take is named."""
    monkeypatch.delenv("FASTATTN_CPU_BWD_TASKS", raising=False)  # (the suite may run under the switch)
    report = fastattn.ops.cpu_matmul_report()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert (report["process_cpus"], report["bwd_min_tasks"]) == (str(cpus), str(max(8, cpus)))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fastattn.ops.cpu_matmul_report()["bwd_min_tasks"] == str(max(8, cpus))
    finally:
        torch.set_num_threads(old)
    mb = min(max(8 * max(8, cpus), 64), 512)  # the partials' cap: 8 MB a task, 64-512 MB
    assert f"up to {max(8, cpus)} tasks (8, or one per CPU of the process's {cpus}), dQ partials within {mb} MB" \
        in fastattn.ops.cpu_matmul()
    monkeypatch.setenv("FASTATTN_CPU_BWD_TASKS", "32")
    assert fastattn.ops.cpu_matmul_report()["bwd_min_tasks"] == "32"
    assert "pairs than 32 cut into key chunks, up to 32 tasks" in fastattn.ops.cpu_matmul()
    assert "dQ partials within 256 MB" in fastattn.ops.cpu_matmul()
    from fastattn.backends import cpu as cpu_backend
    assert not any("FASTATTN_CPU_BWD_TASKS" in n for n in cpu_backend.environment_notes())
    for bad in ("0", "-3", "many", "3.5", "\u0663"):
        monkeypatch.setenv("FASTATTN_CPU_BWD_TASKS", bad)
        assert fastattn.ops.cpu_matmul_report()["bwd_min_tasks"] == str(max(8, cpus)), bad
        assert any(f"FASTATTN_CPU_BWD_TASKS={bad!r} is not a whole number from 1" in n
                   for n in cpu_backend.environment_notes()), bad


def test_key_chunks_on_forced_fp16_pairs():
    """The oracle cells in fp16 (the many-core target's too) with every fp16 call on bf16 pairs
    (FASTATTN_CPU_FP16_PAIRS=1, a fresh process): the pairs' three products a tile go to the chunks' partials too."""
    r = run_on_forced_fp16_pairs("-k", "oracle and float16 and not bfloat16", "tests/test_cpu_bwd_chunks.py",
                                 OMP_NUM_THREADS="2")
    assert r.returncode == 0 and f"{len(CASES) + len(MANY)} passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


_PLANT = r"""
import os, sys, torch
import test_cpu_bwd_chunks as t
from support.cases import run_case
os.environ["FASTATTN_CPU_BWD_TASKS"] = sys.argv[1]  # (read per call)
torch.manual_seed(0)
case = t.CASES[0] if sys.argv[2] == "one" else t.MANY[0]
bad = [m for ok, m in run_case("cpu", case, torch.bfloat16, "cpu") if not ok]
assert not bad, "\n".join(bad)
"""


def test_a_planted_chunk_sum_bug_fails_the_check():
    """FASTATTN_CPU_PLANT=chunk_sum (bwd.cpp write_dq_chunks: the last chunk's dQ partial left out of the sum) fails
    the dQ check of a cell above; the same script passes without it."""
    clean = run_planted(_PLANT, args=("8", "one"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    bad = run_planted(_PLANT, "chunk_sum", args=("8", "one"))
    assert bad.returncode != 0 and "dq" in bad.stderr, bad.stderr[-2000:]


def test_the_switch_decides_the_cut():
    """The planted sum bug shows where heads are cut: eight pairs under FASTATTN_CPU_BWD_TASKS=32 are (the check
    fails), one pair under FASTATTN_CPU_BWD_TASKS=1 is not (no sum to plant it in: it passes)."""
    many = run_planted(_PLANT, "chunk_sum", args=("32", "many"))
    assert many.returncode != 0 and "dq" in many.stderr, many.stderr[-2000:]
    uncut = run_planted(_PLANT, "chunk_sum", args=("1", "one"))
    assert uncut.returncode == 0, uncut.stderr[-2000:]
