"""`python -m fastattn.benchmark`: speed and memory of every fastattn backend against PyTorch SDPA (each kernel
forced), FlexAttention and naive attention, with a correctness check of everything timed. Prints a table and
writes results.json (with the environment), results.csv and PNG plots to --out.

examples:
  python -m fastattn.benchmark                                  # quick preset on the default device
  python -m fastattn.benchmark --preset full --out bench_full
  python -m fastattn.benchmark --backends cpu,sdpa.flash,naive --seqlens 1k,4k --headdims 128 --causal true
  python -m fastattn.benchmark --mode decode --seqlens 1k,8k,32k
  python -m fastattn.benchmark --list                           # implementations (and why some cannot run), cases"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import shlex
import signal
import sys
import time
from typing import List, Optional

import torch

from . import cases as C
from . import ceilings
from . import env as E
from . import impls as I
from . import plots, probe, report, runner


def _ints(s: str) -> List[int]:
    out = []
    for tok in s.split(","):
        tok = tok.strip().lower()
        if tok:
            out.append(int(float(tok[:-1]) * 1024) if tok.endswith("k") else int(tok))
    return out


def _list(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


# torch's dtype names (and `half`/`float`) accepted for --dtype, mapped to the short names the cases use.
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def _dtypes(s: str) -> List[str]:
    return [DTYPE_ALIASES.get(t.lower().removeprefix("torch."), t.lower()) for t in _list(s)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastattn.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=["quick", "full", "tiny", "gpu-first"],
                   help="quick: the main sweeps in a few minutes; full: every head dim, dtype and mode; "
                        "tiny: a smoke test; gpu-first (CUDA): the shapes that matter most, most important first, "
                        "for a short cold session (default quick)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--backends", type=_list, default=None,
                   help="comma list of implementations or glob patterns, e.g. 'cpu,sdpa.flash,naive' or "
                        "'fastattn.*'; a bare fastattn backend name includes its +varlen variant; 'naive' = "
                        "fastattn.reference. --list shows the names")
    p.add_argument("--seqlens", type=_ints, default=None,
                   help="sequence lengths (and KV-cache lengths for decode), e.g. 512,1k,4k")
    p.add_argument("--headdims", type=_ints, default=None, help="head dims, e.g. 64,128")
    p.add_argument("--causal", choices=["true", "false", "both"], default=None,
                   help="causal cases only (true), non-causal only (false) or both (default: the preset's)")
    p.add_argument("--dtype", type=_dtypes, default=None,
                   help=f"comma list of {', '.join(C.DTYPES)} (torch's names bfloat16, float16, float32 too)")
    p.add_argument("--mode", type=_list, default=None, help=f"comma list of {', '.join(C.MODES)}")
    p.add_argument("--out", default="bench_out", help="output folder (default bench_out/)")
    p.add_argument("--model", choices=["on", "off"], default=None,
                   help="model-level benchmark (BERT training step, GPT-2 generation); default: the preset's")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop measuring after this many seconds, the rest listed as skipped (cheapest cases run "
                        "first); default: the preset's (CPU quick 180, GPU quick 240), 0 = no limit")
    p.add_argument("--target-s", type=float, default=None, help="CPU: seconds of timed repeats per measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads(N) for the run (default: torch's). On a shared machine, fewer "
                        "threads than cores avoids waiting for busy cores at every parallel region")
    p.add_argument("--stream", default=None, metavar="PATH",
                   help="also write each result to PATH (rewritten from the start) as one JSON line the moment it is "
                        "measured (the first line holds the settings), so a run that is killed keeps what it measured")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots (JSON and CSV only)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display on stderr (default: a bar on a terminal, a line per tenth of the run "
                        "otherwise)")
    p.add_argument("--list", action="store_true", help="list implementations and cases, run nothing")
    return p


def select_impls(names: Optional[List[str]], device: str, skip=None):
    """(runnable implementations, {implementation: reasons} for those that cannot run on this device, or that the
    preset leaves out when --backends is not given)."""
    every = I.all_impls()
    left_out = {}
    if not names and skip:
        left_out = {n: [skip[n]] for n in every if n in skip}
        every = {n: i for n, i in every.items() if n not in skip}
    if names:
        chosen = []
        for tok in names:
            tok = "fastattn.reference" if tok == "naive" else tok
            hits = [n for n in every if fnmatch.fnmatch(n, tok) or n in (f"fastattn.{tok}", f"fastattn.{tok}+varlen")
                    or n.startswith(tok + ".")]
            if not hits:
                raise SystemExit(f"--backends: {tok!r} matches nothing; known: {', '.join(every)}")
            chosen += hits
        every = {n: every[n] for n in dict.fromkeys(chosen)}
    dev = device.split(":")[0]
    runnable, not_run = [], {}
    for n, impl in every.items():
        why = impl.unavailable(dev)
        if why:
            not_run[n] = why
        else:
            runnable.append(impl)
    not_run.update(left_out)
    return runnable, not_run


def _filter_explicit(p, args) -> list:
    """A preset with an explicit case list (gpu-first) keeps its order: the options select from it."""
    out = []
    for c in p.cases:
        S = c.seqlen_k if c.mode == "decode" else c.seqlen_q
        if ((args.headdims and c.head_dim not in args.headdims) or (args.seqlens and S not in args.seqlens)
                or (args.dtype and c.dtype not in args.dtype) or (args.mode and c.mode not in args.mode)
                or (args.causal in ("true", "false") and c.mode != "decode" and c.causal != (args.causal == "true"))):
            continue
        out.append(c)
    return out


def build_cases(args, device: str):
    try:
        p = C.preset_for(args.preset, device)
    except ValueError as e:
        raise SystemExit(f"--preset: {e} on {device}")
    if args.dtype:
        bad = [d for d in args.dtype if d not in C.DTYPES]
        if bad:
            raise SystemExit(f"--dtype: unknown {bad}; choose from {', '.join(C.DTYPES)}")
    if args.mode:
        bad = [m for m in args.mode if m not in C.MODES]
        if bad:
            raise SystemExit(f"--mode: unknown {bad}; choose from {', '.join(C.MODES)}")
    if args.target_s is not None:
        p.target_s = args.target_s
    if p.cases is not None:
        return p, _filter_explicit(p, args)
    if args.headdims:
        p.headdims = args.headdims
        p.train_headdims = None
        p.decode_shape = p.decode_shape[:3] + (args.headdims[0],)
    if args.seqlens:
        p.extra_seqlens = [s for s in p.extra_seqlens if s in args.seqlens] or [args.seqlens[len(args.seqlens) // 2]]
        p.seqlens = p.decode_lens = args.seqlens
        p.train_seqlens = None
    if args.causal:
        p.causal = {"true": (True,), "false": (False,), "both": (False, True)}[args.causal]
    if args.dtype:
        p.dtypes = args.dtype
    modes = args.mode or None
    cases = C.generate(p, modes)
    if args.headdims and (not modes or "decode" in modes):  # decode runs once per requested head dim
        decode = [c for c in cases if c.mode == "decode"]
        cases = [c for c in cases if c.mode != "decode"]
        for D in args.headdims:
            cases += [C.Case(**{**c.__dict__, "head_dim": D}) for c in decode]
    return p, list(dict.fromkeys(cases))


def _check_args(args) -> None:
    """Values argparse's types let through that would fail deep in the run (or be ignored): refused up front."""
    for name in ("seqlens", "headdims"):
        bad = [n for n in getattr(args, name) or [] if n <= 0]
        if bad:
            raise SystemExit(f"--{name}: every value must be positive, got {bad}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: must be at least 1, got {args.threads}")
    if args.target_s is not None and not args.target_s > 0:
        raise SystemExit(f"--target-s: must be positive, got {args.target_s}")
    if args.max_seconds is not None and args.max_seconds < 0:
        raise SystemExit(f"--max-seconds: must be >= 0 (0 = no limit), got {args.max_seconds}")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise SystemExit(f"--device: cpu or cuda[:N], got {args.device!r}")
    if args.list:
        return
    # The output folder and the stream file are checked before minutes of measuring, not after them.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out!r} is a file, not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out!r}: cannot create the folder ({e.strerror})") from None
    if not os.access(args.out, os.W_OK):
        raise SystemExit(f"--out {args.out!r}: the folder is not writable")
    if args.stream and os.path.isdir(args.stream):
        raise SystemExit(f"--stream {args.stream!r} is a folder; give a file path")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    preset, cases = build_cases(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    # Ctrl-C and SIGTERM (e.g. `timeout`) stop the measuring; what was measured is still reported and written. A
    # signal during the set-up (the ceilings take 10-30 s on a CPU) counts too: the flag is cleared here, once.
    runner.STATE["stop"] = False
    old = {sig: signal.signal(sig, runner.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, device, preset, cases, t0, argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Stream:
    """--stream: one JSON line per record, flushed as it lands (the settings and environment first)."""

    def __init__(self, path: Optional[str], settings: dict, env: dict):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "w")
            self.f.write(json.dumps({"settings": settings, "env": env}, default=str) + "\n")
            self.f.flush()

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec, default=str) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _run(args, device, preset, cases, t0, argv) -> int:
    impls, not_run = select_impls(args.backends, device, preset.skip)
    # Native kernels first run tiny calls in child processes, in the background: a crash there keeps the backend
    # out of this process (it is listed with the reason) instead of taking the whole run down.
    probes = None if args.list else probe.Probes(
        {i.backend for i in impls if isinstance(i, I.FastattnImpl)}, device)
    if args.list:
        print("implementations:")
        for impl in impls:
            print(f"  {impl.name:<24} {impl.description}")
        for n, why in not_run.items():
            print(f"  {n:<24} not run here: {'; '.join(why)}")
        print(f"\n{len(cases)} cases:")
        for c in cases:
            print("  " + c.label)
        return 0

    if not impls:
        print("no implementation can run here:")
        print(report.not_run_text(not_run))
        return 2
    env = E.collect(device)
    # Portable: the command as a user would type it, not this interpreter's absolute path to __main__.py.
    env["command"] = shlex.join(["python", "-m", "fastattn.benchmark", *(sys.argv[1:] if argv is None else argv)])
    cpu = not device.startswith("cuda")
    print(f"fastattn benchmark: preset {args.preset} on {env.get('gpu') or env['cpu_model']} ({device}), "
          f"torch {env['torch']}, {len(cases)} cases x {len(impls)} implementations", flush=True)
    try:
        env["ceilings"] = ceilings.measure(device)
        c = env["ceilings"]
        unit, mul = ("GFLOP/s", 1e3) if cpu else ("TFLOP/s", 1)
        rates = ", ".join(f"{d} {t * mul:.0f}" for d, t in c["matmul_by_dtype"].items())
        shape = c["matmul"].split(" ")[1]
        if cpu:  # the faster of torch's square matmul and the cpu kernels' tiles, each shown
            parts = "; ".join(f"{d} {c['matmul_square_by_dtype'][d] * mul:.0f} / {c['tile_by_dtype'][d] * mul:.0f}"
                              for d in c["matmul_by_dtype"])
            shape = f"the faster of a {shape} matmul and the cpu kernels' {c['tile']}: {parts}"
        print(f"ceilings measured now: matmul {rates} {unit} ({shape}), copy "
              f"{c['copy_gbps']:.0f} GB/s ({c['copy']}); torch threads {env['torch_threads']}, commit "
              f"{(env.get('git_commit') or '?')[:10]}", flush=True)
        if cpu:
            print(f"CPU paths: {env.get('cpu_matmul')}", flush=True)
            if env.get("cpu_isa_env"):
                print(f"CPU ISA settings: {env['cpu_isa_env']}", flush=True)
    except Exception as e:  # noqa: BLE001 - context only
        env["ceilings"] = {"error": f"{type(e).__name__}: {e}"}
    if cpu and (env.get("load_average") or 0) > 0.5 * (env["cpu_count"] or 1):
        hint = "; re-run with --threads 1 for steadier numbers" if torch.get_num_threads() > 1 else ""
        print(f"note: the CPU is busy (load average {env['load_average']} on {env['cpu_count']} cores): timings "
              f"include waiting for other processes{hint}", flush=True)
    elif cpu and not args.threads and torch.get_num_threads() > 1:
        print(f"note: timing with torch's default {torch.get_num_threads()} threads; on a shared machine "
              f"--threads 1 gives steadier numbers (and a fair per-core comparison)", flush=True)
    budget = preset.max_seconds if args.max_seconds is None else (args.max_seconds or None)
    # FASTATTN_TRITON_AUTOTUNE=0 times the heuristic Triton config, not the tuned one: the numbers say which.
    autotune = os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"
    stream = _Stream(args.stream, dict(preset=args.preset, device=device, argv=sys.argv[1:] if argv is None else
                                       list(argv), triton_autotune=autotune, order="given" if preset.cases else
                                       "cheapest first"), env)
    try:
        records = runner.run(cases, impls, device, target_s=preset.target_s, max_seconds=budget,
                             progress=not args.no_progress, not_run=not_run, order="given" if preset.cases else
                             "cheapest", on_record=stream.write,
                             gate=lambda impl: probes.reasons(impl.backend) if isinstance(impl, I.FastattnImpl)
                             else [])
    finally:
        stream.close()
        probes.close()
    models = []
    run_model = preset.model if args.model is None else args.model == "on"
    if run_model:
        from . import model
        over = budget is not None and time.monotonic() - t0 > budget or runner.STATE["stop"]
        with runner.interruptible():
            # --backends and --dtype narrow the model level too (fastattn backends; sdpa and eager stay as baselines).
            named = [i.backend for i in impls if isinstance(i, I.FastattnImpl)] if args.backends else None
            models = [] if over else model.run(device, args.preset, target_s=max(preset.target_s, 0.5),
                                               backends=named, dtypes=args.dtype or None)
        if runner.STATE["stop"]:
            print("(model-level benchmark interrupted or skipped)", file=sys.stderr)
    wall = time.monotonic() - t0

    print()
    # CPU: no copy ceiling for decode; a cache-resident KV cache outruns the 64 MiB copy, so a percentage misleads.
    print(report.table(records, flops_unit="GFLOP/s" if cpu else "TFLOP/s",
                       copy_gbps=None if cpu else env["ceilings"].get("copy_gbps"),
                       matmul_by_dtype=env["ceilings"].get("matmul_by_dtype")))
    print("summary (geometric means over the cases each implementation ran):")
    print(report.summary(records))
    print("\nverdict:")
    print(report.verdicts(records))
    if not_run:
        print("\nnot run:")
        print(report.not_run_text(not_run))
    if models:
        print("\nmodel level (same random-weight model, attention swapped via fastattn.use_backend):")
        print(report.model_table(models))
    settings = {"preset": args.preset, "device": device, "argv": sys.argv[1:] if argv is None else list(argv),
                "target_s": preset.target_s, "wall_s": round(wall, 1), "max_seconds": budget,
                "triton_autotune": autotune,
                "preset_params": dataclasses.asdict(preset),
                "flop_convention": "fwd 4*B*H*Sq*Sk*D (half for causal Sq==Sk; padding cases: sum over sequences "
                                   "of valid L^2); bwd 2.5x; fwd_bwd 3.5x",
                "memory": "peak extra bytes allocated during one call, over the level before it (see "
                          "fastattn/benchmark/memory.py)"}
    paths = report.write(args.out, env, records, not_run, models, settings)
    written = list(paths.values())
    if not args.no_plots:
        commit = (env.get("git_commit") or "")[:10]
        n = env["torch_threads"]
        threads = f", {n} thread{'s' if n != 1 else ''}" if cpu else ""
        pngs = plots.plot(records, args.out, title=f"{env.get('gpu') or env['cpu_model']} ({device}{threads}), "
                          f"torch {env['torch']}, fastattn {commit}", gflops=cpu,
                          copy_gbps=None if cpu else env["ceilings"].get("copy_gbps"))
        if pngs is None:
            print("\nplots skipped: matplotlib is not installed (pip install matplotlib, or the 'bench' extra)")
        else:
            written += pngs
    short = [os.path.relpath(p) for p in written]
    print(f"\nwrote {', '.join(r if not r.startswith('..') else p for r, p in zip(short, written))}")
    print(f"wall time {wall:.1f} s")
    # An exception, a wrong result or a crash of one of our own implementations is a bug, not a measurement: fail the
    # run (CI runs this). An interrupted run says so in its status too (130, as a shell reports Ctrl-C).
    ours = [r for r in records if r["impl"].startswith("fastattn.")]
    broken = sorted({r["impl"] for r in ours if r["status"] == "error"})
    wrong = sorted({r["impl"] for r in ours if r["status"] == "ok" and r.get("correct") is False})
    crashed = sorted(i.name for i in impls if isinstance(i, I.FastattnImpl) and i.backend in probes.failed)
    for what, names in (("errors", broken), ("wrong results", wrong), ("crashed in the probe", crashed)):
        if names:
            print(f"\n{what} (a bug, see above) in: {', '.join(names)}")
    if broken or wrong or crashed:
        return 1
    return 130 if runner.STATE["stop"] else 0


if __name__ == "__main__":
    sys.exit(main())
