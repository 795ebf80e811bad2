"""Packed varlen documents under Ulysses (1-D group) and the hybrid (Ulysses x ring, 2-D group): every rank's rows,
lse and gradients against single-process flash_attn_varlen_func and a float64 oracle per document (the acceptance
rule of tests/support/cp_cases.py), auto / explain, refusals, exact communication, compile, planted bugs.
Dropout: test_varlen_dropout.py."""
import os
from dataclasses import replace

import pytest
import torch

from tests.support.compiled import compile_counting_ops
from tests.support.cp_cases import (VarlenCase, block_backends, check_acceptance, check_varlen_case, gather_varlen,
                                    make_varlen_inputs, reference_varlen, run_varlen_local, single_block_varlen,
                                    single_process_varlen, varlen_shard)
from fastattn.distributed import CountingComm, CPConfig, CPUnsupportedError, LocalComm, cp_varlen_attention, run_local
from fastattn.distributed import varlen_ulysses as VU
from fastattn.distributed.varlen_api import explain_varlen, plan_varlen
from fastattn.distributed.varlen_ulysses import shard_2d, unshard_2d_list

STREAM_DOCS = (1, 36, 128, 301, 46)  # odd lengths crossing every shard boundary, a document of one token


def _per_doc(n):
    """Document lengths that split into n pieces each (2W for zigzag), one a single piece per rank."""
    return (n * 3, n * 7, n, n * 5)


def U_(**kw):
    return VarlenCase(strategy="ulysses", **kw)


# --- Ulysses on a 1-D group ------------------------------------------------------------------------------------

ULYSSES = [U_(W=W, docs=STREAM_DOCS if s == "stream" else _per_doc(2 * W), sharding=s, balance=b, causal=causal)
           for W in (2, 4) for s in ("per_doc", "stream") for b in ("zigzag", "contiguous") for causal in (False, True)
           if not (W == 4 and b == "contiguous" and not causal)]

FEATURES = [
    U_(W=4, docs=STREAM_DOCS, sharding="stream", causal=True, window=(7, -1)),
    U_(W=2, docs=_per_doc(4), window=(4, 9)),                                       # two-sided, non-causal
    U_(W=2, docs=STREAM_DOCS, sharding="stream", balance="contiguous", causal=True, alibi="H"),
    U_(W=4, docs=_per_doc(8), alibi="NH", window=(6, 3)),                           # per-document slopes
    U_(W=2, docs=STREAM_DOCS, sharding="stream", causal=True, H=4, Hkv=1, softcap=5.0),  # MQA: K/V replicated 2x
    U_(W=4, docs=_per_doc(8), causal=True, H=4, Hkv=2, alibi="H"),                 # K/V replicated 2x
    U_(W=4, docs=_per_doc(8), causal=True, H=8, Hkv=4),                             # no replication, 2 heads/rank
    U_(W=2, docs=(8, 0, 4, 0, 12), causal=True),                                    # empty documents
]

BF16 = [
    U_(W=4, docs=_per_doc(8), causal=True, dtype=torch.bfloat16),
    U_(W=2, docs=STREAM_DOCS, sharding="stream", H=4, Hkv=1, window=(12, 3), dtype=torch.bfloat16),
]


KERNELS = [b for b in block_backends() if b != "reference"]  # the C++ cpu kernels here; CUDA/Triton on a GPU


@pytest.mark.parametrize("case", ULYSSES + FEATURES + BF16 + [replace(c, backend=b) for b in KERNELS
                                                                for c in (FEATURES[3], FEATURES[4], BF16[1])],
                         ids=VarlenCase.id)
def test_ulysses(case):
    check_varlen_case(case)


# --- the hybrid on a 2-D group ----------------------------------------------------------------------------------

