"""PNG plots (matplotlib is optional: without it, plots are skipped with a note).

  tflops_<mode>_<dtype>.png   TFLOP/s (GFLOP/s on CPU) vs sequence length per implementation, one panel per (head dim, causal)
  memory_<mode>_<dtype>.png   peak extra memory vs sequence length, same panels
  decode_<dtype>.png          achieved bandwidth (GB/s) vs KV-cache length
Only the main sweeps are plotted (padding and GQA variants are single points; they are in the table/CSV)."""
from __future__ import annotations

import os
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


def plot(records: List[dict], out_dir: str, title: str = "", gflops: bool = False) -> Optional[List[str]]:
    """Writes the PNGs; returns their paths, or None when matplotlib is missing. gflops: label compute in GFLOP/s
    (CPU numbers) instead of TFLOP/s."""
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
        for metric, ylabel, fname in (("tflops", unit, "tflops"), ("peak_mem_mb", "peak extra MiB", "memory")):
            fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
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
                ax.set_xscale("log", base=2)
                if metric == "peak_mem_mb":
                    ax.set_yscale("log")
                ax.set_title(f"{mode} {dtype} hd{D}{' causal' if causal else ''}", fontsize=10)
                ax.set_xlabel("sequence length")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=7)
            if title:
                fig.suptitle(title, fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{fname}_{mode}_{dtype}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    dec = defaultdict(lambda: defaultdict(list))
    for r in ok:
        if r["case"]["mode"] == "decode" and r.get("gbps"):
            dec[r["case"]["dtype"]][r["impl"]].append((r["case"]["seqlen_k"], r["gbps"]))
    for dtype, series in dec.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for impl, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl, color=color[impl])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV cache length")
        ax.set_ylabel("GB/s (K and V read once)")
        ax.set_title(f"decode {dtype}" + (f" — {title}" if title else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"decode_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
