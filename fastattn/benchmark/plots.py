"""PNG plots (matplotlib is optional: without it, plots are skipped with a note).

  tflops_<mode>_<dtype>.png   TFLOP/s vs sequence length per implementation (GPU), one panel per (head dim, causal);
  gflops_<mode>_<dtype>.png   the same in GFLOP/s (CPU)
  memory_<mode>_<dtype>.png   peak extra memory vs sequence length, same panels
  decode_<dtype>.png          achieved bandwidth (GB/s) vs KV-cache length (GPU: with the copy ceiling)
Only the main sweeps are plotted (padding and GQA variants are single points; they are in the table/CSV).
Throughput axes start at 0, so the gap between two lines is not exaggerated; ticks sit at the measured lengths only,
and the subtitle gives the batch x heads behind each length (the presets shrink the batch as lengths grow)."""
from __future__ import annotations

import os
import textwrap
from collections import defaultdict
from typing import List, Optional


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _len_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _shapes(rows, key: str) -> str:
    """'batch x heads: 128: 8x8, 512: 2x8' (heads 'Hq/Hkv' when they differ) for the lengths on the x axis."""
    seen = {}
    for r in rows:
        c = r["case"]
        h = f"{c['heads']}" if c["heads"] == c["heads_kv"] else f"{c['heads']}/{c['heads_kv']}"
        seen.setdefault(c[key], f"{c['batch']}x{h}")
    return "batch x heads: " + ", ".join(f"{_len_label(n)}: {s}" for n, s in sorted(seen.items()))


def _x_axis(ax, lengths, label: str):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lengths))
    ax.set_xticklabels([_len_label(n) for n in sorted(lengths)])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _finish(plt, fig, axes, headline: str, subtitle: str, path: str):
    handles, labels = {}, {}
    for ax in axes:  # one legend for the figure, below the panels, so it never covers a line
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(len(handles), 4), fontsize=7, frameon=False)
    # Wrapped to the figure's width (about 14 characters per inch at 9 pt): a one-panel figure must not clip it.
    width = max(20, int(fig.get_size_inches()[0] * 14))
    lines = [headline] + [w for line in subtitle.splitlines() for w in textwrap.wrap(line, width)]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(records: List[dict], out_dir: str, title: str = "", gflops: bool = False,
         copy_gbps: Optional[float] = None) -> Optional[List[str]]:
    """Writes the PNGs; returns their paths, or None when matplotlib is missing. gflops: compute in GFLOP/s (CPU
    numbers) instead of TFLOP/s. title: the environment (device, threads, versions). copy_gbps: the device's copy
    bandwidth, drawn on the decode plot as its ceiling (None on CPU, where a cache-resident KV cache beats it)."""
    plt = _matplotlib()
    if plt is None:
        return None
    ok = [r for r in records if r["status"] == "ok"]
    names = sorted({r["impl"] for r in ok})
    cmap = plt.get_cmap("tab10")
    color = {n: cmap(i % 10) for i, n in enumerate(names)}  # one colour per implementation in every figure
    unit, mult = ("GFLOP/s", 1e3) if gflops else ("TFLOP/s", 1.0)
    written = []
    sweeps = defaultdict(list)  # (mode, dtype) -> records of the main sweeps
    for r in ok:
        c = r["case"]
        if c["mode"] != "decode" and not c["padding"] and c["heads"] == c["heads_kv"]:
            sweeps[(c["mode"], c["dtype"])].append(r)
    for (mode, dtype), rows in sorted(sweeps.items()):
        panels = sorted({(r["case"]["head_dim"], r["case"]["causal"]) for r in rows})
        lengths = {r["case"]["seqlen_q"] for r in rows}
        for metric, ylabel, fname, what in (
                ("tflops", f"{unit} (higher is better)", unit[0].lower() + "flops", f"attention throughput in {unit}"),
                ("peak_mem_mb", "peak extra MiB (lower is better)", "memory", "peak extra memory in MiB")):
            fig, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 4.6 * len(panels)), 4.6), squeeze=False,
                                     layout="constrained")
            for ax, (D, causal) in zip(axes[0], panels):
                series = defaultdict(list)
                for r in rows:
                    if r["case"]["head_dim"] == D and r["case"]["causal"] == causal and r.get(metric) is not None:
                        val = r[metric] * (mult if metric == "tflops" else 1.0)
                        series[r["impl"]].append((r["case"]["seqlen_q"], val))
                for impl, pts in sorted(series.items()):
                    pts.sort()
                    style = "--" if impl.startswith("sdpa") or impl == "flex" else "-"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=impl,
                            color=color[impl])
                _x_axis(ax, lengths, "sequence length")
                if metric == "peak_mem_mb":
                    ax.set_yscale("log")  # spans orders of magnitude (linear kernels vs the score matrix)
                else:
                    ax.set_ylim(bottom=0)
                ax.set_title(f"head dim {D}{', causal' if causal else ''}", fontsize=9)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
            path = os.path.join(out_dir, f"{fname}_{mode}_{dtype}.png")
            _finish(plt, fig, axes[0], f"{mode} {dtype}: {what}", "\n".join(filter(None, [_shapes(rows, "seqlen_q"),
                                                                                          title])), path)
            written.append(path)
    dec = defaultdict(lambda: defaultdict(list))
    dec_rows = defaultdict(list)
    for r in ok:
        if r["case"]["mode"] == "decode" and r.get("gbps"):
            dec[r["case"]["dtype"]][r["impl"]].append((r["case"]["seqlen_k"], r["gbps"]))
            dec_rows[r["case"]["dtype"]].append(r)
    for dtype, series in dec.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
        for impl, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl, color=color[impl])
        if copy_gbps:
            ax.axhline(copy_gbps, color="grey", ls=":", lw=1, label=f"copy ceiling {copy_gbps:.0f} GB/s")
        _x_axis(ax, {r["case"]["seqlen_k"] for r in dec_rows[dtype]}, "KV cache length")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("GB/s, K and V read once (higher is better)")
        ax.grid(alpha=0.3)
        shapes = sorted({(c["batch"], c["heads"], c["heads_kv"], c["head_dim"])
                         for c in (r["case"] for r in dec_rows[dtype])})
        shape = "one query token; " + "; ".join(f"batch {b}, heads {h}/{hk} (q/kv), head dim {d}"
                                                for b, h, hk, d in shapes)
        path = os.path.join(out_dir, f"decode_{dtype}.png")
        _finish(plt, fig, [ax], f"decode {dtype}: KV-cache bandwidth in GB/s", "\n".join(filter(None, [shape, title])),
                path)
        written.append(path)
    return written
