"""Public context-parallel attention: `cp_attention` and flash-attn / ring-flash-attention compatible functions.

Inputs are this rank's shards of the sequence, laid out as CPConfig.balance says (`CPConfig.shard`,
`layout.shard`); the result is this rank's rows of attention over the WHOLE sequence: the same as one process
attending over the gathered sequence (causal, sliding window, ALiBi and dropout at global positions, dropout also
at global query heads on the head-sharded strategies; key padding masks travel with their keys).
"""
from __future__ import annotations

import zlib
from typing import Optional, Tuple

import torch

from . import layout
from ..blocks import dropout_rng
from ..params import check_softcap, default_scale
from ._call import CallSpec
from .config import CPConfig, CPUnsupportedError
from .ops import cp_attn, cp_ulysses

try:
    from torch.distributed.tensor import DTensor as _DTensor
    from .dtensor import dtensor_cp_attention
except ImportError:  # a torch build without torch.distributed: no DTensor can reach cp_attention
    _DTensor, dtensor_cp_attention = (), None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, cp: CPConfig, layout_: str, window_size, alibi_slopes, dropout_p, key_padding_mask=None,
           softcap=0.0, softmax_scale=None, causal: bool = False):
    """Every local check before the first collective. With cp.check_shapes the ranks then compare their inputs in
    one all-gather, and a rank that refused its own makes every rank raise (no peer is left waiting in a
    collective); without it, a rank that refuses raises alone."""
    err = None
    try:
        _check_local(q, k, v, cp, layout_, window_size, alibi_slopes, dropout_p, key_padding_mask, softcap,
                     softmax_scale)
    except (ValueError, TypeError) as e:  # CPUnsupportedError and fastattn's input errors included
        err = e
    if cp.check_shapes:
        settings = 0 if err is not None else _settings(cp, layout_, causal, window_size, softcap, softmax_scale,
                                                        dropout_p, alibi_slopes)
        _check_across_ranks(q, k, v, cp, key_padding_mask is not None, err is not None, settings)
    if err is not None:
        raise err


def _settings(cp: CPConfig, layout_, causal, window_size, softcap, softmax_scale, dropout_p, alibi_slopes) -> int:
    """The call's settings as one int for check_shapes: a rank with other ones would compute something else, or
    wait in another collective (a different strategy)."""
    parts = [cp.strategy, cp.balance, layout_, bool(causal), [int(w) for w in window_size], float(softcap),
             softmax_scale, float(dropout_p)]
    if alibi_slopes is not None:
        parts.append(alibi_slopes.detach().cpu().flatten().tolist())
    return zlib.crc32(repr(parts).encode())


