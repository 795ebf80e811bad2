"""Tier 0: dropout parity, clear errors, strategy choice (explain), the flash-compatible functions, the loss."""
import pytest
import torch
import torch.nn.functional as F

from tests.support.cp_cases import Case, block_backends, install_keyed_dropout, make_inputs
from fastattn.blocks import block_backward, block_forward
from fastattn.distributed import (CPCommError, CPConfig, CPUnsupportedError, cp_attention, cp_cross_entropy,
                                  global_loss, ring_flash_attn_func, run_local, unshard_list,
                                  zigzag_ring_flash_attn_func)
from support.oracle import oracle_attention

DROPOUT_BACKENDS = block_backends(dropout=True)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS + ["reference-keyed"])
@pytest.mark.parametrize("strategy,balance,W", [("ring", "zigzag", 4), ("ring", "contiguous", 3),
                                                ("allgather", "zigzag", 2)])
def test_dropout_equals_single_process_mask(monkeypatch, backend, strategy, balance, W):
    """With v = identity (Dv = S), out[i, j] = P_ij * keep_ij / (1 - p): the zeros of the CP output are the dropped
    elements, which must be exactly the single-process call's (same rng); values and gradients within rounding.
    Runs on every backend that takes block calls with dropout (the kernels' position-keyed Philox), and on the
    reference backend given a position-keyed dropout of the tests' own ("reference-keyed"), which checks the CP
    plumbing (one rng for every block, positions per block) where no kernel does it yet."""
    if backend == "reference-keyed":
        install_keyed_dropout(monkeypatch)
        backend = "reference"
    B, H, S, D, p = 1, 2, 8 * W, 16, 0.3
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    v = torch.eye(S).view(1, S, 1, S).expand(B, S, H, S).contiguous()  # (B, S, H, Dv=S): key j -> unit vector j
    dout = torch.randn(B, S, H, S, generator=g)
    rng = (1234, 56)
    kw = dict(q_start=0, k_start=0, causal=True, dropout_p=p, rng=rng, backend=backend)
    qb, kb, vb, db = (t.transpose(1, 2) for t in (q, k, v, dout))  # (B, S, H, D) -> (B, H, S, D) views
    o1, l1 = block_forward(qb, kb, vb, **kw)
    g1 = block_backward(db, qb, kb, vb, o1, l1, **kw)

    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance, backend=backend)
        ql, kl, vl = (cp.shard(t, 1).clone().requires_grad_() for t in (q, k, v))
        out = cp_attention(ql, kl, vl, cp=cp, causal=True, dropout_p=p, rng=rng)
        out.backward(cp.shard(dout, 1))
        return out.detach(), ql.grad, kl.grad, vl.grad
    res = run_local(W, rank)
    out, dq, dk, dv = (unshard_list([r[i] for r in res], 1, balance) for i in range(4))
    keep1 = o1.transpose(1, 2) != 0
    assert torch.equal(out != 0, keep1), "CP dropped other elements than the single-process call"
    assert 0.5 * p < 1 - keep1[torch.ones(S, S).tril().bool().expand(B, H, S, S).transpose(1, 2)].float().mean() \
        < 1.5 * p  # the mask is real: about p of the visible elements dropped
    torch.testing.assert_close(out, o1.transpose(1, 2), atol=1e-5, rtol=1e-5)
    for got, want in zip((dq, dk, dv), g1):
        torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # and the single-process mask is the one the float64 oracle applies
    mask = keep1.transpose(1, 2) | ~torch.ones(S, S, dtype=torch.bool).tril()
    ref = oracle_attention(qb, kb, vb, scale=D ** -0.5, window=(-1, 0), dropout_mask=mask, dropout_p=p)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_dropout_rng_shared_from_rank_0():
    """rng=None: each rank draws, rank 0's pair is used by all (ranks whose generators differ still agree)."""
    from fastattn.distributed import api

    def rank(comm):
        torch.manual_seed(100 + comm.rank)  # deliberately different generators
        return api._shared_rng(CPConfig(comm), torch.device("cpu"))
    a, b = run_local(2, rank)
    assert a == b


# --- clear errors, not hangs ----------------------------------------------------------------------------------

def _call(comm, shapes, **kw):
    cfg = kw.pop("cfg", {})
    cp = CPConfig(comm, **cfg)
    q, k, v = (torch.randn(*s) for s in shapes(comm.rank))
    return cp_attention(q, k, v, cp=cp, **kw)


@pytest.mark.parametrize("shapes,cfg,kw,match", [
    (lambda r: [(1, 5, 4, 8)] * 3, {}, {}, "zigzag layout needs an even local sequence length"),
    (lambda r: [(1, 4, 4, 8), (1, 6, 4, 8), (1, 6, 4, 8)], {}, {}, "same local length"),
    (lambda r: [(1, 4, 4, 8), (1, 4, 3, 8), (1, 4, 3, 8)], {}, {}, "multiple of the"),
    (lambda r: [(1, 4, 4, 8), (1, 4, 4, 6), (1, 4, 4, 8)], {}, {}, "head dims differ"),
    (lambda r: [(1, 4, 4, 8)] * 3, {}, dict(window_size=(-2, 0)), "window_size"),
    (lambda r: [(1, 4, 4, 8)] * 3, {}, dict(alibi_slopes=torch.ones(3)), "alibi_slopes must be float32"),
    (lambda r: [(1, 4, 4, 8)] * 3, {}, dict(dropout_p=1.0), "dropout_p"),
    (lambda r: [(1, 4, 4, 8)] * 3, {}, dict(layout="sbhd"), "layout must be"),
    (lambda r: [(1, 4, 6, 8)] * 3, dict(strategy="ulysses"), {}, "6 query heads are not divisible by W=4"),
    (lambda r: [(1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)], dict(strategy="ulysses", kv_replication=False), {},
     "kv_replication=False"),
    (lambda r: [(1, 4 + 2 * (r == 1), 4, 8)] * 3, dict(check_shapes=True), {}, "differ across the CP ranks"),
])
def test_clear_errors(shapes, cfg, kw, match):
    with pytest.raises((ValueError, CPUnsupportedError), match=match):
        run_local(4, _call, shapes, cfg=cfg, **kw)


