"""@triton.jit helpers shared by the forward and backward kernels.

Conventions: scores are kept in log2 units (the softmax scale is folded with log2(e) so the kernels use exp2);
lse is stored in natural log. `off` is the diagonal offset of the visibility rule: Sk - Sq when bottom-right
aligned, 0 when top-left, and q_start[n] - k_start[n] for block calls (HAS_START: query row i sits at global
position q_start[n] + i, key j at k_start[n] + j). Key j is visible to query i iff
    (not WINDOW_LEFT or j >= i + off - window_left) and (not WINDOW_RIGHT or j <= i + off + window_right),
evaluated as j - i >= band_lo and j - i <= band_hi (band_lo = off - window_left, band_hi = off + window_right):
j - i never overflows int32, and for block calls the bands are formed in int64 and saturated to int32 (|off| and
the windows reach 2^31), which keeps the comparison exact because |j - i| < 2^31.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # jit code may only read constexpr globals
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def f32(x):
    """A float argument as fp32. torch.compile (inductor's launch of a user-defined kernel) types Python float
    arguments fp64, and one fp64 scalar turns every product it touches fp64: the loop-carried accumulators then
    change type and the kernel fails to compile (seen on an H200, torch 2.11 / triton 3.6). Eager launches pass
    fp32, for which this is a no-op."""
    return tl.cast(x, tl.float32)


@triton.jit
def mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. PRECISION is "ieee" for fp32 inputs (the 1e-5 rule rules out TF32).
    UPCAST is set for bf16 under TRITON_INTERPRET=1: triton 3.8's interpreter returns garbage from tl.dot on two
    bf16 operands (fp16/fp32 are right), so there the already-rounded bf16 values are widened to fp32 first; the
    result is the same product a GPU computes from those bf16 inputs."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def seq_bounds(CuQ, CuK, seq, seqlen_q_arg, seqlen_k_arg, rows_q, rows_k, IS_VARLEN: tl.constexpr):
    """(q_row0, k_row0, seqlen_q, seqlen_k, batch index) of sequence `seq`: the first rows of its queries and keys in
    the tensors (0 unless varlen), its lengths and its batch entry. Varlen reads cu_seqlens (its tensors
    have batch 1); dense sequences are batch entries sharing one length pair. `seq * 0` keeps every value a tensor
    of one type in both branches. cu_seqlens values are not checked on the host (a sync): each sequence's rows are
    clamped into the tensors' rows_q / rows_k, so bad values give wrong rows, never accesses outside them."""
    if IS_VARLEN:
        q_row0 = tl.minimum(tl.maximum(tl.load(CuQ + seq), 0), rows_q)
        seqlen_q = tl.minimum(tl.maximum(tl.load(CuQ + seq + 1), q_row0), rows_q) - q_row0
        k_row0 = tl.minimum(tl.maximum(tl.load(CuK + seq), 0), rows_k)
        seqlen_k = tl.minimum(tl.maximum(tl.load(CuK + seq + 1), k_row0), rows_k) - k_row0
        bb = seq * 0
    else:
        q_row0 = seq * 0
        k_row0 = seq * 0
        seqlen_q = seqlen_q_arg + seq * 0
        seqlen_k = seqlen_k_arg + seq * 0
        bb = seq
    return q_row0, k_row0, seqlen_q, seqlen_k, bb


@triton.jit
def _sat32(x):
    """int64 -> int32, saturating (the visibility bands of block calls)."""
    return tl.minimum(tl.maximum(x, -2147483647), 2147483647).to(tl.int32)


@triton.jit
def block_coords(QStart, KStart, seq, seqlen_q, seqlen_k, window_left, window_right,
                 HAS_START: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(off, aoff, band_lo, band_hi, q0, k0) of sequence `seq`: the visibility offset, the ALiBi offset (Sk - Sq
    without block coordinates, whatever the alignment; q_start - k_start with them), the bands of the module
    docstring, and the global positions of the first query and key (0 without block coordinates). Block
    coordinates are int32 values in [0, 2^31), so off = q0 - k0 fits int32; off -+ window is formed in int64."""
    if HAS_START:
        q0 = tl.load(QStart + seq)
        k0 = tl.load(KStart + seq)
        off = q0 - k0
        aoff = off
        band_lo = _sat32(off.to(tl.int64) - window_left)
        band_hi = _sat32(off.to(tl.int64) + window_right)
    else:
        q0 = seq * 0
        k0 = seq * 0
        off = seqlen_k - seqlen_q if BOTTOM_RIGHT else seqlen_k * 0
        aoff = seqlen_k - seqlen_q
        band_lo = off - window_left
        band_hi = off + window_right
    return off, aoff, band_lo, band_hi, q0, k0


@triton.jit
def visible_range(m0, row_end, seqlen_k, off, window_left, window_right,
                  WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """For query rows [m0, row_end): every visible key lies in [lo, hi); key blocks starting in [full_lo, full_hi)
    (BLOCK_N-aligned) are visible to every row and inside seqlen_k, so they need no mask at all. Blocks in
    [lo, full_lo) and [full_lo... hi) outside the full range form the masked diagonal bands; keys outside [lo, hi)
    are never visited. Also used by the dK/dV kernel with the roles of queries and keys swapped.
    WIDE (block calls): m0 + off -+ window can leave int32, so these scalars are computed in int64 and the results
    clamped to [0, seqlen_k] (a monotone clamp: empty ranges stay empty) before going back to int32."""
    if WIDE:
        m0 = m0.to(tl.int64)
        row_end = row_end.to(tl.int64)
        off = off.to(tl.int64)
    lo = m0 * 0
    hi = lo + seqlen_k
    full_lo = lo
    full_hi = (hi // BLOCK_N) * BLOCK_N
    if WINDOW_LEFT:
        first = tl.maximum(m0 + off - window_left, 0)  # the first key row m0 sees
        lo = (first // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(row_end - 1 + off - window_left, 0), BLOCK_N) * BLOCK_N
    if WINDOW_RIGHT:
        hi = tl.minimum(row_end + off + window_right, seqlen_k)
        full_hi = (tl.maximum(tl.minimum(m0 + off + window_right + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
    if WINDOW_LEFT:  # the first visible key at or past the end: nothing visible, not even in lo's tile
        hi = tl.where(first >= hi, lo, hi)
    hi = tl.maximum(hi, lo)  # lo == hi: no visible key
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(full_hi, full_lo)  # full_hi <= hi always holds
    if WIDE:
        lo = tl.minimum(lo, seqlen_k).to(tl.int32)
        full_lo = tl.minimum(full_lo, seqlen_k).to(tl.int32)
        full_hi = tl.minimum(full_hi, seqlen_k).to(tl.int32)
        hi = tl.minimum(hi, seqlen_k).to(tl.int32)
    return lo, full_lo, full_hi, hi


@triton.jit
def tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without inf/inf (no tl.tanh in every triton version / interpreter)
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def scores(qk, ii, jj, seqlen_q, seqlen_k, band_lo, band_hi, aoff,
           qk_scale2, cap_in, cap_out2, slope2, Bias, stride_bm, stride_bn,
           MASK: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
           ALIBI: tl.constexpr, BIAS: tl.constexpr):
    """Raw q.k (fp32; (BM, BN), or (BN, BM) in the dK/dV kernel) -> scores in log2 units, -inf where invisible, and d(score)/d(q.k)/scale (the
    softcap's 1 - tanh^2; 1 without softcap). Order as flash-attn: scale, softcap, alibi, bias, mask.
    BIAS: 0 none, 1 key-padding row vector (strides (sB, 0, 0, 1)), 2 a tile loaded through its strides.
    ii, jj: query and key indices as 2-D tensors broadcastable to qk's shape (so either orientation works).
    band_lo/band_hi: the visibility bands on j - i; aoff: the ALiBi offset (alibi distance |i + aoff - j|, formed
    as (i - j) + aoff, which is q_pos - k_pos for block calls and so stays inside int32).
    MASK: apply the visibility rule and the key bound (only the diagonal band and tail blocks need it)."""
    if SOFTCAP:
        t = tanh(qk * cap_in)
        s = t * cap_out2
        dcap = 1.0 - t * t
    else:
        s = qk * qk_scale2
        dcap = 1.0
    if ALIBI:
        dist = (ii - jj) + aoff
        s = s - slope2 * tl.abs(dist).to(tl.float32)
    if BIAS == 1:
        b = tl.load(Bias + jj * stride_bn, mask=jj < seqlen_k, other=0.0)
        s = s + b.to(tl.float32) * 1.4426950408889634
    elif BIAS == 2:
        b = tl.load(Bias + ii * stride_bm + jj * stride_bn, mask=(ii < seqlen_q) & (jj < seqlen_k), other=0.0)
        s = s + b.to(tl.float32) * 1.4426950408889634
    if MASK:
        vis = jj < seqlen_k
        if WINDOW_LEFT:
            vis = vis & (jj - ii >= band_lo)
        if WINDOW_RIGHT:
            vis = vis & (jj - ii <= band_hi)
        s = tl.where(vis, s, float("-inf"))
    return s, dcap


@triton.jit
def dropout_keep(seed, rng_base, ii, jj, rng_row_stride, q0, k0, dropout_p, POS: tl.constexpr):
    """Counter-based keep mask, regenerated by the backward.
    Without block coordinates: Philox(seed, offset + linear index of (b, h, i, j)); rng_base already holds offset +
    the (b, h, sequence start) part of the index (int64).
    POS (block calls): a function of the global positions and the global head only, so any split of a call into
    blocks (over positions, or over heads with head_start) drops the same elements: the Philox counter is
    (k_pos, q_pos, low and high words of rng_base = offset + n * 2^32 + head_start + h) with q_pos = q0 + i,
    k_pos = k0 + j (n * 2^32, not n * H: the key must not depend on how many heads the call holds); keep iff the top
    31 bits of its first output, as a uniform in [0, 1), are >= dropout_p. Without POS, head_start is refused with
    dropout (op.py): the linear index depends on the call's head count."""
    if POS:
        c0 = (k0 + jj + ii * 0).to(tl.uint32, bitcast=True)  # (ii * 0, jj * 0: every counter word a full tile)
        c1 = (q0 + ii + jj * 0).to(tl.uint32, bitcast=True)
        c2 = c0 * 0 + rng_base.to(tl.uint32)  # low 32 bits
        c3 = c0 * 0 + (rng_base >> 32).to(tl.uint32)
        r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
        return (r >> 1).to(tl.int32, bitcast=True).to(tl.float32) * 4.656612873077393e-10 >= dropout_p
    else:
        idx = rng_base + ii.to(tl.int64) * rng_row_stride + jj
        return tl.rand(seed, idx) >= dropout_p
