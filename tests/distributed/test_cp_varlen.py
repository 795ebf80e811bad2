"""Packed varlen documents under CP: every rank's rows, lse and gradients against single-process
flash_attn_varlen_func and a float64 oracle per document (acceptance rule in tests/support/cp_cases.py), the
ring-flash-attention drop-ins, per-document layouts, exact dropout, clear errors, communication counts, compile."""
import os
from functools import lru_cache

import pytest
import torch

from tests.support.compiled import eager_and_compiled
from tests.support.cp_cases import (VarlenCase, block_backends, check_acceptance, check_varlen_case, gather_varlen,
                                    make_varlen_inputs, reference_varlen, run_varlen_local, single_block_varlen,
                                    single_process_varlen, varlen_call, varlen_shard)
from fastattn.distributed import (CountingComm, CPCommError, CPConfig, CPUnsupportedError, cp_varlen_attention,
                                  layout, llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func,
                                  ring_flash_attn_varlen_func, run_local, shard_varlen, unshard_varlen,
                                  varlen_positions, zigzag_ring_flash_attn_varlen_func)


def _divisible(W):
    """Document lengths that split into 2W pieces (per-document zigzag), odd multiples so pieces differ in size."""
    return (2 * W * 3, 2 * W * 7, 2 * W, 2 * W * 5)


# --- per-document sharding (every document % W or % 2W) ------------------------------------------------------

PER_DOC = [VarlenCase(W=W, docs=_divisible(W), strategy=s, balance=b, causal=causal)
           for W in (2, 3, 4) for s in ("ring", "allgather") for b in ("zigzag", "contiguous")
           for causal in (False, True) if not (s == "allgather" and W == 3 and not causal)]


@pytest.mark.parametrize("case", PER_DOC, ids=VarlenCase.id)
def test_per_doc_fp32(case):
    check_varlen_case(case)


# --- stream sharding: documents cross ranks, any lengths (total % W) ----------------------------------------

STREAM = [VarlenCase(W=W, docs=docs, strategy=s, sharding="stream", balance=b, causal=causal)
          for W, docs, b in ((2, (37, 128, 301, 46), "zigzag"), (3, (37, 128, 301, 47), "contiguous"),
                             (4, (37, 128, 301, 46), "contiguous"))
          for s in ("allgather", "ring") for causal in (False, True)]


@pytest.mark.parametrize("case", STREAM, ids=VarlenCase.id)
def test_stream_fp32(case):
    check_varlen_case(case)


FEATURES = [
    VarlenCase(W=4, docs=_divisible(4), causal=True, window=(5, -1)),                  # window across pieces
    VarlenCase(W=3, docs=_divisible(3), balance="contiguous", window=(4, 9)),          # two-sided, non-causal
    VarlenCase(W=4, docs=_divisible(4), causal=True, window=(0, 0)),                   # most block rows empty
    VarlenCase(W=2, docs=_divisible(2), causal=True, alibi="H"),
    VarlenCase(W=2, docs=_divisible(2), alibi="NH", window=(6, 3)),                    # per-document slopes
    VarlenCase(W=4, docs=_divisible(4), causal=True, softcap=5.0, H=4, Hkv=1),          # MQA
    VarlenCase(W=2, docs=(8, 0, 4, 0, 12), causal=True),                               # empty documents
    VarlenCase(W=4, docs=(37, 128, 301, 46), strategy="allgather", sharding="stream", balance="zigzag",
               causal=True, window=(20, -1), alibi="NH"),
    VarlenCase(W=3, docs=(3, 1, 500, 9), strategy="ring", sharding="stream", balance="contiguous", causal=True,
               alibi="H"),                                                           # a document over all ranks
    VarlenCase(W=2, docs=_divisible(2), api="ring", causal=True),
    VarlenCase(W=4, docs=_divisible(4), api="zigzag", causal=True, window=(7, -1)),
    VarlenCase(W=3, docs=_divisible(3), api="zigzag"),                                  # non-causal zigzag: exact
    VarlenCase(W=2, docs=(37, 128, 301, 46), api="llama3", causal=True),
    VarlenCase(W=3, docs=(37, 128, 301, 47), api="llama3"),
    VarlenCase(W=4, docs=(37, 128, 301, 46), api="llama3", causal=True, window=(9, -1), alibi="NH"),
    VarlenCase(W=4, docs=(37, 128, 301, 46), api="llama3", window=(5, 5)),              # exact, unlike bottom-right
]

