"""flash_attn_with_kvcache: attention against a KV cache, appending new keys/values in place.

Order of work: validate every argument and index, ask the dispatcher (fastattn/dispatch.py `choose_decode`) for a
backend whose split-KV kernel that reads the cache in its own layout (dense or paged), or else build the generic path's
call and let the dispatcher pick its backend — every refusal happens before anything is written — then append the
new rows in place and run. Should the run still fail (an error the checks did not foresee, out of memory), the
overwritten slots are restored, so a failing call leaves every cache bit-for-bit untouched. The generic path views
or gathers the cache as (B, Skv, Hkv, D) and turns each row's valid prefix, causality, window and alibi into one
additive bias, so every backend that takes masks can serve it (no bias where every row has the same length and
nothing else limits what a query sees: a view of each row's first L keys). On a GPU, `auto` sends such a step to
the generic path and so to PyTorch's own SDPA (GPU_STEP_HANDOVER). `explain_kvcache` says which path runs and why.
A dense decode step on the CPU whose facts an earlier call had replays that call's kernel instead (fastattn/lean.py
`cache_run`: the same value checks, append and restore, without the rebuilding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import dispatch, lean, rotary
from .lean import fx_node
from .params import (AttnParams, DecodeCall, InputTypeError, InputValueError, check_alibi, check_qkv, check_softcap,
                     check_window, clamp_window, default_scale, last_dim_contiguous, no_values)

_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_Tensor = torch.Tensor


def _check_index(name: str, t, B: int, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() < 1 or t.shape[0] != B:
        raise InputValueError(f"fastattn: {name} must be an int32 tensor with batch {B} first, got "
                              f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise InputValueError(f"fastattn: {name} is on {t.device} but q is on {device}")


def _check_cache_seqlens(cache_seqlens, B, device):
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise InputValueError(f"fastattn: cache_seqlens must be an int or an int32 tensor of shape ({B},), got "
                              f"{type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens < 2 ** 31:  # (torch.full would fail on the int32 conversion, naming nothing)
            raise InputValueError(f"fastattn: cache_seqlens={cache_seqlens} must lie in [0, the cache capacity]")
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        raise InputValueError(f"fastattn: cache_seqlens must be an int or an int32 tensor of shape ({B},), got "
                              f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    # contiguous: kernels read it densely (the Triton decode kernel asks for it); a view of it is passed through
    return (cache_seqlens if cache_seqlens.device == device else cache_seqlens.to(device)).contiguous()


def _bad_pages(block_table, lens, snew, page, nblocks):
    """Bool (B, max_blocks): block_table entries that break the rule. Pages a row uses (its valid keys after the
    append; all of them without cache_seqlens) must lie in [0, num_blocks); pages past them may also be -1, the
    vLLM / flash-attn padding, since no kernel reads them."""
    valid = (block_table >= 0) & (block_table < nblocks)
    if lens is None:
        return ~valid
    used = (lens.long() + snew + page - 1) // page  # (B,) pages holding valid keys
    j = torch.arange(block_table.shape[1], device=block_table.device)
    return ~valid & ((j.unsqueeze(0) < used.unsqueeze(1)) | (block_table != -1))  # (B, max_blocks)


def _paged_slots(block_table, lens, snew, page):
    """int64 (B, Snew) physical slots (page id * page size + offset) the append writes."""
    pos = lens.long().unsqueeze(1) + torch.arange(snew, device=lens.device)  # (B, Snew) logical positions
    blk = block_table.long().gather(1, pos // page)  # (B, Snew) physical page ids
    return blk * page + pos % page


def _check_values(lens, snew, capacity, cache_batch_idx, block_table, k_cache, page) -> Optional[Tuple[int, int]]:
    """Every index the append and the kernels follow lies inside the cache, and no two rows append into one slot;
    one host sync for all of them (none on CPU). Returns cache_seqlens' (min, max), or None without it."""
    nblocks = k_cache.shape[0]
    shared_slots = block_table is not None and snew and block_table.numel() and capacity >= snew
    if block_table is None and k_cache.is_cpu:
        # CPU, dense cache: no host sync to save, and B Python ints cost less than tensor reductions.
        vals = []
        if lens is not None:
            ls = lens.tolist()
            vals += [min(ls), max(ls)]
        if cache_batch_idx is not None:
            ix = cache_batch_idx.tolist()
            vals += [min(ix), max(ix), len(ix) - len(set(ix)) if snew else 0]
    else:
        stats = []  # int64 scalars, read back together
        if lens is not None:
            stats += [lens.min(), lens.max()]
        if cache_batch_idx is not None:
            stats += [cache_batch_idx.min(), cache_batch_idx.max(),
                      (cache_batch_idx.sort().values.diff() == 0).sum() if snew else cache_batch_idx.new_zeros(())]
        if block_table is not None:
            stats.append(_bad_pages(block_table, lens, snew, page, nblocks).sum() if block_table.numel()
                         else block_table.new_zeros(()))
        if shared_slots:
            # Clamped so that a bad length or page (reported first, below) cannot make this gather fail instead.
            slots = _paged_slots(block_table.clamp(0, max(nblocks - 1, 0)), lens.clamp(0, capacity - snew), snew,
                                 page)
            stats.append((slots.flatten().sort().values.diff() == 0).sum())
        if not stats:
            return None
        vals = torch.stack([t.to(torch.int64) for t in stats]).tolist()
    lo_hi = None
    if lens is not None:
        lo, hi = lo_hi = vals[:2]
        vals = vals[2:]
        if lo < 0 or hi + snew > capacity:
            raise InputValueError(f"fastattn: cache_seqlens (min {lo}, max {hi}) + new tokens ({snew}) must lie in "
                                  f"[0, {capacity}] (the cache capacity per row)")
    if cache_batch_idx is not None:
        lo, hi, repeats = vals[:3]
        vals = vals[3:]
        if lo < 0 or hi >= nblocks:
            raise InputValueError(f"fastattn: cache_batch_idx entries must lie in [0, {nblocks}) (k_cache batch), got "
                             f"{cache_batch_idx.tolist()}")
        if repeats:
            raise InputValueError(f"fastattn: cache_batch_idx {cache_batch_idx.tolist()} repeats a cache row; "
                                  "appending would write one row twice")
    if block_table is not None and vals[0]:
        b, j = (int(x) for x in _bad_pages(block_table, lens, snew, page, nblocks).nonzero()[0])
        raise InputValueError(f"fastattn: block_table[{b}, {j}] = {int(block_table[b, j])} is outside [0, {nblocks}) "
                         f"(num_blocks of k_cache {tuple(k_cache.shape)}; -1 is allowed only past the pages a row "
                         f"uses)")
    if shared_slots and vals[1]:
        slots = _paged_slots(block_table, lens, snew, page)  # (B, Snew)
        flat = slots.flatten()
        dup = int(flat[(flat.unsqueeze(0) == flat.unsqueeze(1)).sum(0) > 1][0])
        rows = sorted({int(b) for b in (slots == dup).nonzero()[:, 0]})
        raise InputValueError(f"fastattn: rows {rows} of block_table append into the same cache slot (page "
                              f"{dup // page}, offset {dup % page}); the last write would win")
    return lo_hi


