"""Tier 0: shard_batch / pad_batch — every sequence tensor of a batch sharded alike, in torch's head-tail order for
zigzag; clear errors naming the tensor and its shape."""
import pytest
import torch

from fastattn.distributed import CPConfig, LocalComm, layout, pad_batch, shard_batch


def configs(W, balance="zigzag"):
    """One CPConfig per rank (sharding does not communicate: no threads needed)."""
    return [CPConfig(c, balance=balance) for c in LocalComm.world(W)]


def make_batch(B=2, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, S), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(B, S, dtype=torch.long),
            "token_type_ids": torch.randint(0, 2, (B, S), generator=g), "class_labels": torch.tensor([1, 0]),
            "inputs_embeds": torch.randn(B, S, 5, generator=g), "note": "kept as is"}


def torch_head_tail(S, W):
    try:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
    except ImportError as e:  # private torch API: compare with our order instead where it is missing
        pytest.skip(f"torch {torch.__version__} has no _HeadTailLoadBalancer at the known path ({e})")
    return _HeadTailLoadBalancer(S, W, torch.device("cpu"))._generate_indices()[0].long()


@pytest.mark.parametrize("W,balance", [(2, "zigzag"), (3, "zigzag"), (4, "contiguous")])
def test_every_sequence_tensor_sharded_alike(W, balance):
    batch = make_batch()
    S = batch["input_ids"].shape[1]
    order = torch_head_tail(S, W) if balance == "zigzag" else torch.arange(S)  # torch's order: buffers interoperate
    L = S // W
    for r, cp in enumerate(configs(W, balance)):
        local = shard_batch(batch, cp)
        rows = order[r * L:(r + 1) * L]  # the global positions rank r holds, in its local order
        for name in ("input_ids", "labels", "attention_mask", "token_type_ids", "inputs_embeds"):
            assert torch.equal(local[name], batch[name][:, rows]), name
        assert torch.equal(local["position_ids"], rows.expand(2, L))
        assert torch.equal(local["position_ids"][0], layout.global_positions(S, W, r, balance))
        assert local["class_labels"] is batch["class_labels"] and local["note"] == "kept as is"
    full = [shard_batch(batch, cp)["input_ids"] for cp in configs(W, balance)]
    assert torch.equal(layout.unshard_list(full, 1, balance), batch["input_ids"])


def test_shift_labels_before_sharding():
    batch = make_batch(S=16)
    ids = batch["input_ids"]
    for cp in configs(2):
        local = shard_batch(batch, cp, shift_labels=True, ignore_index=-7)
        pos = local["position_ids"][0]
        nxt = torch.where(pos + 1 < 16, ids[:, (pos + 1).clamp(max=15)], torch.tensor(-7))
        assert torch.equal(local["labels"], nxt)  # each token's label is its global successor, across ranks
        assert torch.equal(local["input_ids"], ids[:, pos])
    assert torch.equal(batch["labels"], ids)  # the caller's batch is not modified


def test_given_position_ids_are_sharded_not_replaced():
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.arange(100, 108).view(1, 8)}
    cp = configs(2)[0]
    assert shard_batch(batch, cp)["position_ids"].tolist() == [[100, 101, 106, 107]]
    assert "position_ids" not in shard_batch({"input_ids": batch["input_ids"]}, cp, add_position_ids=False)


def test_clear_errors():
    cp = configs(4)[1]
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] \(2, 21\): the sequence length 21 \(dim 1\) is not "
                                         r"divisible by 8 \(zigzag layout over 4 ranks\); pad_batch.* by 3"):
        shard_batch({"input_ids": torch.zeros(2, 21)}, cp)
    with pytest.raises(ValueError, match=r"batch\['labels'\] \(2, 15\) and batch\['input_ids'\] \(2, 16\) differ"):
        shard_batch({"input_ids": torch.zeros(2, 16), "labels": torch.zeros(2, 15)}, cp)
    with pytest.raises(ValueError, match=r"batch\['special_tokens_mask'\] \(2, 16\) has the sequence length 16 .* "
                                         r"not a known sequence key"):
        shard_batch({"input_ids": torch.zeros(2, 16), "special_tokens_mask": torch.zeros(2, 16)}, cp)
    ok = shard_batch({"input_ids": torch.zeros(2, 16), "special_tokens_mask": torch.zeros(2, 16)}, cp,
                     keep=("special_tokens_mask",))
    assert ok["special_tokens_mask"].shape == (2, 16)
    with pytest.raises(ValueError, match=r"batch\['attention_mask'\] \(2, 1, 16, 16\) is a 4-D mask"):
        shard_batch({"input_ids": torch.zeros(2, 16), "attention_mask": torch.ones(2, 1, 16, 16)}, cp)
    with pytest.raises(ValueError, match="no sequence tensor in the batch"):
        shard_batch({"labels": torch.zeros(2)}, cp)
    with pytest.raises(TypeError, match="batch must be a dict"):
        shard_batch([torch.zeros(2, 16)], cp)


def test_pad_batch():
    batch = {"input_ids": torch.arange(1, 22).view(1, 21), "labels": torch.arange(1, 22).view(1, 21),
             "attention_mask": torch.ones(1, 21, dtype=torch.long), "position_ids": torch.arange(21).view(1, 21)}
    cp = configs(4)[0]  # zigzag over 4: a multiple of 8
    p = pad_batch(batch, cp)
    assert p["input_ids"][0, 21:].tolist() == [0, 0, 0] and p["labels"][0, 21:].tolist() == [-100] * 3
    assert p["attention_mask"][0, 21:].tolist() == [0] * 3 and p["position_ids"][0].tolist() == list(range(24))
    assert pad_batch(batch, cp, pad_values={"input_ids": 5})["input_ids"][0, 21:].tolist() == [5] * 3
    assert shard_batch(p, cp)["input_ids"].shape == (1, 6)
    assert pad_batch(p, cp)["input_ids"] is p["input_ids"]  # already divisible: unchanged
    with pytest.raises(ValueError, match=r"no pad value for batch\['loss_weights'\] \(1, 21\)"):
        pad_batch({"input_ids": batch["input_ids"], "loss_weights": torch.ones(1, 21)}, cp,
                  seq_keys=("input_ids", "loss_weights"))


def test_padded_gpt2_logits_equal_unpadded():
    """pad_batch + shard_batch + the reference GPT-2 under CP: the real tokens' logits are those of one process on
    the unpadded sequence (right pads never reach a real token under causality)."""
    from fastattn.distributed import run_local, unshard_list
    from fastattn.models import GPT2, GPT2Config
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)

    def rank(comm):
        cp = CPConfig(comm)
        local = shard_batch(pad_batch({"input_ids": ids}, cp), cp)
        with torch.no_grad():
            return model(local["input_ids"], position_ids=local["position_ids"], cp=cp)
    got = unshard_list(run_local(2, rank), 1, "zigzag")
    assert got.shape == (2, 24, 97)
    torch.testing.assert_close(got[:, :21], want, atol=1e-5 * float(want.abs().max()), rtol=0)