BACKENDS = [b for b in block_backends() if b != "reference"]


@pytest.mark.parametrize("case", FEATURES + [VarlenCase(**{**c.__dict__, "backend": b}) for b in BACKENDS
                                             for c in FEATURES[:3] + FEATURES[7:9] if c.api == "cp"],
                         ids=VarlenCase.id)
def test_features_fp32(case):
    check_varlen_case(case)


BF16 = [
    VarlenCase(W=4, docs=_divisible(4), causal=True, dtype=torch.bfloat16),
    VarlenCase(W=3, docs=(37, 128, 301, 47), sharding="stream", balance="contiguous", strategy="ring",
               causal=True, dtype=torch.bfloat16),
    VarlenCase(W=2, docs=(37, 128, 301, 46), api="llama3", causal=True, dtype=torch.bfloat16),
    VarlenCase(W=4, docs=(37, 128, 301, 46), sharding="stream", strategy="allgather", window=(12, 3),
               dtype=torch.float16),
]


@pytest.mark.parametrize("case", BF16, ids=VarlenCase.id)
def test_bf16(case):
    check_varlen_case(case)


def test_drop_ins_equal_cp_varlen_attention():
    """ring_/zigzag_ring_flash_attn_varlen_func (LOCAL cu_seqlens) and llama3 (prepare_cu_seqlens) give the bits
    of cp_varlen_attention with GLOBAL cu_seqlens on the same layout."""
    for api, kw in (("ring", dict(balance="contiguous")), ("zigzag", dict(balance="zigzag")),
                    ("llama3", dict(sharding="stream", balance="contiguous", strategy="allgather"))):
        c = VarlenCase(W=2, docs=_divisible(2), api=api, causal=True)
        a, b = run_varlen_local(c), run_varlen_local(VarlenCase(**{**c.__dict__, "api": "cp", **kw}))
        for x, y in zip(a, b):
            assert torch.equal(x, y), api


# --- layouts ---------------------------------------------------------------------------------------------------

def _extract_local(x, cu, rank, W, zigzag):
    """ring-flash-attention's tests' extract_local: per document, chunk(2W) pieces r and 2W-1-r (or chunk(W)[r])."""
    out = []
    for a, b in zip(cu, cu[1:]):
        chunks = x[a:b].chunk(2 * W if zigzag else W, dim=0)
        out += [chunks[rank], chunks[2 * W - 1 - rank]] if zigzag else [chunks[rank]]
    return torch.cat(out)


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
def test_shard_varlen_order_and_inverse(W, balance):
    docs = _divisible(W)
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.arange(int(cu[-1])).view(-1, 1).float() * torch.ones(1, 3)  # (T, 3): row i holds i
    shards = [shard_varlen(x, cu, 0, W, r, balance) for r in range(W)]
    for r, s in enumerate(shards):
        assert torch.equal(s, _extract_local(x, cu.tolist(), r, W, balance == "zigzag"))
        pos = varlen_positions(cu, W, r, balance)
        starts = cu[torch.searchsorted(cu, s[:, 0].long(), right=True) - 1]
        assert torch.equal(pos, s[:, 0].long() - starts)  # the position of each token within its document
    assert torch.equal(layout.unshard_varlen_list(shards, cu, 0, balance), x)
    got = run_local(W, lambda comm: unshard_varlen(shards[comm.rank], cu, 0, comm, balance))
    assert all(torch.equal(g, x) for g in got)


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_llama3_prepare_cu_seqlens_vs_brute_force(W, causal):
    docs = (37, 128, 0, 301, 46 + (W == 3)) if W != 3 else (37, 128, 301, 47)
    cu = [0] + torch.tensor(docs).cumsum(0).tolist()
    T = cu[-1] // W
    for r in range(W):
        cu_q, cu_k, mq, mk, ks = llama3_flash_attn_prepare_cu_seqlens(torch.tensor(cu, dtype=torch.int32), causal,
                                                                      r, W)
        lo, hi = r * T, (r + 1) * T
        # brute force: the documents from the first to the last with a token in [lo, hi) (empty ones between kept)
        hit = [n for n in range(len(docs)) if cu[n] < hi and cu[n + 1] > lo and docs[n]]
        docs_in = list(range(hit[0], hit[-1] + 1))
        assert cu_q.tolist() == [0] + [min(cu[n + 1], hi) - lo for n in docs_in]
        first = cu[docs_in[0]]
        assert ks == slice(first, hi if causal else cu[docs_in[-1] + 1])
        assert cu_k.tolist() == [0] + [min(cu[n + 1], ks.stop) - first for n in docs_in]
        assert (mq, mk) == (max(torch.diff(cu_q).tolist()), max(torch.diff(cu_k).tolist()))