@torch.library.custom_op("fastattn::kvcache_check", mutates_args=())
def _kvcache_check(lens: Optional[torch.Tensor], snew: int, capacity: int, cache_batch_idx: Optional[torch.Tensor],
                   block_table: Optional[torch.Tensor], k_cache: torch.Tensor, page: int) -> List[torch.Tensor]:
    """_check_values as one op for torch.compile (it reads tensor contents, which a traced graph cannot), returning
    copies of the index tensors it checked (those given, in this order) for everything after it to read: the append
    and the kernels then depend on it, so no graph can write or read through an index before it is checked. During
    CUDA graph capture (a host sync is illegal there) the values pass unchecked, as in eager mode."""
    capturing = k_cache.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and (lens is None or lens.numel()):
        _check_values(lens, snew, capacity, cache_batch_idx, block_table, k_cache, page)
    return [t.clone() for t in (lens, cache_batch_idx, block_table) if t is not None]


@_kvcache_check.register_fake
def _(lens, snew, capacity, cache_batch_idx, block_table, k_cache, page):
    return [torch.empty_like(t) for t in (lens, cache_batch_idx, block_table) if t is not None]


def _traced_checks(plan, cache_batch_idx, block_table, k_cache):
    """(lens, cache_batch_idx, block_table) as _kvcache_check returns them (None where not given)."""
    given = [t is not None for t in (plan.lens, cache_batch_idx, block_table)]
    checked = iter(_kvcache_check(plan.lens, plan.snew, plan.capacity, cache_batch_idx, block_table, k_cache,
                                  plan.page))
    return tuple(next(checked) if g else None for g in given)


