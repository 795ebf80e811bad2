"""Context-parallel training of the reference GPT-2 (fastattn.models.gpt2) on CPU with gloo.

    torchrun --nproc-per-node 2 examples/context_parallel.py [--steps 5] [--strategy ring|allgather|ulysses]
    python examples/context_parallel.py            # the same with 2 simulated ranks (threads) in one process

Every rank holds S/W tokens of every sequence (zigzag order: rank r has chunks r and 2W-1-r of 2W), embeds them at
their GLOBAL positions, runs attention with cp_attention (which sees the whole sequence), and normalises its loss by
the global token count; the parameter gradients are summed over the ranks before the optimizer step. Rank 0 also
trains an identical model on the whole sequence in one process and prints both losses: they agree to fp32
rounding. The model is unchanged: its attention module is swapped for a subclass that calls cp_attention.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastattn.distributed import CPConfig, TorchComm, cp_attention, cp_cross_entropy, global_loss, run_local
from fastattn.models.gpt2 import GPT2, CausalSelfAttention, GPT2Config

CONFIG = GPT2Config(vocab_size=97, n_positions=128, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0,
                    resid_pdrop=0.0)
BATCH, SEQ = 2, 64


class CPSelfAttention(CausalSelfAttention):
    """GPT-2 attention on this rank's tokens; `cp` (a CPConfig) is set on the instance by use_context_parallel."""
    cp: CPConfig

    def forward(self, x, cache=None):
        if cache is not None:
            raise ValueError("context parallelism is for training and prefill; generate() runs on one rank")
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, C) -> (B, T, nh, hd)
        k = k.view(B, T, self.n_head, self.head_dim)
        v = v.view(B, T, self.n_head, self.head_dim)
        y = cp_attention(q, k, v, cp=self.cp, causal=True, softmax_scale=self.scale,
                         dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.reshape(B, T, C)  # (B, T, nh, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def use_context_parallel(model: GPT2, cp: CPConfig) -> GPT2:
    for block in model.transformer.h:
        block.attn.__class__ = CPSelfAttention
        block.attn.cp = cp
    return model


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
    """(input_ids, labels) of the whole sequence, the same every step (the model memorises it: the loss falls).
    Labels are shifted BEFORE sharding: after it, a token's successor may live on another rank."""
    g = torch.Generator().manual_seed(1000)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:].clone()


def train(comm, steps: int = 5, reference: bool = True, strategy: str = "ring", lr: float = 1e-2):
    """Trains `steps` steps on this rank; returns [(cp_loss, single_process_loss or None)] per step."""
    cp = CPConfig(comm, strategy=strategy, balance="zigzag")
    model = use_context_parallel(build_model(), cp)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ref = build_model() if reference else None
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr) if reference else None
    positions = cp.global_positions(SEQ).view(1, -1)  # (1, S/W): this rank's global positions
    params = list(model.parameters())
    history = []
    for step in range(steps):
        ids, labels = batch()
        logits = model(cp.shard(ids, 1), position_ids=positions)
        loss = cp_cross_entropy(logits, cp.shard(labels, 1), cp)
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one all-reduce for every gradient
        comm.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        opt.step()
        opt.zero_grad()
        cp_loss = global_loss(loss, cp).item()
        ref_loss = None
        if reference:
            ref_logits = ref(ids)
            r = F.cross_entropy(ref_logits.reshape(-1, CONFIG.vocab_size), labels.reshape(-1))  # (B*S, V)
            r.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_loss = r.item()
        history.append((cp_loss, ref_loss))
    return history


def report(history) -> bool:
    ok = True
    for step, (cp_loss, ref_loss) in enumerate(history):
        diff = abs(cp_loss - ref_loss)
        ok &= diff <= 1e-5 * max(1.0, abs(ref_loss))
        print(f"step {step}: loss context-parallel {cp_loss:.6f}  single-process {ref_loss:.6f}  |diff| {diff:.2e}")
    print("losses equal to fp32 rounding" if ok else "MISMATCH between context-parallel and single-process losses")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--strategy", default="ring", choices=["ring", "allgather", "ulysses"])
    args = ap.parse_args()
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
