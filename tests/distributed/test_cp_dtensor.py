"""Tier 1: DTensor inputs of cp_attention and the FastattnContextParallel ParallelStyle (fastattn/distributed/
dtensor.py) on real gloo process groups: results and gradients as DTensors with the inputs' placement, under the CP
acceptance rule (tests/support/cp_cases.py) against single-process attention on the whole sequence; the clear errors;
and the planted bugs each check must catch (a zigzag config on naturally ordered DTensors, a wrong lse placement, a
style that does not enter the CP context)."""
import os

import pytest
import torch

from tests.support.cp_cases import Case, check_acceptance, reference, single_block, single_process

pytestmark = pytest.mark.distributed
TASKS = os.path.join(os.path.dirname(__file__), "gloo_tasks.py")


def _head_tail_restore(S: int, W: int) -> torch.Tensor:
    """Index that undoes torch's head-tail permutation (rank r: chunks r and 2W-1-r of 2W), built here
    independently of both torch's _HeadTailLoadBalancer and fastattn.distributed.layout."""
    c = S // (2 * W)
    order = torch.cat([torch.arange(i * c, (i + 1) * c) for r in range(W) for i in (r, 2 * W - 1 - r)])
    return torch.argsort(order)


def _run(gloo_pool, case: Case, how: str, plant: str = "", world: int = 0):
    """Every rank's (placements, whole tensors); all ranks must agree, and out without return_lse must be out's
    bits. Returns rank 0's, in natural token order. world > case.W: the "cp" dim of a (dp, cp) mesh."""
    per_rank = gloo_pool(world or case.W).run(TASKS, "dtensor_case", case, how, plant, bool(world))
    placements, full, _ = per_rank[0]
    for p, f, same in per_rank:
        assert p == placements and all(torch.equal(a, b) for a, b in zip(f, full))
        assert same, "cp_attention without return_lse differs from out with it"
    if how == "zigzag":
        restore = _head_tail_restore(case.S, case.W)
        full = [x.index_select(2 if x.dim() == 3 else 1, restore) for x in full]
    return placements, full


CASES = [  # (case, how): cp=None (contiguous, strategy "auto": Ulysses here), a contiguous ring, torch's zigzag
    (Case(W=2, strategy="auto", balance="contiguous", causal=True), "auto"),
    (Case(W=2, balance="contiguous", causal=False, H=4, Hkv=2, layout="bhsd"), "contiguous"),
    (Case(W=2, balance="contiguous", causal=True, dtype=torch.bfloat16), "contiguous"),
    (Case(W=2, balance="zigzag", causal=True, H=4, Hkv=2), "zigzag"),
]


def _check(case, placements, full):
    sd = 1 if case.layout == "bshd" else 2
    # out and the gradients keep the inputs' placement, lse (B, H, S) is sharded on its sequence dim
    want = [f"(Shard(dim={sd}),)", "(Shard(dim=2),)"] + [f"(Shard(dim={sd}),)"] * 4
    assert placements == want, f"placements of (out, lse, dq, dk, dv, out alone): {placements}, want {want}"
    return check_acceptance(case, tuple(full), single_process(case), reference(case), single_block(case))


@pytest.mark.parametrize("case,how", CASES, ids=[f"{how}-{c.id()}" for c, how in CASES])
def test_dtensor_matches_single_process(gloo_pool, case, how):
    _check(case, *_run(gloo_pool, case, how))


def test_dtensor_on_the_cp_dim_of_a_2d_mesh(gloo_pool):
    """DTensors on mesh["cp"] of a (dp 2, cp 2) mesh of 4 processes, cp=None: the config comes from the sub-mesh."""
    case = Case(W=2, strategy="auto", balance="contiguous", causal=True, H=4, Hkv=2)
    _check(case, *_run(gloo_pool, case, "auto", world=4))


@pytest.mark.parametrize("plant,match", [("zigzag_config", "acceptance rule"), ("lse_placement", "placements")])
def test_planted_bugs_are_caught(gloo_pool, plant, match):
    """zigzag_config: a zigzag CPConfig on DTensors in natural order (distribute_tensor) reads the shards in the
    wrong token order, so causal attention is wrong. lse_placement: lse wrapped Shard(1) (heads) instead of
    Shard(2) (sequence). The check of the test above must fail on each."""
    case = Case(W=2, balance="contiguous", causal=True)
    with pytest.raises(AssertionError, match=match):
        _check(case, *_run(gloo_pool, case, "contiguous", plant=plant))


