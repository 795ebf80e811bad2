"""Dropout for packed varlen documents under Ulysses (W = 2, 4) and the hybrid (U x R = 2 x 2), issue #15: each
rank's block calls get its first global query head (head_start), so with one rng (seed, offset) they drop exactly
what the single-process varlen block call drops. Checked per case against the float64 oracle per document run with
the Philox keep mask of (document, global head) (tests/support/philox.py) under the CP acceptance rule
(tests/support/cp_cases.py: e_1 is the single-process varlen block call with the same rng), fp32 and bf16, per_doc
and stream sharding, causal, GQA with K/V replication; Ulysses fp32 out and lse equal that call bit for bit (per head
it is the same kernel call). Planted: a rank without its head offset, a backward with another seed than the forward."""
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from fastattn.distributed import CPConfig, LocalComm, cp_varlen_attention, run_local
from fastattn.distributed import varlen_ulysses as VU
from fastattn.distributed.varlen_ulysses import shard_2d, unshard_2d_list
from support.oracle import oracle_attention
from support.philox import keep_mask
from tests.support.compiled import eager_and_compiled
from tests.support.cp_cases import (VarlenCase, block_backends, check_acceptance, errors, make_varlen_inputs,
                                    reference_varlen, run_varlen_local, single_block_varlen)

P, RNG = 0.2, (2025, 7)
BACKENDS = [b for b in block_backends(dropout=True) if b != "reference"]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no backend takes varlen block calls with dropout here (the C++ "
                                "cpu kernels, fastattn._C, are not built; the reference uses torch's RNG)")
BE = BACKENDS[0] if BACKENDS else "cpu"

PER_DOC = (24, 8, 40)          # every length % 8: per_doc zigzag over W = 4, and over R = 2 cut into U = 2 pieces
STREAM = (1, 19, 30, 14)       # documents cross every shard boundary, one of a single token; total % 8 == 0


def C(strategy, W, sharding, **kw):
    return VarlenCase(strategy=strategy, W=W, sharding=sharding, docs=PER_DOC if sharding == "per_doc" else STREAM,
                      backend=BE, causal=True, **kw)


@lru_cache(maxsize=8)
def _keep(docs, H):
    """Per document n: bool (1, H, L, L), the Philox keep mask of sequence n, global head h (positions from 0)."""
    return tuple(torch.stack([keep_mask(RNG[0], RNG[1], P, n, h, L, L) for h in range(H)]).unsqueeze(0)
                 for n, L in enumerate(docs))


