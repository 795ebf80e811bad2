"""The hybrid strategy (Ulysses x ring, "USP") on a 2-D group: tier 0 on simulated ranks (run_local(mesh=(U, R)):
two LocalComm groups per rank), tier 1 on a 2-D DeviceMesh of gloo processes. Results against single-process
fastattn and the float64 oracle on the whole sequence with the CP acceptance rule (tests/support/cp_cases.py)."""
import math
import os
from dataclasses import replace

import pytest
import torch

from tests.support import torch_older_than
from tests.support.compiled import compile_counting_ops
from tests.support.cp_cases import (HybridCase, check_acceptance, check_hybrid_case, gather_hybrid_results,
                                    make_inputs, reference, run_hybrid_local, single_block, single_process)
from fastattn.distributed import (CountingComm, CPCommError, CPConfig, CPUnsupportedError, cp_attention, hybrid,
                                  layout, run_local)

TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")


# --- layout --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
@pytest.mark.parametrize("U,R", [(2, 2), (2, 3), (3, 2), (1, 4), (4, 1)])
def test_layout_is_the_ring_layout_cut_into_ulysses_pieces(U, R, balance):
    """Rank (u, r) = r * U + u holds piece u of ring shard r (yunchang's extract with rd=R, ud=U): the Ulysses
    all-to-all, which concatenates its group's pieces in rank order, then yields exactly ring shard r."""
    W, S = U * R, 2 * U * R * 3
    x = torch.arange(S).view(1, S, 1) * 10  # row s holds 10 s
    shards = [hybrid.shard(x, 1, U, R, i, balance) for i in range(W)]
    assert torch.equal(hybrid.unshard_list(shards, 1, U, R, balance), x)
    for i in range(W):
        r, u = divmod(i, U)
        assert torch.equal(shards[i], layout.shard(x, 1, R, r, balance).chunk(U, dim=1)[u])
        assert torch.equal(shards[i][0, :, 0], hybrid.global_positions(S, U, R, i, balance) * 10)
        segs = hybrid.segments(S // W, U, R, i, balance)  # runs of consecutive positions, in local order
        runs = torch.cat([torch.arange(g.start, g.start + g.length) for g in segs])
        assert torch.equal(runs, shards[i][0, :, 0] // 10)
        assert [g.local for g in segs] == [sum(h.length for h in segs[:j]) for j in range(len(segs))]
    for r in range(R):
        assert torch.equal(torch.cat(shards[r * U:(r + 1) * U], 1), layout.shard(x, 1, R, r, balance))


def test_config_layout_and_collectives():
    """CPConfig.shard / unshard / global_positions on a 2-D group, and HybridComm's flattened collectives."""
    S = 24
    x = torch.arange(S).view(1, S)

    def rank(comm):
        cp = CPConfig(comm)
        mine = cp.shard(x, 1)
        ag = comm.all_gather(torch.tensor([comm.rank]))
        rs = comm.reduce_scatter(torch.arange(comm.world_size, dtype=torch.float) + 100 * comm.rank)
        ar = comm.all_reduce(torch.tensor([float(comm.rank)]))
        with pytest.raises(CPCommError, match="runs along one dim"):
            comm.ring_hop([mine], [mine.clone()])
        return (mine, cp.global_positions(S), cp.unshard(mine, 1), ag, rs, ar, cp.is_2d, cp.mesh_shape,
                (comm.ulysses.rank, comm.ring.rank), cp.segments(S // 6))
    res = run_local(6, rank, mesh=(3, 2))
    for i, (mine, pos, full, ag, rs, ar, is_2d, shape, ur, segs) in enumerate(res):
        assert ur == (i % 3, i // 3) and is_2d and shape == (3, 2) and segs == hybrid.segments(4, 3, 2, i, "zigzag")
        assert torch.equal(mine[0], pos) and torch.equal(pos, hybrid.global_positions(S, 3, 2, i, "zigzag"))
        assert torch.equal(full, x)
        assert ag.view(-1).tolist() == list(range(6))  # slot i: flattened rank i
        assert rs.item() == 6 * i + 100 * sum(range(6)) and ar.item() == sum(range(6))


# --- exactness -----------------------------------------------------------------------------------------------------

MATRIX = [HybridCase(W=W, U=U, balance=b, causal=causal, H=H, Hkv=2) for W, U, H in ((4, 2, 4), (6, 2, 4), (6, 3, 6))
          for b in ("zigzag", "contiguous") for causal in (False, True)]


@pytest.mark.parametrize("case", MATRIX, ids=HybridCase.id)
def test_matrix_fp32(case):
    check_hybrid_case(case)


FEATURES = [
    HybridCase(W=4, causal=True, window=(5, -1)),                              # sliding window across shards
    HybridCase(W=6, U=3, H=6, Hkv=6, window=(3, 7), balance="contiguous"),     # two-sided window, non-causal
    HybridCase(W=4, causal=True, window=(1, -1)),                              # empty rows inside most blocks
    HybridCase(W=4, causal=True, alibi=True, H=8, Hkv=2),                      # slopes follow the head group
    HybridCase(W=6, U=2, causal=True, alibi=True, H=4, Hkv=1, layout="bhsd"),  # MQA: K/V replicated 2x
    HybridCase(W=6, U=3, H=6, Hkv=1, causal=True),                             # K/V replicated 3x
    HybridCase(W=4, causal=True, softcap=5.0),
    HybridCase(W=4, causal=True, inputs="staircase"),                          # a rescale at every ring merge
    HybridCase(W=6, U=3, H=6, Hkv=3, causal=True, inputs="large"),             # logits ~ +-1e3
    HybridCase(W=6, U=2, H=4, causal=True, S=2 * 6 * 37),                      # not a block multiple
    HybridCase(W=4, U=1, causal=True),                                         # degenerate: a ring of 4
    HybridCase(W=4, U=4, causal=True, H=4, Hkv=2),                             # degenerate: Ulysses, ring of 1
]
BF16 = [
    HybridCase(W=4, causal=True, dtype=torch.bfloat16, S=64, Hkv=1),           # replicas summed exactly
    HybridCase(W=6, U=3, H=6, Hkv=2, causal=True, dtype=torch.float16, S=48, window=(9, -1)),
    HybridCase(W=4, causal=True, dtype=torch.bfloat16, S=64, grad_comm_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", FEATURES + BF16, ids=HybridCase.id)
def test_features(case):
    check_hybrid_case(case)


def test_cpu_backend_block_calls():
    """The same schedule on the C++ cpu backend's block calls (when built with the block contract)."""
    from tests.support.cp_cases import block_backends
    others = [b for b in block_backends() if b != "reference"]
    if not others:
        pytest.skip("no backend besides the reference takes block calls in this build")
    for b in others:
        check_hybrid_case(HybridCase(W=6, U=2, H=4, Hkv=1, causal=True, alibi=True, backend=b))


def test_key_padding_mask():
    """Padded keys (scattered, left and right padding) are invisible whichever rank holds them; the key bias is
    gathered over the Ulysses dim and travels with the ring's K/V."""
    from test_cp_padding import check, make, oracle, single
    S = 48
    q, k, v, dout, mask = make(S)
    for (U, R), causal, balance in (((2, 2), True, "zigzag"), ((2, 3), False, "contiguous"), ((4, 1), True, "zigzag"),
                                    ((2, 3), True, "contiguous")):  # H=4, H_kv=2 (replicated 2x for U=4)
        def rank(comm):
            cp = CPConfig(comm, balance=balance)
            ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
            out = cp_attention(ql, kl, vl, cp=cp, causal=causal, key_padding_mask=cp.shard(mask, 1))
            out.backward(cp.shard(dout, 1))
            return out.detach(), ql.grad, kl.grad, vl.grad
        res = run_local(U * R, rank, mesh=(U, R))
        got = [hybrid.unshard_list([r[i] for r in res], 1, U, R, balance) for i in range(4)]
        if causal:
            assert not got[0][1, :3].any(), "queries that see only padded keys must give 0"
        check(got, single(q, k, v, dout, mask, causal), oracle(q, k, v, dout, mask, causal), f"U{U}xR{R}")


# --- communication -------------------------------------------------------------------------------------------------

def _counts(comm, c: HybridCase, mask: bool):
    q, k, v, dout, _ = make_inputs(c)
    cp = CPConfig(comm, balance=c.balance)  # auto: hybrid on a 2-D group
    ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
    kpm = cp.shard(torch.ones(c.B, c.S, dtype=torch.bool), 1) if mask else None
    out, _ = cp_attention(ql, kl, vl, cp=cp, causal=c.causal, return_lse=True, key_padding_mask=kpm)
    uly, ring = comm.ulysses, comm.ring
    fwd = dict(uly.calls), dict(ring.calls), dict(ring.bytes)
    uly.reset()
    ring.reset()
    out.backward(cp.shard(dout, 1))
    return fwd, (dict(uly.calls), dict(ring.calls), dict(ring.bytes))


@pytest.mark.parametrize("U,R,Hkv,mask", [(2, 2, 2, False), (2, 3, 1, False), (3, 2, 3, True)])
def test_comm_counts(U, R, Hkv, mask):
    """All-to-alls over U only (forward q, k, v, out, lse; backward dout, dq, dk, dv), K/V hops over R only (R-1
    forward; R-1 + R dK/dV backward) carrying 1/U of the (replicated) K/V heads; a key bias: one all_gather over U
    each way, and it rides the K/V hops."""
    c = HybridCase(W=U * R, U=U, H=6 if U == 3 else 4, Hkv=Hkv, causal=True)
    hk = Hkv * (U // math.gcd(Hkv, U)) // U  # K/V heads per rank after replication
    kv = 2 * c.B * (c.S // R) * hk * c.D * 4  # K and V of one ring shard, fp32
    bias = c.B * (c.S // R) * 4 if mask else 0
    for (fu, fr, fb), (bu, br, bb) in run_local(c.W, _counts, c, mask, wrap=CountingComm, mesh=(U, R)):
        gathers = {"all_gather": 1} if mask else {}
        assert fu == {"all_to_all": 5, **gathers} and bu == {"all_to_all": 4, **gathers}
        assert fr == {"ring_hop": R - 1} and br == {"ring_hop": 2 * R - 1}
        assert fb.get("ring_hop", 0) == (R - 1) * (kv + bias)
        assert bb["ring_hop"] == (R - 1) * (kv + bias) + R * kv


# --- strategy choice and refusals ------------------------------------------------------------------------------

def test_auto_explain_and_refusals():
    def rank(comm):
        cp = CPConfig(comm)
        out = [cp.plan(heads_q=8, heads_kv=2), cp.explain(heads_q=8, heads_kv=1, causal=True),
               CPConfig(comm, balance="contiguous").explain(heads_q=8, heads_kv=8, causal=True),
               cp.explain(heads_q=9, heads_kv=9)]
        with pytest.raises(CPUnsupportedError) as e:
            CPConfig(comm, strategy="hybrid").plan(heads_q=9, heads_kv=9)
        out.append(str(e.value))
        out.append(CPConfig(comm, strategy="hybrid").plan(heads_q=8, heads_kv=8, dropout=True))
        with pytest.raises(ValueError, match="strategy='ring' runs on one group; this config has a 2-D group "
                                             r"\(ulysses U=2 x ring R=2\)"):
            CPConfig(comm, strategy="ring")
        with pytest.raises(ValueError, match="ulysses_group= and ring_group= together"):
            CPConfig(ulysses_group=comm.ulysses)
        both = CPConfig(ulysses_group=comm.ulysses, ring_group=comm.ring)
        out.append((both.rank, both.world_size, both.plan(heads_q=4, heads_kv=4).strategy))
        return out
    plan, e_auto, e_contig, e_bad, r_heads, r_drop, both = run_local(4, rank, mesh=(2, 2))[3]
    assert (plan.strategy, plan.kv_repeat) == ("hybrid", 1)
    assert "W=4 (ulysses U=2 x ring R=2)" in e_auto and "-> hybrid: a 2-D group: Ulysses over U=2 (4 of H=8" in \
        e_auto and "K/V heads replicated 2x" in e_auto and "zigzag ring over R=2" in e_auto
    assert "ring rank 0 idle" in e_contig and "refused" in e_bad and "9 query heads are not divisible by U=2" in e_bad
    assert "9 query heads are not divisible by U=2" in r_heads and "a 1-D CPConfig over the flattened" in r_heads
    assert r_drop.strategy == "hybrid"  # dropout is exact on the hybrid (head_start): no refusal
    assert both == (3, 4, "hybrid")

    def one_d(comm):
        with pytest.raises(ValueError, match="strategy='hybrid' needs a 2-D group"):
            CPConfig(comm, strategy="hybrid")
    run_local(2, one_d)


# --- torch.compile -----------------------------------------------------------------------------------------------

def _compiled(comm, strategy, dynamic):
    """torch.compile(fullgraph=True) of cp_attention with a key padding mask: the same bits as eager, and the CP
    attention one op in each graph."""
    cp = CPConfig(comm, strategy=strategy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (cp.shard(torch.randn(2, 48, h, 8, generator=g), 1).requires_grad_() for h in (4, 2, 2))
    mask = cp.shard(torch.rand(2, 48, generator=g) > 0.3, 1)

    def f(q, k, v, mask):
        return cp_attention(q, k, v, cp=cp, causal=True, window_size=(9, -1), key_padding_mask=mask) * 2
    eager = f(q, k, v, mask)
    eager.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fn, ops = compile_counting_ops(f, prefix="fastattn.cp_", dynamic=dynamic)
    out = fn(q, k, v, mask)
    out.sum().backward()
    return torch.equal(eager, out) and all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v))), ops


@pytest.mark.parametrize("strategy,W,mesh,dynamic", [
    ("ring", 2, None, False), ("allgather", 2, None, False), ("ulysses", 2, None, False), ("hybrid", 4, (2, 2), False),
    ("ring", 2, None, True), ("hybrid", 4, (2, 2), True)])
def test_torch_compile_fullgraph_with_key_padding(strategy, W, mesh, dynamic):
    """dynamic=True: the head counts reach CPConfig.plan as SymInts (math.gcd refused them, a graph break: fullgraph
    failed for every strategy, as it does after any recompile with new shapes)."""
    if torch_older_than(2, 14):  # each rank thread compiles at once
        pytest.skip("torch < 2.14: dynamo segfaulted entering FakeTensorMode with rank threads compiling at once "
                    "(torch 2.11); real ranks are processes (tests/distributed/test_cp_gloo.py compiles there)")
    torch._dynamo.reset()
    op = {"ulysses": "cp_ulysses", "hybrid": "cp_hybrid"}.get(strategy, "cp_attn")
    for same, ops in run_local(W, _compiled, strategy, dynamic, mesh=mesh):
        assert same, "compiled CP attention differs from eager"
        assert ops == {"fwd": [f"fastattn.{op}_fwd.default"], "bwd": [f"fastattn.{op}_bwd.default"]}, ops


def test_custom_op_opcheck():
    """Schema, fake function (shapes, strides, dtypes) and autograd registration of the hybrid op (a 1 x 1 group)."""
    from fastattn.distributed.comm import comm_name
    comm = run_local(1, lambda c: c, mesh=(1, 1))[0]
    q = torch.randn(2, 8, 4, 16, requires_grad=True)
    k, v = (torch.randn(2, 8, 2, 16, requires_grad=True) for _ in range(2))
    bias = torch.zeros(2, 8).masked_fill_(torch.arange(8) >= 6, float("-inf"))
    for kb in (None, bias):
        args = (q, k, v, None, comm_name(comm), "zigzag", "bshd", 0.25, 3, 0, 0.0, 1, True, "float32", "", kb)
        torch.library.opcheck(torch.ops.fastattn.cp_hybrid_fwd.default, args)


# --- the checks catch planted bugs ----------------------------------------------------------------------------

def _plant(monkeypatch, bug):
    import fastattn.distributed.hybrid as hyb
    if bug == "pieces in reverse rank order":  # a wrong head <-> sequence permutation, undone on the way back
        real_in, real_out = hyb.seq_to_heads, hyb.heads_to_seq

        def flip(comm, x):  # (B, n*s, h, D) -> pieces of s rows in reverse order
            B, S, h, D = x.shape
            n = comm.world_size
            return x.reshape(B, n, S // n, h, D).flip(1).reshape(B, S, h, D)
        monkeypatch.setattr(hyb, "seq_to_heads", lambda comm, x: flip(comm, real_in(comm, x)))
        monkeypatch.setattr(hyb, "heads_to_seq", lambda comm, x: real_out(comm, flip(comm, x)))
    elif bug == "slopes of another head group":
        real = hyb._ring_spec

        def wrong(spec, h):
            U, u = spec.comm.ulysses.world_size, spec.comm.ulysses.rank
            return replace(real(spec, h), alibi_slopes=spec.alibi_slopes[((u + 1) % U) * h:((u + 1) % U + 1) * h])
        monkeypatch.setattr(hyb, "_ring_spec", wrong)
    elif bug == "replica gradients not summed":
        real = hyb.sum_replicas
        monkeypatch.setattr(hyb, "sum_replicas", lambda spec, g, dtype: real(replace(spec, kv_repeat=1), g, dtype)
                            [:, :, ::spec.kv_repeat].to(dtype))  # keeps the first replica's gradient only


@pytest.mark.parametrize("bug,case", [
    ("pieces in reverse rank order", HybridCase(W=4, causal=True)),
    ("slopes of another head group", HybridCase(W=4, alibi=True, H=4, Hkv=4)),
    ("replica gradients not summed", HybridCase(W=4, H=4, Hkv=1)),
])
def test_planted_bugs_fail(monkeypatch, bug, case):
    _plant(monkeypatch, bug)
    with pytest.raises(AssertionError, match="acceptance rule"):
        check_acceptance(case, run_hybrid_local(case), single_process(case), reference(case), single_block(case))


# --- tier 1: a 2-D DeviceMesh of gloo processes ---------------------------------------------------------------

@pytest.mark.distributed
def test_gloo_hybrid_on_a_2d_device_mesh(gloo_pool):
    """CPConfig(group=mesh) with mesh dims ("ring", "ulysses") (the Ulysses dim the inner one: its ranks adjacent,
    as a node's GPUs would be), and the same case with ulysses_group= / ring_group= given one by one."""
    case = HybridCase(W=4, causal=True, H=4, Hkv=1, alibi=True)
    ref, one, blk = reference(case), single_process(case), single_block(case)
    for how in ("mesh", "groups"):
        per_rank = gloo_pool(4).run(TASKS, "hybrid_mesh_case", case, how)
        ranks = [r for r, _, _ in per_rank]
        assert sorted(ranks) == [0, 1, 2, 3]
        by_rank = dict((r, res) for r, _, res in per_rank)
        check_acceptance(case, gather_hybrid_results(case, [by_rank[i] for i in range(4)]), one, ref, blk)
        for _, counts, _ in per_rank:  # forward + backward: 5 + 4 all-to-alls over U, 1 + 3 hops over R
            assert counts == ({"all_to_all": 9}, {"ring_hop": 4}), counts


# --- the reference models ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("U,R,balance", [(2, 2, "zigzag"), (2, 3, "contiguous")])
def test_gpt2_logits_and_grads_equal_single_process(U, R, balance):
    """The reference GPT-2 with cp= a 2-D config: shard_batch lays the batch out for it, the model embeds the global
    positions of its tokens; logits and gradients summed over the W ranks against float64 transformers."""
    import copy
    import torch.nn.functional as F
    from test_cp_models import V, check_grads, grads_of, hf_gpt2, sum_grads, tokens
    from support.oracle import assert_rule
    from fastattn.distributed import cp_cross_entropy, shard_batch
    from fastattn.models import GPT2
    from fastattn.models.gpt2 import CONV1D_WEIGHTS
    hf = hf_gpt2()
    ids = tokens()
    ref = copy.deepcopy(hf).double()
    out = ref(ids, labels=ids)
    out.loss.backward()
    base = GPT2.from_transformers(hf)
    F.cross_entropy(base(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()  # (B*(S-1), V)
    model = GPT2.from_transformers(hf)

    def rank(comm):
        cp = CPConfig(comm, balance=balance)
        m = copy.deepcopy(model)
        local = shard_batch({"input_ids": ids, "labels": ids}, cp, shift_labels=True)
        logits = m(local["input_ids"], position_ids=local["position_ids"], cp=cp)
        cp_cross_entropy(logits, local["labels"], cp).backward()
        return logits.detach(), grads_of(m)
    res = run_local(U * R, rank, mesh=(U, R))
    logits = hybrid.unshard_list([r[0] for r in res], 1, U, R, balance)
    assert_rule("logits", logits, out.logits, None, torch.float32)
    check_grads(sum_grads([r[1] for r in res]), grads_of(ref, CONV1D_WEIGHTS), grads_of(base))


def test_transformers_fastattn_cp_under_the_hybrid():
    """attn_implementation="fastattn_cp" inside context_parallel(a 2-D config), U=3 x R=2 zigzag: the middle Ulysses
    rank's piece straddles two chunks (a position jump transformers turns into a packed-sequence mask, which the
    integration must recognise as the layout's), against the eager model on the whole sequence."""
    transformers = pytest.importorskip("transformers", reason="the integration under test is transformers'")
    import fastattn.integrations.transformers  # noqa: F401  (registers fastattn_cp)
    from fastattn.distributed import context_parallel, shard_batch
    cfg = dict(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=64)
    model = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**cfg),
                                                      attn_implementation="fastattn_cp").eval()
    eager = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**cfg),
                                                      attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(3, 97, (2, 36), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = eager(ids).logits

    def rank(comm):
        cp = CPConfig(comm)
        local = shard_batch({"input_ids": ids}, cp)
        with context_parallel(cp), torch.no_grad():
            return model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    got = hybrid.unshard_list(run_local(6, rank, mesh=(3, 2)), 1, 3, 2, "zigzag")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