@dataclass
class _Plan:
    """A validated call: sizes, where the cache lives, and each row's lengths (built positionally: keep the order)."""
    B: int
    Sq: int
    Hq: int
    D: int
    Hkv: int
    Dv: int
    paged: bool
    page: int
    capacity: int  # keys one row can hold
    lens: Optional[torch.Tensor]  # int32 (B,) valid keys before the append, None = the whole cache
    snew: int
    wl: int
    wr: int
    alibi: Optional[torch.Tensor]
    # The valid length every row has before the append, where they all have the same one in a dense cache without
    # cache_batch_idx (as checked; -1 otherwise, and while tracing): the append is then one slice copy per cache.
    same_len: int = -1

    def seqlens_k(self, device) -> torch.Tensor:
        """int32 (B,) valid keys per row after the append."""
        if self.lens is None:
            return torch.full((self.B,), self.capacity, dtype=torch.int32, device=device)
        return self.lens + self.snew if self.snew else self.lens  # kernels only read it


def _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_size,
              softcap, alibi_slopes, num_splits, rotary_cos, rotary_sin, cache_leftpad) -> _Plan:
    if cache_leftpad is not None:  # rotary_cos/sin: fastattn/rotary.py
        raise NotImplementedError("fastattn: flash_attn_with_kvcache(cache_leftpad=...) is not supported yet")
    qs, ks, vs = check_qkv(q, k_cache, v_cache, layout="bshd", names=("q", "k_cache", "v_cache"), same_batch=False)
    B, Sq, Hq, D = qs
    Hkv, Dv = ks[2], vs[3]
    if k_cache.stride(3) != 1 and D > 1 or v_cache.stride(3) != 1 and Dv > 1:
        # flash-attn's rule too. The kernels read rows with stride 1, and the generic path would copy such a cache
        # before the append writes into it (the new keys would be missing from its result).
        raise InputValueError(f"fastattn: k_cache and v_cache need stride 1 along the head dim (the last), got strides "
                              f"{tuple(k_cache.stride())} and {tuple(v_cache.stride())}")
    if type(num_splits) is not int and (isinstance(num_splits, bool) or not isinstance(num_splits, int)) \
            or num_splits < 0:
        raise InputValueError(f"fastattn: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    softcap = check_softcap(softcap)
    # Value checks read tensor contents: one host sync (below). While compiling they run as an op instead
    # (_kvcache_check, from flash_attn_with_kvcache), and not during CUDA graph capture (a sync is illegal there)
    # nor on fake tensors (FakeTensorMode: no values).
    compiling = no_values(q, cache_seqlens) or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    paged = block_table is not None
    page = 0
    if paged:
        _check_index("block_table", block_table, B, q.device)
        if block_table.dim() != 2:
            raise InputValueError(f"fastattn: block_table must be int32 of shape ({B}, max_blocks), got "
                                  f"{tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise InputValueError("fastattn: cache_batch_idx cannot be combined with block_table")
        page = ks[1]
        if page == 0:
            raise InputValueError(f"fastattn: paged k_cache {tuple(k_cache.shape)} has page size 0")
        capacity = block_table.shape[1] * page
    else:
        capacity = ks[1]
        if cache_batch_idx is not None:
            _check_index("cache_batch_idx", cache_batch_idx, B, q.device)
            if cache_batch_idx.dim() != 1:
                raise InputValueError(f"fastattn: cache_batch_idx must be int32 of shape ({B},), got "
                                      f"{tuple(cache_batch_idx.shape)}")
        elif ks[0] < B:  # more rows: flash-attn reads rows 0..B-1 (the caller narrows the caches to them)
            raise InputValueError(f"fastattn: k_cache batch {k_cache.shape[0]} < q batch {B} (pass cache_batch_idx)")
    lens = _check_cache_seqlens(cache_seqlens, B, q.device)
    snew = 0
    if (k is None) != (v is None):
        raise InputValueError("fastattn: pass both k and v to append, or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise InputTypeError(f"fastattn: {name} must be a torch.Tensor, got {type(t).__name__}")
        if k.dim() != 4 or v.dim() != 4 or k.shape[0] != B or k.shape[2] != Hkv or k.shape[3] != D or \
                tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] != Dv:
            raise InputValueError(f"fastattn: new k {tuple(k.shape)} / v {tuple(v.shape)} must be ({B}, Snew, {Hkv}, "
                                  f"{D}) / ({B}, Snew, {Hkv}, {Dv})")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise InputTypeError(f"fastattn: new k/v dtype {k.dtype}/{v.dtype} must match the cache's {k_cache.dtype}")
        if k.device != k_cache.device or v.device != k_cache.device:
            raise InputValueError(f"fastattn: new k/v are on {k.device}/{v.device} but the cache is on "
                                  f"{k_cache.device}")
        snew = k.shape[1]
        if lens is None:
            raise InputValueError("fastattn: appending k/v needs cache_seqlens (where to write)")
    same_len = -1
    if not compiling and B:
        lo_hi = _check_values(lens, snew, capacity, None if paged else cache_batch_idx, block_table, k_cache, page)
        if lo_hi is not None and lo_hi[0] == lo_hi[1] and not paged and cache_batch_idx is None:
            same_len = lo_hi[0]
    # flash-attn's rule: an entry reaching the cache's capacity is no window (-1). It hides no key (the rows see at
    # most `capacity` keys) but makes a call non-local, which decides where rotary places q (rotary.py).
    wl, wr = clamp_window(*check_window(window_size), capacity - 1)
    if causal:
        wr = 0
    # Positional, in _Plan's field order: binding fourteen keywords would cost ~0.6 us more on every call.
    return _Plan(B, Sq, Hq, D, Hkv, Dv, paged, page, capacity, lens, snew, wl, wr,
                 check_alibi(alibi_slopes, B, Hq, q.device), same_len)


def _append_index(plan: _Plan, cache_batch_idx, block_table, device):
    """(cache dim-0 index, dim-1 index), both int64 (B, Snew): where row b's new tokens go (positions lens[b] ..
    lens[b] + Snew - 1), or (every row, slice of those positions) where all rows have the same length in a dense
    cache (plan.same_len; a slice copy costs ~2 us against ~8 us to build the index and ~3 us to scatter through it).
    Validation guarantees the slots are distinct and inside the cache."""
    if plan.same_len >= 0:
        return slice(None), slice(plan.same_len, plan.same_len + plan.snew)
    pos = plan.lens.long().unsqueeze(1) + torch.arange(plan.snew, device=device)  # (B, Snew)
    if plan.paged:
        return block_table.long().gather(1, pos // plan.page), pos % plan.page  # physical page ids, offsets
    rows = (cache_batch_idx.long() if cache_batch_idx is not None
            else torch.arange(plan.B, device=device)).unsqueeze(1).expand(plan.B, plan.snew)
    return rows, pos


def _prefix_len(plan: _Plan) -> int:
    """L when every query attends to exactly the first L keys of its row, L the same for every row (after the
    append): no window, no alibi, causal only with one query token (which sees all L then); else -1. Such a call
    is plain attention over each row's first L keys (a view of a dense cache), with no bias."""
    if plan.alibi is not None or plan.wl >= 0 or (plan.wr >= 0 and plan.Sq != 1):
        return -1
    if plan.lens is None:
        return plan.capacity
    return plan.same_len + plan.snew if plan.same_len >= 0 else -1


# On a GPU `auto` hands a step that is PyTorch's own SDPA call to `sdpa`, as it does on the SDPA surface
# (backends/triton CUDA_HANDOVER): on an H200 (benchmarks/results/gpu-h200-20261204) cuDNN ran one-token steps over
# full caches (B8, GQA 32/8, hd 128, 4k-32k keys) 1.9-15x faster than the Triton split-KV kernel and 3.6-5.1x faster
# than the CUDA C++ one. Elsewhere (B1, other heads) the hand-over is PyTorch's own speed by construction, which is
# the rule; benchmarks/gpu_decode_splits.py measures B1 beside the kernels on the next GPU run.
GPU_STEP_HANDOVER = ("sdpa: a step that is PyTorch's own SDPA call (every row the same length, no window, alibi, "
                     "softcap or lse) runs on PyTorch's fused kernel on a GPU (cuDNN 1.9-15x the split-KV kernels "
                     "on an H200, 2026-12-04)")
STEP_HANDOVER_DEVICES = ("cuda",)  # (the tests add "cpu" to run the hand-over's path here)


def _gpu_step(plan: _Plan, q, k_cache, v_cache, k, v, cache_batch_idx, block_table, scale, softcap, return_lse,
              backend) -> Optional[AttnParams]:
    """The generic path's call for a CUDA step that auto hands to `sdpa` (GPU_STEP_HANDOVER), or None."""
    if q.device.type not in STEP_HANDOVER_DEVICES or not plan.B or _prefix_len(plan) <= 0 \
            or dispatch.requested_backend(backend) != "auto":
        return None
    K, V = _generic_kv(plan, k_cache, v_cache, k, v, cache_batch_idx, block_table)
    p = _generic_params(plan, q, K, V, scale, softcap, return_lse)
    return p if p.q.shape[2] and dispatch.select(p, backend).name == "sdpa" else None


def _generic_kv(plan: _Plan, k_cache, v_cache, k, v, cache_batch_idx, block_table):
    """The cache as (B, Skv, Hkv, D|Dv) for the generic path, built before the append: a view of a dense cache (the
    append shows through it), or a row/page gather with each row's new tokens placed in the copy."""
    B, Hkv, D, Dv = plan.B, plan.Hkv, plan.D, plan.Dv
    if not plan.paged and cache_batch_idx is None:
        L = _prefix_len(plan)
        if 0 <= L < plan.capacity:  # every row L keys long: their first L, so no bias is needed
            return k_cache[:, :L], v_cache[:, :L]  # (B, L, Hkv, D|Dv) views
        return k_cache, v_cache
    if plan.paged:
        nb, page = block_table.shape[1], plan.page
        bt = block_table.long().clamp(min=0)  # -1 padding past the used pages: read page 0, masked by the bias
        K = k_cache[bt].reshape(B, nb * page, Hkv, D)  # (B, nb, page, Hkv, D) -> (B, Skv, Hkv, D)
        V = v_cache[bt].reshape(B, nb * page, Hkv, Dv)
    else:
        K, V = k_cache[cache_batch_idx.long()], v_cache[cache_batch_idx.long()]  # (B, Smax, Hkv, D|Dv) copies
    if plan.snew and k is not None:  # explain_kvcache passes no new tokens: it writes and computes nothing
        rows = torch.arange(B, device=K.device).unsqueeze(1)  # (B, 1)
        pos = plan.lens.long().unsqueeze(1) + torch.arange(plan.snew, device=K.device)  # (B, Snew)
        K, V = K.index_put((rows, pos), k), V.index_put((rows, pos), v)
    return K, V


def _decode_call(plan: _Plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap, num_splits):
    # Positional, in DecodeCall's field order (cheaper than keywords on every call).
    return DecodeCall(q.transpose(1, 2), k_cache, v_cache,  # q (B, Sq, H, D) -> (B, H, Sq, D)
                      plan.seqlens_k(q.device), block_table, cache_batch_idx, scale, plan.wl, plan.wr,
                      float(softcap), plan.alibi, num_splits)


def _generic_params(plan: _Plan, q, K, V, scale, softcap, return_lse) -> AttnParams:
    """K, V (B, Skv, Hkv, D|Dv) from _generic_kv plus one additive bias for lengths, window and alibi."""
    B, Sq, Hq = plan.B, plan.Sq, plan.Hq
    Skv = K.shape[1]
    bias = None
    wl, wr, alibi = plan.wl, plan.wr, plan.alibi
    if _prefix_len(plan) < 0:  # else K, V are each row's visible keys already (_generic_kv)
        seqk = plan.seqlens_k(q.device).long()
        i = torch.arange(Sq, device=q.device).view(1, Sq, 1)
        j = torch.arange(Skv, device=q.device).view(1, 1, Skv)
        diag = i + (seqk.view(B, 1, 1) - Sq)  # (B, Sq, 1): bottom-right aligned to each row's length
        vis = j < seqk.view(B, 1, 1)  # (B, Sq, Skv)
        if wl >= 0:
            vis = vis & (j >= diag - wl)
        if wr >= 0:
            vis = vis & (j <= diag + wr)
        bias = torch.zeros(B, 1, Sq, Skv, dtype=torch.float32, device=q.device)
        if alibi is not None:
            slopes = alibi.view(-1, Hq, 1, 1)
            bias = bias - slopes * (diag - j).abs().unsqueeze(1).float()  # (B, Hq, Sq, Skv)
        bias = bias.masked_fill(~vis.unsqueeze(1), float("-inf")).to(q.dtype).expand(B, Hq, Sq, Skv)
    qt, kt, vt = last_dim_contiguous(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2))  # (B,S,H,D)->(B,H,S,D)
    return AttnParams(q=qt, k=kt, v=vt, scale=scale, attn_bias=bias,
                      mask_kind=None if bias is None else "dense", softcap=float(softcap),
                      return_lse=bool(return_lse))


def _run(chosen, call, p, backend):
    """The decode kernel of the backend chosen for `call`, else the generic path on the prefill kernels."""
    return chosen.decode.run(call) if p is None else dispatch.run(p, backend, route_decode=False)


def _append_and_run(idx, k, v, k_cache, v_cache, chosen, call, p, backend):
    k_cache[idx] = k  # in place; nothing else in the caches changes
    v_cache[idx] = v
    return _run(chosen, call, p, backend)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            backend: Optional[str] = None):
    """flash-attn's flash_attn_with_kvcache.

    q: (B, Sq, Hq, D). k_cache/v_cache: (B_cache, Smax, Hkv, D|Dv) (rows 0..B-1 without cache_batch_idx), or
    paged (num_blocks, page_size, Hkv, D|Dv) with block_table int32 (B, max_blocks) (any page size). k, v: optional
    new (B, Snew, Hkv, D|Dv), written in place into the cache at positions cache_seqlens[b] .. cache_seqlens[b] +
    Snew - 1. cache_seqlens: int or int32 (B,) valid lengths before the append (None: the whole cache).
    cache_batch_idx: int32 (B,) rows of the cache.
    Attention covers each row's valid prefix (after the append); causal/window align bottom-right to it:

        keys   0 1 2 ... L-3 L-2 L-1          (L = cache_seqlens[b] + Snew, Sq = 2, causal)
        q[0]   x x x ...  x   x   .
        q[1]   x x x ...  x   x   x

    rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2) rotate the new keys and q first (flash-attn's rule: rotary.py).
    Returns out (B, Sq, Hq, Dv), and softmax_lse (B, Hq, Sq) fp32 when return_softmax_lse. num_splits (0 = heuristic)
    is a performance hint for split-KV kernels and does not change results beyond rounding.
    """
    if isinstance(q, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node (it writes the caches when it runs)
        return fx_node(flash_attn_with_kvcache, q, locals())
    lean_key = None
    if (block_table is None and cache_batch_idx is None and rotary_cos is None and alibi_slopes is None
            and cache_leftpad is None and not _is_dynamo_compiling()):  # a dense decode step: the lean path's
        # (fastattn/lean.py; one C++ call, which dynamo cannot trace): the result, the key to learn, or None
        res = lean.cache_call(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap,
                              num_splits, return_softmax_lse, backend)
        if res is not None:
            if type(res) is _Tensor or len(res) == 2:  # out, or (out, lse)
                return res
            lean_key = res  # (a key: 13 fields)
    plan = _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_size,
                     softcap, alibi_slopes, num_splits, rotary_cos, rotary_sin, cache_leftpad)
    if not plan.paged and cache_batch_idx is None and k_cache.shape[0] > plan.B:
        # a cache allocated for a larger batch: rows 0..B-1, appended through the views
        k_cache, v_cache = k_cache[:plan.B], v_cache[:plan.B]  # (B_cache, Smax, Hkv, D) -> (B, ...) views
        lean_key = None  # the key describes the whole caches: learn no route for these views under it
    if plan.B and torch.compiler.is_compiling():  # the value checks, as an op everything after it depends on
        plan.lens, cache_batch_idx, block_table = _traced_checks(plan, cache_batch_idx, block_table, k_cache)
    q, k = rotary.apply_kvcache(plan, q, k, rotary_cos, rotary_sin, rotary_interleaved)  # checks, then copies
    scale = default_scale(softmax_scale, plan.D)
    # Every refusal before the first write: the decode kernel, or the generic path's backend, is chosen here.
    call = _decode_call(plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale, softcap, num_splits)
    p = _gpu_step(plan, q, k_cache, v_cache, k, v, cache_batch_idx, block_table, scale, softcap,
                  return_softmax_lse, backend)
    chosen = None if p is not None else dispatch.choose_decode(call, backend)
    if chosen is None and p is None:
        K, V = _generic_kv(plan, k_cache, v_cache, k, v, cache_batch_idx, block_table)
        p = _generic_params(plan, q, K, V, scale, softcap, return_softmax_lse)
        if p.q.shape[2] and p.k.shape[2] and plan.B:  # dispatch.run answers empty calls without a backend
            dispatch.select(p, backend)
    if lean_key is not None:  # no route learnt yet for its key
        lean.learn_cache(lean_key, chosen, call)
    if not plan.snew:
        res = _run(chosen, call, p, backend)
    else:
        idx = _append_index(plan, cache_batch_idx, block_table, q.device)
        if torch.compiler.is_compiling():  # no try/except in a traced graph: _kvcache_check ran before
            res = _append_and_run(idx, k, v, k_cache, v_cache, chosen, call, p, backend)
        else:
            old = k_cache[idx], v_cache[idx]  # (B, Snew, Hkv, D|Dv): the slots about to be overwritten
            if plan.same_len >= 0:
                old = old[0].clone(), old[1].clone()  # slicing gave views: copies
            try:
                res = _append_and_run(idx, k, v, k_cache, v_cache, chosen, call, p, backend)
            except BaseException:
                k_cache[idx], v_cache[idx] = old  # slots are distinct: this restores the caches bit for bit
                raise
    out, lse = res
    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv) -> (B, Sq, Hq, Dv)
    return (out, lse) if return_softmax_lse else out


