"""Tier 0: key padding masks under context parallelism (cp_attention(key_padding_mask=...)): the mask travels with
its K/V (ring) or is gathered once (allgather, ulysses). Against the float64 oracle on the whole sequence with the
CP tests' acceptance rule (tests/support/cp_cases.py): e_cp <= 2 * e_1 + 1e-6 * max(1, max|X_ref|), e_1 the error
of single-process fastattn with the same key mask."""
import pytest
import torch

import fastattn
from fastattn.distributed import CountingComm, CPConfig, cp_attention, run_local, unshard_list
from support.oracle import oracle_attention

B, H, HKV, D = 2, 4, 2, 16


def make(S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g) * 3
    k = torch.randn(B, S, HKV, D, generator=g) * 3
    v = torch.randn(B, S, HKV, D, generator=g)
    dout = torch.randn(B, S, H, D, generator=g)
    mask = torch.rand(B, S, generator=g) > 0.3  # row 0: scattered padding
    mask[1] = True
    mask[1, :3] = False  # row 1: left padding (under causal, queries 0-2 see no real key: out 0) ...
    mask[1, S - S // 4:] = False  # ... and right padding: whole key chunks padded on some ranks
    return q, k, v, dout, mask


def oracle(q, k, v, dout, mask, causal):
    """float64 out, dq, dk, dv in BSHD."""
    qd, kd, vd = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
    out = oracle_attention(qd, kd, vd, scale=D ** -0.5, mask=mask[:, None, None, :], window=(-1, 0 if causal else -1))
    out.backward(dout.double().transpose(1, 2))
    return [t.transpose(1, 2) for t in (out.detach(), qd.grad, kd.grad, vd.grad)]


def single(q, k, v, dout, mask, causal):
    """Single-process fastattn (fp32) with the same key mask: e_1 of the rule."""
    qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    out = fastattn.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None, None, :], is_causal=causal,
                                                enable_gqa=True)
    out.backward(dout.transpose(1, 2))
    return [t.transpose(1, 2) for t in (out.detach(), qs.grad, ks.grad, vs.grad)]


def check(got, one, ref, what=""):
    for name, g, o, r in zip(("out", "dq", "dk", "dv"), got, one, ref):
        m = max(1.0, float(r.abs().max()))
        e_cp, e_1 = float((g.double() - r).abs().max()), float((o.double() - r).abs().max())
        tol = 2 * e_1 + 1e-6 * m
        assert e_cp <= tol, f"{what} {name}: e_cp={e_cp:.3g} e_1={e_1:.3g} tol={tol:.3g} (acceptance rule)"


@pytest.mark.parametrize("strategy,balance,W,causal", [
    ("ring", "zigzag", 4, True), ("ring", "contiguous", 3, False), ("ring", "zigzag", 2, False),
    ("allgather", "zigzag", 2, True), ("allgather", "contiguous", 4, False),
    ("ulysses", "zigzag", 2, True), ("ulysses", "contiguous", 4, False),
])
def test_key_padding_equals_single_process(strategy, balance, W, causal):
    S = 48
    q, k, v, dout, mask = make(S)

    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance)
        ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
        out = cp_attention(ql, kl, vl, cp=cp, causal=causal, key_padding_mask=cp.shard(mask, 1))
        out.backward(cp.shard(dout, 1))
        return out.detach(), ql.grad, kl.grad, vl.grad
    res = run_local(W, rank)
    got = [unshard_list([r[i] for r in res], 1, balance) for i in range(4)]
    ref = oracle(q, k, v, dout, mask, causal)
    if causal:
        assert not got[0][1, :3].any(), "queries that see only padded keys must give 0"
    check(got, single(q, k, v, dout, mask, causal), ref, f"{strategy}-{balance}-W{W}")


def test_key_padding_communication():
    """The ring carries the key bias in the K/V hops (no extra hop); allgather gathers it once per pass."""
    S = 16
    q, k, v, dout, mask = make(S)

    def rank(comm, strategy):
        cp = CPConfig(comm, strategy=strategy)
        ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
        out = cp_attention(ql, kl, vl, cp=cp, causal=True, key_padding_mask=cp.shard(mask, 1))
        fwd, log = dict(comm.calls), list(comm.log)
        comm.reset()
        out.backward(cp.shard(dout, 1))
        return fwd, dict(comm.calls), log
    for fwd, bwd, log in run_local(2, rank, "ring", wrap=CountingComm):
        assert fwd == {"ring_hop": 1} and bwd == {"ring_hop": 3}
        assert [shapes for name, shapes, _ in log] == [[(B, S // 2, HKV, D)] * 2 + [(B, S // 2)]]  # k, v, key bias
    for fwd, bwd, _ in run_local(2, rank, "allgather", wrap=CountingComm):
        assert fwd == {"all_gather": 2} and bwd == {"all_gather": 2, "reduce_scatter": 1}


def test_key_padding_mask_errors():
    def rank(comm, mask):
        cp = CPConfig(comm)
        x = torch.randn(2, 4, 2, 8)
        cp_attention(x, x, x, cp=cp, key_padding_mask=mask)
    for mask, match in ((torch.ones(2, 5, dtype=torch.bool), r"bool \(B, S/W\) = \(2, 4\) .* got torch.bool \(2, 5\)"),
                        (torch.ones(2, 4), r"got torch.float32 \(2, 4\)")):
        with pytest.raises(ValueError, match=match):
            run_local(2, rank, mask)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_custom_op_opcheck_with_key_bias(strategy):
    """Schema, fake function and autograd of the CP ops with the optional key_bias argument (one simulated rank)."""
    from fastattn.distributed.comm import comm_name
    comm = run_local(1, lambda c: c)[0]
    q = torch.randn(2, 8, 4, 16, requires_grad=True)
    k, v = (torch.randn(2, 8, 2, 16, requires_grad=True) for _ in range(2))
    bias = torch.zeros(2, 8).masked_fill_(torch.arange(8) >= 6, float("-inf"))
    if strategy == "ulysses":
        op = torch.ops.fastattn.cp_ulysses_fwd.default
        args = (q, k, v, None, comm_name(comm), "zigzag", "bshd", 0.25, 3, 0, 0.0, 1, True, "float32", "", bias)
    else:
        op = torch.ops.fastattn.cp_attn_fwd.default
        args = (q, k, v, None, comm_name(comm), strategy, "zigzag", "bshd", 0.25, 3, 0, 0.0, 0.0, 0, 0, "float32", "",
                bias)
    torch.library.opcheck(op, args)


def test_mask_on_some_ranks_only_is_a_clear_error_with_check_shapes():
    def rank(comm):
        cp = CPConfig(comm, check_shapes=True)
        x = torch.randn(2, 4, 2, 8)
        mask = torch.ones(2, 4, dtype=torch.bool) if comm.rank == 1 else None
        try:
            cp_attention(x, x, x, cp=cp, key_padding_mask=mask)
        except ValueError as e:
            return str(e)
    for msg in run_local(2, rank, timeout=20):
        assert msg is not None and "rank 0: q [2, 4, 2, 8], k [2, 4, 2, 8], v [2, 4, 2, 8], key_padding_mask None" \
            in msg and "rank 1: q [2, 4, 2, 8], k [2, 4, 2, 8], v [2, 4, 2, 8], key_padding_mask given" in msg