def check_placement_and_scalars(q, softcap, softmax_scale, **tensors) -> None:
    """What cp_attention and cp_varlen_attention check alike before their first collective: every tensor on q's
    device and none on `meta` (the ring would send uninitialised buffers), softcap and scale (refused inside the
    ring's first block call, they left a K/V hop in flight that the next call read)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"fastattn.distributed: {name} is on {t.device} but q is on {q.device}")
    if q.device.type == "meta":
        raise ValueError("fastattn.distributed: q, k, v are on the meta device: there are no values to exchange")
    check_softcap(softcap)
    default_scale(softmax_scale, q.shape[-1])


def _check_local(q, k, v, cp: CPConfig, layout_: str, window_size, alibi_slopes, dropout_p, key_padding_mask,
                 softcap, softmax_scale):
    def shapes():
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} ({layout_})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"fastattn.distributed: {name} must be a 4-D tensor: {shapes()}")
    if layout_ not in ("bshd", "bhsd"):
        raise ValueError(f"fastattn.distributed: layout must be 'bshd' or 'bhsd', got {layout_!r}")
    sd, hd = (1, 2) if layout_ == "bshd" else (2, 1)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fastattn.distributed: q, k, v must share one dtype of float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"fastattn.distributed: batch sizes differ: {shapes()}")
    if not (q.shape[sd] == k.shape[sd] == v.shape[sd]):
        raise ValueError(f"fastattn.distributed: context parallelism is self-attention over one sharded sequence: "
                         f"q, k and v need the same local length: {shapes()}")
    if q.shape[sd] == 0:
        raise ValueError(f"fastattn.distributed: empty local sequence: {shapes()}")
    if k.shape[hd] != v.shape[hd] or k.shape[hd] == 0 or q.shape[hd] % k.shape[hd]:
        raise ValueError(f"fastattn.distributed: query heads must be a multiple of the (equal) key and value heads: "
                         f"{shapes()}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fastattn.distributed: q and k head dims differ: {shapes()}")
    layout.segments(q.shape[sd], cp.world_size, cp.rank, cp.balance)  # zigzag: even local length
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"fastattn.distributed: window_size must be (left, right) with -1 = unlimited, got "
                         f"{window_size}")
    if alibi_slopes is not None:
        H = q.shape[hd]
        if alibi_slopes.dtype != torch.float32 or tuple(alibi_slopes.shape) not in ((H,), (q.shape[0], H)):
            raise ValueError(f"fastattn.distributed: alibi_slopes must be float32 ({H},) or ({q.shape[0]}, {H}), "
                             f"got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastattn.distributed: dropout_p must be in [0, 1), got {dropout_p}")
    _check_key_mask(key_padding_mask, k, layout_)
    check_placement_and_scalars(q, softcap, softmax_scale, k=k, v=v, alibi_slopes=alibi_slopes,
                                key_padding_mask=key_padding_mask)


def _check_across_ranks(q, k, v, cp: CPConfig, masked: bool, failed: bool, settings: int = 0):
    def dims(t):  # 4 ints whatever t is (a rank with a bad input still sends as many)
        s = list(t.shape)[:4] if isinstance(t, torch.Tensor) else []
        return s + [-1] * (4 - len(s))
    dt = _DTYPES.index(q.dtype) if isinstance(q, torch.Tensor) and q.dtype in _DTYPES else -1
    mine = torch.tensor([dims(q) + dims(k) + dims(v) + [int(masked), dt, int(failed), settings]], dtype=torch.int64,
                        device=q.device if isinstance(q, torch.Tensor) and q.device.type != "meta" else "cpu")
    got = cp.comm.all_gather(mine).view(cp.world_size, -1).tolist()  # (W, 1, 16) -> (W, 16)
    if failed:
        return  # this rank raises its own error
    bad = [r for r, g in enumerate(got) if g[14]]
    if bad:
        raise ValueError(f"fastattn.distributed: CP rank(s) {bad} rejected their inputs (see their error)")
    if any(g[15] != got[0][15] for g in got):
        raise ValueError("fastattn.distributed: the call's settings differ across the CP ranks (strategy, balance, "
                         "layout, causal, window_size, softcap, softmax_scale, dropout_p or alibi_slopes): every "
                         "rank must make the same call on its own shard")
    if any(g[:14] != got[0][:14] for g in got):
        per = "; ".join(f"rank {r}: q {g[0:4]}, k {g[4:8]}, v {g[8:12]}, key_padding_mask "
                        f"{'given' if g[12] else 'None'}, dtype {_DTYPES[g[13]] if g[13] >= 0 else '?'}"
                        for r, g in enumerate(got))
        raise ValueError(f"fastattn.distributed: inputs differ across the CP ranks: {per}")


def _shared_rng(cp: CPConfig, device) -> Tuple[int, int]:
    """One dropout (seed, offset) for every rank: each rank draws (keeping generators in step), rank 0's wins."""
    seed, offset = dropout_rng()
    got = cp.comm.all_gather(torch.tensor([int(seed), int(offset)], dtype=torch.int64, device=device))
    return int(got[0, 0]), int(got[0, 1])


def _key_mask_shape(k, layout_: str) -> Tuple[int, int]:
    return k.shape[0], k.shape[1 if layout_ == "bshd" else 2]  # (B, S/W)


def _check_key_mask(key_padding_mask, k, layout_: str) -> None:
    if key_padding_mask is None:
        return
    want = _key_mask_shape(k, layout_)
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool or \
            tuple(key_padding_mask.shape) != want:
        got = (f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}" if isinstance(key_padding_mask,
               torch.Tensor) else type(key_padding_mask).__name__)
        raise ValueError(f"fastattn.distributed: key_padding_mask must be bool (B, S/W) = {want} (True = a real "
                         f"key, this rank's shard in the config's layout), got {got}")


def _key_bias(key_padding_mask, q, k, layout_: str):
    """bool (B, S/W), True = a real key (checked by _check) -> (B, S/W) bias in q's dtype: 0 for real keys, -inf
    for padding."""
    if key_padding_mask is None:
        return None
    bias = torch.zeros(_key_mask_shape(k, layout_), dtype=q.dtype, device=q.device)
    return bias.masked_fill_(~key_padding_mask.to(q.device), float("-inf"))


