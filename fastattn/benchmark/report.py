"""Writes a run's results: a table on stdout, results.json (environment + every record), results.csv."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List

CSV_FIELDS = ["label", "impl", "family", "status", "mode", "dtype", "batch", "heads", "heads_kv", "seqlen_q",
              "seqlen_k", "head_dim", "causal", "padding", "flops", "time_ms", "min_ms", "tflops", "gbps",
              "peak_mem_mb", "speedup_vs_naive", "speedup_vs_sdpa_best", "sdpa_best", "correct", "check", "notes",
              "reason", "wall_s"]


def _fmt(x, spec: str, missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, spec)


def _x(x, width: int) -> str:
    """A speedup cell: '1.23x', or an em dash when there is no baseline in this run (e.g. naive filtered out)."""
    return f"{format(x, f'{width - 1}.2f')}x" if x else f"{'—':>{width}}"


def _copy_note(gbps, copy_gbps) -> str:
    """Decode bandwidth against the copy ceiling. Only meaningful where the ceiling is one: a KV cache that fits a
    cache level outruns a large DRAM copy (the CPU case: cli passes no ceiling there), so no percentage above 100."""
    if not gbps or not copy_gbps:
        return ""
    pct = 100 * gbps / copy_gbps
    return f"  ({pct:.0f}% of copy bandwidth)" if pct <= 100 else "  (above copy bandwidth: cache-resident KV)"


def _ceil_pct(r: dict, matmul_by_dtype) -> str:
    """Achieved FLOP rate as a percentage of this run's matmul rate in the row's dtype."""
    peak = (matmul_by_dtype or {}).get(r.get("dtype") or (r.get("case") or {}).get("dtype"))
    if not peak or not r.get("tflops"):
        return f"{'-':>6}"
    return f"{100 * r['tflops'] / peak:5.0f}%"


def table(records: List[dict], flops_unit: str = "TFLOP/s", copy_gbps=None, matmul_by_dtype=None) -> str:
    """One block per case; one row per implementation (measured ones fastest first, then refusals).

    copy_gbps: the device copy ceiling that decode rows are compared with; None leaves the comparison out.
    matmul_by_dtype: {dtype name: TFLOP/s} measured this run; the '% ceil' column divides by the row's dtype."""
    cases: "OrderedDict[str, List[dict]]" = OrderedDict()
    for r in records:
        cases.setdefault(r["label"], []).append(r)
    lines = []
    per_s = 1e3 if flops_unit == "GFLOP/s" else 1.0
    head = f"  {'implementation':<24} {'ms':>9} {flops_unit:>8} {'% ceil':>6} {'GB/s':>7} {'peak MB':>8} " \
           f"{'x naive':>8} {'x sdpa-best':>11}  check"
    for label, rows in cases.items():
        lines.append(label)
        lines.append(head)
        ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["time_ms"])
        for r in ok:
            flag = {True: "ok", False: "OFF: " + r.get("check", ""), None: "? " + r.get("check", "")}[r.get("correct")]
            if r.get("notes"):
                flag += f"  [{r['notes']}]"
            flag += _copy_note(r.get("gbps"), copy_gbps)
            lines.append(f"  {r['impl']:<24} {_fmt(r['time_ms'], '9.3f')} {_fmt(r['tflops'] * per_s if r.get('tflops') else None, '8.3f')} "
                         f"{_ceil_pct(r, matmul_by_dtype)} {_fmt(r.get('gbps'), '7.1f')} {_fmt(r.get('peak_mem_mb'), '8.1f')} "
                         f"{_x(r.get('speedup_vs_naive'), 8)} {_x(r.get('speedup_vs_sdpa_best'), 11)}"
                         f"  {flag}")
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"  {r['impl']:<24} {r['status']}: {r['reason'][:150]}")
        lines.append("")
    return "\n".join(lines)