# --- dropout: exactly the single-process mask ---------------------------------------------------------------------

DROPOUT_BACKENDS = block_backends(dropout=True)


@pytest.mark.skipif(not DROPOUT_BACKENDS, reason="no backend takes varlen block calls with dropout here (the C++ "
                    "cpu backend does, keyed on document, head and positions; the reference uses torch's RNG)")
@pytest.mark.parametrize("c", [
    VarlenCase(W=4, docs=_divisible(4), causal=True),
    VarlenCase(W=3, docs=(37, 128, 301, 47), sharding="stream", balance="contiguous", strategy="allgather"),
    VarlenCase(W=2, docs=(37, 128, 301, 46), sharding="stream", strategy="ring", causal=True, window=(30, -1)),
    VarlenCase(W=3, docs=(37, 128, 301, 47), api="llama3", causal=True),
    VarlenCase(W=2, docs=_divisible(2), api="zigzag", causal=True),
], ids=VarlenCase.id)
def test_dropout_equals_single_process(monkeypatch, c):
    """With the same rng, CP drops exactly the elements the whole packed call drops (the document index and the
    in-document positions key the mask): out, lse and grads equal the single-process varlen block call with that
    rng, within rounding (a wrong document index or position changes O(p) of the elements). The drop-ins draw the
    rng themselves (rank 0's); it is pinned here."""
    from fastattn.distributed import varlen_api
    be, rng, p = DROPOUT_BACKENDS[0], (1234, 56), 0.3
    monkeypatch.setattr(varlen_api, "_shared_rng", lambda cp, device: rng)
    c = VarlenCase(**{**c.__dict__, "backend": be})
    got = run_varlen_local(c, dropout_p=p)
    one = single_block_varlen(c, rng=rng, dropout_p=p)
    nodrop = single_block_varlen(c)
    assert (one[0] - nodrop[0]).abs().max() > 0.1, "the dropout is real"
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, one):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# --- clear errors, not hangs ----------------------------------------------------------------------------------