def cp_attention(q, k, v, *, cp: Optional[CPConfig] = None, causal: bool = False,
                 softmax_scale: Optional[float] = None, dropout_p: float = 0.0, window_size=(-1, -1),
                 softcap: float = 0.0, alibi_slopes=None, return_lse: bool = False, layout: str = "bshd",
                 rng: Optional[tuple] = None, key_padding_mask: Optional[torch.Tensor] = None):
    """Attention over the whole sequence, split over the CP group of `cp`.

    q (B, S/W, Hq, D), k (B, S/W, Hkv, D), v (B, S/W, Hkv, Dv) with layout="bshd" (flash-attn's), or (B, H, S/W, D)
    with layout="bhsd": this rank's shard in cp.balance's layout. Hq % Hkv == 0 is GQA/MQA (K/V never expanded
    except as Ulysses needs, see CPConfig). causal / window_size=(left, right) / alibi_slopes (fp32 (Hq,) or
    (B, Hq), bias -slope*|i - j|) use global positions. softcap > 0: softcap * tanh(scores / softcap).
    dropout_p > 0 drops exactly the probabilities one process would with the same rng (seed, offset), on every
    strategy (ulysses and hybrid key it on the global query head: head_start); rng=None draws one
    (fastattn.blocks.dropout_rng) and shares rank 0's.
    Returns out (q's layout and dtype), and with return_lse also lse fp32 (B, Hq, S/W) (+inf for rows that see no
    key). Differentiable in q, k, v. Under torch.compile(fullgraph=True) the whole CP attention is one custom op
    (fastattn.distributed.ops); with dropout there, pass rng (drawing one communicates, which breaks the graph).
    key_padding_mask: bool (B, S/W), True = a real key, this rank's shard (shard it like the inputs): padded keys
    are invisible to every query, whichever rank holds them (the mask travels with its K/V, or is gathered once
    for allgather / ulysses). A query that sees no real key gets 0 (lse +inf). Every rank passes one or none
    (cp.check_shapes checks that too).
    DTensor q, k, v placed (Shard(seq dim),) on a 1-D CP mesh return DTensors, cp optional (from the mesh,
    contiguous layout): fastattn.distributed.dtensor.
    """
    if isinstance(q, _DTensor) or isinstance(k, _DTensor) or isinstance(v, _DTensor):
        # unwraps to the local shards and calls cp_attention on them
        return dtensor_cp_attention(cp_attention, q, k, v, cp=cp, causal=causal, softmax_scale=softmax_scale,
                                    dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                                    alibi_slopes=alibi_slopes, return_lse=return_lse, layout=layout, rng=rng,
                                    key_padding_mask=key_padding_mask)
    if not isinstance(cp, CPConfig):
        raise TypeError(f"fastattn.distributed.cp_attention: cp= must be a CPConfig for local tensors (DTensor "
                        f"inputs may omit it), got {type(cp).__name__}")
    _check(q, k, v, cp, layout, window_size, alibi_slopes, dropout_p, key_padding_mask, softcap, softmax_scale,
           causal)
    key_bias = _key_bias(key_padding_mask, q, k, layout)
    hd = 2 if layout == "bshd" else 1
    plan = cp.plan(heads_q=q.shape[hd], heads_kv=k.shape[hd], dropout=dropout_p > 0)
    if dropout_p > 0 and rng is None:  # under torch.compile pass rng: drawing one here breaks the graph
        rng = _shared_rng(cp, q.device)
    wl, wr = int(window_size[0]), int(window_size[1])
    spec = CallSpec(comm=cp.comm, balance=cp.balance, layout=layout,
                    scale=float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5,
                    window=(wl, 0 if causal else wr), softcap=float(softcap), alibi_slopes=alibi_slopes,
                    dropout_p=float(dropout_p), rng=rng if dropout_p > 0 else None, backend=cp.backend,
                    grad_comm_dtype=cp.grad_comm_dtype, return_lse=return_lse, kv_repeat=plan.kv_repeat)
    # one custom op with its autograd per strategy: opaque to torch.compile
    if plan.strategy == "ulysses":
        out, lse = cp_ulysses(spec, q, k, v, key_bias)
    else:
        out, lse = cp_attn(spec, q, k, v, plan.strategy, key_bias)
    return (out, lse) if return_lse else out


def _flash_compat(balance, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, group):
    cp = CPConfig(group=group, strategy="ring", balance=balance)
    out, lse = cp_attention(q, k, v, cp=cp, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """ring-flash-attention's ring_flash_attn_func: q (B, S/W, Hq, D), k/v (B, S/W, Hkv, D), rank r holding
    tokens [r*S/W, (r+1)*S/W) of the sequence (contiguous layout). group: a ProcessGroup, a CPComm or None (the
    default group). return_attn_probs=True returns (out, lse (B, Hq, S/W) fp32, None). The ring is exact in
    every case (fixed reduction order; `deterministic` is accepted for compatibility)."""
    return _flash_compat("contiguous", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                         alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1),
                                softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None):
    """ring-flash-attention's zigzag_ring_flash_attn_func: as ring_flash_attn_func, but rank r holds chunks r and
    2W-1-r of 2W (layout.shard(..., balance="zigzag")), which balances causal work across ranks."""
    return _flash_compat("zigzag", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                         deterministic, return_attn_probs, group)


__all__ = ["cp_attention", "ring_flash_attn_func", "zigzag_ring_flash_attn_func", "CPUnsupportedError"]
