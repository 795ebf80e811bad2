"""The benchmark suite (fastattn/benchmark): FLOP convention, the CPU memory tracker, the correctness flag, and a
tiny end-to-end run whose JSON/CSV must carry the expected fields. Speed itself is never asserted."""
import csv
import json
import math

import pytest
import torch

from fastattn.benchmark import Case, CpuAllocTracker, attention_flops, flops, kv_bytes, peak_extra_bytes
from fastattn.benchmark import cli, runner
from fastattn.benchmark.check import small_check
from fastattn.benchmark.impls import FastattnImpl, Impl
from fastattn.benchmark.inputs import Runner, leaves_for

MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------- FLOPs and bytes
def test_flop_convention():
    base = 4 * 2 * 8 * 1024 * 1024 * 64
    assert attention_flops(2, 8, 1024, 1024, 64, False) == base
    assert attention_flops(2, 8, 1024, 1024, 64, True) == base / 2          # causal, Sq == Sk: half
    assert attention_flops(2, 8, 512, 1024, 64, True) == base / 2           # Sq != Sk: not halved (Sq halves it)
    assert attention_flops(2, 8, 1024, 1024, 64, False, "bwd") == 2.5 * base
    assert attention_flops(2, 8, 1024, 1024, 64, True, "fwd_bwd") == 3.5 * base / 2


def test_padding_flops_count_valid_tokens_only():
    c = Case("fwd", "fp32", batch=3, heads=4, heads_kv=4, seqlen_q=100, seqlen_k=100, head_dim=32, padding=True)
    L = c.lengths()
    assert L == [50, 75, 100] and sum(L) / (3 * 100) == pytest.approx(0.75)
    assert flops(c) == sum(4 * 4 * l * l * 32 for l in L)


def test_decode_bytes():
    c = Case("decode", "bf16", batch=2, heads=32, heads_kv=8, seqlen_q=1, seqlen_k=4096, head_dim=128)
    assert kv_bytes(c) == 2 * 2 * 8 * 4096 * 128 * 2
    assert flops(c) == 4 * 2 * 32 * 1 * 4096 * 128


# ---------------------------------------------------------------------------------------------- memory tracker
def test_cpu_tracker_measures_a_known_allocation():
    with CpuAllocTracker() as t:
        a = torch.empty(48 * MiB, dtype=torch.uint8).fill_(1)
        del a
        b = torch.empty(16 * MiB, dtype=torch.uint8)
    print(f"peak {t.peak / MiB:.2f} MiB, still held {t.current / MiB:.2f} MiB, {t.events} events")
    assert 48 * MiB <= t.peak <= 48 * MiB + MiB / 2
    assert 16 * MiB <= t.current <= 16 * MiB + MiB / 2
    del b


