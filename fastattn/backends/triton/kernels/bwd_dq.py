"""Backward dQ kernel: one program per (query block, batch x head), visiting the same key blocks as the forward.
dQ gets its own pass (recomputing P) instead of atomics from the dK/dV kernel, so the backward is deterministic."""
import triton
import triton.language as tl

from .common import LOG2E, block_coords, dropout_keep, f32, mm, scores, seq_bounds, visible_range


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, lo, hi, offs_m, seqlen_q, seqlen_k,
              band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2, slope2, Bias, stride_bm, stride_bn,
              seed, rng_base, rng_row_stride, q0, k0, dropout_p, Stats,
              MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_START: tl.constexpr, DEBUG: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = offs_d[None, :] < HEAD_D
        vmask = offs_dv[:, None] < HEAD_DV
        if MASK:
            kmask = kmask & (offs_n[:, None] < seqlen_k)
            vmask = vmask & (offs_n[None, :] < seqlen_k)
        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)  # (BN, D)
        vt = tl.load(V_base + offs_n[None, :] * stride_vn + offs_dv[:, None], mask=vmask, other=0.0)  # (Dv, BN)
        qk = mm(q, tl.trans(k), PRECISION, UPCAST)
        s, dcap = scores(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, band_lo, band_hi, aoff,
                         qk_scale2, cap_in, cap_out2, slope2, Bias, stride_bm, stride_bn,
                         MASK, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, BIAS)
        p = tl.exp2(s - lse2[:, None])
        dp = mm(do, vt, PRECISION, UPCAST)
        if DROPOUT:
            keep = dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], rng_row_stride, q0, k0, dropout_p,
                                HAS_START)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dcap
        dq += mm(ds.to(k.dtype), k, PRECISION, UPCAST)
        if DEBUG:
            if MASK:
                tl.atomic_add(Stats, 1)
            else:
                tl.atomic_add(Stats + 1, 1)
    return dq


@triton.jit(do_not_specialize=["seed", "rng_offset", "head_start"])  # a fresh seed or head_start: no recompile
def attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, Bias, Alibi, CuQ, CuK, QStart, KStart, Stats,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh,
                stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
                seqlen_q_arg, seqlen_k_arg, rows_q, rows_k, num_heads, head_ratio,
                scale, qk_scale2, cap_in, cap_out2, window_left, window_right, dropout_p, seed, rng_offset,
                head_start, BUCKET_Q, BUCKET_K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                HAS_START: tl.constexpr, ACCUMULATE: tl.constexpr, DEBUG: tl.constexpr):
    """HAS_START: block call (QStart/KStart, see common.py). ACCUMULATE: DQ is a float32 accumulator that the
    block's dQ is added to, unrounded, by its single writer (a relaxed atomic add, as in attn_bwd_dkdv)."""
    scale, qk_scale2, cap_in, cap_out2 = f32(scale), f32(qk_scale2), f32(cap_in), f32(cap_out2)
    dropout_p = f32(dropout_p)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_heads
    h = pid_bh % num_heads
    q_row0, k_row0, seqlen_q, seqlen_k, bb = seq_bounds(CuQ, CuK, seq, seqlen_q_arg, seqlen_k_arg, rows_q, rows_k,
                                                        IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen_q:
        bb64 = bb.to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = (h // head_ratio).to(tl.int64)
        qs = q_row0.to(tl.int64)
        ks = k_row0.to(tl.int64)
        off, aoff, band_lo, band_hi, q0, k0 = block_coords(QStart, KStart, seq, seqlen_q, seqlen_k, window_left,
                                                           window_right, HAS_START, BOTTOM_RIGHT)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        rmask = offs_m[:, None] < seqlen_q
        q = tl.load(Q + bb64 * stride_qb + h64 * stride_qh + qs * stride_qm + offs_m[:, None] * stride_qm
                    + offs_d[None, :], mask=rmask & (offs_d[None, :] < HEAD_D), other=0.0)
        do = tl.load(DO + bb64 * stride_dob + h64 * stride_doh + qs * stride_dom + offs_m[:, None] * stride_dom
                     + offs_dv[None, :], mask=rmask & (offs_dv[None, :] < HEAD_DV), other=0.0)
        lse2 = tl.load(Lse + bb64 * stride_lb + h64 * stride_lh + qs + offs_m, mask=offs_m < seqlen_q,
                       other=float("inf")) * LOG2E
        delta = tl.load(Delta + (bb64 * num_heads + h64) * rows_q + qs + offs_m, mask=offs_m < seqlen_q, other=0.0)
        K_base = K + bb64 * stride_kb + hk64 * stride_kh + ks * stride_kn
        V_base = V + bb64 * stride_vb + hk64 * stride_vh + ks * stride_vn
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Alibi + seq * stride_ab + h) * LOG2E
        Bias_base = Bias
        if BIAS > 0:
            Bias_base = Bias + bb64 * stride_bb + h64 * stride_bh
        if HAS_START:  # keyed on (sequence, global head, positions): see dropout_keep
            rng_base = rng_offset + (seq.to(tl.int64) << 32) + head_start + h64  # global head
        else:
            rng_base = rng_offset + ((bb64 * num_heads + h64) * rows_q + qs) * rows_k + ks
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        row_end = tl.minimum(m0 + BLOCK_M, seqlen_q)
        lo, full_lo, full_hi, hi = visible_range(m0, row_end, seqlen_k, off, window_left, window_right,
                                                 WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N, HAS_START)
        dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, lo, full_lo, offs_m, seqlen_q,
                       seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2, slope2, Bias_base,
                       stride_bm, stride_bn, seed, rng_base, rows_k, q0, k0, dropout_p, Stats,
                       True, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
                       BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, full_lo, full_hi, offs_m,
                       seqlen_q, seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2, slope2,
                       Bias_base, stride_bm, stride_bn, seed, rng_base, rows_k, q0, k0, dropout_p, Stats,
                       False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
                       BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, full_hi, hi, offs_m, seqlen_q,
                       seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2, slope2, Bias_base,
                       stride_bm, stride_bn, seed, rng_base, rows_k, q0, k0, dropout_p, Stats,
                       True, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
                       BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        dq = dq * scale
        DQ_ptrs = (DQ + bb64 * stride_dqb + h64 * stride_dqh + qs * stride_dqm + offs_m[:, None] * stride_dqm
                   + offs_d[None, :])
        dq_mask = rmask & (offs_d[None, :] < HEAD_D)
        if ACCUMULATE:  # one writer per element: an exact, deterministic add (see attn_bwd_dkdv)
            tl.atomic_add(DQ_ptrs, dq, mask=dq_mask, sem="relaxed")
        else:
            tl.store(DQ_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)
