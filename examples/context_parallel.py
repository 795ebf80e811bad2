"""Context-parallel training of the reference GPT-2 (fastattn.models.gpt2) on CPU with gloo.

    torchrun --nproc-per-node 2 examples/context_parallel.py [--steps 5] [--strategy ring|allgather|ulysses]
    python examples/context_parallel.py            # the same with 2 simulated ranks (threads) in one process

The sequence (64 tokens) is cut into 2W zigzag chunks, so W must divide 32 (1, 2, 4, 8, 16 or 32 ranks; ulysses
also splits the 4 heads: 1, 2 or 4).

Every rank holds S/W tokens of every sequence (shard_batch: zigzag order, rank r has chunks r and 2W-1-r of 2W;
labels shifted on the whole sequence first), the model embeds them at their GLOBAL positions and runs attention with
cp_attention (which sees the whole sequence) because it is given `cp=`, and the loss is normalised by the global
token count; the parameter gradients are summed over the ranks before the optimizer step. Rank 0 also trains an
identical model on the whole sequence in one process and prints both losses, and at the first step (the same
weights on both sides; AdamW's steps then amplify rounding) how far the summed gradients are from its gradients: they
agree to fp32 rounding.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastattn.distributed import CPConfig, TorchComm, cp_cross_entropy, global_loss, run_local, shard_batch
from fastattn.models.gpt2 import GPT2, GPT2Config

CONFIG = GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0,
                    resid_pdrop=0.0)
BATCH, SEQ = 2, 64


def build_model(seed: int = 0) -> GPT2:
    """The same weights on every rank (a local generator: ranks may be threads sharing torch's global one)."""
    model = GPT2(CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return model


def batch():
    """A whole batch in transformers' convention (labels = input_ids; shifted later), the same every step (the
    model memorises it: the loss falls)."""
    g = torch.Generator().manual_seed(1000)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": tokens, "labels": tokens.clone()}


def train(comm, steps: int = 5, reference: bool = True, strategy: str = "ring", lr: float = 1e-2):
    """Trains `steps` steps on this rank; returns [(cp_loss, single_process_loss or None, max |grad difference| /
    max |grad| at the first step, else None)] per step."""
    cp = CPConfig(comm, strategy=strategy, balance="zigzag")
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ref = build_model() if reference else None
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr) if reference else None
    params = list(model.parameters())
    history = []
    for step in range(steps):
        full = batch()
        # (B, S) -> (B, S/W) each: input_ids, next-token labels (shifted before sharding: a token's successor may
        # live on another rank), position_ids (the global positions of this rank's tokens)
        local = shard_batch(full, cp, shift_labels=True)
        logits = model(local["input_ids"], position_ids=local["position_ids"], cp=cp)  # (B, S/W, V)
        loss = cp_cross_entropy(logits, local["labels"], cp)
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one all-reduce for every gradient
        comm.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        opt.step()
        opt.zero_grad()
        cp_loss = global_loss(loss, cp).item()
        ref_loss = grad_diff = None
        if reference:
            ids = full["input_ids"]
            ref_logits = ref(ids)[:, :-1]  # the last token has no successor
            r = F.cross_entropy(ref_logits.reshape(-1, CONFIG.vocab_size), ids[:, 1:].reshape(-1))  # (B*(S-1), V)
            r.backward()
            ref_flat = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
            if step == 0:  # the same weights on both sides
                grad_diff = float((flat - ref_flat).abs().max() / ref_flat.abs().max())
            ref_opt.step()
            ref_opt.zero_grad()
            ref_loss = r.item()
        history.append((cp_loss, ref_loss, grad_diff))
    return history


def report(history) -> bool:
    ok = True
    for step, (cp_loss, ref_loss, grad_diff) in enumerate(history):
        diff = abs(cp_loss - ref_loss)
        ok &= diff <= 1e-5 * max(1.0, abs(ref_loss)) and (grad_diff is None or grad_diff <= 1e-5)
        grads = "" if grad_diff is None else f"  gradients: max |diff| / max |grad| {grad_diff:.2e}"
        print(f"step {step}: loss context-parallel {cp_loss:.6f}  single-process {ref_loss:.6f}  |diff| {diff:.2e}"
              + grads)
    print("losses and gradients equal to fp32 rounding" if ok else
          "MISMATCH between context-parallel and single-process training")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--strategy", default="ring", choices=["ring", "allgather", "ulysses"])
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if "RANK" in os.environ:  # under torchrun
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        history = train(TorchComm(), args.steps, reference=rank == 0, strategy=args.strategy)
        ok = report(history) if rank == 0 else True
        dist.destroy_process_group()
    else:
        print("not under torchrun: 2 simulated ranks in this process")
        history = run_local(2, lambda comm: train(comm, args.steps, reference=comm.rank == 0,
                                                  strategy=args.strategy))[0]
        ok = report(history)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