def test_dtensor_errors(gloo_pool):
    for got in gloo_pool(2).run(TASKS, "dtensor_errors"):
        assert "must be placed (Shard(dim=1),)" in got["replicate"] and "Replicate()" in got["replicate"], got
        assert "must be placed (Shard(dim=2),)" in got["wrong_seq_dim"], got
        assert "all be DTensors or all local tensors; k is a Tensor" in got["mixed"], got
        assert "global sequence length 6" in got["zigzag_length"] and "divide by 4" in got["zigzag_length"], got
        assert "communicator (rank 0 of 1) differs" in got["other_comm"], got
        assert "cp= must be a CPConfig for local tensors" in got["local_without_cp"], got
        assert "input #0 must be placed (Shard(dim=1),)" in got["style_replicate"], got
        # the style: the forward ran inside context_parallel (cp=None: the mesh's contiguous config), a local output
        # by default, and no config stays active after the call, nor after calls that failed (in the input hook, in
        # the forward)
        assert got["inside"] == (2, "contiguous") and got["local_output"] == ("Tensor", True), got
        assert got["after"] and got["after_error"] and "failing" in got["forward_raises"], got


def test_dtensor_mesh_mismatch(gloo_pool):
    for other_group, two_d in gloo_pool(4).run(TASKS, "dtensor_mesh_mismatch"):
        assert other_group is not None and "cp's group (global ranks" in other_group, other_group
        assert two_d is not None and "1-D CP mesh" in two_d and "2-D" in two_d, two_d


# --- the ParallelStyle on the reference GPT-2 ----------------------------------------------------------------------

GPT = dict(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0,
           resid_pdrop=0.0)
B, S = 2, 16


def _gpt2_run(gloo_pool, balance: str, plant: str = ""):
    from fastattn.models import GPT2, GPT2Config
    torch.manual_seed(0)
    model = GPT2(GPT2Config(**GPT))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, GPT["vocab_size"], (B, S), generator=g)
    dlogits = torch.randn(B, S, GPT["vocab_size"], generator=g)
    ref = model(ids)  # single process, whole sequence, fp32
    ref.backward(dlogits)
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    perm = torch.argsort(_head_tail_restore(S, 2)) if balance == "zigzag" else torch.arange(S)  # DTensor order
    per_rank = gloo_pool(2).run(TASKS, "dtensor_style_gpt2", GPT, model.state_dict(), ids[:, perm],
                                dlogits[:, perm], balance, plant)
    placement, logits, grads = per_rank[0]
    assert placement == "(Shard(dim=1),)", placement
    return ref.detach(), ref_grads, logits.index_select(1, torch.argsort(perm)), grads


def _close(got, want):
    # fp32 CP vs single-process fp32 fastattn: within 1e-5 of the magnitude (the CP rule's fp32 bound)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("balance", ["contiguous", "zigzag"])
def test_parallel_style_gpt2(gloo_pool, balance):
    ref, ref_grads, logits, grads = _gpt2_run(gloo_pool, balance)
    _close(logits, ref)
    for n, g in ref_grads.items():
        _close(grads[n], g)


def test_parallel_style_without_the_context_is_caught(gloo_pool):
    """The planted bug: the style converts the inputs but does not enter context_parallel, so each rank's GPT-2
    attends within its own shard (and embeds local positions): the logits check fails."""
    ref, _, logits, _ = _gpt2_run(gloo_pool, "contiguous", plant="no_context")
    with pytest.raises(AssertionError):
        _close(logits, ref)


def test_dtensor_key_padding_mask_and_alibi(gloo_pool):
    """A bool DTensor key_padding_mask (Shard(1)) or a local one, and Replicate ALiBi slopes, reach the local call
    unchanged (same bits as cp_attention on the local shards, whose masks and slopes tests/distributed checks)."""
    for dtensor_mask, local_mask, mask_matters in gloo_pool(2).run(TASKS, "dtensor_mask_alibi"):
        assert dtensor_mask and local_mask and mask_matters