def _gm(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary(records: List[dict]) -> str:
    """Geometric-mean speedups per implementation over the cases it ran, and refusal counts."""
    per: Dict[str, dict] = OrderedDict()
    for r in records:
        s = per.setdefault(r["impl"], {"n": 0, "naive": [], "sdpa": [], "off": 0, "refused": 0, "other": 0,
                                       "skipped": 0})
        if r["status"] == "ok":
            s["n"] += 1
            if r.get("speedup_vs_naive"):
                s["naive"].append(r["speedup_vs_naive"])
            if r.get("speedup_vs_sdpa_best"):
                s["sdpa"].append(r["speedup_vs_sdpa_best"])
            s["off"] += r.get("correct") is False
        elif r["status"] in ("refused", "skipped"):
            s[r["status"]] += 1
        else:
            s["other"] += 1

    lines = [f"  {'implementation':<24} {'ran':>4} {'refused':>8} {'failed':>7} {'skipped':>8} {'geomean x naive':>16} "
             f"{'geomean x sdpa-best':>20} {'wrong':>6}"]
    for name, s in per.items():
        lines.append(f"  {name:<24} {s['n']:>4} {s['refused']:>8} {s['other']:>7} {s['skipped']:>8} "
                     f"{_x(_gm(s['naive']), 16)} {_x(_gm(s['sdpa']), 20)} {s['off']:>6}")
    return "\n".join(lines)


def verdicts(records: List[dict]) -> str:
    """One line per implementation that ran: in how many of its cases it was the fastest, and its geometric-mean
    speed relative to the best SDPA kernel of each case. Best first."""
    by_case: Dict[str, List[dict]] = OrderedDict()
    for r in records:
        if r["status"] == "ok":
            by_case.setdefault(r["label"], []).append(r)
    stats: Dict[str, dict] = OrderedDict()
    for rows in by_case.values():
        fastest = min(rows, key=lambda r: r["time_ms"])["impl"]
        for r in rows:
            s = stats.setdefault(r["impl"], {"ran": 0, "won": 0, "sdpa": []})
            s["ran"] += 1
            s["won"] += r["impl"] == fastest
            if r.get("speedup_vs_sdpa_best"):
                s["sdpa"].append(r["speedup_vs_sdpa_best"])
    lines = []
    for name, s in sorted(stats.items(), key=lambda kv: -(_gm(kv[1]["sdpa"]) or 0)):
        gm = _gm(s["sdpa"])
        rel = f"{gm:.2f}x the best SDPA kernel (geomean over {len(s['sdpa'])})" if gm else "no SDPA kernel to compare"
        lines.append(f"  {name:<24} fastest in {s['won']}/{s['ran']} cases, {rel}")
    return "\n".join(lines)


def not_run_text(not_run: Dict[str, List[str]]) -> str:
    return "\n".join(f"  {n:<24} {'; '.join(why)}" for n, why in not_run.items())


def model_table(rows: List[dict]) -> str:
    lines = [f"  {'model':<14} {'attention':<12} {'tokens/s':>10} {'ms':>9} {'x sdpa':>7} {'x eager':>8}  shape"]
    for r in rows:
        if r.get("status") == "error":
            lines.append(f"  {r['model']:<14} {r['attention']:<12} error: {r['reason']}")
        else:
            lines.append(f"  {r['model']:<14} {r['attention']:<12} {r['tokens_per_s']:>10.1f} {r['time_ms']:>9.1f} "
                         f"{_fmt(r.get('speedup_vs_sdpa'), '6.2f')}x {_fmt(r.get('speedup_vs_eager'), '7.2f')}x  "
                         f"{r['shape']}")
    return "\n".join(lines)


def flat(r: dict) -> dict:
    row = {k: v for k, v in r.items() if k != "case"}
    row.update({k: v for k, v in r["case"].items() if k not in ("kind",)})
    return row


# Files of ours a run may leave in its folder (plots.py's names, models.csv): cleared before a run writes there, so
# a rerun with fewer cases, --no-plots or no model level leaves none of the last run's beside its own.
_OURS = re.compile(r"(?:(?:tflops|gflops|memory)_[a-z_]+_(?:fp32|bf16|fp16)|decode_(?:fp32|bf16|fp16))\.png|models\.csv")


def write(out_dir: str, env: dict, records: List[dict], not_run: Dict[str, List[str]], models: List[dict],
          settings: dict) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if _OURS.fullmatch(name):
            os.remove(os.path.join(out_dir, name))
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "results.csv")}
    with open(paths["json"], "w") as f:
        json.dump({"env": env, "settings": settings, "not_run": not_run, "results": records, "models": models}, f,
                  indent=1, default=str)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat(r).items()})
    if models:
        paths["models_csv"] = os.path.join(out_dir, "models.csv")
        with open(paths["models_csv"], "w", newline="") as f:
            fields = ["model", "attention", "tokens_per_s", "time_ms", "tokens", "speedup_vs_sdpa", "speedup_vs_eager",
                      "shape", "status", "reason"]
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(models)
    return paths