def test_mismatch_without_check_is_an_error_not_a_hang():
    """Without check_shapes a length mismatch still fails (the ring hop's sizes differ), within the timeout."""
    with pytest.raises(CPCommError, match="expected .* in a ring hop"):
        run_local(2, _call, lambda r: [(1, 4 + 2 * r, 4, 8)] * 3, cfg=dict(strategy="ring"), timeout=10)


def test_bad_config():
    with pytest.raises(ValueError, match="strategy must be one of"):
        CPConfig(run_local(1, lambda c: c)[0], strategy="usp")
    with pytest.raises(TypeError, match="group must be"):
        CPConfig(group="world")


# --- strategy choice --------------------------------------------------------------------------------------------

def test_explain_and_auto():
    def rank(comm):
        cp = CPConfig(comm)
        return (cp.plan(heads_q=8, heads_kv=8).strategy, cp.plan(heads_q=8, heads_kv=2), cp.plan(heads_q=6,
                heads_kv=6).strategy, cp.plan(heads_q=8, heads_kv=8, dropout=True).strategy,
                cp.explain(heads_q=6, heads_kv=6, causal=True), CPConfig(comm, balance="contiguous").explain(
                    heads_q=6, heads_kv=6, causal=True), CPConfig(comm, strategy="ulysses").explain(heads_q=6,
                                                                                                 heads_kv=6))
    a, gqa, b, c, e1, e2, e3 = run_local(4, rank)[0]
    # dropout no longer steers auto off ulysses: the block calls key it on the global head (head_start)
    assert (a, gqa.strategy, gqa.kv_repeat, b, c) == ("ulysses", "ulysses", 2, "ring", "ulysses")
    assert "-> ring" in e1 and "not divisible by W=4" in e1 and "rank 0 idle" not in e1
    assert "balance='zigzag' evens the work" in e2
    assert "refused" in e3 and "6 query heads" in e3


# --- flash-compatible surface ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,balance", [(ring_flash_attn_func, "contiguous"), (zigzag_ring_flash_attn_func, "zigzag")])
def test_flash_compatible(fn, balance):
    c = Case(W=2, balance=balance, causal=True)
    q, k, v, _, _ = make_inputs(c)

    def rank(comm):
        cp = CPConfig(comm, strategy="ring", balance=balance)
        ql, kl, vl = (cp.shard(t, 1) for t in (q, k, v))
        o, lse, probs = fn(ql, kl, vl, causal=True, return_attn_probs=True, group=comm)
        o2, lse2 = cp_attention(ql, kl, vl, cp=cp, causal=True, return_lse=True)
        return o, lse, probs, o2, lse2, fn(ql, kl, vl, causal=True, group=comm)
    for o, lse, probs, o2, lse2, plain in run_local(2, rank):
        assert probs is None and torch.equal(o, o2) and torch.equal(lse, lse2) and torch.equal(plain, o)
        assert lse.shape == (c.B, c.H, c.S // 2) and lse.dtype == torch.float32


# --- loss ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
def test_cp_cross_entropy(balance):
    B, S, V, W = 2, 24, 11, 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :15] = -100  # uneven counted tokens across ranks: a per-rank mean would be wrong
    F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100).backward()

    def rank(comm):
        cp = CPConfig(comm, balance=balance)
        lg = cp.shard(logits.detach(), 1).clone().requires_grad_()
        loss = cp_cross_entropy(lg, cp.shard(labels, 1), cp)
        loss.backward()
        return loss.detach(), global_loss(loss, cp), lg.grad
    res = run_local(W, rank)
    want = F.cross_entropy(logits.detach().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sum(r[0] for r in res), want)
    for r in res:
        torch.testing.assert_close(r[1], want)
    torch.testing.assert_close(unshard_list([r[2] for r in res], 1, balance), logits.grad)


# --- the custom ops ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_custom_op_opcheck(strategy):
    """Schema, fake function (shapes, strides, dtypes) and autograd registration of the CP ops, on one
    simulated rank (the compiled multi-rank run is in test_cp_gloo.py)."""
    from fastattn.distributed.comm import comm_name
    comm = run_local(1, lambda c: c)[0]
    q = torch.randn(2, 8, 4, 16, requires_grad=True)
    k, v = (torch.randn(2, 8, 2, 16, requires_grad=True) for _ in range(2))
    if strategy == "ulysses":
        op = torch.ops.fastattn.cp_ulysses_fwd.default
        args = (q, k, v, None, comm_name(comm), "zigzag", "bshd", 0.25, 3, 0, 0.0, 1, True, "float32", "")
    else:
        op = torch.ops.fastattn.cp_attn_fwd.default
        args = (q, k, v, None, comm_name(comm), strategy, "zigzag", "bshd", 0.25, 3, 0, 0.0, 0.0, 0, 0, "float32", "")
    torch.library.opcheck(op, args)
