"""Tier 0: CP attention on W simulated ranks (threads, LocalComm) against single-process fastattn and a float64
oracle on the whole sequence (acceptance rule in tests/support/cp_cases.py): out, lse, dq, dk, dv."""
import threading

import pytest
import torch

from tests.support.cp_cases import (Case, block_backends, check_acceptance, check_case, reference, run_cp_local,
                                    single_block, single_process, with_)
from fastattn.distributed import CountingComm, CPConfig, cp_attention, run_local

MATRIX = [Case(strategy=s, balance=b, W=W, causal=causal, H=4, Hkv=2)
          for s, Ws in (("ring", (2, 3, 4)), ("allgather", (2, 4)), ("ulysses", (2, 4)))
          for W in Ws for b in ("zigzag", "contiguous") for causal in (False, True)]


@pytest.mark.parametrize("case", MATRIX, ids=Case.id)
def test_matrix_fp32(case):
    check_case(case)


FEATURES = [
    Case(W=1, causal=True),                                                # one rank: no communication at all
    Case(W=3, causal=True, S=2 * 3 * 37),                                  # odd W, length not a block multiple
    Case(W=4, causal=True, window=(5, -1)),                                # sliding window across shards
    Case(W=4, window=(3, 7), balance="contiguous"),                        # two-sided window, non-causal
    Case(W=4, causal=True, window=(2, -1)),                                # empty rows inside most blocks
    Case(W=3, causal=True, alibi=True),
    Case(W=2, alibi=True, window=(6, 4)),
    Case(W=4, causal=True, softcap=5.0),
    Case(W=4, causal=True, inputs="staircase"),                            # a rescale at every merge
    Case(W=4, inputs="staircase", balance="contiguous"),
    Case(W=4, causal=True, inputs="large"),                                # logits ~ +-1e3
    Case(W=2, causal=True, H=4, Hkv=1),                                    # MQA
    Case(W=3, causal=True, layout="bhsd", H=6, Hkv=2),
    Case(W=2, strategy="allgather", causal=True, window=(4, -1), alibi=True),
    Case(W=4, strategy="allgather", inputs="staircase"),
    Case(W=4, strategy="ulysses", causal=True, alibi=True, H=8, Hkv=2),   # alibi slopes follow the head shard
    Case(W=4, strategy="ulysses", causal=True, H=4, Hkv=1, layout="bhsd"),  # K/V replicated 4x
]


# The schedule logic runs on the reference backend above; these cases also run on every other backend that takes
# block calls here (the C++ cpu backend once built with the block contract), which checks its positions too.
BACKENDS = block_backends()


def _on_backends(cases):
    return [with_(c, backend=b) for b in BACKENDS for c in cases]


def _id(c: Case) -> str:
    return c.id() + ("" if c.backend == "reference" else f"-{c.backend}")


@pytest.mark.parametrize("case", _on_backends(FEATURES), ids=_id)
def test_features_fp32(case):
    check_case(case)


BF16 = [
    Case(W=4, causal=True, dtype=torch.bfloat16, S=64),
    Case(W=2, balance="contiguous", dtype=torch.bfloat16, S=64),
    Case(W=3, causal=True, dtype=torch.bfloat16, S=2 * 3 * 37, inputs="staircase"),
    Case(W=2, strategy="allgather", causal=True, dtype=torch.bfloat16, S=64),
    Case(W=4, strategy="ulysses", causal=True, dtype=torch.bfloat16, S=64, Hkv=2),
    Case(W=4, causal=True, dtype=torch.bfloat16, S=64, grad_comm_dtype=torch.bfloat16),  # rounds per hop
    Case(W=3, causal=True, dtype=torch.float16, S=60, window=(9, -1)),
]


@pytest.mark.parametrize("case", _on_backends(BF16), ids=_id)
def test_bf16(case):
    check_case(case)


GPU_BACKENDS = block_backends("cuda") if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device, or no CUDA backend takes block calls")
@pytest.mark.parametrize("case", [with_(c, backend=b, device="cuda", S=2 * c.W * 48) for b in GPU_BACKENDS
                                  for c in BF16[:5] + FEATURES[1:4]], ids=_id)
def test_gpu_kernels_under_simulated_cp(case):
    """The GPU kernels under CP on one device: W simulated ranks (threads) share it (design note: NCCL cannot run
    two ranks on one GPU)."""
    check_case(case)


def test_lse_exact_and_no_nan_with_empty_block_rows():
    """Window 0 (each query sees only itself): nearly every block row is empty; out must be v, lse the score."""
    c = Case(W=4, causal=True, window=(0, 0))
    out, lse, dq, dk, dv = run_cp_local(c)
    ref = reference(c)
    assert torch.allclose(out, ref[0].float(), atol=1e-6) and torch.isfinite(lse).all()
    assert torch.allclose(lse.double(), ref[1], atol=1e-5)


# --- exact communication -------------------------------------------------------------------------------------