def _cp_call(comm, docs, T=None, check=False, **kw):
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    T = T(comm.rank) if callable(T) else (T or sum(docs) // comm.world_size)
    q = torch.randn(T, 2, 8)
    cfg = dict(strategy="ring", balance="zigzag", check_shapes=check)
    cfg.update(kw.pop("cfg", {}))
    return cp_varlen_attention(q, q, q, cu, cp=CPConfig(comm, **cfg), **kw)


@pytest.mark.parametrize("docs,kw,match", [
    ((37, 128, 301, 46), {}, r"cu_seqlens: document 0 \(length 37\), document 2 \(length 301\), document 3 "
                            r"\(length 46\) not divisible by 4: per-document zigzag sharding over W=2"),
    ((8, 10, 2), dict(cfg=dict(balance="contiguous")), r"cu_seqlens: document 1 \(length 10\), document 2 "
                                                       r"\(length 2\) not divisible by 4: .*contiguous .*W=4"),
    ((8, 8), dict(T=5), r"cu_seqlens ends at 16 but the 2 ranks hold 2 x 5 = 10 tokens"),
    ((8, 8), dict(sharding="rows"), "sharding must be one of"),
    ((8, 8), dict(cfg=dict(strategy="ulysses")), r"strategy='ulysses' refused: the 2 query heads are not divisible "
                                                 r"by W=4"),
    ((8, 8), dict(alibi_slopes=torch.ones(3, 2)), r"alibi_slopes must be float32 \(2,\) or \(documents, 2\)"),
    ((7, 7), dict(sharding="stream", cfg=dict(balance="zigzag")), "zigzag layout needs an even local"),
])
def test_clear_errors(docs, kw, match):
    W = 4 if "W=4" in match else 2
    with pytest.raises(ValueError, match=match):
        run_local(W, _cp_call, docs, **kw)
    if "ulysses" in str(kw):  # Ulysses itself: tests/distributed/test_varlen_ulysses.py
        with pytest.raises(CPUnsupportedError):
            run_local(W, _cp_call, docs, **kw)


def test_drop_in_errors():
    q = torch.randn(16, 2, 8)
    cu_global = torch.tensor([0, 8, 32], dtype=torch.int32)

    def ring(comm, cu):
        return ring_flash_attn_varlen_func(q, q, q, cu, 16, group=comm)
    with pytest.raises(ValueError, match=r"ends at 32 but q holds 16 tokens.*pass the LOCAL cu_seqlens"):
        run_local(2, ring, cu_global)
    run_local(2, ring, cu_global // 2)  # the local one works

    with pytest.raises(TypeError, match="softcap must be a float, got NoneType; unlike ring-flash-attention"):
        # ring-flash-attention's positional order: (..., window_size, alibi_slopes, deterministic, ...)
        run_local(2, lambda comm: ring_flash_attn_varlen_func(q, q, q, cu_global // 2, 8, 0.0, None, True, (-1, -1),
                                                              None, False, False, comm))

    def zigzag(comm):
        return zigzag_ring_flash_attn_varlen_func(q, q, q, torch.tensor([0, 5, 16], dtype=torch.int32), 11,
                                                  group=comm, causal=True)
    with pytest.raises(ValueError, match=r"document 0 has local length 5 \(global 10\), not divisible by 2"):
        run_local(2, zigzag)

    def llama3(comm, shift):
        cu_q, cu_k, mq, mk, ks = llama3_flash_attn_prepare_cu_seqlens(cu_global, True, comm.rank, 2)
        return llama3_flash_attn_varlen_func(q, q, q, cu_q, cu_k, mq, mk, 2, slice(ks.start + shift, ks.stop + shift),
                                             group=comm, causal=True)
    run_local(2, llama3, 0)
    with pytest.raises(ValueError, match=r"llama3_flash_attn_varlen_func on rank 0 of 2: document 0: queries at "
                                         r"packed rows \[0, 8\) are not inside its keys \[1, 9\)"):
        run_local(2, llama3, 1)
    with pytest.raises(ValueError, match=r"on rank 0 of 2: local_k_slice slice\(20, 36, None\) must lie in the 32"):
        run_local(2, llama3, 20)
    with pytest.raises(ValueError, match="heads_k_stride must be a positive divisor of the 2"):
        run_local(2, lambda comm: llama3_flash_attn_varlen_func(q, q, q, cu_global // 2, cu_global // 2, 8, 8, 3,
                                                                slice(0, 16), group=comm))


def test_shard_varlen_error_names_the_document():
    with pytest.raises(ValueError, match=r"cu_seqlens: document 1 \(length 6\) not divisible by 8: per-document "
                                         r"zigzag sharding over W=4"):
        shard_varlen(torch.zeros(14, 2), torch.tensor([0, 8, 14]), 0, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="cu_seqlens ends at 14 but x has 15 tokens"):
        shard_varlen(torch.zeros(15, 2), torch.tensor([0, 8, 14]), 0, 2, 0, "contiguous")


def test_mismatched_ranks_fail_clearly():
    """With check_shapes, one small all-gather runs before any other collective: ranks passing other cu_seqlens
    all raise the comparison, and a rank whose own check fails makes every peer raise too (nobody waits in a
    collective). Without it, the bad rank raises and its peers' ring hop fails at the communicator's timeout."""
    def rank(comm, docs, T=None, api="cp"):
        try:
            if api == "cp":
                _cp_call(comm, docs(comm.rank), T=T, check=True)
            else:
                q = torch.randn(T(comm.rank), 2, 8)
                cfg = CPConfig(comm, check_shapes=True)
                ring_flash_attn_varlen_func(q, q, q, torch.tensor([0, 4, 8], dtype=torch.int32), 4, group=cfg)
        except ValueError as e:
            return str(e)
    msgs = run_local(2, rank, lambda r: (8, 8) if r == 0 else (4, 12), timeout=20)
    assert all("varlen inputs differ across the CP ranks" in m for m in msgs), msgs
    for api in ("cp", "ring"):
        msgs = run_local(2, rank, lambda r: (8, 8), T=lambda r: 8 + 4 * r, api=api, timeout=20)
        assert "rejected their varlen inputs" in msgs[0] and "ends at" in msgs[1], msgs
    with pytest.raises((ValueError, CPCommError), match="cu_seqlens ends at 16 but|waited 1 s for a ring hop"):
        run_local(2, _cp_call, (8, 8), T=lambda r: 8 + 4 * r, timeout=1)


# --- communication counts ---------------------------------------------------------------------------------------

def _counts(comm, c: VarlenCase):
    q, k, v, dout, alibi = make_varlen_inputs(c)
    ql, kl, vl = (varlen_shard(c, t, comm.rank).requires_grad_() for t in (q, k, v))
    out, _ = varlen_call(comm, c, ql, kl, vl, alibi)
    fwd = dict(comm.calls)
    comm.reset()
    out.backward(varlen_shard(c, dout, comm.rank))
    return fwd, dict(comm.calls)


@pytest.mark.parametrize("c,fwd,bwd", [
    (VarlenCase(W=3, docs=_divisible(3), causal=True), {"ring_hop": 2}, {"ring_hop": 5}),
    (VarlenCase(W=4, docs=(37, 128, 301, 46), sharding="stream", strategy="ring"), {"ring_hop": 3}, {"ring_hop": 7}),
    (VarlenCase(W=2, docs=_divisible(2), strategy="allgather", causal=True), {"all_gather": 1},
     {"all_gather": 1, "reduce_scatter": 1}),
    (VarlenCase(W=3, docs=(37, 128, 301, 47), api="llama3", causal=True), {"all_gather": 1},
     {"all_gather": 1, "reduce_scatter": 1}),
], ids=lambda x: x.id() if isinstance(x, VarlenCase) else "")
def test_comm_counts(c, fwd, bwd):
    for f, b in run_local(c.W, _counts, c, wrap=CountingComm):
        assert (f, b) == (fwd, bwd)


# --- torch.compile ------------------------------------------------------------------------------------------------

def test_compile_fullgraph_one_op():
    """torch.compile(fullgraph=True) of a function calling cp_varlen_attention: one opaque custom op per graph,
    the same bits as eager (one simulated rank: dynamo compiles per thread, and the op is the same for any W)."""
    import torch._dynamo
    from fastattn.distributed import LocalComm
    torch._dynamo.reset()
    c = VarlenCase(W=1, docs=(12, 20, 8), causal=True)
    cp = CPConfig(LocalComm.world(1)[0], strategy="ring", balance="zigzag", backend="reference")
    q, k, v, dout, _ = make_varlen_inputs(c)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = c.cu

    def f(q, k, v):
        return cp_varlen_attention(q, k, v, cu, cp=cp, causal=True, window_size=(5, -1)) * 2
    eager, grads, compiled, compiled_grads, seen = eager_and_compiled(f, (q, k, v), dout)
    assert seen == {"fwd": ["fastattn.cp_varlen_fwd.default"], "bwd": ["fastattn.cp_varlen_bwd.default"]}, seen
    assert torch.equal(eager, compiled) and all(torch.equal(a, b) for a, b in zip(grads, compiled_grads))


def test_opcheck():
    """torch.library.opcheck of the varlen op pair (schema, fake function, autograd registration) at W = 1."""
    from fastattn.distributed import LocalComm
    from fastattn.distributed.comm import comm_name
    from fastattn.distributed.varlen import cp_varlen_fwd
    comm = LocalComm.world(1)[0]
    c = VarlenCase(W=1, docs=(6, 10))
    q, k, v, _, _ = make_varlen_inputs(c)
    cu = c.cu.long()
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, cu, None, comm_name(comm), "ring",
            "per_doc", "zigzag", 0, 0, 0, 0.25, -1, 0, 0.0, 0.0, 0, 0, "float32", "reference")
    torch.library.opcheck(cp_varlen_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


# --- the checks catch planted bugs ---------------------------------------------------------------------------

def _plant(monkeypatch, bug):
    import fastattn.distributed.varlen as V
    if bug == "k_start off by one":
        real = V.block_forward
        monkeypatch.setattr(V, "block_forward", lambda *a, k_start, **kw: real(*a, k_start=k_start + 1, **kw))
    elif bug == "skipped merge":
        monkeypatch.setattr(V, "merge_", lambda *a: None)
    elif bug == "dkv not accumulated":
        import fastattn.distributed.ring as ring  # the travelling accumulators are ring._GradRing's
        monkeypatch.setattr(ring, "_add", lambda acc, x: None)
    elif bug == "tail pieces' positions off by one":
        real_plan = V.rank_plan

        def plan(*a):
            p = real_plan(*a)
            tail = p.groups[-1]
            return p._replace(groups=p.groups[:-1] + (tail._replace(starts=tuple(x + 1 for x in tail.starts)),))
        monkeypatch.setattr(V, "rank_plan", plan)
        for name in ("_plans", "_schedule"):  # fresh caches for the test: planted plans are used, then dropped
            monkeypatch.setattr(V, name, lru_cache(maxsize=64)(getattr(V, name).__wrapped__))
    elif bug == "zigzag pieces swapped":
        real_pieces = layout.doc_pieces

        def pieces(lengths, W, rank, balance="zigzag"):
            ps = real_pieces(lengths, W, rank, balance)
            if balance != "zigzag":
                return ps
            out = []
            for head, tail in zip(ps[::2], ps[1::2]):  # tail first, local rows kept
                out += [head._replace(pos=tail.pos), tail._replace(pos=head.pos)]
            return out
        monkeypatch.setattr(layout, "doc_pieces", pieces)
    elif bug == "llama3 local document index":
        real_plans = V.plans_for
        monkeypatch.setattr(V, "plans_for", lambda *a: real_plans(*a[:-2], 0, a[-1]))  # doc_base ignored


@pytest.mark.parametrize("bug,check", [
    ("k_start off by one", "acceptance"), ("skipped merge", "acceptance"), ("dkv not accumulated", "acceptance"),
    ("tail pieces' positions off by one", "acceptance"), ("zigzag pieces swapped", "layout"),
    ("llama3 local document index", "dropout"),
])
def test_planted_bugs_fail(monkeypatch, bug, check):
    _plant(monkeypatch, bug)
    with pytest.raises(AssertionError):
        if check == "acceptance":
            check_varlen_case(VarlenCase(W=4, docs=_divisible(4), causal=True, alibi="H"))  # positions matter
        elif check == "layout":
            test_shard_varlen_order_and_inverse(2, "zigzag")
        else:
            if not DROPOUT_BACKENDS:
                pytest.skip("no backend takes varlen block calls with dropout here")
            test_dropout_equals_single_process(monkeypatch, VarlenCase(W=3, docs=(37, 128, 301, 47), api="llama3",
                                                                      causal=True))


# --- tier 1: real gloo process groups ----------------------------------------------------------------------------

TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")


@pytest.mark.distributed
@pytest.mark.parametrize("case", [
    VarlenCase(W=2, docs=_divisible(2), api="zigzag", causal=True),
    VarlenCase(W=4, docs=(37, 128, 301, 46), api="llama3", causal=True, dtype=torch.bfloat16),
    VarlenCase(W=3, docs=(37, 128, 301, 47), sharding="stream", balance="contiguous", strategy="ring",
               window=(9, 4)),
], ids=VarlenCase.id)
def test_gloo_matches_single_process(gloo_pool, case):
    per_rank = gloo_pool(case.W).run(TASKS, "varlen_case", case)
    check_acceptance(case, gather_varlen(case, per_rank), single_process_varlen(case), reference_varlen(case),
                     single_block_varlen(case))


@pytest.mark.distributed
def test_gloo_bad_rank_raises_on_every_rank(gloo_pool):
    msgs = gloo_pool(2).run(TASKS, "varlen_bad_rank", True)
    assert "rejected their varlen inputs" in msgs[0] and "cu_seqlens ends at 16" in msgs[1], msgs


@pytest.mark.distributed
@pytest.mark.parametrize("api", ["cp", "llama3"])
def test_gloo_torch_compile_fullgraph(gloo_pool, api):
    for same, counts in gloo_pool(2).run(TASKS, "varlen_compiled_vs_eager", api):
        assert same, "compiled varlen CP attention differs from eager"
        assert counts == {"fwd": ["fastattn.cp_varlen_fwd.default"], "bwd": ["fastattn.cp_varlen_bwd.default"]}, \
            counts


def test_two_d_config_runs_the_hybrid_or_refuses():
    """A 2-D (hybrid) config runs packed documents (tests/distributed/test_varlen_ulysses.py; dropout:
    test_varlen_dropout.py), and refuses what the hybrid cannot do with a clear error, never the hybrid's
    communicator error."""
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)

    def call(comm, H=2, **kw):
        q = torch.randn(8, H, 8)
        return cp_varlen_attention(q, q, q, cu, cp=CPConfig(comm), **kw)
    run_local(4, call, mesh=(2, 2))
    with pytest.raises(CPUnsupportedError, match=r"the 3 query heads are not divisible by U=2"):
        run_local(4, call, 3, mesh=(2, 2))
