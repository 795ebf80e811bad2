"""Smoke test of benchmarks/bench_cp_gloo.py (no speed asserted): the gloo mode at a tiny size (W=2, 256 tokens per
rank, 1 rep) prints its table and writes its JSON; its compute-only and comm-only variants do what the ring call
does, minus the other part (checked on simulated ranks).

    pytest benchmarks/test_bench_cp_gloo.py -q        # ~15 s: spawns 2 gloo processes once
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_cp_gloo as B  # noqa: E402

import fastattn.distributed.ring as ring  # noqa: E402
from fastattn.distributed import CountingComm, CPConfig, cp_attention, run_local  # noqa: E402

ENV_KEYS = {"cpu_matmul", "cpu_report", "torch", "logical_cpus", "world", "threads_per_process", "dtype", "causal",
            "balance", "bwd", "reps", "block_backend"}


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    path = tmp_path_factory.mktemp("cp_gloo") / "out.json"
    cmd = [sys.executable, os.path.join(HERE, "bench_cp_gloo.py"), "--world", "2", "--tokens", "128", "256",
           "--reps", "1", "--bwd", "--dtype", "bfloat16", "--json", str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(path) as f:
        return p.stdout, json.load(f)


def test_table(gloo_run):
    out, _ = gloo_run
    lines = out.strip().splitlines()
    assert f"2 gloo processes x 1 torch thread(s) share {os.cpu_count()} logical CPUs" in out
    assert "forward + backward, bfloat16" in lines[0] and "zigzag, causal" in lines[0]
    head = lines.index(next(ln for ln in lines if ln.lstrip().startswith("tokens/rank")))
    rows = [ln.split() for ln in lines[head + 1:]]
    assert [(r[0], r[1]) for r in rows] == [("128", "0"), ("128", "1"), ("256", "0"), ("256", "1")], out
    assert all(len(r) == 12 and r[9].endswith("%") and r[10].endswith("%") for r in rows), out


def test_json(gloo_run):
    _, res = gloo_run
    env = res["env"]
    assert ENV_KEYS <= set(env), ENV_KEYS - set(env)
    assert env["world"] == 2 and env["dtype"] == "bfloat16" and env["causal"] and env["balance"] == "zigzag"
    assert env["logical_cpus"] == os.cpu_count() and env["threads_per_process"] == 1
    assert [(r["tokens_per_rank"], r["seq_len"], r["rank"]) for r in res["rows"]] == \
        [(128, 256, 0), (128, 256, 1), (256, 512, 0), (256, 512, 1)]
    for r in res["rows"]:
        assert all(len(r["times_ms"][k]) == 1 and r["times_ms"][k][0] > 0 for k in B.KINDS), r
        med = r["median_ms"]
        assert r["exposed_ms"] == pytest.approx(med["ring"] - med["compute"])
        assert r["exposed_pct"] == pytest.approx(100 * r["exposed_ms"] / med["compute"])
        assert r["comm_pct"] == pytest.approx(100 * med["comm"] / med["compute"])
    assert res["table"].splitlines()[-1].split()[:2] == ["256", "1"]


@pytest.mark.parametrize("bwd", [False, True])
@pytest.mark.parametrize("W", [2, 3])
def test_variants_split_the_ring_call(W, bwd):
    """On W simulated ranks: (b) LocalHops runs exactly the ring call's block calls with no hop reaching the
    communicator, and (c) hops_only sends exactly the ring call's hops (count and bytes)."""
    calls = {}

    def counted(fn, key):
        def f(*a, **kw):
            calls[key] = calls.get(key, 0) + 1
            return fn(*a, **kw)
        return f

    def rank(comm, variant):
        g = torch.Generator().manual_seed(comm.rank)
        q, k, v, do = (torch.randn(1, 8, 2, 16, generator=g) for _ in range(4))  # (B, S/W, H, D)
        if variant == "comm":
            B.hops_only(comm, k, v, bwd)()
        else:
            cp = CPConfig(B.LocalHops(comm) if variant == "compute" else comm, strategy="ring", balance="zigzag")
            ql, kl, vl = (t.requires_grad_(bwd) for t in (q, k, v))
            out = cp_attention(ql, kl, vl, cp=cp, causal=True)
            if bwd:
                out.backward(do)
        return dict(comm.calls), dict(comm.bytes)

    saved = ring.block_forward, ring.block_backward
    got = {}
    try:
        for variant in B.KINDS:
            calls.clear()
            ring.block_forward = counted(saved[0], "fwd")
            ring.block_backward = counted(saved[1], "bwd")
            got[variant] = (run_local(W, rank, variant, wrap=CountingComm), dict(calls))
    finally:
        ring.block_forward, ring.block_backward = saved
    (ring_comm, ring_blocks), (local_comm, local_blocks), (hop_comm, hop_blocks) = (got[k] for k in B.KINDS)
    hops = (W - 1) + (2 * W - 1) * bwd
    assert all(c == ({"ring_hop": hops}, c[1]) for c in ring_comm), ring_comm
    assert local_blocks == ring_blocks and ring_blocks["fwd"] > 0 and ("bwd" in ring_blocks) == bwd
    assert all(c == ({}, {}) for c in local_comm), local_comm
    assert hop_blocks == {} and hop_comm == ring_comm


def test_bad_tokens_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        B.parse_args(["--tokens", "256", "255"])
    assert "--tokens (per rank) must be positive and even for --balance zigzag, got [255]" in capsys.readouterr().err
    assert B.parse_args(["--tokens", "255", "--balance", "contiguous"]).tokens == [255]