def _counts(comm, c: Case, return_lse=True):
    from tests.support.cp_cases import make_inputs
    q, k, v, dout, _ = make_inputs(c)
    cp = CPConfig(comm, strategy=c.strategy, balance=c.balance, backend=c.backend)
    ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
    out = cp_attention(ql, kl, vl, cp=cp, causal=c.causal, return_lse=return_lse)
    out = out[0] if return_lse else out
    fwd = (dict(comm.calls), dict(comm.bytes))
    comm.reset()
    out.backward(cp.shard(dout, 1))
    return fwd, (dict(comm.calls), dict(comm.bytes))


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
def test_ring_comm_counts(W, balance):
    c = Case(W=W, balance=balance, causal=True, H=4, Hkv=2)
    kv_bytes = 2 * c.B * (c.S // W) * c.Hkv * c.D * 4  # K and V of one shard, fp32
    for (fc, fb), (bc, bb) in run_local(W, _counts, c, wrap=CountingComm):
        assert fc == {"ring_hop": W - 1} and fb["ring_hop"] == (W - 1) * kv_bytes  # every rank, causal or not
        assert bc == {"ring_hop": (W - 1) + W}  # K/V again, and W hops of the fp32 dK/dV accumulators
        assert bb["ring_hop"] == (2 * W - 1) * kv_bytes


def test_allgather_and_ulysses_comm_counts():
    for (fc, _), (bc, _) in run_local(2, _counts, Case(W=2, strategy="allgather", causal=True), wrap=CountingComm):
        assert fc == {"all_gather": 1} and bc == {"all_gather": 1, "reduce_scatter": 1}
    for lse, n in ((True, 5), (False, 4)):
        res = run_local(4, _counts, Case(W=4, strategy="ulysses", causal=True), lse, wrap=CountingComm)
        for (fc, _), (bc, _) in res:
            assert fc == {"all_to_all": n} and bc == {"all_to_all": 4}


# --- the checks catch planted bugs ----------------------------------------------------------------------------

def _planted(monkeypatch, bug):
    import fastattn.distributed.ring as ring
    if bug == "skipped merge":
        monkeypatch.setattr(ring, "merge_", lambda *a: None)
    elif bug == "k_start off by one":
        real = ring.block_forward
        monkeypatch.setattr(ring, "block_forward", lambda *a, k_start, **kw: real(*a, k_start=k_start + 1, **kw))
    elif bug == "dkv not accumulated":
        monkeypatch.setattr(ring, "_add", lambda acc, x: None)


@pytest.mark.parametrize("bug", ["skipped merge", "k_start off by one", "dkv not accumulated"])
def test_planted_bugs_fail(monkeypatch, bug):
    _planted(monkeypatch, bug)
    c = Case(W=4, causal=True, alibi=bug == "k_start off by one")
    with pytest.raises(AssertionError, match="acceptance rule"):
        check_acceptance(c, run_cp_local(c), single_process(c), reference(c), single_block(c))


def test_ring_overlap_order(monkeypatch):
    """Each step posts its K/V hop before the step's block calls and waits for it after them (the communication
    hides behind the compute); in the backward the dK/dV hop of step t is waited for only after step t+1's compute.
    Rank 1's events, W = 3: P = hop posted, W = hop waited, f / b = a block forward / backward call."""
    import fastattn.distributed.ring as ring
    from tests.support.cp_cases import make_inputs
    events = []

    class Logged(CountingComm):
        def ring_hop(self, send, recv):
            h = self.inner.ring_hop(send, recv)
            log = self.rank == 1
            events.extend("P" if log else "")

            class Handle:
                def wait(_):
                    h.wait()
                    events.extend("W" if log else "")
            return Handle()

    for name in ("block_forward", "block_backward"):
        def logged(*a, _real=getattr(ring, name), _tag=name[6], **kw):  # "f" or "b"
            if threading.current_thread().name == "cp-rank1":
                events.append(_tag)
            return _real(*a, **kw)
        monkeypatch.setattr(ring, name, logged)
    c = Case(W=3, balance="contiguous")

    def rank(comm):
        q, k, v, dout, _ = make_inputs(c)
        cp = CPConfig(comm, strategy="ring", balance="contiguous")
        ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
        cp_attention(ql, kl, vl, cp=cp).backward(cp.shard(dout, 1))
    run_local(3, rank, wrap=Logged)
    fwd = "PfW" "PfW" "f"                       # steps 0, 1: post, compute, wait; step 2: compute only
    bwd = "PbPW" "PbWPW" "bWP" "W"              # t: [post K/V] compute [wait dKV] post dKV [wait K/V]; home hop
    assert "".join(events) == fwd + bwd


@pytest.mark.parametrize("causal,alibi,balance,want", [
    (True, False, "zigzag", 3 + 3),       # step 0: 3 diagonal-touching calls; steps 1-3: one fused call each
    (True, True, "zigzag", 3 + 3 * 2),    # ALiBi depends on positions: every pair at its own positions
    (False, False, "zigzag", 4),          # non-causal: each step's 2 x 2 chunk pairs in one call
    (True, False, "contiguous", 2),       # rank 1 of 4: its diagonal block and rank 0's block; 2 steps skip work
])
def test_ring_block_calls_per_rank(monkeypatch, causal, alibi, balance, want):
    import fastattn.distributed.ring as ring
    from tests.support.cp_cases import make_inputs
    calls = []
    real = ring.block_forward

    def counted(*a, **kw):
        if threading.current_thread().name == "cp-rank1":
            calls.append(kw["q_start"])
        return real(*a, **kw)
    monkeypatch.setattr(ring, "block_forward", counted)
    c = Case(W=4, causal=causal, balance=balance, alibi=alibi)
    q, k, v, _, slopes = make_inputs(c)

    def rank(comm):
        cp = CPConfig(comm, strategy="ring", balance=balance)
        cp_attention(*(cp.shard(t, 1) for t in (q, k, v)), cp=cp, causal=causal, alibi_slopes=slopes)
    run_local(4, rank)
    assert len(calls) == want, calls
