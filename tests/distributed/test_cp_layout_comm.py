"""Tier 0: layouts (shard / unshard / global positions, torch's head-tail order) and the communicators."""
import threading
import time

import pytest
import torch

from fastattn.distributed import CountingComm, CPCommError, run_local
from fastattn.distributed import layout


@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_shard_unshard_positions(W, balance):
    S = 2 * W * 5
    x = torch.arange(S).view(1, S, 1) * 10 + torch.arange(3).view(1, 1, 3)  # (1, S, 3): row s holds 10 s + c
    shards = [layout.shard(x, 1, W, r, balance) for r in range(W)]
    assert torch.equal(layout.unshard_list(shards, 1, balance), x)
    for r in range(W):
        pos = layout.global_positions(S, W, r, balance)
        assert torch.equal(shards[r][0, :, 0], pos * 10), (r, pos)  # the positions of the rows a rank holds
        segs = layout.segments(S // W, W, r, balance)
        assert torch.equal(torch.cat([torch.arange(s.start, s.start + s.length) for s in segs]), pos)
    if balance == "zigzag" and W > 1:  # rank 0 holds the first and the last chunk
        c = S // (2 * W)
        assert layout.global_positions(S, W, 0, balance).tolist() == list(range(c)) + list(range(S - c, S))


@pytest.mark.parametrize("W", [2, 3, 4])
def test_zigzag_equals_torch_head_tail(W):
    try:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
    except ImportError as e:  # private torch API: it moved before; the test documents the equality while it exists
        pytest.skip(f"torch {torch.__version__} has no _HeadTailLoadBalancer at the known path ({e})")
    S = 2 * W * 7
    theirs = _HeadTailLoadBalancer(S, W, torch.device("cpu"))._generate_indices()[0].long()
    assert torch.equal(layout.order(S, W, "zigzag"), theirs)


def test_divisibility_error_names_padding():
    with pytest.raises(ValueError, match=r"50 is not divisible by 8 .*pad the sequence by 6"):
        layout.shard(torch.zeros(1, 50), 1, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="not divisible by 3"):
        layout.global_positions(10, 3, 0, "contiguous")
    with pytest.raises(ValueError, match="balance must be one of"):
        layout.shard(torch.zeros(1, 8), 1, 2, 0, "stripe")


def _collectives(comm):
    r, W = comm.rank, comm.world_size
    x = torch.full((W, 2), float(r)) + torch.arange(W).view(W, 1) * 100  # slot j: 100 j + r
    ag = comm.all_gather(torch.tensor([r, r * r]))
    rs = comm.reduce_scatter(x)
    a2a = comm.all_to_all(x)
    ar = comm.all_reduce(torch.tensor([float(r + 1)]))
    # two hops in flight, waited in the opposite order: they must match in posting order
    b1, b2 = torch.empty(1), torch.empty(1)
    h1 = comm.ring_hop([torch.tensor([float(r)])], [b1])
    h2 = comm.ring_hop([torch.tensor([float(r) + 0.5])], [b2])
    h2.wait()
    h1.wait()
    return ag, rs, a2a, ar, b1, b2


@pytest.mark.parametrize("W", [2, 3])
def test_local_comm_semantics(W):
    res = run_local(W, _collectives)
    for r, (ag, rs, a2a, ar, b1, b2) in enumerate(res):
        assert ag.tolist() == [[j, j * j] for j in range(W)]
        assert rs.tolist() == [100.0 * r * W + sum(range(W))] * 2  # sum over ranks j of (100 r + j)
        assert a2a[:, 0].tolist() == [100.0 * r + j for j in range(W)]  # from rank j: its slot r
        assert ar.item() == W * (W + 1) / 2
        assert (b1.item(), b2.item()) == ((r - 1) % W, (r - 1) % W + 0.5)


def test_counting_comm():
    res = run_local(2, lambda c: (_collectives(c), c)[1], wrap=CountingComm)
    c = res[0]
    assert c.calls == {"all_gather": 1, "reduce_scatter": 1, "all_to_all": 1, "all_reduce": 1, "ring_hop": 2}
    assert c.bytes["ring_hop"] == 8 and c.bytes["all_to_all"] == 2 * 2 * 4


def test_local_failure_does_not_hang():
    """A rank that raises (or skips a collective) fails its peers at once, not after a timeout."""
    def body(comm):
        if comm.rank == 1:
            raise RuntimeError("rank 1 broke")
        comm.all_reduce(torch.zeros(1))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 broke"):
        run_local(3, body, timeout=30)
    assert time.monotonic() - t0 < 10


def test_local_mismatched_collective_is_an_error():
    def body(comm):
        return comm.all_gather(torch.zeros(comm.rank + 1))  # shapes differ across ranks
    with pytest.raises(CPCommError, match="ranks disagree on a collective"):
        run_local(2, body)


def test_local_missing_hop_times_out_with_message():
    def body(comm):
        if comm.rank == 0:
            comm.ring_hop([torch.zeros(1)], [torch.empty(1)]).wait()  # rank 1 never sends
    with pytest.raises(CPCommError, match="waited 1 s for a ring hop"):
        run_local(2, body, timeout=1)
    assert not [t for t in threading.enumerate() if t.name.startswith("cp-rank") and t.is_alive()]


@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
def test_config_layout_helpers_unshard_over_comm(balance):
    from fastattn.distributed import CPConfig
    x = torch.randn(2, 24, 3)

    def rank(comm):
        cp = CPConfig(comm, balance=balance)
        return cp.unshard(cp.shard(x, 1), 1), cp.global_positions(24)
    res = run_local(3, rank)
    for r, (full, pos) in enumerate(res):
        assert torch.equal(full, x)
        assert torch.equal(pos, layout.global_positions(24, 3, r, balance))


# --- a torch built without torch.distributed ---------------------------------------------------------------------

_NO_DIST = """
import sys, types, torch
if {stub}:  # what a USE_DISTRIBUTED=0 build's torch.distributed holds: is_available() False, two stub classes
    stub = types.ModuleType("torch.distributed")
    stub.is_available = lambda: False
    stub.ProcessGroup = stub.GroupName = type("_Stub", (), {{}})
    sys.modules["torch.distributed"] = torch.distributed = stub
else:  # fastattn.distributed cannot be imported at all
    sys.modules["fastattn.distributed"] = None
import fastattn
from fastattn.models import GPT2, GPT2Config, Bert, BertConfig
torch.manual_seed(0)
gpt = GPT2(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
ids = torch.randint(0, 50, (1, 8))
full = gpt(ids)
Bert(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                max_position_embeddings=32)).eval()(ids)
if {stub}:
    from fastattn.distributed import CPConfig, run_local, unshard_list
    try:
        CPConfig()  # the default process group: TorchComm
    except RuntimeError as e:
        print(e)
    res = run_local(2, lambda comm: gpt(CPConfig(comm).shard(ids, 1), cp=CPConfig(comm)))  # simulated ranks
    print("cp max err", float((unshard_list(res, 1, "zigzag") - full).abs().max()))
else:
    from fastattn.models import _cp
    try:
        _cp.cp_attention()
    except RuntimeError as e:
        print(e)
print("models ok")
"""


@pytest.mark.parametrize("stub", [True, False], ids=["distributed-unavailable", "fastattn.distributed-unimportable"])
def test_import_without_torch_distributed(stub):
    """fastattn, fastattn.models and (with a stub torch.distributed) fastattn.distributed import and run: TorchComm
    refuses with a clear error, the simulated ranks still work; without fastattn.distributed the models run
    without context parallelism. In a subprocess: the simulation replaces torch.distributed in sys.modules."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    got = subprocess.run([sys.executable, "-c", _NO_DIST.format(stub=stub)], cwd=root, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert got.returncode == 0 and "models ok" in got.stdout, got.stdout + got.stderr
    if stub:
        assert "this torch build has no torch.distributed" in got.stdout
        assert float(got.stdout.split("cp max err")[1].split()[0]) < 1e-5
    else:
        assert "cp=) needs fastattn.distributed, which cannot be imported" in got.stdout