def _hybrid_rank(comm, c: VarlenCase, U: int):
    """One rank of the 2-D group (U x R): shard_2d, forward + backward -> (out, lse, dq, dk, dv)."""
    R = c.W // U
    q, k, v, dout, alibi = make_varlen_inputs(c)

    def sh(t):
        return shard_2d(t, c.cu, 0, U, R, comm.rank, c.sharding, c.balance).to(c.dtype)
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    cp = CPConfig(comm, strategy=c.strategy, balance=c.balance, backend=c.backend)
    out, lse = cp_varlen_attention(ql, kl, vl, c.cu, cp=cp, sharding=c.sharding, causal=c.causal,
                                   window_size=c.window, softcap=c.softcap, alibi_slopes=alibi, return_lse=True)
    out.backward(sh(dout))
    return tuple(x.detach() for x in (out, lse, ql.grad, kl.grad, vl.grad))


def run_hybrid(c: VarlenCase, U: int, **kw):
    per_rank = run_local(c.W, _hybrid_rank, c, U, mesh=(U, c.W // U), **kw)
    return tuple(unshard_2d_list([r[i] for r in per_rank], c.cu, 1 if i == 1 else 0, U, c.W // U, c.sharding,
                                 c.balance) for i in range(5))


def check_hybrid(c: VarlenCase, U: int):
    check_acceptance(c, run_hybrid(c, U), single_process_varlen(c), reference_varlen(c), single_block_varlen(c))


def H_(**kw):
    return VarlenCase(strategy="hybrid", **kw)


HYBRID = [  # (U, case); W = U * R
    (2, H_(W=4, docs=_per_doc(4), causal=True)),                                   # per_doc zigzag over R=2
    (2, H_(W=4, docs=STREAM_DOCS, sharding="stream", balance="contiguous", window=(9, 4), alibi="NH")),
    (2, H_(W=4, docs=STREAM_DOCS, sharding="stream", causal=True, H=4, Hkv=1, alibi="H")),  # K/V replicated 2x
    (2, H_(W=4, docs=_per_doc(2), balance="contiguous", causal=True, window=(5, -1), dtype=torch.bfloat16)),
    (2, H_(W=2, docs=_per_doc(2), causal=True)),                                   # R = 1
    (1, H_(W=2, docs=STREAM_DOCS, sharding="stream", causal=True)),                # U = 1: the varlen ring
]


@pytest.mark.parametrize("U,case", HYBRID + [(2, replace(HYBRID[1][1], backend=b)) for b in KERNELS],
                         ids=lambda x: x.id() if isinstance(x, VarlenCase) else f"U{x}")
def test_hybrid(U, case):
    check_hybrid(case, U)


def test_shard_2d_inverse_and_layout():
    """shard_2d: piece u of ring shard r, rank r * U + u; unshard_2d_list undoes it."""
    c = VarlenCase(W=4, docs=STREAM_DOCS)
    for sharding in ("per_doc", "stream"):
        cu = c.cu if sharding == "stream" else torch.tensor([0, 12, 40, 44, 64])
        x = torch.arange(int(cu[-1])).view(-1, 1).float()
        shards = [shard_2d(x, cu, 0, 2, 2, i, sharding, "zigzag") for i in range(4)]
        assert torch.equal(unshard_2d_list(shards, cu, 0, 2, 2, sharding, "zigzag"), x)
        ring1 = VarlenCase(W=2, docs=tuple(torch.diff(cu).tolist()), sharding=sharding)
        assert torch.equal(torch.cat(shards[2:]), varlen_shard(ring1, x, 1))  # ring shard 1 = ranks 2, 3
    with pytest.raises(ValueError, match="not divisible by U=4"):
        shard_2d(torch.zeros(12, 1), torch.tensor([0, 12]), 0, 4, 2, 0, "stream", "zigzag")


# --- auto, explain, refusals ------------------------------------------------------------------------------------

def test_auto_plans_and_explain():
    comms = LocalComm.world(4)
    cfg = CPConfig(comms[0])
    p = plan_varlen(cfg, heads_q=8, heads_kv=2, sharding="per_doc")
    assert p.strategy == "ulysses" and p.kv_repeat == 2 and "ONE varlen kernel call per rank over the whole" in p.reason
    for sharding, fallback in (("per_doc", "ring"), ("stream", "allgather")):
        p = plan_varlen(cfg, heads_q=6, heads_kv=6, sharding=sharding)
        assert p.strategy == fallback and "the 6 query heads are not divisible by W=4" in p.reason, p
        p = plan_varlen(cfg, heads_q=8, heads_kv=8, sharding=sharding, dropout=True)  # dropout: exact everywhere
        assert p.strategy == "ulysses", p
    text = explain_varlen(cfg, heads_q=6, heads_kv=6, sharding="stream", causal=True)
    assert "sharding='stream'" in text and "-> allgather: ulysses not possible" in text, text
    text = explain_varlen(CPConfig(comms[0], strategy="ulysses"), heads_q=8, heads_kv=8, dropout=True)
    assert "-> ulysses: requested" in text and "dropout: exact" in text and "head_start" in text, text
    two_d = run_local(4, lambda comm: explain_varlen(CPConfig(comm), heads_q=4, heads_kv=1), mesh=(2, 2))
    assert all("(ulysses U=2 x ring R=2)" in t and "-> hybrid: a 2-D group" in t and "replicated 2x" in t
               and "packed varlen ring over R=2" in t for t in two_d), two_d


def test_auto_runs_ulysses():
    """strategy='auto' with heads that split: the all-to-all path runs (no ring hop), and the result passes."""
    c = VarlenCase(W=2, docs=STREAM_DOCS, strategy="auto", sharding="stream", causal=True)
    per = run_local(2, _counts, c, wrap=CountingComm)
    assert all(f == {"all_to_all": 2} for f, _, _ in per), per
    check_varlen_case(c)


def _call(comm, docs, H=2, cfg=None, **kw):
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(docs) // comm.world_size, H, 8)
    cfg = dict(dict(strategy="ulysses", balance="zigzag"), **(cfg or {}))
    return cp_varlen_attention(q, q, q, cu, cp=CPConfig(comm, **cfg), **kw)


@pytest.mark.parametrize("W,mesh,kw,match", [  # dropout runs (tests/distributed/test_varlen_dropout.py)
    (4, None, dict(H=2), r"strategy='ulysses' refused: the 2 query heads are not divisible by W=4"),
    (4, (2, 2), dict(H=3, cfg=dict(strategy="hybrid")), r"the 3 query heads are not divisible by U=2"),
    (4, (2, 2), dict(H=3, dropout_p=0.1, cfg=dict(strategy="auto")), r"the 3 query heads are not divisible by U=2"),
])
def test_refusals(W, mesh, kw, match):
    with pytest.raises(CPUnsupportedError, match=match):
        run_local(W, _call, (16, 16), mesh=mesh, **kw)


def test_hybrid_layout_errors():
    """The 2-D layout is over the R ring ranks: per_doc needs every document % 2R (zigzag), not % 2W."""
    run_local(4, _call, (8, 16, 8), cfg=dict(strategy="hybrid"), mesh=(2, 2), causal=True)  # % 2R = 4
    with pytest.raises(ValueError, match=r"document 1 \(length 6\) not divisible by 4: per-document zigzag sharding "
                                         r"over W=2"):
        run_local(4, _call, (10, 6), cfg=dict(strategy="hybrid"), mesh=(2, 2))


@pytest.mark.parametrize("W,mesh,strategy", [(2, None, "ulysses"), (4, (2, 2), "hybrid")])
def test_check_shapes_mismatch_raises_on_every_rank(W, mesh, strategy):
    """cp.check_shapes: one small all-gather (over both dims of a 2-D group) before any all-to-all; other
    cu_seqlens on the last rank make every rank raise, none waits in a collective."""
    def rank(comm):
        try:
            _call(comm, (8, 16, 8) if comm.rank < W - 1 else (16, 8, 8), cfg=dict(strategy=strategy,
                                                                                  check_shapes=True))
        except ValueError as e:
            return str(e)
    msgs = run_local(W, rank, mesh=mesh, timeout=20)
    assert all(m and "varlen inputs differ across the CP ranks" in m for m in msgs), msgs


# --- communication counts ---------------------------------------------------------------------------------------

def _counts(comm, c: VarlenCase, U=None, return_lse=True):
    q, k, v, dout, alibi = make_varlen_inputs(c)
    R = c.W // U if U else None
    sh = (lambda t: shard_2d(t, c.cu, 0, U, R, comm.rank, c.sharding, c.balance)) if U else \
        (lambda t: varlen_shard(c, t, comm.rank))
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    cp = CPConfig(comm, strategy=c.strategy, balance=c.balance, backend=c.backend)
    out = cp_varlen_attention(ql, kl, vl, c.cu, cp=cp, sharding=c.sharding, causal=c.causal, return_lse=return_lse)
    out = out[0] if return_lse else out
    comms = (comm.ulysses, comm.ring) if U else (comm,)
    fwd = [(dict(x.calls), dict(x.bytes)) for x in comms]
    for x in comms:
        x.reset()
    out.backward(sh(dout))
    bwd = [(dict(x.calls), dict(x.bytes)) for x in comms]
    return (fwd[0][0], bwd[0][0], fwd[0][1]) if not U else (fwd, bwd)


@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("return_lse", [False, True])
def test_ulysses_comm_counts_and_bytes(Hkv, return_lse):
    """Forward: ONE all-to-all for q|k|v and one for out (|lse); backward: one for dout, one for dq|dk|dv. The bytes
    are this rank's whole payload: nothing sent twice (K/V heads replicated for Hkv=1 < W=2)."""
    c = U_(W=2, docs=STREAM_DOCS, sharding="stream", causal=True, H=4, Hkv=Hkv)
    s, rep = sum(c.docs) // 2, 2 if Hkv == 1 else 1
    qkv = s * (c.H + 2 * Hkv * rep) * c.D * 4
    out = s * c.H * (c.D + (1 if return_lse else 0)) * 4
    for f, b, fb in run_local(2, _counts, c, None, return_lse, wrap=CountingComm):
        assert (f, b) == ({"all_to_all": 2}, {"all_to_all": 2}), (f, b)
        assert fb == {"all_to_all": qkv + out}, fb


@pytest.mark.parametrize("U,R", [(2, 2), (2, 1)])
def test_hybrid_comm_counts(U, R):
    """All-to-alls over U only (2 forward, 2 backward), ring hops over R only (the varlen ring: R-1, 2R-1)."""
    c = H_(W=U * R, docs=_per_doc(2 * R), causal=True)
    for fwd, bwd in run_local(c.W, _counts, c, U, wrap=CountingComm, mesh=(U, R)):
        hops_f, hops_b = ({"ring_hop": R - 1} if R > 1 else {}), ({"ring_hop": 2 * R - 1} if R > 1 else {})
        assert [f for f, _ in fwd] == [{"all_to_all": 2}, hops_f], fwd
        assert [b for b, _ in bwd] == [{"all_to_all": 2}, hops_b], bwd


# --- torch.compile and the op pair ------------------------------------------------------------------------------

def test_compile_fullgraph_one_op():
    """torch.compile(fullgraph=True): one opaque custom op per graph (cp_varlen_a2a_fwd / _bwd), eager's bits (one
    simulated rank: dynamo compiles per thread, and the op is the same for any W)."""
    import torch._dynamo
    torch._dynamo.reset()
    c = U_(W=1, docs=(12, 1, 19, 8), causal=True, alibi="H")
    cp = CPConfig(LocalComm.world(1)[0], strategy="ulysses", balance="zigzag", backend="reference")
    q, k, v, dout, alibi = make_varlen_inputs(c)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = c.cu

    def f(q, k, v):
        out, lse = cp_varlen_attention(q, k, v, cu, cp=cp, sharding="stream", causal=True, window_size=(5, -1),
                                       alibi_slopes=alibi, return_lse=True)
        return out * 2, lse
    eager, eager_lse = f(q, k, v)
    eager.backward(dout)
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fn, seen = compile_counting_ops(f)
    compiled, lse = fn(q, k, v)
    compiled.backward(dout)
    assert seen == {"fwd": ["fastattn.cp_varlen_a2a_fwd.default"], "bwd": ["fastattn.cp_varlen_a2a_bwd.default"]}
    assert torch.equal(eager, compiled) and torch.equal(eager_lse, lse)
    assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck(return_lse):
    """torch.library.opcheck of the op pair (schema, fake function, autograd registration) at W = 1, GQA."""
    from fastattn.distributed.comm import comm_name
    comm = LocalComm.world(1)[0]
    c = U_(W=1, docs=(6, 10), H=4, Hkv=2)
    q, k, v, _, _ = make_varlen_inputs(c)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), c.cu.long(), None, comm_name(comm),
            "ulysses", "per_doc", "zigzag", 0.25, -1, 0, 0.0, 1, return_lse, "float32", "reference")
    torch.library.opcheck(VU.cp_varlen_a2a_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_autograd_registration"))


# --- the checks catch planted bugs ------------------------------------------------------------------------------

def _plant(monkeypatch, bug):
    if bug == "token reorder skipped":
        monkeypatch.setattr(VU, "_orders", lambda *a: None)  # the gathered rows used in shard order
    elif bug == "cu_seqlens boundary off by one":
        real = VU._doc_kw

        def doc_kw(cu, lengths, device):
            kw = real(cu, lengths, device)
            c = kw["cu_seqlens_q"].clone()
            c[1] += 1
            return dict(kw, cu_seqlens_q=c, cu_seqlens_k=c)
        monkeypatch.setattr(VU, "_doc_kw", doc_kw)
    elif bug == "rank 0's ALiBi slopes":
        real = VU._slopes
        monkeypatch.setattr(VU, "_slopes", lambda a, h, rank: real(a, h, 0))
    elif bug == "one replica's dK/dV":
        monkeypatch.setattr(VU, "_sum_replicas", lambda g, rep, dt: g[:, ::rep].to(dt))
    elif bug == "pieces gathered in reverse rank order":
        real = VU.seq_to_heads

        def seq_to_heads(comm, xs):
            n = comm.world_size
            return [x.unflatten(0, (n, -1)).flip(0).flatten(0, 1) for x in real(comm, xs)]  # (n*s, ..) per rank
        monkeypatch.setattr(VU, "seq_to_heads", seq_to_heads)


@pytest.mark.parametrize("bug,case,U", [
    ("token reorder skipped", U_(W=2, docs=_per_doc(4), causal=True), None),
    ("token reorder skipped", U_(W=2, docs=STREAM_DOCS, sharding="stream", causal=True), None),
    ("cu_seqlens boundary off by one", U_(W=2, docs=STREAM_DOCS, sharding="stream", causal=True), None),
    ("rank 0's ALiBi slopes", U_(W=2, docs=_per_doc(4), causal=True, alibi="H"), None),
    ("rank 0's ALiBi slopes", H_(W=4, docs=_per_doc(4), causal=True, alibi="NH"), 2),
    ("one replica's dK/dV", U_(W=2, docs=_per_doc(4), H=4, Hkv=1), None),
    ("pieces gathered in reverse rank order", H_(W=4, docs=_per_doc(4), causal=True), 2),
], ids=lambda x: x.id() if isinstance(x, VarlenCase) else str(x))
def test_planted_bugs_fail(monkeypatch, bug, case, U):
    _plant(monkeypatch, bug)
    with pytest.raises(AssertionError):
        if U:
            check_hybrid(case, U)
        else:
            check_acceptance(case, run_varlen_local(case), single_process_varlen(case), reference_varlen(case),
                             single_block_varlen(case))


# --- tier 1: real gloo process groups ----------------------------------------------------------------------------

TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")


@pytest.mark.distributed
def test_gloo_ulysses_matches_single_process(gloo_pool):
    """The byte-packed all-to-alls over a real gloo group (all_to_all_single of uint8)."""
    case = U_(W=2, docs=STREAM_DOCS, sharding="stream", causal=True, H=4, Hkv=1, dtype=torch.bfloat16)
    per_rank = gloo_pool(case.W).run(TASKS, "varlen_case", case)
    check_acceptance(case, gather_varlen(case, per_rank), single_process_varlen(case), reference_varlen(case),
                     single_block_varlen(case))