def test_cpu_tracker_sees_simultaneous_not_sequential_peaks():
    def together():
        x = torch.ones(10 * MiB // 4)   # 10 MiB of fp32
        y = torch.ones(10 * MiB // 4)
        return float(x[0] + y[0])

    def one_after_other():
        x = torch.ones(10 * MiB // 4)
        del x
        y = torch.ones(10 * MiB // 4)
        return float(y[0])

    both, _ = peak_extra_bytes(together, "cpu")
    seq, _ = peak_extra_bytes(one_after_other, "cpu")
    print(f"together {both / MiB:.2f} MiB, one after the other {seq / MiB:.2f} MiB")
    assert 20 * MiB <= both <= 21 * MiB
    assert 10 * MiB <= seq <= 11 * MiB


def test_peak_counts_the_returned_output_not_the_inputs():
    x = torch.randn(4 * MiB // 4)  # 4 MiB allocated before: not counted
    peak, how = peak_extra_bytes(lambda: x * 2, "cpu")
    assert 4 * MiB <= peak <= 4 * MiB + MiB / 2, (peak, how)


# ---------------------------------------------------------------------------------------------- correctness flag
class _Skewed(Impl):
    """Planted bug: naive attention whose output is 1% off. The benchmark must flag it."""
    name, family = "skewed", "test"

    def build(self, case, inp, grad):
        q, k, v = leaves_for(inp, grad)
        return Runner(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal) * 1.01,
                      [q, k, v], inp.dout)


def test_check_flags_a_wrong_output_and_passes_a_right_one():
    c = Case("fwd_bwd", "fp32", batch=1, heads=2, heads_kv=2, seqlen_q=64, seqlen_k=64, head_dim=32, causal=True)
    ok, detail = small_check(_Skewed(), c, "cpu")
    assert not ok and "err" in detail, detail
    ok, detail = small_check(FastattnImpl("reference"), c, "cpu")
    assert ok, detail
    pad = Case("fwd_bwd", "bf16", batch=2, heads=4, heads_kv=4, seqlen_q=64, seqlen_k=64, head_dim=32, padding=True)
    ok, detail = small_check(FastattnImpl("sdpa"), pad, "cpu")
    assert ok, detail


def test_layout_variant_passes_strided_views_and_is_checked():
    """The (B, S, H, D) variants (Case.bshd) hand every implementation views of (B, S, H, D) memory, and the check
    runs on them: the skewed implementation still fails, the kernels pass forward and every gradient."""
    from fastattn.benchmark.cases import generate, preset_for
    from fastattn.benchmark.inputs import make_inputs
    quick = [c for c in generate(preset_for("quick", "cpu")) if c.bshd]
    assert quick and all(c.heads * c.head_dim == 1024 and not c.causal and "bshd" in c.label for c in quick)
    c = Case("fwd_bwd", "fp32", batch=1, heads=4, heads_kv=4, seqlen_q=64, seqlen_k=64, head_dim=32, bshd=True)
    inp = make_inputs(c, "cpu")
    for t in (inp.q, inp.k, inp.v, inp.dout):
        assert t.shape == (1, 4, 64, 32) and t.stride() == (64 * 4 * 32, 32, 4 * 32, 1)
    assert all(t.stride() == inp.q.stride() for t in leaves_for(inp, True))
    ok, detail = small_check(_Skewed(), c, "cpu")
    assert not ok and "err" in detail, detail
    for impl in (FastattnImpl("cpu"), FastattnImpl("auto")):
        ok, detail = small_check(impl, c, "cpu")
        assert ok, detail


class _OffPastRow(Impl):
    """Right on the small case (97 rows) and on most rows, wrong on query rows from 200 on, in the output or only
    in dQ: as a kernel (or a route auto takes only for long calls) that errs only at the timed size."""
    family = "test"

    def __init__(self, where: str):
        self.where, self.name = where, f"{where}-off-past-row"

    def build(self, case, inp, grad):
        q, k, v = leaves_for(inp, grad)
        where = self.where

        class Skew(torch.autograd.Function):  # rows 200.. of the output (forward) or of dQ (backward), 1% off
            @staticmethod
            def forward(ctx, x):
                return torch.cat([x[:, :, :200], x[:, :, 200:] * 1.01], dim=2) if where == "out" else x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return torch.cat([g[:, :, :200], g[:, :, 200:] * 1.01], dim=2) if where == "dq" else g

        def fwd():
            if where == "dq":
                return torch.nn.functional.scaled_dot_product_attention(Skew.apply(q), k, v, is_causal=case.causal)
            return Skew.apply(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal))
        return Runner(fwd, [q, k, v], inp.dout)


@pytest.mark.parametrize("mode,where", [("fwd", "out"), ("fwd_bwd", "out"), ("fwd_bwd", "dq")])
def test_check_at_the_timed_size_flags_an_error_the_small_case_misses(mode, where):
    c = Case(mode, "fp32", batch=1, heads=2, heads_kv=2, seqlen_q=512, seqlen_k=512, head_dim=32, causal=True)
    recs = runner.run([c], [_OffPastRow(where), FastattnImpl("reference")], "cpu", target_s=0.001, progress=False)
    by = {r["impl"]: r for r in recs}
    bad, good = by[f"{where}-off-past-row"], by["fastattn.reference"]
    assert bad["correct"] is False and f"timed size: {where} err" in bad["check"], bad["check"]
    assert "small case: max err/tol" in bad["check"], bad["check"]  # the small case alone passes it
    assert good["correct"] is True and "timed size: max err/tol" in good["check"], good["check"]


def test_sampled_rows_keep_both_ends():
    from fastattn.benchmark.check import sample_rows
    assert sample_rows(32) is None
    rows = sample_rows(1000)
    assert rows[0] == 0 and rows[-1] == 999 and len(rows) == 32 and bool((rows[1:] > rows[:-1]).all())


def test_failing_implementation_is_listed_with_its_reason():
    class Broken(Impl):
        name, family = "broken", "test"

        def build(self, case, inp, grad):
            def fwd():
                raise RuntimeError("kernel exploded\nsecond line")
            return Runner(fwd, [], inp.dout)

    c = Case("fwd", "fp32", batch=1, heads=1, heads_kv=1, seqlen_q=16, seqlen_k=16, head_dim=16)
    recs = runner.run([c], [Broken(), FastattnImpl("reference")], "cpu", target_s=0.001, progress=False)
    by = {r["impl"]: r for r in recs}
    assert by["broken"]["status"] == "refused" and "kernel exploded" in by["broken"]["reason"]
    assert by["fastattn.reference"]["status"] == "ok" and by["fastattn.reference"]["correct"] is True


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_run_writes_json_and_csv(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["--preset", "tiny", "--device", "cpu", "--backends", "naive,sdpa.flash,sdpa.efficient,cpu",
                   "--seqlens", "64", "--mode", "fwd,fwd_bwd,decode", "--causal", "false", "--out", str(out),
                   "--no-progress", "--max-seconds", "45"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "implementation" in printed and "summary" in printed and "verdict:" in printed
    data = json.loads((out / "results.json").read_text())
    env = data["env"]
    for key in ("torch", "triton", "cpu_model", "torch_threads", "git_commit", "device", "date", "load_average",
                "ceilings"):
        assert key in env, key
    assert data["settings"]["preset"] == "tiny"
    # CPU ceilings: per dtype the faster of torch's square matmul and the cpu kernels' own tiles (MKL's fp32 sgemm
    # trails oneDNN's tiles on AMD, fp16 matmul reads ~1 GFLOP/s without AVX512-FP16: a '% ceil' past 100 otherwise)
    c = env["ceilings"]
    for d in ("fp32", "bf16", "fp16"):
        assert c["tile_by_dtype"][d] > 0, d
        assert c["matmul_by_dtype"][d] == max(c["matmul_square_by_dtype"][d], c["tile_by_dtype"][d]), d
    # The command as typed, not this machine's absolute path to __main__.py.
    assert env["command"].startswith("python -m fastattn.benchmark --preset tiny") and "__main__" not in env["command"]
    # Each selected implementation is either measured/refused per case, or listed as not runnable with reasons.
    seen = {r["impl"] for r in data["results"]}
    for name in ("fastattn.reference", "sdpa.flash", "sdpa.efficient", "fastattn.cpu", "fastattn.cpu+varlen"):
        assert name in seen or data["not_run"].get(name), name
    assert data["not_run"]["sdpa.efficient"]  # no CPU kernel: listed with its reason
    modes = {r["case"]["mode"] for r in data["results"]}
    assert modes == {"fwd", "fwd_bwd", "decode"}
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"fastattn.reference", "sdpa.flash"}
    for r in data["results"]:
        assert r["status"] in ("ok", "refused", "error", "oom", "skipped")
        if r["status"] != "ok":
            assert r["reason"], r
    for r in ok:
        assert r["time_ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["peak_mem_mb"] >= 0 and r["correct"] in (True, False, None)
        if r["impl"] in ("fastattn.reference", "sdpa.flash"):
            assert r["correct"] is True, r["check"]
        if r["impl"] == "fastattn.reference":
            assert r["speedup_vs_naive"] == pytest.approx(1.0)
        assert r["case"]["flops"] > 0
        if r["case"]["mode"] == "decode":
            assert r["gbps"] > 0
    try:
        import matplotlib  # noqa: F401
        assert (out / "gflops_fwd_fp32.png").stat().st_size > 0 and (out / "decode_fp32.png").exists()  # CPU: GFLOP/s
    except ImportError:
        assert "plots skipped" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["results"])
    assert {"impl", "time_ms", "tflops", "peak_mem_mb", "speedup_vs_naive", "correct"} <= set(rows[0])


# ---------------------------------------------------------------------------------------------- filters
def test_backend_filters_and_case_filters():
    impls, not_run = cli.select_impls(["naive", "sdpa.*", "cpu"], "cpu")
    names = {i.name for i in impls} | set(not_run)
    assert {"fastattn.reference", "sdpa.flash", "sdpa.math", "sdpa.efficient", "sdpa.cudnn", "fastattn.cpu",
            "fastattn.cpu+varlen"} == names
    assert "sdpa.efficient" in not_run and "sdpa.flash" not in not_run
    with pytest.raises(SystemExit, match="matches nothing"):
        cli.select_impls(["no_such_backend"], "cpu")
    # The CPU quick preset leaves flex out, with a reason, unless --backends names it.
    _, not_run = cli.select_impls(None, "cpu", {"flex": "too slow to compile"})
    assert not_run["flex"] == ["too slow to compile"]

    args = cli.parser().parse_args(["--preset", "quick", "--seqlens", "256,1k", "--headdims", "64", "--causal",
                                    "true", "--mode", "fwd,decode", "--dtype", "bf16"])
    _, cases = cli.build_cases(args, "cpu")
    fwd = [c for c in cases if c.mode == "fwd"]
    dec = [c for c in cases if c.mode == "decode"]
    assert {c.seqlen_q for c in fwd} == {256, 1024} and all(c.causal and c.head_dim == 64 for c in fwd)
    assert {c.seqlen_k for c in dec} == {256, 1024} and all(c.head_dim == 64 and c.seqlen_q == 1 for c in dec)
    assert {c.dtype for c in cases} == {"bf16"} and any(c.gqa for c in fwd)
    assert not any(c.mode in ("bwd", "fwd_bwd") for c in cases)


def test_interruption_keeps_what_was_measured():
    """Ctrl-C / SIGTERM during a case: that case (its implementations are timed together, interleaved, on the CPU)
    and the rest are listed as skipped, earlier cases kept."""
    class Interrupting(Impl):
        name, family = "interrupting", "test"

        def build(self, case, inp, grad):
            def fwd():
                if case.seqlen_q == 32:
                    runner.request_stop()  # what the signal handler does; raises inside a measurement
                    raise AssertionError("request_stop should have interrupted")
                return inp.q
            return Runner(fwd, [], inp.dout)

    c = Case("fwd", "fp32", batch=1, heads=1, heads_kv=1, seqlen_q=16, seqlen_k=16, head_dim=16)
    c2 = Case("fwd", "fp32", batch=1, heads=1, heads_kv=1, seqlen_q=32, seqlen_k=32, head_dim=16)
    c3 = Case("fwd", "fp32", batch=1, heads=1, heads_kv=1, seqlen_q=48, seqlen_k=48, head_dim=16)
    recs = runner.run([c, c2, c3], [FastattnImpl("reference"), Interrupting()], "cpu", target_s=0.001,
                      progress=False)
    status = [(r["label"], r["impl"], r["status"]) for r in recs]
    print(status)
    assert [s[2] for s in status[:2]] == ["ok"] * 2 and all(r["time_ms"] > 0 for r in recs[:2])
    assert [s[2] for s in status[2:]] == ["skipped"] * 4  # c2's reference was prepared, but its timing never ran
    assert all("interrupted" in r["reason"] for r in recs[2:])
    runner.STATE["stop"] = False


def test_cpu_timings_interleave_the_implementations():
    """On the CPU a case's implementations are timed in rounds that alternate between them (a spell of load on a
    shared machine then falls on each alike), each with its own number of calls, medians per implementation; the
    rounds' orders differ, so each implementation runs right after each of the others."""
    order = []

    class Logged(Impl):
        family = "test"

        def __init__(self, name):
            self.name = name

        def build(self, case, inp, grad):
            def fwd():
                order.append(self.name)
                return inp.q
            return Runner(fwd, [], inp.dout)

    c = Case("fwd", "fp32", batch=1, heads=1, heads_kv=1, seqlen_q=16, seqlen_k=16, head_dim=16)
    recs = runner.run([c], [Logged("a"), Logged("b"), Logged("c")], "cpu", target_s=0.001, progress=False)
    assert all(r["status"] == "ok" and r["reps"] >= 3 and "interleaved" in r["timing"] for r in recs)
    timed = order[order.index("c") + 1:]  # after each one's probe (the first call) and small check
    timed = [n for n in timed if n in "abc"]
    switches = [(x, y) for x, y in zip(timed, timed[1:]) if x != y]
    assert len(switches) >= 4, timed  # alternating rounds, not a's block then b's
    assert set(switches) == {(x, y) for x in "abc" for y in "abc" if x != y}, timed  # every predecessor


# ---------------------------------------------------------------------------------------------- gpu-first preset
def test_gpu_first_preset_is_ordered_by_importance_and_covers_the_first_session():
    from fastattn.benchmark import cases as C
    cases = C.generate(C.preset_for("gpu-first", "cuda"))
    assert len(cases) == len(set(cases)) == 92
    head = cases[:4]  # the headline: bf16 hd128 4k, fwd and fwd+bwd, causal and not
    assert {(c.mode, c.causal) for c in head} == {(m, k) for m in ("fwd", "fwd_bwd") for k in (False, True)}
    assert all(c.dtype == "bf16" and c.head_dim == 128 and c.seqlen_q == 4096 for c in head)
    assert cases[4].mode == "decode" and cases[5].padding  # then a decode step and the padded BERT batch
    sweeps = [c for c in cases if c.mode != "decode" and not c.padding]
    assert {(c.dtype, c.head_dim, c.seqlen_q, c.mode, c.causal) for c in sweeps} == {
        (dt, d, s, m, k) for dt in ("bf16", "fp16") for d in (64, 128) for s in (1024, 2048, 4096, 8192, 16384)
        for m in ("fwd", "fwd_bwd") for k in (False, True)}
    assert {(c.dtype, c.seqlen_k) for c in cases if c.mode == "decode"} == {
        (dt, s) for dt in ("bf16", "fp16") for s in (4096, 8192, 16384, 32768)}
    bert = [c for c in cases if c.padding]
    assert {(c.dtype, c.mode) for c in bert} == {(dt, m) for dt in ("bf16", "fp16") for m in ("fwd", "fwd_bwd")}
    assert all((c.batch, c.heads, c.seqlen_q, c.head_dim) == (32, 12, 512, 64) for c in bert)
    # fp16 only after every bf16 headline and the bf16 hd64 sweep ends
    first_fp16 = next(i for i, c in enumerate(cases) if c.dtype == "fp16")
    assert all(c.dtype == "bf16" for c in cases[:first_fp16]) and first_fp16 == 29

    # Options select from the list and keep its order; the preset is CUDA-only, with a clear error elsewhere.
    args = cli.parser().parse_args(["--preset", "gpu-first", "--headdims", "128", "--dtype", "bf16", "--mode",
                                    "fwd", "--causal", "true"])
    _, sel = cli.build_cases(args, "cuda")
    assert sel == [c for c in cases if c.head_dim == 128 and c.dtype == "bf16" and c.mode == "fwd" and c.causal]
    with pytest.raises(SystemExit, match="gpu-first"):
        cli.build_cases(cli.parser().parse_args(["--preset", "gpu-first"]), "cpu")


def test_given_order_and_stream_keep_each_record_as_it_lands(tmp_path):
    """order="given" runs the list as given (not cheapest first); on_record sees each record before the next
    case starts, which is what --stream writes (so a killed run keeps what it measured)."""
    big = Case("fwd", "fp32", batch=1, heads=2, heads_kv=2, seqlen_q=64, seqlen_k=64, head_dim=16)
    small = Case("fwd", "fp32", batch=1, heads=1, heads_kv=1, seqlen_q=16, seqlen_k=16, head_dim=16)
    seen = []
    recs = runner.run([big, small], [FastattnImpl("reference")], "cpu", target_s=0.001, progress=False,
                      order="given", on_record=lambda r: seen.append(r["label"]))
    assert seen == [big.label, small.label] == [r["label"] for r in recs]
    seen.clear()
    runner.run([big, small], [FastattnImpl("reference")], "cpu", target_s=0.001, progress=False,
               on_record=lambda r: seen.append(r["label"]))
    assert seen == [small.label, big.label]  # the default: fewest FLOPs first
    with pytest.raises(ValueError, match="order"):
        runner.run([small], [], "cpu", order="biggest")

    stream = tmp_path / "s" / "stream.jsonl"
    rc = cli.main(["--preset", "tiny", "--device", "cpu", "--backends", "naive", "--seqlens", "64", "--mode", "fwd",
                   "--causal", "false", "--out", str(tmp_path / "b"), "--no-progress", "--no-plots",
                   "--stream", str(stream)])
    assert rc == 0
    lines = [json.loads(x) for x in stream.read_text().splitlines()]
    assert lines[0]["settings"]["preset"] == "tiny" and "triton_autotune" in lines[0]["settings"]
    assert len(lines) > 1 and all(x["impl"] == "fastattn.reference" and x["status"] for x in lines[1:])
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(data["results"]) == len(lines) - 1 and "triton_autotune" in data["settings"]


def test_crash_probe_child_does_not_autotune(monkeypatch):
    from fastattn.benchmark import probe
    got = {}

    class FakePopen:
        def __init__(self, argv, **kw):
            got.update(kw["env"])

    monkeypatch.delenv("FASTATTN_BENCH_NO_PROBE", raising=False)
    monkeypatch.setenv("FASTATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(probe.subprocess, "Popen", FakePopen)
    probe.Probes(["triton"], "cpu")
    assert got["FASTATTN_TRITON_AUTOTUNE"] == "0"


def test_gpu_session_scripts_parse():
    """benchmarks/device_run.sh (device_recheck.sh, device_speed.sh) run once per rare GPU session: at least their
    syntax is checked on every run (benchmarks/rehearse_gpu_stack.sh rehearses their control flow; too slow for CI)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("device_run.sh", "device_recheck.sh", "device_speed.sh", "device_lib.sh", "rehearse_gpu_stack.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(root, "benchmarks", script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script,args,rows", [
    ("gpu_host_time.py", ["--calls", "3", "--profile", "3"], ["decode auto (cache_seqlens)", "decode triton (no cache_",
                                                              "prefill triton (1,8,512,64)", "--- cProfile"]),
    ("gpu_decode_splits.py", ["--splits", "0,1,3"], ["B 8, keys 256", "B 1, keys 256", "  cpu     0:", "3:"]),
])
def test_gpu_session_python_scripts_run_on_cpu(script, args, rows):
    """The Python scripts device_speed.sh runs on the GPU have a CPU path (stubbed Triton launches, the cpu decode
    kernel): it runs here, so a GPU minute is not lost to an import or a typo; every row prints, none wrong."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it before triton
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), *args], capture_output=True,
                       text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert all(row in r.stdout for row in rows), r.stdout
    assert "failed" not in r.stdout and "WRONG" not in r.stdout, r.stdout


def test_an_error_in_our_implementation_fails_the_run(tmp_path, monkeypatch, capsys):
    """The quick benchmark is CI's first command: an exception from a fastattn implementation must fail it (a
    NameError in a speed rule once showed only as 'error' rows with exit code 0)."""
    from fastattn.backends import BACKENDS

    def boom(p):
        raise NameError("planted")  # what the real bug raised, from auto's speed rule
    monkeypatch.setattr(type(BACKENDS["cpu"]), "auto_reasons", lambda self, p: boom(p))
    rc = cli.main(["--preset", "tiny", "--device", "cpu", "--backends", "naive,auto", "--seqlens", "64", "--mode",
                   "fwd", "--causal", "false", "--out", str(tmp_path / "b"), "--no-progress", "--no-plots",
                   "--max-seconds", "30"])
    assert rc == 1
    assert "errors (a bug, see above) in: fastattn.auto" in capsys.readouterr().out


_SMALL = ["--preset", "tiny", "--device", "cpu", "--seqlens", "64", "--mode", "fwd", "--causal", "false",
          "--no-progress", "--no-plots", "--max-seconds", "30"]


def test_a_wrong_result_or_a_probe_crash_fails_the_run(tmp_path, monkeypatch, capsys):
    """A fastattn implementation whose output is off by 1% (flagged OFF in the table) and one whose start-up probe
    crashed (a segfault in a native kernel) each fail the run, as an exception does: CI reads only the exit status."""
    from fastattn.benchmark import impls as I, probe
    build = I.FastattnImpl.build

    def off(self, case, inp, grad):
        r = build(self, case, inp, grad)
        f = r.forward
        r.forward = lambda: f() * 1.01
        return r
    monkeypatch.setattr(I.FastattnImpl, "build", off)
    rc = cli.main(_SMALL + ["--backends", "naive,cpu", "--out", str(tmp_path / "w")])
    assert rc == 1 and "wrong results (a bug, see above) in: fastattn.cpu" in capsys.readouterr().out
    monkeypatch.setattr(I.FastattnImpl, "build", build)
    def crashed(self, backend):  # what reasons() records for a child that died on SIGSEGV
        self.failed.add(backend)
        return ["crashed (signal SIGSEGV) in a child-process probe during x; not run so the benchmark survives"]
    monkeypatch.setattr(probe.Probes, "reasons", crashed)
    rc = cli.main(_SMALL + ["--backends", "naive,cpu", "--out", str(tmp_path / "c")])
    assert rc == 1 and "crashed in the probe (a bug, see above) in: fastattn.cpu" in capsys.readouterr().out


def test_a_stop_during_set_up_is_kept(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM while the ceilings are measured (10-30 s on a CPU) stops the run: nothing more is measured,
    the run says so in its exit status (130), and the probe children, in their own session, are not reported as
    crashed (a terminal's Ctrl-C had killed them and they read as crashes)."""
    from fastattn.benchmark import ceilings
    measure = ceilings.measure

    def stopped(device):
        out = measure(device)
        runner.request_stop()  # what the signal handler does
        return out
    monkeypatch.setattr(ceilings, "measure", stopped)
    rc = cli.main(_SMALL + ["--backends", "naive,cpu", "--out", str(tmp_path / "s")])
    runner.STATE["stop"] = False
    data = json.loads((tmp_path / "s" / "results.json").read_text())
    assert rc == 130 and data["results"] and all(r["status"] == "skipped" for r in data["results"])
    assert not any("crashed" in " ".join(why) for why in data.get("not_run", {}).values())


@pytest.mark.parametrize("argv,message", [
    (["--seqlens", "0"], "--seqlens: every value must be positive"),
    (["--headdims", "0"], "--headdims: every value must be positive"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--device", "foo"], "--device: cpu or cuda"),
    (["--max-seconds", "-1"], "--max-seconds: must be >= 0"),
])
def test_bad_arguments_are_refused_before_measuring(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        cli.main(["--preset", "tiny", "--out", str(tmp_path / "o")] + argv)


def test_unwritable_output_and_nothing_to_run_are_refused_early(tmp_path, capsys):
    """An --out that is a file, a --stream that is a folder: refused before the ceilings (they had raised after all the
    measuring, with nothing written). Only GPU backends named on a CPU: exit 2 with the reasons, nothing measured."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        cli.main(["--preset", "tiny", "--out", str(f)])
    with pytest.raises(SystemExit, match="is a folder; give a file path"):
        cli.main(["--preset", "tiny", "--out", str(tmp_path / "o"), "--stream", str(tmp_path)])
    rc = cli.main(_SMALL + ["--backends", "cuda,sdpa.cudnn", "--out", str(tmp_path / "g")])
    assert rc == 2 and "no implementation can run here" in capsys.readouterr().out


def test_a_rerun_leaves_none_of_the_last_runs_files(tmp_path):
    """Plots and models.csv of an earlier run into the same --out are cleared (a rerun with fewer cases, --no-plots
    or no model level had left them beside its own results); files that are not ours stay."""
    out = tmp_path / "o"
    out.mkdir()
    for name in ("gflops_fwd_bf16.png", "decode_fp16.png", "models.csv", "notes.txt", "gflops_fwd_bf16.png.bak"):
        (out / name).write_text("old")
    rc = cli.main(_SMALL + ["--backends", "naive", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["gflops_fwd_bf16.png.bak", "notes.txt", "results.csv",
                                                    "results.json"]


def test_model_level_rows_include_auto_and_compare_with_sdpa(monkeypatch):
    """The model-level table measures what a user gets (auto) and reads each row against PyTorch's SDPA too."""
    from fastattn.benchmark import model
    rate = {"sdpa": 20.0, "reference": 10.0}

    def fake(name):
        return lambda device, s, backend, target_s: {"model": name, "attention": backend,
                                                     "tokens_per_s": rate.get(backend, 30.0), "time_ms": 1.0}
    monkeypatch.setattr(model, "bert_train", fake("bert_train"))
    monkeypatch.setattr(model, "gpt2_generate", fake("gpt2_generate"))
    rows = model.run("cpu", "tiny")
    names = [r["attention"] for r in rows if r["model"] == "bert_train"]
    assert names[0] == "auto" and names[-2:] == ["sdpa", "reference"] and len(rows) == 2 * len(names)
    auto = rows[0]
    assert auto["speedup_vs_sdpa"] == 1.5 and auto["speedup_vs_eager"] == 3.0


def test_model_level_follows_backends_and_dtype(tmp_path, monkeypatch):
    """--backends and --dtype narrow the model level as they narrow the op level (they were ignored there); sdpa
    and eager stay, as the baselines its columns read against."""
    from fastattn.benchmark import model
    seen = []

    def fake(name):
        def f(device, s, backend, target_s):
            seen.append((name, backend, s["dtype"]))
            return {"model": name, "attention": backend, "tokens_per_s": 1.0, "time_ms": 1.0,
                    "shape": f"layers=1 {s['dtype']}"}
        return f
    monkeypatch.setattr(model, "bert_train", fake("bert_train"))
    monkeypatch.setattr(model, "gpt2_generate", fake("gpt2_generate"))
    # No time budget: past _SMALL's 30 s the model level is skipped (the op level took longer than that on an AMD
    # EPYC Zen 3, whose bf16 runs on the fp32 tiles, beside another test process).
    rc = cli.main(_SMALL + ["--backends", "cpu", "--dtype", "bf16", "--model", "on", "--out", str(tmp_path),
                            "--max-seconds", "0"])
    assert rc == 0
    assert sorted({b for _, b, _ in seen}) == ["cpu", "reference", "sdpa"] and {d for *_, d in seen} == {"bf16"}


def test_bench_steps_runs_every_path_and_mask():
    """benchmarks/bench_steps.py (inference steps against torch's SDPA) at a tiny size: one line per case, a ratio
    per path, the mask named; step_mask builds transformers' bottom-right causal mask and a left-padding mask."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_steps.py")
    spec = importlib.util.spec_from_file_location("bench_steps", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    causal = mod.step_mask("causal", 3, 5, torch.float32)
    assert causal.shape == (1, 1, 3, 5) and torch.isinf(causal).sum() == 3 and causal[0, 0, 2].isfinite().all()
    pad = mod.step_mask("pad", 3, 16, torch.float32)
    assert pad.shape == (1, 1, 1, 16) and pad.sum() == 14
    for kind in ("none", "causal", "pad"):
        line = mod.run_case(4, 2, 16, 40, 5, torch.float16, kind, ["cpu", "sdpa", "auto"], rounds=1)
        assert line.startswith("H4/2 D16 Sk40 Sq5") and line.count("x ") == 3 and "torch" in line, line
        assert (kind in line) == (kind != "none"), line
