"""A compact BERT encoder on fastattn, in the style of nanoGPT: one file, a dataclass config, classes in reading order.

Module and parameter names follow transformers' BertModel / BertForSequenceClassification, so their state_dict
loads directly (load_hf_state_dict drops the few buffers old checkpoints carry). Padding becomes a key mask
(B, 1, 1, S) that the kernels apply per key instead of a dense (B, H, S, S) bias.

    model = BertForSequenceClassification.from_transformers(hf_model)
    logits = model(input_ids, attention_mask)
    hidden, _ = model.bert(cp.shard(input_ids, 1), cp=cp)    # context parallel: this rank's tokens and rows

Context parallelism (`cp=` or an active `context_parallel` block): the encoder runs on this rank's shard of every
sequence at its global positions, attention over the whole sequence through fastattn.distributed.cp_attention
(non-causal: the contiguous layout is as balanced as zigzag here); a padding mask travels with its keys. The [CLS]
row (global position 0) lives on one rank: a differentiable all-reduce of it, zero on the other ranks, gives every
rank the pooled output and the classifier's logits (`cls_hidden`). A loss computed from them is the same on every
rank: scale it by 1 / W (fastattn.distributed.loss.cp_replicated_loss) so that gradients summed over the ranks are
one process's.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..params import no_values
from ._cp import active_cp, cp_attention


def _cls_local_index(cp, local_len: int):
    """The local row of global position 0 on this rank, or None where another rank holds it (any layout)."""
    for seg in cp.segments(local_len):
        if seg.start == 0:
            return seg.local
    return None


class _ClsRow(torch.autograd.Function):
    """x (B, S/W, C), this rank's rows -> (B, C): row i of the rank that holds global position 0, on every rank
    (an all-reduce of that row and zeros elsewhere: exact). Backward: the ranks' gradients of the result summed
    (all_reduce's adjoint is all_reduce: dL/dy for L = the sum of the ranks' losses), placed on the owner's row
    only (zeros on the others). x itself is the input on every rank, so the result needs a gradient on all ranks
    alike: the backward is a collective, and every rank must backpropagate through the result, or none."""

    @staticmethod
    def forward(ctx, x, i, comm):
        ctx.shape, ctx.i, ctx.comm = x.shape, i, comm
        row = x[:, i].clone() if i is not None else x.new_zeros(x.shape[0], x.shape[2])  # (B, C)
        return comm.all_reduce(row)

    @staticmethod
    def backward(ctx, grad):
        grad = ctx.comm.all_reduce(grad.contiguous().clone())  # (B, C), the same on every rank
        # Zeros, not None, on the other ranks: their encoder backward must still run (its attention backward is
        # a collective their peers wait in), and None would skip the layers above the first attention.
        gx = grad.new_zeros(ctx.shape)  # (B, S/W, C)
        if ctx.i is not None:
            gx[:, ctx.i] = grad
        return gx, None, None


def cls_hidden(x: torch.Tensor, cp=None) -> torch.Tensor:
    """x (B, S, C) -> (B, C): the hidden state at global position 0 ([CLS]). Under CP (x: this rank's rows) every
    rank gets it from the rank that holds it; the gradient flows back to that rank's row only."""
    if cp is None:
        return x[:, 0]
    return _ClsRow.apply(x, _cls_local_index(cp, x.shape[1]), cp.comm)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    classifier_dropout: Optional[float] = None  # None: hidden_dropout_prob (transformers' rule)
    pad_token_id: Optional[int] = 0  # its embedding row gets no gradient, as in transformers

    @classmethod
    def from_transformers(cls, hf_config) -> "BertConfig":
        # This is BERT's bidirectional encoder: a decoder configuration (causal self-attention, cross-attention)
        # would load without a missing weight and compute something else.
        for flag in ("is_decoder", "add_cross_attention"):
            if getattr(hf_config, flag, False):
                raise ValueError(f"fastattn Bert: config.{flag}=True is not supported (the reference BERT is the "
                                 f"bidirectional encoder only)")
        return cls(**{f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)})


_ACT = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu}


