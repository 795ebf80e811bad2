"""Tier 0: sliding-window layers under attn_implementation="fastattn_cp" (transformers >= 5), on simulated ranks.

Tiny random Qwen2 (layer 0 full attention, layer 1 a sliding window: both kinds in one model) and Mistral (every
layer windowed), windows smaller than the sequence and than a rank's shard or wider than it, so that windows cross
shard boundaries. The gathered logits and the summed parameter gradients meet the fp32 rule against the eager model
in float64 on the whole sequence, as tests/distributed/test_cp_transformers.py does; an off-by-one in the mapping
from transformers' sliding_window to cp_attention's window_size fails. Refusals (chunked attention, a windowed mask
that is not a sliding window) happen on every rank alike."""
import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="HuggingFace transformers is not installed")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"fastattn's transformers integration needs transformers >= 5, found {transformers.__version__}",
                allow_module_level=True)

import fastattn.integrations.cp_transformers as cp_hf  # noqa: E402
import fastattn.integrations.transformers as fa_hf  # noqa: E402
from fastattn.distributed import (CPConfig, context_parallel, run_local, shard_batch,  # noqa: E402
                                  unshard_list)
from support.hf_cp import cp_lm_step, next_token_labels  # noqa: E402
from support.oracle import assert_param_grads, assert_rule  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

V, B, S = 97, 2, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def config(kind: str, window: int):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=window, initializer_range=0.2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "qwen2":  # layers >= max_window_layers are windowed
        return transformers.Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)
    return transformers.MistralConfig(**common)


MODELS = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def pair(kind: str, window: int):
    """(eager float64 reference, fastattn_cp fp32 model), identical weights."""
    cls = getattr(transformers, MODELS[kind])
    ref = cls._from_config(config(kind, window), attn_implementation="eager")
    fast = cls._from_config(config(kind, window), attn_implementation=fa_hf.CP_NAME)
    fast.load_state_dict(ref.state_dict())
    return ref.double(), fast


def run(kind, window, W, strategy, balance, use_cache, padding):
    """-> (reference logits, reference model with gradients, CP logits gathered, summed CP gradients, real-token
    mask, the sliding_window keyword each attention call got)."""
    ref, fast = pair(kind, window)
    ids = torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padding:  # right padding, fewer pads than the window; real tokens and real-to-real labels are compared.
        # (Left padding, or more pads than the window, leaves a pad query with no visible key: eager transformers
        # then gives NaN, which reaches every token through the pad's K/V, so no reference exists.)
        mask[0, S - 2:] = 0
        mask[1, S - 4:] = 0
    labels = next_token_labels(ids, mask)
    out = ref(input_ids=ids, attention_mask=mask)
    F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1)).backward()  # (B*S, V)
    seen = []
    logits, grads = cp_lm_step(fast, ids, labels, mask if padding else None, W, strategy, balance, use_cache,
                               lambda module, kw: seen.append((module.layer_idx, kw.get("sliding_window"))))
    return out.logits, ref, logits, grads, mask.bool(), seen


def check(want, ref, logits, grads, real):
    assert_rule("logits", logits[real], want[real], None, torch.float32)
    assert_param_grads(ref, grads)


# window 5: smaller than every shard (12, 8 or 6 tokens), crossing shard and zigzag chunk boundaries; window 9 is
# wider than a W=4 shard (6) and a zigzag chunk (3). use_cache=False: the zigzag position jump makes transformers
# cut the sliding mask at a rank's runs ("packed sequences"); with a cache it passes the uncut function.
@pytest.mark.parametrize("kind,window,W,strategy,balance,use_cache,padding", [
    ("qwen2", 5, 2, "ring", "zigzag", False, False),
    ("qwen2", 5, 3, "allgather", "contiguous", True, True),
    ("mistral", 9, 4, "ulysses", "zigzag", True, False),
    ("mistral", 5, 2, "ring", "zigzag", False, True)])
def test_sliding_window_logits_and_grads_equal_eager(kind, window, W, strategy, balance, use_cache, padding):
    want, ref, logits, grads, real, seen = run(kind, window, W, strategy, balance, use_cache, padding)
    check(want, ref, logits, grads, real)
    # every layer of every rank went through fastattn_cp, the windowed ones with the model's sliding_window
    windowed = {0: window if kind == "mistral" else None, 1: window}
    assert sorted(seen) == sorted((layer, w) for layer, w in windowed.items() for _ in range(W))


@pytest.mark.parametrize("bug", ["window one key too wide", "window one key too narrow", "window ignored"])
def test_planted_window_mapping_bugs_fail(monkeypatch, bug):
    real = cp_hf._window_size

    def planted(sliding_window, causal):
        left, right = real(sliding_window, causal)
        if left < 0:
            return left, right
        return {"window one key too wide": (left + 1, right), "window one key too narrow": (left - 1, right),
                "window ignored": (-1, -1)}[bug]
    monkeypatch.setattr(cp_hf, "_window_size", planted)
    want, ref, logits, grads, real_tokens, _ = run("qwen2", 5, 2, "ring", "zigzag", False, False)
    with pytest.raises(AssertionError):
        check(want, ref, logits, grads, real_tokens)


