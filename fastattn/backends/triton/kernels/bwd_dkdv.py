"""Backward dK/dV kernel: one program per (key block, batch x kv head). It loops over the query heads of its GQA
group and over the query blocks that see its keys, so dK/dV are summed in registers: no atomics, deterministic.
Works in the transposed orientation (keys x queries) so dV += P^T dO and dK += dS^T Q need no transposes of P."""
import triton
import triton.language as tl

from .common import LOG2E, block_coords, dropout_keep, f32, mm, scores, seq_bounds, visible_range


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_qm, stride_dom, lo, hi, offs_n,
                seqlen_q, seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2, slope2,
                Bias, stride_bm, stride_bn, seed, rng_base, rng_row_stride, q0, k0, dropout_p, Stats,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_START: tl.constexpr, DEBUG: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qmask = offs_d[:, None] < HEAD_D
        domask = offs_dv[None, :] < HEAD_DV
        if MASK:
            qmask = qmask & (offs_m[None, :] < seqlen_q)
            domask = domask & (offs_m[:, None] < seqlen_q)
        qt = tl.load(Q_base + offs_m[None, :] * stride_qm + offs_d[:, None], mask=qmask, other=0.0)  # (D, BM)
        lse2 = tl.load(Lse_base + offs_m, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E
        qkt = mm(k, qt, PRECISION, UPCAST)  # (BN, BM)
        st, dcapt = scores(qkt, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, band_lo, band_hi, aoff,
                           qk_scale2, cap_in, cap_out2, slope2, Bias, stride_bm, stride_bn,
                           MASK, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, BIAS)
        pt = tl.exp2(st - lse2[None, :])  # P^T; rows with lse = +inf give 0
        do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :], mask=domask, other=0.0)  # (BM, Dv)
        delta = tl.load(Delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        dpt = mm(v, tl.trans(do), PRECISION, UPCAST)  # (BN, BM)
        if DROPOUT:
            keep = dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], rng_row_stride, q0, k0, dropout_p,
                                HAS_START)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += mm(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do, PRECISION, UPCAST)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            dv += mm(pt.to(do.dtype), do, PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * dcapt
        dk += mm(dst.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
        if DEBUG:
            if MASK:
                tl.atomic_add(Stats, 1)
            else:
                tl.atomic_add(Stats + 1, 1)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "rng_offset", "head_start"])  # a fresh seed or head_start: no recompile
def attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, Bias, Alibi, CuQ, CuK, QStart, KStart, Stats,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
                  stride_dvb, stride_dvh, stride_dvn, stride_lb, stride_lh,
                  stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
                  seqlen_q_arg, seqlen_k_arg, rows_q, rows_k, num_heads, num_kv_heads, head_ratio,
                  scale, qk_scale2, cap_in, cap_out2, window_left, window_right, dropout_p, seed, rng_offset,
                  head_start, BUCKET_Q, BUCKET_K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                  WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                  ALIBI: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, HAS_START: tl.constexpr, ACCUMULATE: tl.constexpr, DEBUG: tl.constexpr):
    """HAS_START: block call (QStart/KStart, see common.py). ACCUMULATE: DK/DV are float32 accumulators that the
    block's dK/dV are added to, unrounded. Each element has one writer (this program), so the add is one exact
    round-to-nearest fp32 addition in a fixed order (deterministic); it is issued as a relaxed atomic add (red.add:
    no loaded accumulator tile in registers, where a load-add-store spilled at D=128 on sm_90; like every PTX f32
    atomic it flushes subnormals to zero)."""
    scale, qk_scale2, cap_in, cap_out2 = f32(scale), f32(qk_scale2), f32(cap_in), f32(cap_out2)
    dropout_p = f32(dropout_p)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    q_row0, k_row0, seqlen_q, seqlen_k, bb = seq_bounds(CuQ, CuK, seq, seqlen_q_arg, seqlen_k_arg, rows_q, rows_k,
                                                        IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < seqlen_k:
        bb64 = bb.to(tl.int64)
        hk64 = hk.to(tl.int64)
        off, aoff, band_lo, band_hi, q0, k0 = block_coords(QStart, KStart, seq, seqlen_q, seqlen_k, window_left,
                                                           window_right, HAS_START, BOTTOM_RIGHT)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        nmask = offs_n[:, None] < seqlen_k
        ks = k_row0.to(tl.int64)
        k = tl.load(K + bb64 * stride_kb + hk64 * stride_kh + ks * stride_kn + offs_n[:, None] * stride_kn
                    + offs_d[None, :], mask=nmask & (offs_d[None, :] < HEAD_D), other=0.0)
        v = tl.load(V + bb64 * stride_vb + hk64 * stride_vh + ks * stride_vn + offs_n[:, None] * stride_vn
                    + offs_dv[None, :], mask=nmask & (offs_dv[None, :] < HEAD_DV), other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        col_end = tl.minimum(n0 + BLOCK_N, seqlen_k)
        # Query rows that see these keys: the forward's rule with queries and keys swapped (off -> -off, the
        # left and right windows exchanged).
        lo, full_lo, full_hi, hi = visible_range(n0, col_end, seqlen_q, -off, window_right, window_left,
                                                 WINDOW_RIGHT, WINDOW_LEFT, BLOCK_M, HAS_START)
        qs = q_row0.to(tl.int64)
        for g in range(0, head_ratio):  # the query heads sharing this kv head
            h64 = hk64 * head_ratio + g
            Q_base = Q + bb64 * stride_qb + h64 * stride_qh + qs * stride_qm
            DO_base = DO + bb64 * stride_dob + h64 * stride_doh + qs * stride_dom
            Lse_base = Lse + bb64 * stride_lb + h64 * stride_lh + qs
            Delta_base = Delta + (bb64 * num_heads + h64) * rows_q + qs
            slope2 = 0.0
            if ALIBI:
                slope2 = tl.load(Alibi + seq * stride_ab + h64) * LOG2E
            Bias_base = Bias
            if BIAS > 0:
                Bias_base = Bias + bb64 * stride_bb + h64 * stride_bh
            if HAS_START:  # keyed on (sequence, global head, positions): see dropout_keep
                rng_base = rng_offset + (seq.to(tl.int64) << 32) + head_start + h64  # global head
            else:
                rng_base = rng_offset + ((bb64 * num_heads + h64) * rows_q + qs) * rows_k + ks
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_qm, stride_dom,
                                 lo, full_lo, offs_n, seqlen_q, seqlen_k, band_lo, band_hi, aoff,
                                 qk_scale2, cap_in, cap_out2, slope2, Bias_base, stride_bm, stride_bn,
                                 seed, rng_base, rows_k, q0, k0, dropout_p, Stats,
                                 True, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT,
                                 SOFTCAP, ALIBI, BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_qm, stride_dom,
                                 full_lo, full_hi, offs_n, seqlen_q, seqlen_k, band_lo, band_hi, aoff,
                                 qk_scale2, cap_in, cap_out2, slope2, Bias_base, stride_bm, stride_bn,
                                 seed, rng_base, rows_k, q0, k0, dropout_p, Stats,
                                 False, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT,
                                 SOFTCAP, ALIBI, BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, stride_qm, stride_dom,
                                 full_hi, hi, offs_n, seqlen_q, seqlen_k, band_lo, band_hi, aoff,
                                 qk_scale2, cap_in, cap_out2, slope2, Bias_base, stride_bm, stride_bn,
                                 seed, rng_base, rows_k, q0, k0, dropout_p, Stats,
                                 True, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT,
                                 SOFTCAP, ALIBI, BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        dk = dk * scale
        DK_ptrs = (DK + bb64 * stride_dkb + hk64 * stride_dkh + ks * stride_dkn + offs_n[:, None] * stride_dkn
                   + offs_d[None, :])
        DV_ptrs = (DV + bb64 * stride_dvb + hk64 * stride_dvh + ks * stride_dvn + offs_n[:, None] * stride_dvn
                   + offs_dv[None, :])
        dk_mask = nmask & (offs_d[None, :] < HEAD_D)
        dv_mask = nmask & (offs_dv[None, :] < HEAD_DV)
        if ACCUMULATE:  # see attn_bwd_dkdv's docstring
            tl.atomic_add(DK_ptrs, dk, mask=dk_mask, sem="relaxed")
            tl.atomic_add(DV_ptrs, dv, mask=dv_mask, sem="relaxed")
        else:
            tl.store(DK_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
            tl.store(DV_ptrs, dv.to(DV.dtype.element_ty), mask=dv_mask)
