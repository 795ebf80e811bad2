"""Packed varlen documents under CP: every rank's rows, lse and gradients against single-process
flash_attn_varlen_func and a float64 oracle per document (acceptance rule in tests/support/cp_cases.py), the
ring-flash-attention drop-ins, per-document layouts, exact dropout, clear errors, communication counts, compile."""
import os

import pytest
import torch

from tests.support.cp_cases import (VarlenCase, block_backends, check_acceptance, check_varlen_case,
                                    make_varlen_inputs, reference_varlen, run_varlen_local, single_block_varlen,
                                    single_process_varlen, varlen_call, varlen_shard, varlen_unshard)
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