def test_window_size_mapping():
    """transformers' flash-attention convention: sliding_window keys for a causal query, itself included."""
    assert cp_hf._window_size(None, True) == (-1, -1)
    assert cp_hf._window_size(5, True) == (4, 0)
    assert cp_hf._window_size(5, False) == (4, 4)  # ModernBERT passes config.sliding_window + 1
    assert cp_hf._window_size(1, True) == (0, 0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"sliding_window must be a positive int .* got"):
            cp_hf._window_size(bad, True)


def _mask_call(comm, case, local_len=12):
    """fastattn_cp_mask as transformers calls it for a windowed layer, on each rank; the error message or None."""
    cp = CPConfig(comm, balance="zigzag")
    cfg = SimpleNamespace(sliding_window=None, attention_chunk_size=None)
    if case == "chunked":  # Llama 4: chunks of 16 > the shard, which look plain causal on a rank's indices
        fn, size, cfg.attention_chunk_size = mu.chunked_causal_mask_function(16, torch.zeros(B, dtype=torch.long)), \
            16, 16
    elif case == "chunked without config":  # chunks of 4 < the shard: the check on the rank's indices sees it
        fn, size = mu.chunked_causal_mask_function(4, torch.zeros(B, dtype=torch.long)), 4
    elif case == "window narrower than local_size":  # a custom function that is not the window it claims
        fn, size = mu.sliding_window_causal_mask_function(3), 5
    elif case == "sliding causal":
        fn, size = mu.sliding_window_causal_mask_function(5), 5
    else:  # "sliding bidirectional"
        fn, size = mu.sliding_window_bidirectional_mask_function(5), 5
    try:
        with context_parallel(cp):
            fa_hf.fastattn_cp_mask(B, q_length=local_len, kv_length=local_len, mask_function=fn, local_size=size,
                                   config=cfg, attention_mask=None, device="cpu")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("case", ["chunked", "chunked without config", "window narrower than local_size"])
def test_not_a_sliding_window_refused_on_every_rank(case):
    for msg in run_local(2, _mask_call, case, timeout=20):
        assert msg is not None and re.search(r"a windowed mask that is not a sliding window .* \(found on rank 0 "
                                             r"and 1 more of 2\)", msg), msg


@pytest.mark.parametrize("case", ["sliding causal", "sliding bidirectional"])
def test_sliding_masks_accepted(case):
    assert run_local(2, _mask_call, case, timeout=20) == [None, None]


# ModernBERT: bidirectional, every 2nd layer windowed. transformers' mask keeps |i - j| <= config.sliding_window
# (local_attention // 2 = 4) and the layer passes sliding_window = 5: window_size (4, 4). Right padding of fewer keys
# than the half-window (a pad query that sees no real key makes eager NaN).
@pytest.mark.parametrize("W,strategy,balance,padding", [(2, "ring", "zigzag", False), (3, "allgather", "contiguous",
                                                                                        True)])
def test_modernbert_bidirectional_window_equals_eager(W, strategy, balance, padding):
    cfg = transformers.ModernBertConfig(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, local_attention=8,
                                        global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        cls_token_id=1, sep_token_id=2)
    assert cfg.layer_types == ["full_attention", "sliding_attention"] and cfg.sliding_window == 4
    ref = transformers.ModernBertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    fast = transformers.ModernBertModel._from_config(copy.deepcopy(cfg), attn_implementation=fa_hf.CP_NAME)
    fast.load_state_dict(ref.state_dict())
    ref = ref.double()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones_like(ids)
    if padding:
        mask[1, S - 3:] = 0
    probe = torch.randn(B, S, 64, generator=g) * mask[..., None]  # loss: <hidden, probe> on real tokens
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    (want * probe.double()).sum().backward()

    def rank(comm):
        cp = CPConfig(comm, strategy=strategy, balance=balance)
        m = copy.deepcopy(fast)
        local = shard_batch({"input_ids": ids} | ({"attention_mask": mask} if padding else {}), cp)
        with context_parallel(cp):
            hidden = m(**local).last_hidden_state
        (hidden * cp.shard(probe, 1)).sum().backward()
        return hidden.detach(), {n: p.grad for n, p in m.named_parameters()}
    res = run_local(W, rank)
    real = mask.bool()
    assert_rule("hidden", unshard_list([r[0] for r in res], 1, balance)[real], want[real], None, torch.float32)
    assert_param_grads(ref, {name: sum(r[1][name] for r in res) for name, _ in ref.named_parameters()})


def test_planted_bidirectional_off_by_one_fails(monkeypatch):
    real = cp_hf._window_size
    monkeypatch.setattr(cp_hf, "_window_size", lambda sw, causal: tuple(x + (x >= 0) for x in real(sw, causal)))
    with pytest.raises(AssertionError, match="hidden"):
        test_modernbert_bidirectional_window_equals_eager(2, "ring", "zigzag", False)
