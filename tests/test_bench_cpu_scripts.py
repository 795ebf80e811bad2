"""The CPU benchmark scripts that search for slow calls and time the few-rows rules run end to end at tiny sizes (their
numbers are not checked here): benchmarks/bench_random_calls.py and bench_few_rows.py; the order of interleaved rounds
(benchmarks/interleave.py)."""
import json
import os
import subprocess
import sys

import pytest

from fastattn import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))  # (CI: installed; here: the tree)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_random_calls_sweep_runs(tmp_path):
    """bench_random_calls.py at a tiny budget: each call runs on both sides, the JSON keeps every call with its ratio
    and what auto chose, within the budget (training: a quarter)."""
    out = tmp_path / "calls.json"
    stdout = _run("bench_random_calls.py", "--calls", "8", "--rounds", "1", "--max-work", "65536", "--seed", "5",
                  "--json", str(out))
    calls = json.loads(out.read_text())["calls"]
    assert len(calls) == 8 and "8 calls: auto" in stdout
    for c in calls:
        assert c["x_torch"] > 0 and c["chosen"] and 2 ** c["log2W"] <= 65536 / (4 if c["grad"] else 1) * 1.1, c
    only = tmp_path / "only.json"
    _run("bench_random_calls.py", "--calls", "8", "--rounds", "1", "--max-work", "65536", "--seed", "5",
         "--json", str(only), "--only", "2", "6")
    picked = json.loads(only.read_text())["calls"]
    assert [c["Sk"] for c in picked] == [calls[2]["Sk"], calls[6]["Sk"]] and picked[1]["D"] == calls[6]["D"]


@pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built (the script times its fwd op)")
def test_few_rows_bench_runs():
    """bench_few_rows.py: a ratio per key count on the fwd op and on the bwd op, and the three columns (both kernel
    pairs and the rules' pick) in training."""
    for mode in ([], ["--bwd"]):
        stdout = _run("bench_few_rows.py", "--dtype", "fp32", "--dim", "16", "--shapes", "1,2,2,1", "2,4,2,2",
                      "--keys", "64", "600", *mode)
        assert "B1 H2/2 Sq1 (rows 1): 64 " in stdout and "B2 H4/2 Sq2 (rows 4): 64 " in stdout, stdout
        assert ("the bwd op, tile time over one-pass time" in stdout) == bool(mode), stdout
    stdout = _run("bench_few_rows.py", "--dtype", "bf16", "--dim", "16", "--shapes", "1,2,2,1", "--keys", "64",
                  "--training", "--rounds", "1")
    assert all(s in stdout for s in ("keys 64: torch", "prefill", "rule", "decode")), stdout


def test_interleaved_rounds_take_balanced_orders():
    """Each implementation takes each place, and directly follows each other one, equally often over the orders the
    rounds cycle through (a Williams design), for 2-7 implementations."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from interleave import balanced_orders
    finally:
        sys.path.pop(0)
    for n in range(2, 8):
        rows = balanced_orders(n)
        assert all(sorted(r) == list(range(n)) for r in rows)
        places = {(x, i) for r in rows for i, x in enumerate(r)}
        follows = [(r[i], r[i + 1]) for r in rows for i in range(n - 1)]
        assert len(places) == n * n and len(set(follows)) == n * (n - 1)
        assert len(follows) == len(rows) // n * n * (n - 1)  # (so each pair exactly len(rows) / n times)
