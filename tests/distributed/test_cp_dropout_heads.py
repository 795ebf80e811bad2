"""Dropout with the head-sharded strategies (issue #15): Ulysses (W = 2, 4) and the hybrid (mesh U x R = 2 x 2) give
each rank's block calls its first global query head (head_start), so with dropout_p > 0 and one rng they drop
exactly the elements one process drops. Checked against the float64 oracle run with the Philox keep mask of the
global heads (tests/support/philox.py) under the CP acceptance rule (tests/support/cp_cases.py: e_1 is the
single-process block call with the same rng), in fp32 and bf16, with GQA and K/V replication; the Ulysses forward
equals the single-process block call bit for bit (per head it is the same kernel call). Planted: a Ulysses or hybrid
rank that forgets its head offset fails these checks."""
from dataclasses import replace

import pytest
import torch

import fastattn.distributed.hybrid as hyb
import fastattn.distributed.ulysses as uly
from fastattn.blocks import block_forward
from fastattn.distributed import CPConfig, cp_attention, run_local, unshard_list
from support.philox import keep_mask
from tests.support.cp_cases import (Case, HybridCase, block_backends, check_acceptance, install_keyed_dropout,
                                    reference, run_cp_local, run_hybrid_local, single_block)

P, RNG = 0.25, (2024, 11)
needs_cpu = pytest.mark.skipif("cpu" not in block_backends(dropout=True),
                               reason="the CPU kernels (fastattn._C) are not built: no kernel takes block dropout")


def _keep(c: Case) -> torch.Tensor:
    """bool (B, H, S, S): the Philox keep mask of the whole call (sequence b, global head h)."""
    return torch.stack([torch.stack([keep_mask(RNG[0], RNG[1], P, b, h, c.S, c.S) for h in range(c.H)])
                        for b in range(c.B)])


def _check(c: Case, run):
    cp = run(c, rng=RNG, dropout_p=P)
    one = single_block(c, rng=RNG, dropout_p=P)
    table = check_acceptance(c, cp, one, reference(c, dropout_mask=_keep(c), dropout_p=P))
    if c.strategy == "ulysses" and c.dtype == torch.float32:
        assert torch.equal(cp[0], one[0]), "Ulysses out differs from the single-process block call"
    return table


CASES = [Case(W=2, strategy="ulysses", backend="cpu", causal=True),
         Case(W=4, strategy="ulysses", backend="cpu", H=8, Hkv=8, window=(13, 2)),
         Case(W=4, strategy="ulysses", backend="cpu", H=4, Hkv=2, causal=True),            # K/V replicated 2x
         Case(W=2, strategy="ulysses", backend="cpu", H=4, Hkv=1, balance="contiguous"),   # K/V replicated 2x
         Case(W=4, strategy="ulysses", backend="cpu", H=8, Hkv=2, causal=True, dtype=torch.bfloat16),
         Case(W=2, strategy="ulysses", backend="cpu", H=4, Hkv=1, dtype=torch.bfloat16, layout="bhsd")]
HYBRID = [HybridCase(W=4, backend="cpu", causal=True),
          HybridCase(W=4, backend="cpu", H=4, Hkv=1, window=(11, 0)),                       # K/V replicated 2x
          HybridCase(W=4, backend="cpu", H=4, Hkv=2, causal=True, dtype=torch.bfloat16)]


@needs_cpu
@pytest.mark.parametrize("c", CASES, ids=Case.id)
def test_ulysses_dropout_equals_single_process(c):
    _check(c, run_cp_local)


@needs_cpu
@pytest.mark.parametrize("c", HYBRID, ids=HybridCase.id)
def test_hybrid_dropout_equals_single_process(c):
    _check(c, run_hybrid_local)


def test_auto_picks_ulysses_with_dropout():
    """strategy='auto' no longer steers dropout calls away from Ulysses."""
    def rank(comm):
        return CPConfig(comm).plan(heads_q=4, heads_kv=4, dropout=True).strategy
    assert run_local(2, rank) == ["ulysses"] * 2


@pytest.mark.parametrize("strategy,mesh", [("ulysses", None), ("hybrid", (2, 2))])
def test_keyed_reference_dropout_plumbing(monkeypatch, strategy, mesh):
    """On the reference backend given a dropout keyed on (batch, global head, positions), the CP output's zeros
    (v = identity) are exactly the single-process call's: the plumbing (rng and head_start to every block call),
    checked without the kernels."""
    install_keyed_dropout(monkeypatch)
    B, H, S = 1, 4, 16
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, S, H, 8, generator=g), torch.randn(B, S, H, 8, generator=g)
    v = torch.eye(S).view(1, S, 1, S).expand(B, S, H, S).contiguous()
    o1, _ = block_forward(*(t.transpose(1, 2) for t in (q, k, v)), q_start=0, k_start=0, causal=True, dropout_p=P,
                          rng=RNG, backend="reference")
    W = 4 if mesh else 2

    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, backend="reference")
        return cp_attention(*(cp.shard(t, 1) for t in (q, k, v)), cp=cp, causal=True, dropout_p=P, rng=RNG)
    res = run_local(W, rank, mesh=mesh)
    if mesh:
        out = hyb.unshard_list(res, 1, *mesh, "zigzag")
    else:
        out = unshard_list(res, 1, "zigzag")
    assert torch.equal(out != 0, o1.transpose(1, 2) != 0)


# --- the checks catch a rank that forgets its head offset ------------------------------------------------------

@needs_cpu
def test_planted_ulysses_without_head_start_fails(monkeypatch):
    real = uly._head_kw
    monkeypatch.setattr(uly, "_head_kw", lambda spec, h: dict(real(spec, h), head_start=0))
    with pytest.raises(AssertionError, match="acceptance rule"):
        _check(CASES[0], run_cp_local)


@needs_cpu
def test_planted_hybrid_without_head_start_fails(monkeypatch):
    real = hyb._ring_spec
    monkeypatch.setattr(hyb, "_ring_spec", lambda spec, h: replace(real(spec, h), head_start=0))
    with pytest.raises(AssertionError, match="acceptance rule"):
        _check(HYBRID[0], run_hybrid_local)
