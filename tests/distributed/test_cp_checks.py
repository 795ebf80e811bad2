"""What the CP entry points check before their first collective, on simulated ranks (run_local): every rank raises
where one rank's input is bad (with check_shapes), inputs on another device are refused instead of sent as
uninitialised buffers, a refused softcap leaves no K/V hop in flight, and the all-gather backward takes Dv != D on
the fused cpu backend (its packed dK | dV accumulators)."""
import pytest
import torch

import fastattn
from fastattn.distributed import CPConfig, cp_attention, cp_varlen_attention, run_local
from support.oracle import assert_rule

CPU = "cpu" if not fastattn.get_backend("cpu").unavailable() else "reference"


def _qkv(dv=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 8, 2, 16, generator=g).to(dtype) for _ in range(2))  # (B, S/W, H, D)
    return q, k, torch.randn(1, 8, 2, dv, generator=g).to(dtype)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_allgather_backward_with_dv_ne_d(varlen):
    """dK and dV are column ranges of one fp32 buffer there; the fused op's overlap rule must see them apart."""
    def rank(comm, backend):
        cp = CPConfig(comm, strategy="allgather", backend=backend, balance="zigzag")
        q, k, v = (t.requires_grad_() for t in _qkv(dv=8, seed=comm.rank))
        if varlen:
            q, k, v = (t.detach()[0].requires_grad_() for t in (q, k, v))  # (S/W, H, D) packed
            out = cp_varlen_attention(q, k, v, torch.tensor([0, 4, 16], dtype=torch.int32), cp=cp,
                                      sharding="per_doc", causal=True)
        else:
            out = cp_attention(q, k, v, cp=cp, causal=True)
        out.square().sum().backward()
        return [t.grad for t in (q, k, v)]
    got, want = run_local(2, rank, CPU), run_local(2, rank, "reference")
    for r in range(2):
        for name, a, b in zip("qkv", got[r], want[r]):
            assert_rule(f"rank {r} d{name}", a, b, None, torch.float32)


def test_tensors_on_another_device_refused():
    def rank(comm, name):
        q, k, v = _qkv()
        t = dict(q=q, k=k, v=v)
        t[name] = t[name].to("meta")
        with pytest.raises(ValueError, match=f"{name} is on meta but q is on cpu"):
            cp_attention(t["q"], t["k"], t["v"], cp=CPConfig(comm, strategy="ring"))
        with pytest.raises(ValueError, match="alibi_slopes is on meta"):
            cp_attention(q, k, v, cp=CPConfig(comm, strategy="allgather"), alibi_slopes=torch.ones(2, device="meta"))
    for name in ("k", "v"):
        run_local(2, rank, name)


def test_one_rank_refusing_makes_every_rank_raise():
    """check_shapes: a dtype that differs across ranks, or a local check failing on one rank only, raises on every
    rank (the peers had waited in a collective, or a rank died on gloo's size mismatch)."""
    def rank(comm, what):
        bad = comm.rank == 1
        q, k, v = _qkv(dtype=torch.bfloat16 if what == "dtype" and bad else torch.float32)
        kw = dict(softcap=-1.0) if what == "softcap" and bad else {}
        try:
            cp_attention(q, k, v, cp=CPConfig(comm, strategy="ring", check_shapes=True), **kw)
        except ValueError as e:
            return str(e)
        return "ran"
    got = run_local(2, rank, "dtype")
    assert all("inputs differ across the CP ranks" in m and "dtype torch.bfloat16" in m for m in got), got
    got = run_local(2, rank, "softcap")
    assert "softcap must be finite" in got[1] and "rank(s) [1] rejected their inputs" in got[0], got


def test_settings_differing_across_ranks_raise():
    """check_shapes also compares the call's settings: other ones on one rank computed something else silently
    (balance, causal, ALiBi slopes) or waited in another collective (strategy)."""
    def rank(comm, what):
        one = comm.rank == 1
        kw = dict(strategy="ring", balance="zigzag")
        call = dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25]))
        if one and what in ("strategy", "balance"):
            kw[what] = dict(strategy="allgather", balance="contiguous")[what]
        if one and what == "causal":
            call["causal"] = False
        if one and what == "alibi":
            call["alibi_slopes"] = torch.tensor([0.5, 0.5])
        try:
            cp_attention(*_qkv(), cp=CPConfig(comm, check_shapes=True, **kw), **call)
        except ValueError as e:
            return str(e)
        return "ran"
    for what in ("strategy", "balance", "causal", "alibi"):
        assert all("settings differ across the CP ranks" in m for m in run_local(2, rank, what)), what
    assert run_local(2, rank, "none") == ["ran", "ran"]


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_refused_softcap_leaves_the_group_usable(strategy):
    """softcap is checked before the first collective: the ring once refused it in its first block call, with a K/V
    hop already posted that the next call then read."""
    def rank(comm):
        cp = CPConfig(comm, strategy=strategy)
        q, k, v = _qkv(seed=comm.rank)
        with pytest.raises(ValueError, match="softcap"):
            cp_attention(q, k, v, cp=cp, softcap=-1.0)
        return cp_attention(q, k, v, cp=cp, causal=True)
    a = run_local(2, rank)
    b = run_local(2, lambda comm: cp_attention(*_qkv(seed=comm.rank), cp=CPConfig(comm, strategy=strategy),
                                               causal=True))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
