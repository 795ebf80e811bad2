"""Is the ring's communication hidden behind compute? W real gloo processes on CPU, per token count per rank.

Each rank times, with a barrier before every measured call, interleaved over --reps (min / median):
  (a) ring: cp_attention(strategy="ring") over the gloo group, forward (or forward + backward with --bwd);
  (b) compute: the same call on a communicator whose ring hops are local copies (LocalHops: the received
      buffers get the sent tensors, what a receive writes anyway), so the same block calls, merges and
      bookkeeping run with no communication; every rank runs it at once, so compute contends as in (a);
  (c) comm: the hops alone, in the ring's order: the forward's W-1 K/V hops and, with --bwd, the backward's
      W-1 K/V hops and W dK/dV hops (fp32, grad_comm_dtype's default), each waited as the ring waits it.
exposed = (a) - (b), as a % of (b), beside (c) as a % of (b); hidden = 1 - exposed / (c). The ring hides its
communication when exposed << (c).

    python benchmarks/bench_cp_gloo.py --tokens 1024 2048 4096 8192 --bwd --reps 7 --json cp_gloo.json
    python benchmarks/bench_cp_gloo.py --world 2 --tokens 256 --reps 1     # checks that it runs; numbers meaningless

Caveats (printed with the table): the W processes, each with --threads torch threads plus gloo's transport
threads, share the machine's logical CPUs (os.cpu_count(); a VM's vCPUs may be hyperthreads of fewer cores), so
with W * threads >= CPUs the compute of the ranks contends and gloo's threads take CPU from it. Hops go through
the loopback TCP transport of gloo, not a network.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fastattn
import fastattn  # noqa: E402
from fastattn import ops  # noqa: E402
from fastattn.distributed import CPConfig, TorchComm, cp_attention  # noqa: E402

KINDS = ("ring", "compute", "comm")  # (a), (b), (c)


class _Done:
    def wait(self) -> None:
        pass


class LocalHops:
    """A CPComm whose ring hops copy the sent tensors into the receive buffers at once (no communication); the
    other collectives (none in a ring call without check_shapes) go to the real communicator."""

    def __init__(self, inner):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size

    def ring_hop(self, send, recv):
        for s, r in zip(send, recv):
            r.copy_(s)
        return _Done()

    def all_gather(self, x):
        return self.inner.all_gather(x)

    def reduce_scatter(self, x):
        return self.inner.reduce_scatter(x)

    def all_to_all(self, x):
        return self.inner.all_to_all(x)

    def all_reduce(self, x):
        return self.inner.all_reduce(x)


def hops_only(comm, k, v, bwd: bool):
    """The hops of one ring call (ring.py's _KVRing / _GradRing) without compute. Returns a function running them;
    its buffers are allocated once, here."""
    W = comm.world_size
    kv = [(k, v)] + [(torch.empty_like(k), torch.empty_like(v)) for _ in range(min(W - 1, 2))]
    g = [tuple(torch.empty(t.shape, dtype=torch.float32) for t in (k, v)) for _ in range(2)]

    def kv_pass():  # step t waits the hop it posted before its compute
        held = kv[0]
        for t in range(W - 1):
            nxt = kv[1 + t % 2]
            comm.ring_hop(held, nxt).wait()
            held = nxt

    def run():
        kv_pass()
        if not bwd or W == 1:
            return
        held, acc, free, pending = kv[0], g[0], g[1], None
        for t in range(W):
            hop = None
            if t < W - 1:
                nxt = kv[1 + t % 2]
                hop = comm.ring_hop(held, nxt)
                held = nxt
            if pending is not None:
                pending.wait()  # the dK/dV accumulator of the held block, from rank r - 1
            pending = comm.ring_hop(acc, free)
            acc, free = free, acc
            if hop is not None:
                hop.wait()
        pending.wait()
    return run


def _worker(rank, world, store_path, args, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.pg_timeout))
    try:
        comm = TorchComm()
        kw = dict(strategy="ring", balance=args.balance, backend=args.backend)
        cps = {"ring": CPConfig(comm, **kw), "compute": CPConfig(LocalHops(comm), **kw)}
        dtype = getattr(torch, args.dtype)
        rows = []
        for n in args.tokens:
            g = torch.Generator().manual_seed(1000 * rank + n)
            q, k, v, do = (torch.randn(args.batch, n, args.heads, args.head_dim, generator=g).to(dtype)
                           for _ in range(4))  # (B, S/W, H, D): this rank's shard

            def attention(cp):
                if not args.bwd:
                    with torch.no_grad():
                        cp_attention(q, k, v, cp=cp, causal=args.causal)
                    return
                ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
                cp_attention(ql, kl, vl, cp=cp, causal=args.causal).backward(do)
            fns = {"ring": lambda: attention(cps["ring"]), "compute": lambda: attention(cps["compute"]),
                   "comm": hops_only(comm, k.contiguous(), v.contiguous(), args.bwd)}
            times = {name: [] for name in KINDS}
            for i in range(args.warmup + args.reps):
                for j in range(len(KINDS)):  # interleaved, the order rotating, so that drift hits all three
                    name = KINDS[(i + j) % len(KINDS)]
                    dist.barrier()
                    t0 = time.perf_counter()
                    fns[name]()
                    dt = time.perf_counter() - t0
                    if i >= args.warmup:
                        times[name].append(dt * 1e3)
            rows.append(dict(tokens_per_rank=n, seq_len=n * world, rank=rank, times_ms=times))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(rows=rows, block_backend=_block_backend(args, dtype)), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _block_backend(args, dtype) -> str:
    """The backend the ring's block calls take (fastattn's choice unless --backend)."""
    from fastattn import dispatch
    from fastattn.blocks import block_params
    q = torch.zeros(args.batch, args.heads, 2, args.head_dim, dtype=dtype)  # (B, H, S, D)
    return dispatch.select(block_params(q, q, q, q_start=0, k_start=0, causal=args.causal), args.backend).name


def summarise(row: dict) -> dict:
    t = row["times_ms"]
    med = {k: statistics.median(v) for k, v in t.items()}
    mn = {k: min(v) for k, v in t.items()}
    exposed = med["ring"] - med["compute"]
    return dict(row, median_ms=med, min_ms=mn, exposed_ms=exposed, exposed_pct=100 * exposed / med["compute"],
                comm_pct=100 * med["comm"] / med["compute"],
                hidden_fraction=1 - exposed / med["comm"] if med["comm"] > 0 else None)


def cpu_topology() -> dict:
    """What the OS reports: logical CPUs, those this process may use, and distinct (package, core) pairs."""
    cores = set()
    base = "/sys/devices/system/cpu"
    for c in range(os.cpu_count() or 0):
        try:
            with open(f"{base}/cpu{c}/topology/core_id") as f1, \
                    open(f"{base}/cpu{c}/topology/physical_package_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return dict(logical_cpus=os.cpu_count(), usable_cpus=usable, cores_reported=len(cores) or None)


def environment(args, block_backend: str) -> dict:
    return dict(cpu_matmul=ops.cpu_matmul(), cpu_report=ops.cpu_matmul_report(), torch=torch.__version__,
                fastattn=fastattn.__version__, python=platform.python_version(), platform=platform.platform(),
                **cpu_topology(), load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                world=args.world, threads_per_process=args.threads, dtype=args.dtype, causal=args.causal,
                balance=args.balance, strategy="ring", batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                bwd=args.bwd, reps=args.reps, warmup=args.warmup, grad_comm_dtype="float32",
                backend=args.backend, block_backend=block_backend, date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime()))


def table(env: dict, rows) -> str:
    step = "forward + backward" if env["bwd"] else "forward"
    W, T, cpus = env["world"], env["threads_per_process"], env["logical_cpus"]
    lines = [
        f"# bench_cp_gloo: ring ({env['balance']}{', causal' if env['causal'] else ''}), {step}, {env['dtype']}, "
        f"B={env['batch']} H={env['heads']} D={env['head_dim']}, block calls on '{env['block_backend']}'",
        f"# {W} gloo processes x {T} torch thread(s) share {cpus} logical CPUs (os.cpu_count(); "
        f"{env['cores_reported'] or '?'} cores reported, a VM may hide hyperthreads)"
        + (": the ranks' compute contends, and gloo's threads take CPU from it" if W * T >= (cpus or 1) else ""),
        f"# {env['cpu_matmul'].split(';')[0]}; torch {env['torch']}; load average {env['load_average']}",
        f"# ms per call, median (min) over {env['reps']} reps; exposed = ring - compute; hidden = 1 - exposed/comm",
        f"{'tokens/rank':>11} {'rank':>4} {'(a) ring':>17} {'(b) compute':>17} {'(c) comm':>15} {'exposed':>9} "
        f"{'exposed/(b)':>11} {'(c)/(b)':>8} {'hidden':>7}",
    ]
    for r in rows:
        med, mn = r["median_ms"], r["min_ms"]
        cell = {k: f"{med[k]:.2f} ({mn[k]:.2f})" for k in KINDS}
        hidden = "-" if r["hidden_fraction"] is None else f"{r['hidden_fraction']:.0%}"
        lines.append(f"{r['tokens_per_rank']:>11} {r['rank']:>4} {cell['ring']:>17} {cell['compute']:>17} "
                     f"{cell['comm']:>15} {r['exposed_ms']:>9.2f} {r['exposed_pct']:>10.1f}% {r['comm_pct']:>7.1f}% "
                     f"{hidden:>7}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2, help="gloo processes (W)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens PER RANK (one run per value)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--balance", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--bwd", action="store_true", help="time forward + backward (default: forward, no_grad)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS too)")
    ap.add_argument("--backend", default=None, help="fastattn backend of the block calls (default: fastattn's)")
    ap.add_argument("--pg-timeout", type=float, default=300.0, help="gloo process-group timeout, seconds")
    ap.add_argument("--json", metavar="PATH", help="write the environment and every rank's times here")
    args = ap.parse_args(argv)
    for name in ("world", "reps", "threads", "batch", "heads", "head_dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    unit = 2 if args.balance == "zigzag" else 1  # zigzag: 2W chunks of the W * n tokens
    bad = [n for n in args.tokens if n < unit or n % unit]
    if bad:
        ap.error(f"--tokens (per rank) must be positive{' and even for --balance zigzag' if unit == 2 else ''}, "
                 f"got {bad}")
    return args


def run(args) -> dict:
    """Spawns the W ranks, returns {"env": ..., "rows": [summaries, by tokens then rank]}."""
    import torch.multiprocessing as mp
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the children's torch import
    try:
        with tempfile.TemporaryDirectory(prefix="fastattn_bench_cp_gloo_") as tmp:
            mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args, tmp), nprocs=args.world,
                     join=True)
            per_rank = []
            for r in range(args.world):
                with open(os.path.join(tmp, f"rank{r}.json")) as f:
                    per_rank.append(json.load(f))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    rows = [summarise(row) for i in range(len(args.tokens)) for row in (p["rows"][i] for p in per_rank)]
    return dict(env=environment(args, per_rank[0]["block_backend"]), rows=rows)


def main(argv=None):
    args = parse_args(argv)
    res = run(args)
    text = table(res["env"], res["rows"])
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(res, table=text), f, indent=1)


if __name__ == "__main__":
    main()