def reference_dropout(c: VarlenCase):
    """Float64 oracle (out, lse (H, T), dq, dk, dv) per document with the Philox keep mask; lse is dropout-free."""
    q, k, v, dout, alibi = make_varlen_inputs(c)
    assert alibi is None and c.window == (-1, -1) and not c.softcap
    q, k, v = (t.to(c.dtype).double().requires_grad_() for t in (q, k, v))
    cu, outs = c.cu.tolist(), []
    for n, mask in enumerate(_keep(c.docs, c.H)):
        qd, kd, vd = (t[cu[n]:cu[n + 1]].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (L, H, D) -> (1, H, L, D)
        o = oracle_attention(qd, kd, vd, scale=c.D ** -0.5, window=(-1, 0 if c.causal else -1), dropout_mask=mask,
                             dropout_p=P)
        outs.append(o[0].transpose(0, 1))  # (1, H, L, D) -> (L, H, D)
    out = torch.cat(outs)
    out.backward(dout.double())
    return out.detach(), reference_varlen(c)[1], q.grad, k.grad, v.grad


def _hybrid_rank(comm, c: VarlenCase, U: int, rng):
    """One rank of the 2-D group (U x R): shard_2d, forward + backward -> (out, lse, dq, dk, dv)."""
    q, k, v, dout, _ = make_varlen_inputs(c)

    def sh(t):
        return shard_2d(t, c.cu, 0, U, c.W // U, comm.rank, c.sharding, c.balance).to(c.dtype)
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    cp = CPConfig(comm, strategy=c.strategy, balance=c.balance, backend=c.backend)
    out, lse = cp_varlen_attention(ql, kl, vl, c.cu, cp=cp, sharding=c.sharding, causal=c.causal, dropout_p=P,
                                   rng=rng, return_lse=True)
    out.backward(sh(dout))
    return tuple(x.detach() for x in (out, lse, ql.grad, kl.grad, vl.grad))


def run_cp(c: VarlenCase, rng=RNG):
    if c.strategy != "hybrid":
        return run_varlen_local(c, rng=rng, dropout_p=P)
    U, R = 2, c.W // 2
    per_rank = run_local(c.W, _hybrid_rank, c, U, rng, mesh=(U, R))
    return tuple(unshard_2d_list([r[i] for r in per_rank], c.cu, 1 if i == 1 else 0, U, R, c.sharding, c.balance)
                 for i in range(5))


def check(c: VarlenCase):
    got, one, ref = run_cp(c), single_block_varlen(c, rng=RNG, dropout_p=P), reference_dropout(c)
    assert errors(one, ref)[0] < 0.1, "the oracle's Philox mask is not the kernels' (a wrong mask errs by O(1))"
    table = check_acceptance(c, got, one, ref)
    if c.strategy == "ulysses" and c.dtype == torch.float32:
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), "Ulysses out/lse differ from the " \
                                                                            "single-process varlen block call"
    return table


CASES = [
    C("ulysses", 2, "per_doc"),
    C("ulysses", 2, "stream", H=4, Hkv=1),                                  # MQA: K/V replicated 2x
    C("ulysses", 4, "per_doc", H=8, Hkv=2),                                 # K/V replicated 2x, 2 heads per rank
    C("ulysses", 4, "stream", balance="contiguous", H=4, Hkv=4),
    C("ulysses", 4, "per_doc", H=4, Hkv=2, dtype=torch.bfloat16),           # K/V replicated 2x
    C("ulysses", 2, "stream", H=4, Hkv=1, dtype=torch.bfloat16),
    C("hybrid", 4, "per_doc"),
    C("hybrid", 4, "stream", H=4, Hkv=1),                                   # K/V replicated 2x over U
    C("hybrid", 4, "per_doc", balance="contiguous", H=4, Hkv=1, dtype=torch.bfloat16),
    C("hybrid", 4, "stream", dtype=torch.bfloat16),
]


@pytest.mark.parametrize("c", CASES, ids=VarlenCase.id)
def test_dropout_equals_single_process(c):
    check(c)


def test_dropout_is_real_and_rng_keyed():
    """The oracle's mask is the kernels': with another offset (or no dropout) the single-process call differs."""
    c = CASES[0]
    one = single_block_varlen(c, rng=RNG, dropout_p=P)
    for other in (single_block_varlen(c), single_block_varlen(c, rng=(RNG[0], RNG[1] + 1), dropout_p=P)):
        assert (one[0] - other[0]).abs().max() > 0.1


def test_auto_runs_ulysses_and_hybrid_with_dropout():
    """strategy='auto' keeps Ulysses (1-D) and the hybrid (2-D) for dropout calls, and they pass."""
    from fastattn.distributed import CountingComm
    from fastattn.distributed.varlen_api import plan_varlen
    assert plan_varlen(CPConfig(LocalComm.world(2)[0]), heads_q=4, heads_kv=2, dropout=True).strategy == "ulysses"
    c = C("auto", 2, "stream")

    def calls(comm):
        q = torch.randn(sum(c.docs) // 2, 4, 8)
        cp_varlen_attention(q, q, q, c.cu, cp=CPConfig(comm, backend=BE), sharding="stream", dropout_p=P, rng=RNG)
        return dict(comm.calls)
    assert run_local(2, calls, wrap=CountingComm) == [{"all_to_all": 2}] * 2
    check(c)


def test_rng_none_draws_one_shared_rng(monkeypatch):
    """rng=None: every rank draws and rank 0's is shared, so CP equals the single-process call with that rng."""
    from fastattn.distributed import varlen_api
    real, drawn = varlen_api._shared_rng, []

    def shared(cp, device):
        drawn.append(real(cp, device))
        return drawn[-1]
    monkeypatch.setattr(varlen_api, "_shared_rng", shared)
    c = C("ulysses", 2, "per_doc")
    got = run_cp(c, rng=None)
    assert len(drawn) == 2 and len(set(drawn)) == 1, drawn
    assert torch.equal(got[0], single_block_varlen(c, rng=drawn[0], dropout_p=P)[0])


def test_compile_fullgraph_with_dropout():
    """torch.compile(fullgraph=True) with dropout and rng passed: one opaque op per graph, eager's bits (one
    simulated rank: dynamo compiles per thread)."""
    import torch._dynamo
    torch._dynamo.reset()
    c = replace(C("ulysses", 1, "stream"), H=4, Hkv=2)
    cp = CPConfig(LocalComm.world(1)[0], strategy="ulysses", backend=BE)
    q, k, v, dout, _ = make_varlen_inputs(c)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return cp_varlen_attention(q, k, v, c.cu, cp=cp, sharding="stream", causal=True, dropout_p=P, rng=RNG) * 2
    eager, grads, compiled, compiled_grads, seen = eager_and_compiled(f, (q, k, v), dout)
    assert seen == {"fwd": ["fastattn.cp_varlen_a2a_fwd.default"], "bwd": ["fastattn.cp_varlen_a2a_bwd.default"]}
    assert torch.equal(eager, compiled) and all(torch.equal(a, b) for a, b in zip(grads, compiled_grads))
    assert torch.equal(eager / 2, single_block_varlen(c, rng=RNG, dropout_p=P)[0])


# --- the checks catch planted bugs -----------------------------------------------------------------------------

def test_planted_ulysses_without_head_start_fails(monkeypatch):
    real = VU._head_kw
    monkeypatch.setattr(VU, "_head_kw", lambda spec, h: dict(real(spec, h), head_start=0))
    with pytest.raises(AssertionError, match="acceptance rule"):
        check(CASES[2])


def test_planted_hybrid_without_head_start_fails(monkeypatch):
    real = VU._ring_spec
    monkeypatch.setattr(VU, "_ring_spec", lambda spec, h: replace(real(spec, h), head_start=0))
    with pytest.raises(AssertionError, match="acceptance rule"):
        check(CASES[7])


@pytest.mark.parametrize("c", [CASES[1], CASES[6]], ids=VarlenCase.id)
def test_planted_backward_with_another_seed_fails(monkeypatch, c):
    """The autograd backward calls the module's cp_varlen_a2a_bwd: a wrapper adding 1 to the seed (the last but one
    argument) leaves the forward exact and breaks exactly the gradients."""
    real = VU.cp_varlen_a2a_bwd
    monkeypatch.setattr(VU, "cp_varlen_a2a_bwd", lambda *a: real(*a[:-2], a[-2] + 1, a[-1]))
    with pytest.raises(AssertionError, match=r"acceptance rule for \['dq', 'dk', 'dv'\]"):
        check(c)


def test_opcheck_with_dropout():
    """torch.library.opcheck of the op pair with (dropout_p, seed, offset) given (schema, fake function, autograd
    registration) at W = 1, GQA."""
    from fastattn.distributed.comm import comm_name
    c = replace(C("ulysses", 1, "per_doc"), docs=(6, 10))
    q, k, v, _, _ = make_varlen_inputs(c)
    comm = LocalComm.world(1)[0]  # held: the op finds it by name
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), c.cu.long(), None, comm_name(comm), "ulysses",
            "per_doc", "zigzag", 0.25, -1, 0, 0.0, 1, True, "float32", BE, P, *RNG)
    torch.library.opcheck(VU.cp_varlen_a2a_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_autograd_registration"))
