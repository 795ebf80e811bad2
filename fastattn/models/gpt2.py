"""A compact GPT-2 on fastattn, in the style of nanoGPT: one file, a dataclass config, classes in reading order.

Parameter names are those of transformers' GPT2LMHeadModel, so a checkpoint loads with a key copy plus a transpose
of the four Conv1D weights (CONV1D_WEIGHTS). Attention runs through fastattn: flash_attn_func for whole
sequences, flash_attn_with_kvcache (which appends to the cache in place) for generation, and
fastattn.distributed.cp_attention under context parallelism (`cp=` or an active `context_parallel` block: idx is
this rank's shard of every sequence, embedded at its global positions; the logits are this rank's rows).

    model = GPT2.from_transformers(hf_model)                    # or GPT2(GPT2Config(...)).load_hf_state_dict(sd)
    tokens = model.generate(input_ids, attention_mask, max_new_tokens=20)
    logits = model(cp.shard(input_ids, 1), cp=cp)               # context parallel: this rank's tokens and rows
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ._cp import active_cp, cp_attention

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None = 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True  # lm_head shares wte's weight, as GPT-2's checkpoints (transformers' name)

    @classmethod
    def from_transformers(cls, hf_config) -> "GPT2Config":
        return cls(**{f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)})


@dataclass
class KVCache:
    """Per-layer caches (B, max_len, n_head, head_dim) and each row's number of valid tokens."""
    k: List[torch.Tensor]
    v: List[torch.Tensor]
    seqlens: torch.Tensor  # int32 (B,)

    @classmethod
    def empty(cls, cfg: GPT2Config, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, max_len, cfg.n_head, cfg.n_embd // cfg.n_head)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   seqlens=torch.zeros(batch, dtype=torch.int32, device=device))


def _act(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"fastattn GPT2: unsupported activation_function {name!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        # GPT-2 may scale scores by 1/(layer_idx+1) as well as 1/sqrt(head_dim).
        self.scale = (self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0) / \
            (layer_idx + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
        self.layer_idx = layer_idx

    def forward(self, x, cache: Optional[KVCache] = None, cp=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, C) -> (B, T, nh, hd)
        k = k.view(B, T, self.n_head, self.head_dim)
        v = v.view(B, T, self.n_head, self.head_dim)
        dropout_p = self.attn_pdrop if self.training else 0.0
        if cp is not None:  # this rank's rows of attention over the whole sharded sequence
            y = cp_attention(q, k, v, cp=cp, causal=True, softmax_scale=self.scale, dropout_p=dropout_p)
        elif cache is None:
            y = functional.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=self.scale, causal=True)
        else:  # appends k, v at each row's cache_seqlens, then attends to the row's valid prefix (bottom-right)
            dt = cache.k[self.layer_idx].dtype  # under autocast the projections' dtype may differ from the cache's
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            y = functional.flash_attn_with_kvcache(q, cache.k[self.layer_idx], cache.v[self.layer_idx], k=k, v=v,
                                                   cache_seqlens=cache.seqlens, softmax_scale=self.scale,
                                                   causal=True)
        y = y.reshape(B, T, C)  # (B, T, nh, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, inner)
        self.c_proj = nn.Linear(inner, cfg.n_embd)
        self.act = _act(cfg.activation_function)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, cp=None):
        x = x + self.attn(self.ln_1(x), cache, cp)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            drop=nn.Dropout(cfg.embd_pdrop),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, position_ids=None, cache: Optional[KVCache] = None, cp=None):
        """idx (B, T) -> logits (B, T, vocab). Without a cache the sequences are causal from position 0 (pad on
        the right). With a cache, idx are new tokens written at each row's cache.seqlens (which the caller
        advances); position_ids default to those positions.
        cp: a fastattn.distributed.CPConfig (default: the active `context_parallel` one, if any): idx is this rank's
        shard (cp.shard / shard_batch, cp.balance's layout) of sequences of T * W tokens, position_ids default to
        its global positions, and the logits are this rank's rows of the single-process logits."""
        B, T = idx.shape
        cp = cp if cp is not None else active_cp()
        if cp is not None:
            if cache is not None:
                raise ValueError("fastattn GPT2: context parallelism is for training and prefill of sharded "
                                 "sequences; a KV cache (generate) runs on one rank, outside context_parallel")
            S = T * cp.world_size
            if S > self.config.n_positions:
                raise ValueError(f"fastattn GPT2: {cp.world_size} ranks x {T} local tokens = {S} exceed "
                                 f"n_positions {self.config.n_positions}")
            if position_ids is None:
                position_ids = cp.global_positions(S, device=idx.device).view(1, T)  # (1, T): global positions
        if position_ids is None:
            if cache is None and T > self.config.n_positions:
                raise ValueError(f"fastattn GPT2: {T} tokens exceed n_positions {self.config.n_positions}")
            if cache is not None and cache.k[0].shape[1] + T > self.config.n_positions:
                # a cache longer than the position table (or one this call overflows) could put a token past it:
                # the embedding would raise a bare IndexError (a device assert on CUDA). Checked only then, as the
                # maximum costs a host sync.
                last = int(cache.seqlens.max()) + T
                if last > self.config.n_positions:
                    raise ValueError(f"fastattn GPT2: cache.seqlens up to {last - T} + {T} new tokens = {last} "
                                     f"positions exceed n_positions {self.config.n_positions}")
            start = cache.seqlens.long().view(B, 1) if cache is not None else 0
            position_ids = start + torch.arange(T, device=idx.device).view(1, T)  # (B|1, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            x = block(x, cache, cp)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens: int = 20, eos_token_id: Optional[int] = None,
                 pad_token_id: int = 0, min_new_tokens: int = 0):
        """Greedy decoding with a KV cache. idx (B, T) may be left- or right-padded (attention_mask (B, T), 1 =
        real token); each row's real tokens are packed to the front of its cache, so padding costs nothing.
        Returns the new tokens (B, max_new_tokens); after eos_token_id a row emits pad_token_id. min_new_tokens:
        eos_token_id is not chosen before that many new tokens (transformers' min_new_tokens)."""
        B, T = idx.shape
        if max_new_tokens < 0:
            raise ValueError(f"fastattn GPT2.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if min_new_tokens > 0 and eos_token_id is None:
            raise ValueError("fastattn GPT2.generate: min_new_tokens holds back eos_token_id, which is not given "
                             "(this model has no generation config to take it from)")
        if max_new_tokens == 0:
            return idx.new_empty(B, 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        keep = attention_mask.bool()
        lens = keep.sum(1)  # (B,) real tokens per row
        if int(lens.min()) == 0:
            raise ValueError("fastattn GPT2.generate: every row needs at least one real token")
        if T + max_new_tokens > self.config.n_positions:
            raise ValueError(f"fastattn GPT2.generate: {T} + {max_new_tokens} tokens exceed n_positions "
                             f"{self.config.n_positions}")
        # Pack each row's real tokens to the left (stable sort keeps their order): right padding.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # (B, T)
        packed = torch.gather(idx, 1, order).masked_fill(torch.arange(T, device=idx.device) >= lens[:, None],
                                                         pad_token_id)
        w = self.lm_head.weight
        dtype = w.dtype  # under autocast the cache holds what the projections return, as transformers' cache does
        if torch.is_autocast_enabled(w.device.type) and dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.get_autocast_dtype(w.device.type)
        cache = KVCache.empty(self.config, B, T + max_new_tokens, w.device, dtype)
        logits = self(packed, cache=cache)  # prefill: causal from 0, pads sit after each row's real tokens
        cache.seqlens = lens.to(torch.int32)  # later appends overwrite the pads
        def pick(last, step):  # greedy choice from the last position's logits (B, vocab)
            if eos_token_id is not None and step < min_new_tokens:
                last = last.clone()
                last[:, eos_token_id] = float("-inf")
            return last.argmax(-1)  # (B,)
        nxt = pick(logits[torch.arange(B, device=idx.device), lens - 1], 0)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = nxt.masked_fill(done, pad_token_id)
            out.append(nxt)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    break
            if step + 1 == max_new_tokens:
                break
            logits = self(nxt.view(B, 1), cache=cache)  # (B, 1, vocab)
            cache.seqlens = cache.seqlens + 1
            nxt = pick(logits[:, -1], step + 1)
        res = torch.stack(out, dim=1)
        if res.shape[1] < max_new_tokens:
            res = F.pad(res, (0, max_new_tokens - res.shape[1]), value=pad_token_id)
        return res

    # Loading transformers checkpoints.
    def load_hf_state_dict(self, sd, strict: bool = True):
        """Loads a transformers GPT2LMHeadModel / GPT2Model state_dict (Conv1D weights transposed)."""
        own = self.state_dict()
        new = {}
        for key, val in sd.items():
            k = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old checkpoints store the causal mask as a buffer
            if any(k.endswith(w) for w in CONV1D_WEIGHTS):
                val = val.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
            new[k] = val
        if self.config.tie_word_embeddings:
            wte = new.get("transformer.wte.weight")
            head = new.setdefault("lm_head.weight", wte)
            if wte is not None and head is not None and head is not wte and not torch.equal(head, wte):
                # One shared Parameter would take whichever key loads last: the embedding or the head lost.
                raise ValueError("fastattn GPT2: the checkpoint's lm_head.weight differs from transformer.wte.weight "
                                 "(untied embeddings) but this model ties them; build it with "
                                 "GPT2Config(tie_word_embeddings=False)")
        missing = set(own) - set(new)
        unexpected = set(new) - set(own)
        if strict and (missing or unexpected):
            raise KeyError(f"fastattn GPT2: checkpoint mismatch; missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        self.load_state_dict({k: v for k, v in new.items() if k in own}, strict=strict)
        return self

    @classmethod
    def from_transformers(cls, hf_model) -> "GPT2":
        """Builds the model from a transformers GPT2Model / GPT2LMHeadModel (same weights, dtype and device)."""
        p = next(hf_model.parameters())
        model = cls(GPT2Config.from_transformers(hf_model.config)).to(device=p.device, dtype=p.dtype)
        return model.load_hf_state_dict(hf_model.state_dict()).train(hf_model.training)


__all__ = ["GPT2", "GPT2Config", "KVCache", "CONV1D_WEIGHTS"]