def explain_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                    return_softmax_lse=False, *, backend: Optional[str] = None) -> dispatch.Explanation:
    """Which path flash_attn_with_kvcache takes for these arguments (a split-KV kernel, or the generic path and
    the backend the dispatcher picks there), and why. Validates like the real call; writes and computes nothing."""
    plan = _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, causal, window_size,
                     softcap, alibi_slopes, num_splits, rotary_cos, rotary_sin, cache_leftpad)
    rotary.check(rotary_cos, rotary_sin, q, k, plan.capacity)
    scale = default_scale(softmax_scale, plan.D)
    ex = dispatch.explain_decode(_decode_call(plan, q, k_cache, v_cache, cache_batch_idx, block_table, scale,
                                              softcap, num_splits), backend)
    p = _gpu_step(plan, q, k_cache, v_cache, None, None, cache_batch_idx, block_table, scale, softcap,
                  return_softmax_lse, backend)
    if p is not None and ex.kernel is not None:
        ex.declined[ex.chosen] = [GPU_STEP_HANDOVER]
        ex.chosen = ex.kernel = None
    if ex.kernel is None:
        if p is None:
            K, V = _generic_kv(plan, k_cache, v_cache, None, None, cache_batch_idx, block_table)
            p = _generic_params(plan, q, K, V, scale, softcap, return_softmax_lse)
        ex.generic = dispatch.explain_params(p, backend, full=False, route_decode=False)
    return ex
