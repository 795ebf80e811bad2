"""Forward kernel: one program per (query block, batch x head) — per (query block, sequence x head) for varlen.

Key blocks are visited in three ranges from `visible_range`: the left diagonal band (masked), the fully visible
middle (no mask work at all) and the right band + sequence tail (masked); invisible blocks are never loaded."""
import triton
import triton.language as tl

from .common import LN2, LOG2E, block_coords, dropout_keep, f32, mm, scores, seq_bounds, visible_range


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, lo, hi, offs_m, seqlen_q, seqlen_k,
               band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2, slope2, Bias, stride_bm, stride_bn,
               seed, rng_base, rng_row_stride, q0, k0, dropout_p, Stats,
               MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_START: tl.constexpr, DEBUG: tl.constexpr):
    """Online softmax over key blocks [lo, hi): carries (acc, l_i, m_i) — unnormalised output, row sum, row max
    (log2 units). MASK=False blocks are fully visible and inside the sequence: no bound or visibility masks."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = offs_d[:, None] < HEAD_D
        vmask = offs_dv[None, :] < HEAD_DV
        if MASK:
            kmask = kmask & (offs_n[None, :] < seqlen_k)
            vmask = vmask & (offs_n[:, None] < seqlen_k)
        kt = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kmask, other=0.0)  # (D, BN)
        qk = mm(q, kt, PRECISION, UPCAST)
        s, _ = scores(qk, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, band_lo, band_hi, aoff,
                      qk_scale2, cap_in, cap_out2, slope2, Bias, stride_bm, stride_bn,
                      MASK, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have seen only -inf so far (masked, or -inf by value: a -inf in q): subtract 0 instead of -inf
        # (no NaN; such a row ends with l = 0 and gives 0, as PyTorch's softmax does).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # l_i keeps the undropped sum; 1 / (1 - p) is applied once at the end
            keep = dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], rng_row_stride, q0, k0, dropout_p,
                                HAS_START)
            p = tl.where(keep, p, 0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=vmask, other=0.0)  # (BN, Dv)
        acc += mm(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
        if DEBUG:  # visited-block counters for the tests: [masked, unmasked]
            if MASK:
                tl.atomic_add(Stats, 1)
            else:
                tl.atomic_add(Stats + 1, 1)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "rng_offset", "head_start"])  # a fresh seed or head_start: no recompile
def attn_fwd(Q, K, V, Out, Lse, Bias, Alibi, CuQ, CuK, QStart, KStart, Stats,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
             stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
             stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
             seqlen_q_arg, seqlen_k_arg, rows_q, rows_k, num_heads, head_ratio,
             qk_scale2, cap_in, cap_out2, window_left, window_right, dropout_p, seed, rng_offset,
             head_start, BUCKET_Q, BUCKET_K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
             WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
             BIAS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             HAS_START: tl.constexpr, DEBUG: tl.constexpr):
    """BUCKET_Q/BUCKET_K (next powers of two of the lengths) only feed the autotune key. HAS_START: block call,
    QStart/KStart (int32 (N,)) hold the global positions of each sequence's first query and key (common.py); out
    may then be float32 (out_fp32), which the store below writes unrounded."""
    qk_scale2, cap_in, cap_out2, dropout_p = f32(qk_scale2), f32(cap_in), f32(cap_out2), f32(dropout_p)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_heads  # batch index, or sequence index for varlen
    h = pid_bh % num_heads
    q_row0, k_row0, seqlen_q, seqlen_k, bb = seq_bounds(CuQ, CuK, seq, seqlen_q_arg, seqlen_k_arg, rows_q, rows_k,
                                                        IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen_q:
        bb64 = bb.to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = (h // head_ratio).to(tl.int64)
        off, aoff, band_lo, band_hi, q0, k0 = block_coords(QStart, KStart, seq, seqlen_q, seqlen_k, window_left,
                                                           window_right, HAS_START, BOTTOM_RIGHT)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        Q_base = Q + bb64 * stride_qb + h64 * stride_qh + q_row0.to(tl.int64) * stride_qm
        K_base = K + bb64 * stride_kb + hk64 * stride_kh + k_row0.to(tl.int64) * stride_kn
        V_base = V + bb64 * stride_vb + hk64 * stride_vh + k_row0.to(tl.int64) * stride_vn
        q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_D), other=0.0)
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Alibi + seq * stride_ab + h) * LOG2E
        Bias_base = Bias
        if BIAS > 0:
            Bias_base = Bias + bb64 * stride_bb + h64 * stride_bh
        if HAS_START:  # keyed on (sequence, global head, positions): see dropout_keep
            rng_base = rng_offset + (seq.to(tl.int64) << 32) + head_start + h64  # global head
        else:
            rng_base = rng_offset + ((bb64 * num_heads + h64) * rows_q + q_row0) * rows_k + k_row0
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_end = tl.minimum(m0 + BLOCK_M, seqlen_q)
        lo, full_lo, full_hi, hi = visible_range(m0, row_end, seqlen_k, off, window_left, window_right,
                                                 WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N, HAS_START)
        # masked left band, unmasked middle, masked right band and tail
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, lo, full_lo, offs_m,
                                   seqlen_q, seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2,
                                   slope2, Bias_base, stride_bm, stride_bn, seed, rng_base, rows_k, q0, k0, dropout_p,
                                   Stats,
                                   True, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT,
                                   SOFTCAP, ALIBI, BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, full_lo, full_hi, offs_m,
                                   seqlen_q, seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2,
                                   slope2, Bias_base, stride_bm, stride_bn, seed, rng_base, rows_k, q0, k0, dropout_p,
                                   Stats,
                                   False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT,
                                   SOFTCAP, ALIBI, BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, full_hi, hi, offs_m,
                                   seqlen_q, seqlen_k, band_lo, band_hi, aoff, qk_scale2, cap_in, cap_out2,
                                   slope2, Bias_base, stride_bm, stride_bn, seed, rng_base, rows_k, q0, k0, dropout_p,
                                   Stats,
                                   True, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_D, HEAD_DV, WINDOW_LEFT, WINDOW_RIGHT,
                                   SOFTCAP, ALIBI, BIAS, DROPOUT, PRECISION, UPCAST, HAS_START, DEBUG)
        # rows with no visible key: out = 0, lse = +inf (the backward's exp(s - lse) is then 0)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - dropout_p))
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
        rmask = offs_m < seqlen_q
        O_base = Out + bb64 * stride_ob + h64 * stride_oh + q_row0.to(tl.int64) * stride_om
        tl.store(O_base + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
                 mask=rmask[:, None] & (offs_dv[None, :] < HEAD_DV))
        tl.store(Lse + bb64 * stride_lb + h64 * stride_lh + q_row0 + offs_m, lse, mask=rmask)
