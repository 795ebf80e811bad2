"""Backward preprocess: delta = rowsum(dO * O) in fp32, laid out like lse: (B, H, S) (varlen: (1, H, total))."""
import triton
import triton.language as tl


@triton.jit
def attn_bwd_preprocess(Out, DO, Delta, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                        rows, num_heads,
                        BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HEAD_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < rows) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + (b * num_heads + h) * rows + offs_m, delta, mask=offs_m < rows)
