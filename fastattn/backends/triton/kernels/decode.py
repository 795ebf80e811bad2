"""Split-KV decode (flash-decoding): few query tokens against a long KV cache.

A prefill kernel tiles the queries, so one decode token gives it only B x H programs. Here the keys of each row are
split across programs instead: grid (B * Hkv, num_splits). A program handles every query row of one KV head group
(the G = Hq / Hkv heads times the Sq tokens, stacked as the M dimension of the tile), so K/V are read once per group,
over one contiguous slice of that row's visible key range. It writes a partial (out, lse) to fp32 scratch and
`decode_combine` merges the splits by log-sum-exp. With one split the kernel writes the final output directly.

Cache layouts: dense (Bc, Smax, Hkv, D) picked by cache_batch_idx (or row b), or paged (num_blocks, PAGE, Hkv, D)
through block_table; any strides with stride 1 along D. Visibility follows csrc/ops.cpp (decode_fwd): per row,
Sk = seqlens_k[b], bottom-right aligned (off = Sk - Sq). Scores are kept in log2 units; lse is stored in natural log.
"""
import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import f32
from .configs import pow2
from .launch import INTERPRET, define as _define, launcher as _wrap

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: triton 3.8's interpreter returns garbage from tl.dot on two bf16 operands, so there the (already
    # bf16-rounded) values are widened first; a GPU computes the same product from the bf16 inputs.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without inf/inf
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _kv_slots(BlockTable, bt_row, cache_row, cache_rows, offs_n, nmask, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """(block, slot) of keys offs_n of one sequence, both int64: the physical page and the position in it through
    the page table, or the cache row and the position. Element offset = block * stride_b + slot * stride_s.
    Page ids are clamped into the cache (not checked on the host: a sync), so a bad table never reads outside it."""
    if PAGED:
        phys = tl.load(BlockTable + bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
        return tl.minimum(tl.maximum(phys, 0), cache_rows - 1), (offs_n % PAGE).to(tl.int64)
    return cache_row + offs_n.to(tl.int64) * 0, offs_n.to(tl.int64)


@triton.jit
def _decode_inner(acc, l_i, m_i, q, K, V, BlockTable, bt_row, cache_row, cache_rows, k_head, v_head,
                  stride_kb, stride_ks, stride_vb, stride_vs, start, end, ii, off, window_left, window_right,
                  qk_scale2, cap_in, cap_out2, slope2,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_D: tl.constexpr,
                  HEAD_DV: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                  WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over keys [start, end): carries (acc, l_i, m_i) — unnormalised output, row sum, row max."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk, slot = _kv_slots(BlockTable, bt_row, cache_row, cache_rows, offs_n, nmask, PAGED, PAGE)
        kt = tl.load(K + k_head + (blk * stride_kb + slot * stride_ks)[None, :] + offs_d[:, None],
                     mask=nmask[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)  # (D, BN)
        qk = _dot(q, kt, PRECISION, UPCAST)  # (BM, BN)
        if SOFTCAP:
            s = _tanh(qk * cap_in) * cap_out2
        else:
            s = qk * qk_scale2
        jj = offs_n[None, :]
        if ALIBI:
            s = s - slope2[:, None] * tl.abs(ii[:, None] + off - jj).to(tl.float32)
        vis = nmask[None, :]
        if WINDOW_LEFT:
            vis = vis & (jj >= ii[:, None] + off - window_left)
        if WINDOW_RIGHT:
            vis = vis & (jj <= ii[:, None] + off + window_right)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw only -inf so far: no NaN
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + v_head + (blk * stride_vb + slot * stride_vs)[:, None] + offs_dv[None, :],
                    mask=nmask[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # (BN, Dv)
        acc += _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def decode_split(Q, K, V, SeqlensK, BlockTable, BatchIdx, Alibi, Out, Lse, OutP, LseP,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 stride_btb, stride_ab, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                 batch, num_heads, num_kv_heads, seqlen_q, group, num_splits, capacity, cache_rows,
                 qk_scale2, cap_in, cap_out2, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                 BATCH_IDX: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One program: sequence b, KV head hk, key split `split`. Tile row r is query head hk * G + r // Sq, token
    r % Sq. SPLIT: write partials (OutP (splits, B, Hq, Sq, Dv), LseP (splits, B, Hq, Sq) fp32), else the result."""
    qk_scale2, cap_in, cap_out2 = f32(qk_scale2), f32(cap_in), f32(cap_out2)  # fp64 under torch.compile
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    # Indices are clamped into the cache (the host does not read them: a sync): bad ones give wrong rows, no stray read.
    seqlen_k = tl.minimum(tl.maximum(tl.load(SeqlensK + b), 0), capacity)
    off = seqlen_k - seqlen_q  # bottom-right alignment
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < group * seqlen_q
    h = hk * group + offs_m // seqlen_q  # (BM,) query head of each tile row
    ii = offs_m % seqlen_q  # (BM,) query token of each tile row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + ii[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)  # (BM, D)
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h, mask=row_ok, other=0.0) * 1.4426950408889634

    # Visible keys of the whole group: [lo, seqlen_k); token 0 sees the earliest one. Split it in BLOCK_N units.
    lo = seqlen_k * 0
    if WINDOW_LEFT:
        lo = tl.maximum(off - window_left, 0)
    hi = tl.maximum(seqlen_k, lo)
    blocks_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    start = lo + split * blocks_per_split * BLOCK_N
    end = tl.minimum(hi, start + blocks_per_split * BLOCK_N)

    if BATCH_IDX:
        cache_row = tl.minimum(tl.maximum(tl.load(BatchIdx + b), 0), cache_rows - 1).to(tl.int64)
    else:
        cache_row = b.to(tl.int64)
    bt_row = b.to(tl.int64) * stride_btb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, K, V, BlockTable, bt_row, cache_row, cache_rows,
                                  hk.to(tl.int64) * stride_kh, hk.to(tl.int64) * stride_vh,
                                  stride_kb, stride_ks, stride_vb, stride_vs, start, end, ii, off,
                                  window_left, window_right, qk_scale2, cap_in, cap_out2, slope2,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, PAGED, PAGE, WINDOW_LEFT,
                                  WINDOW_RIGHT, SOFTCAP, ALIBI, PRECISION, UPCAST)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows with no visible key: acc is 0 -> out 0
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = (m_use + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453
    dv_ok = offs_dv[None, :] < HEAD_DV
    if SPLIT:
        row = ((split * batch + b) * num_heads + h) * seqlen_q + ii  # (BM,) row of the (splits, B, Hq, Sq) scratch
        tl.store(LseP + row, tl.where(seen, lse, float("-inf")), mask=row_ok)
        tl.store(OutP + row.to(tl.int64)[:, None] * HEAD_DV + offs_dv[None, :], out, mask=row_ok[:, None] & dv_ok)
    else:
        tl.store(Lse + b * stride_lb + h * stride_lh + ii, tl.where(seen, lse, float("inf")), mask=row_ok)
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + ii[:, None] * stride_om + offs_dv[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok)


@triton.jit
def decode_combine(OutP, LseP, Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                   num_heads, seqlen_q, rows, num_splits,
                   BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DV: tl.constexpr):
    """One program per query row (b, h, i): out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s.
    Rows no split saw: out 0, lse +inf."""
    r = tl.program_id(0)
    b = r // (num_heads * seqlen_q)
    h = (r // seqlen_q) % num_heads
    i = r % seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    smask = offs_s < num_splits
    lse_s = tl.load(LseP + offs_s * rows + r, mask=smask, other=float("-inf"))  # (S,)
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)  # (S,); empty splits weigh 0
    tot = tl.sum(w, 0)
    o_s = tl.load(OutP + (offs_s.to(tl.int64) * rows + r)[:, None] * HEAD_DV + offs_dv[None, :],
                  mask=smask[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # (S, Dv)
    seen = tot > 0.0
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(seen, tot, 1.0)
    lse = tl.where(seen, m_use + tl.log(tl.where(seen, tot, 1.0)), float("inf"))
    tl.store(Lse + b * stride_lb + h * stride_lh + i, lse)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + i * stride_om + offs_dv
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DV)


def interpreting() -> bool:
    return INTERPRET


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_INTERP_SMS = min(os.cpu_count() or 4, 8)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sms(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERP_SMS  # interpreter: a few "SMs" so the split path is exercised


def block_n(head_dim: int) -> int:
    return 64 if pow2(head_dim) <= 128 else 32


def num_splits_heuristic(batch_kv_heads: int, max_keys: int, device: torch.device, head_dim: int) -> int:
    """Enough programs to fill the GPU (about 2 waves over the SMs), but at least 4 key blocks per split so the
    partial writes and the combine stay small next to the key loop; at most 64 splits."""
    bn = block_n(head_dim)
    target = 2 * _num_sms(device)
    if batch_kv_heads >= target:
        return 1
    by_len = max(1, max_keys // (4 * bn))
    return max(1, min(-(-target // batch_kv_heads), by_len, 64))


def _out_like_q(q: torch.Tensor, dv: int) -> torch.Tensor:
    """Output (B, Hq, Sq, Dv) in q's memory order (BSHD memory when q is BSHD), as csrc/common.h alloc_out_like_q."""
    B, H, S, _ = q.shape
    if q.stride(1) < q.stride(2):
        out = q.new_empty(B, S, H, dv).transpose(1, 2)  # (B, S, H, Dv) -> (B, H, S, Dv)
    else:
        out = q.new_empty(B, H, S, dv)
    if os.environ.get("FASTATTN_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


def _check(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi, window_left, window_right,
           softcap):
    def need(ok, msg):  # msg: a callable, so that checks that pass format nothing (~10 us a call saved)
        if not ok:
            raise RuntimeError(f"fastattn: triton_decode_fwd: {msg()}")

    need(q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4, lambda: f"q must be (B, Hq, Sq, D) and the "
         f"caches 4-D, got q{tuple(q.shape)} k_cache{tuple(k_cache.shape)} v_cache{tuple(v_cache.shape)}")
    B, Hq, _, D = q.shape
    Hkv = k_cache.shape[2]
    need(k_cache.shape[3] == D and tuple(v_cache.shape[:3]) == tuple(k_cache.shape[:3]) and Hkv > 0 and Hq % Hkv == 0,
         lambda: f"q{tuple(q.shape)}, k_cache{tuple(k_cache.shape)} and v_cache{tuple(v_cache.shape)} do not fit "
                 f"together")
    need(q.dtype == k_cache.dtype == v_cache.dtype,
         lambda: f"dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t, dims in (("seqlens_k", seqlens_k, 1), ("block_table", block_table, 2),
                          ("cache_batch_idx", cache_batch_idx, 1)):
        if t is not None:
            need(t.dtype == torch.int32 and t.dim() == dims and t.shape[0] == B and t.is_contiguous(),
                 lambda: f"{name} must be contiguous int32 with {dims} dims and {B} rows, got {t.dtype} "
                         f"{tuple(t.shape)}")
    need(block_table is None or cache_batch_idx is None, lambda: "cache_batch_idx cannot be combined with block_table")
    need(block_table is not None or cache_batch_idx is not None or k_cache.shape[0] == B,
         lambda: f"k_cache batch {k_cache.shape[0]} != q batch {B} (pass cache_batch_idx)")
    need(block_table is None or k_cache.shape[1] > 0, lambda: "paged cache with page size 0")
    need(alibi is None or (alibi.dtype == torch.float32 and alibi.is_contiguous() and
                           tuple(alibi.shape) in ((Hq,), (B, Hq))),
         lambda: f"alibi_slopes must be contiguous float32 ({Hq},) or ({B}, {Hq})")
    need(window_left >= -1 and window_right >= -1, lambda: f"window must be >= -1, got ({window_left}, {window_right})")
    need(math.isfinite(softcap) and softcap >= 0, lambda: f"softcap must be finite and >= 0, got {softcap}")


def launch_decode(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left, window_right,
                  softcap, alibi_slopes, num_splits):
    """Same contract as torch.ops.fastattn.decode_fwd (csrc/ops.cpp). Values were validated by the caller
    (fastattn/kvcache.py or fastattn/dispatch.py); the shapes and dtypes the kernel indexes by are checked here, and
    the kernel clamps every index into the cache, so a direct call cannot read outside it."""
    _check(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, alibi_slopes, window_left, window_right,
           softcap)
    B, Hq, Sq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hkv
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 0
    max_keys = block_table.shape[1] * page if paged else k_cache.shape[1]
    # A window wider than the cache is no window (as csrc/decode_checks.h): keeps i + off + window from overflowing.
    window_left = -1 if window_left > max_keys + Sq else window_left
    window_right = -1 if window_right > max_keys + Sq else window_right
    BN = block_n(max(D, Dv))
    if num_splits <= 0:
        num_splits = num_splits_heuristic(B * Hkv, max_keys, q.device, D)
    num_splits = min(num_splits, max(1, -(-max_keys // BN)))  # (a hint) splits past the last key block are empty
    out = _out_like_q(q, Dv)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    BLOCK_M = max(16, pow2(group * Sq))
    BLOCK_D = max(16, pow2(D))
    BLOCK_DV = max(16, pow2(Dv))
    split = num_splits > 1
    if split:
        out_p = torch.empty(num_splits, B, Hq, Sq, Dv, dtype=torch.float32, device=q.device)
        lse_p = torch.empty(num_splits, B, Hq, Sq, dtype=torch.float32, device=q.device)
    else:
        out_p, lse_p = lse, lse  # unused
    dummy = seqlens_k
    alibi = alibi_slopes if alibi_slopes is not None else dummy
    stride_ab = 0 if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes.stride(0)
    log2e = LOG2E
    # Memory-bound: a third pipeline stage hides more load latency where shared memory allows it.
    stages = 3 if q.element_size() <= 2 and max(BLOCK_D, BLOCK_DV) <= 128 else 2
    kw = dict(num_warps=4, num_stages=stages) if q.device.type == "cuda" else {}
    _wrap(decode_split)[(B * Hkv, num_splits)](
        q, k_cache, v_cache, seqlens_k, block_table if paged else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy, alibi, out, lse, out_p, lse_p,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0) if paged else 0, stride_ab,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        B, Hq, Hkv, Sq, group, num_splits, max_keys if k_cache.shape[0] else 0, k_cache.shape[0],
        scale * log2e, scale / softcap if softcap > 0 else 0.0, softcap * log2e, window_left, window_right,
        BLOCK_M=BLOCK_M, BLOCK_N=BN, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, HEAD_D=D, HEAD_DV=Dv,
        PAGED=paged, PAGE=max(page, 1), BATCH_IDX=cache_batch_idx is not None,
        WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0, SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and interpreting(), **kw)
    if split:
        rows = B * Hq * Sq
        _wrap(decode_combine)[(rows,)](out_p, lse_p, out, lse, out.stride(0), out.stride(1), out.stride(2),
                                lse.stride(0), lse.stride(1), Hq, Sq, rows, num_splits,
                                BLOCK_S=max(2, pow2(num_splits)), BLOCK_DV=BLOCK_DV,
                                HEAD_DV=Dv, **({"num_warps": 4} if q.device.type == "cuda" else {}))
    return out, lse


# torch.library registration (kernels/launch.py define)
@_define("fastattn::triton_decode_fwd")
def decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
               block_table: Optional[torch.Tensor], cache_batch_idx: Optional[torch.Tensor], scale: float,
               window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
               num_splits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch_decode(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left,
                         window_right, softcap, alibi_slopes, num_splits)


if INTERPRET:
    @decode_fwd.register_fake
    def _decode_fwd_fake(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left,
                         window_right, softcap, alibi_slopes, num_splits):
        B, H, S, _ = q.shape
        return _out_like_q(q, v_cache.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)
