"""What the benchmark prints and writes for a person to read: progress in logs, table cells without a baseline, the
verdict line, --dtype aliases, the decode bandwidth note, and a JSON that does not record this machine's paths.
Speed itself is never asserted."""
import io

import pytest

from fastattn.benchmark import cli, report, runner


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_in_a_log_is_lines_not_carriage_returns():
    s = _Stream(tty=False)
    bar = runner.Progress(72, stream=s)
    for i in range(72):
        bar.update(f"impl case {i}")
    bar.close()
    text = s.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 5 <= len(lines) <= 12 and lines[-1].startswith("[72/72]")  # about one line per tenth of the run
    assert max(map(len, lines)) < 120


def test_progress_on_a_terminal_redraws_in_place(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # the fallback counter, not tqdm
    s = _Stream(tty=True)
    bar = runner.Progress(3, stream=s)
    for i in range(3):
        bar.update(f"c{i}")
    bar.close()
    assert s.getvalue().count("\r") == 3 and s.getvalue().endswith("\n")


def _rec(impl, family, label, ms, naive=None, sdpa=None, gbps=None):
    return {"impl": impl, "family": family, "label": label, "status": "ok", "time_ms": ms, "tflops": 1e-3,
            "gbps": gbps, "peak_mem_mb": 1.0, "correct": True, "check": "", "speedup_vs_naive": naive,
            "speedup_vs_sdpa_best": sdpa}


RECORDS = [
    _rec("fastattn.cpu", "fastattn", "case A", 1.0, sdpa=2.0),
    _rec("sdpa.flash", "sdpa", "case A", 2.0, sdpa=1.0),
    _rec("fastattn.cpu", "fastattn", "case B", 4.0, sdpa=0.5),
    _rec("sdpa.flash", "sdpa", "case B", 2.0, sdpa=1.0),
]


def test_table_without_naive_shows_a_dash_and_one_header_name():
    text = report.table(RECORDS, flops_unit="GFLOP/s")
    assert "-x" not in text and "—" in text
    assert "x sdpa-best" in text and "x sdpa " not in text
    assert "x sdpa-best" in report.summary(RECORDS)


def test_verdict_line_per_implementation():
    text = report.verdicts(RECORDS)
    lines = text.splitlines()
    assert len(lines) == 2
    cpu = next(ln for ln in lines if "fastattn.cpu" in ln)
    assert "fastest in 1/2 cases" in cpu and "1.00x the best SDPA kernel (geomean over 2)" in cpu
    sdpa = next(ln for ln in lines if "sdpa.flash" in ln)
    assert "fastest in 1/2 cases" in sdpa


def test_decode_copy_note_never_above_100_percent():
    rows = [_rec("fastattn.cpu", "fastattn", "decode", 1.0, gbps=30.0)]
    assert "% of copy" not in report.table(rows, copy_gbps=None)  # CPU: no ceiling given
    assert "above copy bandwidth" in report.table(rows, copy_gbps=10.0) and "300%" not in report.table(rows, copy_gbps=10.0)
    assert "(75% of copy bandwidth)" in report.table(rows, copy_gbps=40.0)


@pytest.mark.parametrize("given, short", [("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32"),
                                          ("torch.bfloat16", "bf16"), ("bf16", "bf16"), ("half", "fp16")])
def test_dtype_aliases(given, short):
    args = cli.parser().parse_args(["--dtype", given, "--mode", "fwd"])
    _, cases = cli.build_cases(args, "cpu")
    assert {c.dtype for c in cases} == {short}


def test_unknown_dtype_is_still_refused():
    args = cli.parser().parse_args(["--dtype", "int8"])
    with pytest.raises(SystemExit, match="--dtype: unknown"):
        cli.build_cases(args, "cpu")