def _act(name: str):
    if name not in _ACT:
        raise ValueError(f"fastattn Bert: unsupported hidden_act {name!r}; supported: {', '.join(_ACT)}")
    return _ACT[name]


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        S = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).unsqueeze(0)  # (1, S)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + \
            self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_pdrop = cfg.attention_probs_dropout_prob

    def forward(self, x, key_mask, cp=None):
        B, S, C = x.shape
        q = self.query(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, S, C) -> (B, nh, S, hd)
        k = self.key(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        dropout_p = self.attn_pdrop if self.training else 0.0
        if cp is not None:  # key_mask (B, 1, 1, S/W): this rank's keys, which travel with their K/V
            y = cp_attention(q, k, v, cp=cp, dropout_p=dropout_p, layout="bhsd",
                             key_padding_mask=None if key_mask is None else key_mask[:, 0, 0, :])
        else:
            y = functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(B, S, C)  # (B, nh, S, hd) -> (B, S, C)


class DenseNorm(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual): BERT's attention.output and output blocks."""

    def __init__(self, cfg: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg, cfg.hidden_size)

    def forward(self, x, key_mask, cp=None):
        return self.output(self.self(x, key_mask, cp), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _act(cfg.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg, cfg.intermediate_size)

    def forward(self, x, key_mask, cp=None):
        x = self.attention(x, key_mask, cp)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, key_mask, cp=None):
        for layer in self.layer:
            x = layer(x, key_mask, cp)
        return x


class Pooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cp=None):
        return torch.tanh(self.dense(cls_hidden(x, cp)))  # the [CLS] token (global position 0 under CP)


class Bert(nn.Module):
    """BertModel: forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cp=None) ->
    (last_hidden (B, S, C), pooled (B, C), None when built with add_pooling_layer=False). attention_mask (B, S):
    1 = real token, 0 = padding (left, right or anywhere). cp (default: the active `context_parallel` config, if any): inputs (attention_mask included) are
    this rank's shards of sequences of S * W tokens, position_ids default to their global positions, last_hidden
    holds this rank's rows and pooled (B, C) is the same on every rank: the [CLS] row's rank shares it through an
    all-reduce (a collective in the backward too: every rank backpropagates through pooled, or none). A loss on
    pooled is then the same on every rank: pass it through cp_replicated_loss (1 / W) before backward, so that
    the gradients summed over ranks are one process's."""

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cp=None):
        cp = cp if cp is not None else active_cp()
        # Under CP every rank passes its mask, padded or not: the ranks' calls must match (the mask travels with K/V).
        # While torch.compile traces (or on fake tensors), the mask is kept whatever its values (none to read).
        padded = attention_mask is not None and (cp is not None or no_values(attention_mask)
                                                 or not bool(attention_mask.bool().all()))
        if position_ids is None and cp is None and input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"fastattn Bert: {input_ids.shape[1]} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if cp is not None:
            S = input_ids.shape[1] * cp.world_size
            if S > self.config.max_position_embeddings:
                raise ValueError(f"fastattn Bert: {cp.world_size} ranks x {input_ids.shape[1]} local tokens = {S} "
                                 f"exceed max_position_embeddings {self.config.max_position_embeddings}")
            if position_ids is None:
                position_ids = cp.global_positions(S, device=input_ids.device).view(1, -1)  # (1, S/W)
        key_mask = attention_mask.bool()[:, None, None, :] if padded else None  # (B, S) -> (B, 1, 1, S): True = attend
        x = self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), key_mask, cp)
        return x, (self.pooler(x, cp) if self.pooler is not None else None)

    def load_hf_state_dict(self, sd, strict: bool = True):
        """Loads a transformers BertModel state_dict (keys with or without the "bert." prefix)."""
        sd = {k.removeprefix("bert."): v for k, v in sd.items() if not k.endswith("position_ids")}
        sd = {k: v for k, v in sd.items() if not k.startswith(("cls.", "classifier."))}
        self.load_state_dict(sd, strict=strict)
        return self

    @classmethod
    def from_transformers(cls, hf_model) -> "Bert":
        """Builds the model from a transformers BertModel (same weights, dtype and device; without a pooler when the
        model has none, as the masked-LM and token-classification heads' BertModel)."""
        p = next(hf_model.parameters())
        pooled = getattr(hf_model, "pooler", None) is not None
        model = cls(BertConfig.from_transformers(hf_model.config), add_pooling_layer=pooled)
        model = model.to(device=p.device, dtype=p.dtype)
        return model.load_hf_state_dict(hf_model.state_dict()).train(hf_model.training)


class BertForSequenceClassification(nn.Module):
    """forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cp=None) -> logits
    (B, num_labels). Under CP (cp= or an active `context_parallel` block; inputs are this rank's shards, as for
    Bert) every rank returns the whole batch's logits; the loss on them is the same on every rank:

        loss = cp_replicated_loss(F.cross_entropy(logits, labels), cp)   # 1 / W each: summed grads = one process's
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cp=None):
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids, cp=cp)
        return self.classifier(self.dropout(pooled))

    def load_hf_state_dict(self, sd, strict: bool = True):
        """Loads a transformers BertForSequenceClassification state_dict."""
        self.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=strict)
        return self

    @classmethod
    def from_transformers(cls, hf_model) -> "BertForSequenceClassification":
        p = next(hf_model.parameters())
        model = cls(BertConfig.from_transformers(hf_model.config)).to(device=p.device, dtype=p.dtype)
        return model.load_hf_state_dict(hf_model.state_dict()).train(hf_model.training)


__all__ = ["Bert", "BertConfig", "BertForSequenceClassification", "cls_hidden"]
