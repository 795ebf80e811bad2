"""CPU-kernel specifics (csrc/cpu) beyond the generated matrix: op registration (opcheck), bitwise determinism
across thread counts for both backward schedules, dropout mask agreement between forward and backward,
torch.compile, strided last dims, and the O(S) memory claim."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import ops
from support import fwd_args
from support.checks import run_on_forced_fp16_pairs
from support.oracle import assert_fwd_bwd, assert_rule, lse_reference, oracle_attention

pytestmark = pytest.mark.skipif(fastattn.get_backend("cpu").unavailable() != [],
                                reason="fastattn._C without CPU kernels (extension not built)")


def _qkv(B, Hq, Hkv, Sq, Sk, D, Dv=None, dtype=torch.float32, grad=True):
    Dv = Dv or D
    mk = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(B, Hq, Sq, D), mk(B, Hkv, Sk, D), mk(B, Hkv, Sk, Dv)


def _assert_fwd_bwd_rule(out, q, k, v, dtype, **oracle_kw):
    """out and the gradients of q, k, v under a random dout against the float64 oracle (assert_fwd_bwd; oracle_kw:
    scale, mask, window, ...)."""
    dout = torch.randn_like(out)
    assert_fwd_bwd("", (out, *torch.autograd.grad(out, (q, k, v), dout)), q, k, v, dout, dtype, **oracle_kw)


def test_opcheck_fwd_bwd():
    q, k, v = _qkv(1, 4, 2, 33, 47, 16, 24)
    bias = torch.randn(1, 1, 33, 47).expand(1, 4, 33, 47)
    for args in (fwd_args(q, k, v), fwd_args(q, k, v, bias=bias, wl=5, wr=0, br=True, softcap=3.0),
                 fwd_args(q, k, v, dropout_p=0.2, seed=7, off=3)):
        torch.library.opcheck(torch.ops.fastattn.fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.fastattn.fwd(*fwd_args(q, k, v, wr=0))
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, None, None, None, 0, 0, 0.25, -1, 0, False, 0.0,
                None, 0.0, 0, 0, True)
    torch.library.opcheck(torch.ops.fastattn.bwd.default, bwd_args)


# (B, Hq, Hkv): B*Hkv >= 8 runs one backward task per (sequence, kv head); fewer cut each head's keys into chunks
# whose dQ partials are summed afterwards (csrc/cpu/params.h bwd_key_chunks; 333 keys are two chunks on the fp32
# tiles, one 512-key block on the matrix units: test_cpu_bwd_chunks.py cuts those).
@pytest.mark.parametrize("shape", [(2, 8, 4), (1, 4, 1)], ids=["one_chunk", "key_chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_across_threads(shape, dtype):
    B, Hq, Hkv = shape
    q, k, v = _qkv(B, Hq, Hkv, 300, 333, 40, dtype=dtype)
    dout = torch.randn(B, Hq, 300, 40, dtype=dtype)
    old = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        try:
            out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1, enable_gqa=True,
                                                        backend="cpu")
            return (out,) + torch.autograd.grad(out, (q, k, v), dout)
        finally:
            torch.set_num_threads(old)

    results = []
    for threads in (1, 2, 3, 1):
        torch.manual_seed(99)
        results.append(run(threads))
    for other in results[1:]:
        for a, b, name in zip(results[0], other, ("out", "dq", "dk", "dv")):
            assert torch.equal(a, b), f"{name} differs between thread counts / runs"


@pytest.mark.parametrize("shape", [(2, 8, 4), (1, 4, 2)], ids=["one_chunk", "key_chunks"])
def test_dropout_backward_regenerates_forward_mask(shape):
    """V = identity exposes the forward's kept mask as out != 0; the backward must use that same mask."""
    B, Hq, Hkv = shape
    p_drop, Sq, Sk = 0.3, 37, 64
    q = torch.randn(B, Hq, Sq, Sk, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, Sk, requires_grad=True)
    v = torch.eye(Sk).expand(B, Hkv, Sk, Sk).contiguous().requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, enable_gqa=True, backend="cpu")
    mask = out.detach() != 0
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p_drop)) < 0.03, f"keep rate {kept:.3f}"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves, scale=Sk ** -0.5, dropout_mask=mask, dropout_p=p_drop)
    assert_rule("out", out, ref, None, torch.float32)
    for name, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, dout.double())):
        assert_rule(name, g, r, None, torch.float32)


def test_strided_last_dim_and_varlen_bias():
    """Inputs whose last dim is strided (no hidden copies) and a key-padding bias on packed sequences."""
    q = torch.randn(1, 3, 50, 48)[..., ::2].requires_grad_()  # (1, 3, 50, 24) with stride 2 over D
    k = torch.randn(1, 3, 61, 48)[..., ::2].requires_grad_()
    v = torch.randn(1, 3, 61, 40)[..., ::2].requires_grad_()  # Dv = 20
    assert q.stride(-1) == 2 and k.stride(-1) == 2
    out, lse = torch.ops.fastattn.fwd(*fwd_args(q, k, v, wl=7, wr=3, br=True))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle_attention(*leaves, scale=24 ** -0.5, window=(7, 3), bottom_right=True)
    assert_rule("out", out, ref, None, torch.float32)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, r in zip(("dq", "dk", "dv"), g, torch.autograd.grad(ref, leaves, dout.double())):
        assert_rule(name, a, r, None, torch.float32)
    # varlen with a key-padding bias read through its strides: each sequence against the oracle
    cu_q = torch.tensor([0, 5, 5, 30], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 20, 41], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (30, 41, 41))
    kp = torch.randn(1, 1, 1, 41)
    kp[..., 3] = float("-inf")
    bias = kp.expand(1, 2, 30, 41)
    out, lse = torch.ops.fastattn.fwd(q, k, v, bias, cu_q, cu_k, 25, 21, 0.25, -1, 0, True, 0.0, None, 0.0, 0, 0,
                                      False)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    for n in range(3):
        sq, sk = slice(int(cu_q[n]), int(cu_q[n + 1])), slice(int(cu_k[n]), int(cu_k[n + 1]))
        leaves = [t.detach()[:, :, s].double().requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk))]
        ref = oracle_attention(*leaves, scale=0.25, mask=bias[:, :, sq, sk], window=(-1, 0), bottom_right=True)
        assert_rule(f"out[{n}]", out[:, :, sq], ref, None, torch.float32)
        if ref.numel():
            rg = torch.autograd.grad(ref, leaves, dout[:, :, sq].double(), allow_unused=True)
            for name, a, r, s in zip(("dq", "dk", "dv"), g, rg, (sq, sk, sk)):
                assert_rule(f"{name}[{n}]", a[:, :, s], r if r is not None else torch.zeros_like(a[:, :, s]),
                            None, torch.float32)


@pytest.mark.parametrize("H,Hkv,D,S", [(16, 16, 64, 300), (8, 8, 128, 300), (12, 12, 64, 300), (16, 16, 64, 100),
                                       (16, 4, 64, 300), (2, 2, 64, 300)],
                         ids=["4KB-rows", "4KB-rows-d128", "3KB-rows", "4KB-rows-one-block", "4KB-rows-gqa",
                              "512B-rows-in-place"])
def test_rows_far_apart_in_transformers_layout(H, Hkv, D, S):
    """fp32 inputs in transformers' (B, S, H, D) layout: rows H * D floats apart. Rows a multiple of 4 KB apart (and
    3 KB) are copied before the products (csrc/cpu/tile.h, rows_in_place: K and V a head at a time over several query
    blocks, a tile at a time with one; in the backward Q and dO a kv head's group at a time, bwd.cpp's DenseRows);
    512-byte rows are read in place."""
    q = torch.randn(2, S, H, D).transpose(1, 2).requires_grad_()  # (B, H, S, D) view
    k, v = (torch.randn(2, S, Hkv, D).transpose(1, 2).requires_grad_() for _ in range(2))
    assert q.stride(2) == H * D
    out = fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", enable_gqa=H != Hkv)
    _assert_fwd_bwd_rule(out, q, k, v, torch.float32, scale=D ** -0.5)


def test_compile_fullgraph_matches_eager():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu") * 2

    q, k, v = _qkv(1, 2, 2, 40, 40, 32, grad=False)
    mod = Attn()
    eager = mod(q, k, v)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.slow  # ~10-30 s on 2 cores: a 16k causal forward+backward
def test_memory_linear_in_sequence_length():
    """Single head, S = 16384, fwd+bwd: peak RSS growth stays under 1 GiB (the score matrix alone is 1 GiB
    in fp32). Measured in a fresh process so other tests' allocations do not count."""
    code = textwrap.dedent("""
        import resource, torch, fastattn
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 1, 16384, 64, requires_grad=True) for _ in range(3))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
        out.backward(torch.randn_like(out))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - before) * 1024)
    """)
    env = dict(os.environ, FASTATTN_POISON_OUTPUTS="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    extra = int(res.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {extra / 2**20:.1f} MiB")
    assert extra < 2**30, f"fwd+bwd at S=16384 grew RSS by {extra / 2**20:.0f} MiB"


def test_dropout_p_rounding_to_one_in_float32_is_refused():
    """p = 1 - 1e-9 is < 1 as a double but 1.0f in the kernel: rescale would be inf. The op refuses it."""
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="rounds to 1 in float32"):
        torch.ops.fastattn.fwd(q, q, q, None, None, None, 0, 0, 0.3, -1, -1, False, 0.0, None, 1 - 1e-9, 0, 0)


@pytest.mark.parametrize("mask_kind", ["key_padding", "dense_strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_several_tiles_each_way_with_key_padding(dtype, causal, mask_kind):
    """Sq = 520, Sk = 1100: several query tiles and three key tiles for every tile shape the forward picks (fp32:
    128 x 512 without a window, 64 x 256 with one; bf16: 64 x 512), so the online softmax rescales across key tiles;
    fp32 without a window has the >= 4 query tiles per head that pack K for MKL once per (sequence, head), so a stale
    pack from the previous head would show; a key-padding mask (one bias row per batch) ends mid-tile; a dense float
    mask with strided keys takes the bias's chunked path. Forward and gradients against the float64 oracle under the
    tolerance rule."""
    torch.manual_seed(5)
    q, k, v = _qkv(2, 2, 2, 520, 1100, 64, dtype=dtype)
    keep = torch.arange(1100).view(1, 1100) < torch.tensor([1100, 700]).view(2, 1)  # (B, Sk), True = attend
    mask = keep.view(2, 1, 1, 1100)  # (B, Sk) -> (B, 1, 1, Sk)
    if mask_kind == "dense_strided":  # a float mask whose keys are not adjacent: the bias's chunked (non-AVX-512) path
        mask_t = torch.randn(1100, 520).masked_fill(~keep[1].view(1100, 1), float("-inf")).to(dtype)
        mask = mask_t.t()  # (Sk, Sq) -> (Sq, Sk), strides (1, Sq)
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, backend="cpu")
    _assert_fwd_bwd_rule(out, q, k, v, dtype, scale=64 ** -0.5, mask=mask, window=(-1, 0 if causal else -1),
                         bottom_right=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rows_whose_scores_climb_across_key_tiles(dtype):
    """The matrix-unit forward's lazy rescaling (bf16 here; fp16 on AMX-FP16 machines, fp32 tiles elsewhere).
    Scores that jump by ~100 from one key tile to the next (the matrix-unit forward must rescale: P against the
    stale max would overflow), then rise by ~3 (within the lazy-rescale slack: P above 1 against a stale max), then
    fall by ~150: forward and gradients against the float64 oracle."""
    torch.manual_seed(3)
    Sk, D = 1536, 16
    level = torch.cat([torch.zeros(512), torch.full((512,), 100.0), torch.full((256,), 103.0),
                       torch.full((256,), -50.0)])  # (Sk,) target scores of each key tile
    q = torch.zeros(1, 2, 64, D)
    q[..., 0] = 1.0
    q[..., 1:] = 0.1 * torch.randn(1, 2, 64, D - 1)
    k = 0.3 * torch.randn(1, 2, Sk, D)
    k[..., 0] = (level + torch.randn(Sk)) * D ** 0.5  # score_j ~ level_j (+ small terms)
    v = torch.randn(1, 2, Sk, D)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    _assert_fwd_bwd_rule(out, q, k, v, dtype, scale=D ** -0.5)


def _padding_bias(kind, dtype):
    """(B=2, 1, 1, Sk=300) masks of one row per batch; batch 1 ends at key 181 (the rest -inf or False): odd, so
    the matrix-unit kernels' even tiles reach one key into the padding."""
    keep = torch.arange(300).view(1, 300) < torch.tensor([300, 181]).view(2, 1)  # (B, Sk), True = attend
    if kind == "bool":  # zero on every computed key: the kernels drop the bias
        return keep.view(2, 1, 1, 300)
    if kind == "all_visible":
        return torch.ones(2, 1, 1, 300, dtype=torch.bool)
    bias = torch.zeros(2, 300).masked_fill(~keep, float("-inf"))
    if kind == "last_visible":  # nonzero only on batch 1's last visible key: an off-by-one drops it
        bias[1, 180] = 3.0
    elif kind == "first":
        bias[0, 0] = -2.0
    elif kind == "left":  # left padding: -inf before the keys, nothing to skip at the end
        bias[1] = bias[1].flip(0)
    return bias.to(dtype).view(2, 1, 1, 300)


@pytest.mark.parametrize("kind", ["bool", "all_visible", "last_visible", "first", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_key_padding_bias_is_dropped_only_where_zero(kind, dtype):
    """A key-padding bias that is 0 on every key the kernels compute (its -inf tail skipped) is dropped
    (csrc/cpu/key_end.cpp: skip_key_padding); one that is nonzero anywhere there, even on the last visible key, or
    whose -inf keys lead, is kept. Forward and gradients against the float64 oracle."""
    torch.manual_seed(11)
    q, k, v = _qkv(2, 2, 2, 70, 300, 32, dtype=dtype)
    mask = _padding_bias(kind, dtype)
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    _assert_fwd_bwd_rule(out, q, k, v, dtype, scale=32 ** -0.5, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_query_rows_expanded_or_overlapping(dtype):
    """Query rows that are one row expanded (stride 0) or overlap (row stride 8 < D = 64): the matrix-unit forward
    copies them rather than hand the product a leading dimension below the row length (fwd_lowp.cpp, q_direct).
    Forward against the float64 oracle."""
    torch.manual_seed(4)
    k, v = torch.randn(1, 2, 100, 64).to(dtype), torch.randn(1, 2, 100, 64).to(dtype)
    base = torch.randn(4000).to(dtype)
    for q in (torch.randn(1, 2, 1, 64).to(dtype).expand(1, 2, 130, 64),  # (B, H, 1, D) -> (B, H, Sq, D), stride 0
              base.as_strided((1, 2, 130, 64), (0, 2000, 8, 1))):  # rows 8 elements apart
        out = fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
        ref = oracle_attention(q, k, v, scale=64 ** -0.5)
        assert_rule("out", out, ref, oracle_attention(q, k, v, scale=64 ** -0.5, dtype=dtype), dtype)


# (B, Hkv, G, Sq, Sk, D, Dv, (B, S, H, D) layout, mask, (window_left, window_right, bottom_right), softcap, fp32
# out); mask (_packed_gqa_mask): "pad" key padding, "causal" transformers' bottom-right causal mask with key padding
# (read as a band), "rows" one random mask for every head, "heads" one per head, "head_pad" key padding per head,
# "runs" per head and row -inf runs long enough to be read as key ranges. Packed but the last.
_PACKED_GQA = [(1, 2, 4, 1, 300, 64, 64, True, None, (-1, -1, False), 0.0, False),  # one token, in place
               (2, 1, 8, 16, 513, 128, 128, True, "pad", (-1, -1, False), 0.0, False),  # 128 rows; copied
               (1, 3, 2, 5, 65, 40, 24, True, None, (-1, -1, False), 5.0, False),
               (2, 2, 3, 13, 1030, 72, 72, False, "pad", (-1, -1, False), 0.0, True),
               (1, 2, 4, 2, 7, 8, 8, False, None, (-1, -1, False), 0.0, False),
               (2, 2, 4, 4, 300, 64, 64, True, "causal", (-1, -1, False), 0.0, False),  # speculative steps
               (1, 1, 12, 7, 300, 64, 64, True, "causal", (-1, -1, False), 0.0, False),  # 84 rows: 64-row tiles
               (1, 1, 8, 16, 513, 128, 128, False, None, (-1, 0, True), 0.0, False),  # 128 rows, 16 tokens
               (2, 2, 3, 5, 1030, 72, 40, True, "pad", (100, 0, True), 3.0, True),  # sliding window
               (1, 2, 5, 7, 65, 32, 32, False, None, (-1, 0, False), 0.0, False),  # top-left causal
               (1, 2, 2, 13, 40, 16, 16, True, None, (2, 3, False), 0.0, False),  # a band about the diagonal
               (1, 2, 4, 9, 5, 64, 64, False, None, (-1, 0, True), 0.0, False),  # Sq > Sk: rows with no key
               (2, 2, 4, 3, 300, 64, 64, True, "rows", (-1, -1, False), 0.0, False),  # tree-attention masks
               (1, 1, 12, 7, 520, 48, 48, False, "rows", (-1, 0, True), 2.0, True),
               (2, 2, 3, 5, 200, 64, 32, True, "heads", (-1, -1, False), 0.0, False),
               (1, 2, 8, 9, 700, 128, 128, False, "head_pad", (-1, -1, False), 0.0, False),
               (2, 1, 6, 11, 700, 64, 64, True, "runs", (-1, -1, False), 0.0, False),
               (1, 2, 4, 40, 600, 64, 64, True, "causal", (-1, -1, False), 0.0, False),  # 160 rows: three tiles
               (2, 1, 3, 63, 130, 128, 96, False, "heads", (-1, -1, False), 0.0, False),  # 63 tokens, the bound
               (1, 2, 2, 33, 300, 64, 64, False, None, (64, 0, True), 0.0, True),
               (1, 2, 2, 64, 200, 64, 64, False, None, (-1, 0, True), 0.0, False)]  # past the bound: not packed


def _packed_gqa_mask(kind, B, Hq, Sq, Sk, dtype):
    """_PACKED_GQA's mask kind as a float (B, 1|Hq, 1|Sq, Sk) mask of 0 and -inf, or None."""
    if kind is None:
        return None
    shape = {"pad": (B, 1, 1, Sk), "causal": (B, 1, 1, Sk), "rows": (B, 1, Sq, Sk), "heads": (B, Hq, Sq, Sk),
             "head_pad": (B, Hq, 1, Sk), "runs": (B, Hq, Sq, Sk)}[kind]
    keep = torch.rand(shape) > 0.3
    j = torch.arange(Sk)
    if kind == "runs":  # keys [lo, hi) of each row: a head's range, a row's a few keys narrower
        lo = torch.randint(0, Sk // 3, (B, Hq, 1, 1)) + torch.randint(0, 16, (B, Hq, Sq, 1))
        hi = torch.randint(2 * Sk // 3, Sk + 1, (B, Hq, 1, 1)) - torch.randint(0, 16, (B, Hq, Sq, 1))
        keep = keep & (j >= lo) & (j < hi)
    if kind == "head_pad":  # each head's keys before a cut hidden, as left padding
        keep = keep & (j >= torch.randint(0, 3 * Sk // 4, (B, Hq, 1, 1)))
    keep[..., Sk - 1] = True  # every row keeps a key
    if kind == "causal":
        keep = keep & torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)  # (B, 1, 1, Sk) -> (B, 1, Sq, Sk)
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_packed_gqa_rows_are_their_own_heads(dtype, monkeypatch):
    """Calls of fewer than 64 query tokens with grouped-query heads run each KV head's G query heads as one head of
    G * Sq rows (register.cpp, pack_gqa; a row's band is its token's, params.h Visibility): in place for (B, H, S,
    D) queries and outputs, through copies for (B, S, H, D) ones. Each row's products and sums are its own head's,
    so out and lse must be the same bits, in the same layout, as the call with K and V repeated per query head
    (nothing to pack), across group sizes, lengths around the tiles, head dims, causal bands and windows, masks
    (key padding, transformers' causal mask, per row, per head), softcap and an fp32 out; out also against the
    float64 oracle. Masks whose -inf edges differ by head start a packed tile at the group's first visible key
    (mask_key_range), so there the blocks' sums may round differently, as on MKL's sgemm: lse is then compared
    within rounding. On the prefill kernel throughout (FASTATTN_CPU_FEW_ROWS=prefill): calls of up to 4 rows per KV
    head otherwise take the decode kernel (tests/test_cpu_few_rows.py), whose row groups round by their size."""
    monkeypatch.setenv("FASTATTN_CPU_FEW_ROWS", "prefill")
    torch.manual_seed(8)
    # MKL's sgemm (the fp32 engine where it timed faster) picks its kernel by shape, so there a 1-row product may
    # round unlike the same row among 4: the same bits hold on oneDNN's brgemm.
    report = fastattn.ops.cpu_matmul_report()
    exact = "brgemm" in (report[{torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]],
                         report["fp32"])
    # fp16 on bf16 pairs by default takes them from 64 rows a KV head: a packed call of G * Sq rows may take them where
    # the repeated one (Sq rows a head) keeps the fp32 tiles. With FASTATTN_CPU_FP16_PAIRS=1 (every fp16 forward on
    # pairs; test_packed_gqa_rows_on_forced_fp16_pairs) both take them and the same bits hold.
    pairs_differ = False  # one call on pairs, the other on the fp32 tiles
    if dtype == torch.float16 and report.get("fp16_forward") == "bf16_pairs":
        pairs_differ = os.environ.get("FASTATTN_CPU_FP16_PAIRS") != "1"
        exact = not pairs_differ
    for B, Hkv, G, Sq, Sk, D, Dv, bshd, kind, (wl, wr, br), softcap, out_fp32 in _PACKED_GQA:
        Hq = Hkv * G
        q = torch.randn(B, Sq, Hq, D).to(dtype).transpose(1, 2) if bshd else torch.randn(B, Hq, Sq, D).to(dtype)
        k, v = torch.randn(B, Hkv, Sk, D).to(dtype), torch.randn(B, Hkv, Sk, Dv).to(dtype)
        mask = _packed_gqa_mask(kind, B, Hq, Sq, Sk, dtype)
        bias = None if mask is None else mask.expand(B, Hq, Sq, Sk)  # (B, 1|Hq, 1|Sq, Sk) -> (B, Hq, Sq, Sk)
        rest = (None, None, 0, 0, D ** -0.5, wl, wr, br, softcap, None, 0.0, 0, 0, False, None, None, out_fp32, 0)
        out, lse = torch.ops.fastattn.fwd(q, k, v, bias, *rest)
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hkv, Sk, .) -> (B, Hq, Sk, .)
        out_mha, lse_mha = torch.ops.fastattn.fwd(q, kr, vr, bias, *rest)
        case = (B, Hkv, G, Sq, Sk, D, Dv, bshd, kind, (wl, wr, br), softcap, out_fp32)
        assert out.stride() == out_mha.stride(), case
        # fp32 score tiles of short query runs take sgemm on K's rows on some CPUs (csrc/cpu/blas.cpp,
        # scores_on_rows), decided by each call's rows per head: G * Sq packed, Sq repeated.
        rows = dtype == torch.float32 and any(fastattn.ops._C.cpu_scores_on_rows(n, Sk, D) for n in (Sq, G * Sq))
        if pairs_differ:  # pairs drop lo * lo (under 2^-18 of each product): scores, and lse, differ by ~1e-4
            torch.testing.assert_close(lse, lse_mha, rtol=0, atol=1e-3, msg=str(case))
        # (runs: the rows share tiles from the first key any sees)
        elif not exact or rows or kind in ("head_pad", "runs"):
            torch.testing.assert_close(lse, lse_mha, msg=str(case))
        else:
            assert torch.equal(out, out_mha) and torch.equal(lse, lse_mha), case
        kw = dict(scale=D ** -0.5, mask=bias, softcap=softcap, window=(wl, wr), bottom_right=br)
        assert_rule("out", out.to(dtype), oracle_attention(q, k, v, **kw),
                    oracle_attention(q, k, v, dtype=dtype, **kw), dtype)


def test_packed_gqa_rows_on_forced_fp16_pairs():
    """The packed-rows check in fp16 with every fp16 forward on bf16 pairs (FASTATTN_CPU_FP16_PAIRS=1, a fresh
    process): a packed row's products and sums are its own head's there too, the same bits as the repeated call."""
    r = run_on_forced_fp16_pairs("-x", "tests/test_cpu_kernels.py::test_packed_gqa_rows_are_their_own_heads[fp16]",
                                 timeout=600)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:]


@pytest.mark.parametrize("level", [1e4, 1e10], ids=["1e4", "1e10"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_scores_subtract_the_max_first(dtype, level):
    """Rows whose scores spread over ~`level` (one key far ahead: a saturated, one-hot row). The kernels form exp's
    argument with the row max subtracted first, as PyTorch's softmax (csrc/cpu/vec512.h, exact_arg), so the max
    key gets P = 1 exactly and lse = m. The fused fma(s, log2 e, -m log2 e) rounds m * log2(e): at 1e4 fp32 lse and
    dV were ~1e-3 off (torch: 5e-8), and from ~1e9 every row came out NaN. Forward, lse and dV of the prefill
    kernels (64 rows over 300 keys: several key tiles, the lazy rescaling), and the split-KV decode kernel with its
    three key splits merged by their lse, against the float64 oracle. dQ and dK of a one-hot row are 0 in the
    oracle; the kernels' are the rounding of delta = rowsum(dO * O) against dP (every FlashAttention backward's):
    only checked finite. (fp16 cannot hold such scores: its naive baseline overflows.)"""
    torch.manual_seed(5)
    D, Sk, scale = 16, 300, 0.25
    c = math.sqrt(level / 4)  # q = c everywhere, k_j = c * u_j: score_j = c^2 * u_j * D * scale = level * u_j
    q = torch.full((1, 2, 64, D), c)
    k = c * torch.randn(1, 2, Sk, 1).expand(1, 2, Sk, D)
    v = torch.randn(1, 2, Sk, D)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse, _ = fastattn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), return_attn_probs=True,
                                           backend="cpu")  # (B, H, S, D) -> (B, S, H, D) views
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = {}
    for prec in (torch.float64, dtype):
        leaves = [t.detach().to(prec).requires_grad_() for t in (q, k, v)]
        o = oracle_attention(*leaves, scale=scale, dtype=prec).transpose(1, 2)  # (B, H, S, D) -> (B, S, H, D)
        ref[prec] = (o, torch.autograd.grad(o, leaves[2], dout.to(prec))[0],
                     lse_reference(q.detach(), k.detach(), scale, (-1, -1), 0.0, None, dtype=prec))
    for i, (name, got) in enumerate((("out", out), ("dv", grads[2]), ("lse", lse))):
        assert_rule(name, got, ref[torch.float64][i], ref[dtype][i], dtype)
    assert all(g.isfinite().all() for g in grads[:2]), "dq / dk not finite"
    # Decode: one query token against the cache (B, Sk, H, D), keys split in three.
    q1, kc, vc = q.detach()[:, :, :1].transpose(1, 2), k.detach().transpose(1, 2), v.detach().transpose(1, 2)
    out1, lse1 = fastattn.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=Sk, num_splits=3, return_softmax_lse=True,
                                                  backend="cpu")
    for prec in (torch.float64, dtype):
        o = oracle_attention(q1.transpose(1, 2), k.detach(), v.detach(), scale=scale, dtype=prec).transpose(1, 2)
        ref[prec] = (o, lse_reference(q1.transpose(1, 2), k.detach(), scale, (-1, -1), 0.0, None, dtype=prec))
    assert_rule("decode out", out1, ref[torch.float64][0], ref[dtype][0], dtype)
    assert_rule("decode lse", lse1, ref[torch.float64][1], ref[dtype][1], dtype)


@pytest.mark.skipif(ops.cpu_matmul_report().get("avx512") == "0",
                    reason="no AVX-512 on this CPU: the fused argument and its plant live in the AVX-512 rows "
                           "(csrc/cpu/vec512.h); the AVX2 rows always subtract the max first")
def test_large_scores_check_catches_the_fused_form():
    """FASTATTN_CPU_PLANT=fused_arg gives every row the fused argument (csrc/cpu/vec512.h, exact_arg): the
    large-score test above must fail where the exact form matters (fp32 at 1e4: lse and dV; 1e10: NaN rows)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTATTN_CPU_PLANT="fused_arg")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "test_large_scores_subtract_the_max_first and fp32"], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert "2 failed" in r.stdout, r.stdout[-3000:]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_heads_sharing_a_mask_run_as_their_own(dtype, threads, monkeypatch):
    """A full mask shared by every query head ((B, 1, Sq, Sk); fwd.cpp fwd_chunk_heads, taken on AMD CPUs and here
    on any, FASTATTN_CPU_HEAD_CHUNKS=1) runs a chunk of heads through each key tile in turn, each with its own K/V
    packs, so the tile's mask rows stay in cache. Each head's tiles and their order are those of a head alone, so out
    and lse must be the same bits as with the mask repeated per head (which runs heads one by one): MHA and
    grouped-query heads, lengths off the tiles, a float mask, one with -inf edges (read per row, shared by the
    heads), dropout; out also against the float64 oracle."""
    monkeypatch.setenv("FASTATTN_CPU_HEAD_CHUNKS", "1")
    torch.manual_seed(11)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, Hq, Hkv, Sq, Sk, D, edges, dropout_p in [(1, 8, 8, 300, 700, 64, False, 0.0),
                                                        (2, 8, 2, 130, 1100, 32, False, 0.0),
                                                        (1, 6, 3, 257, 513, 80, True, 0.0),
                                                        (2, 4, 1, 200, 600, 16, True, 0.0),
                                                        (1, 16, 4, 150, 400, 32, False, 0.0),
                                                        (1, 8, 4, 140, 520, 64, False, 0.2)]:
            q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype=dtype, grad=False)
            mask = torch.randn(B, 1, Sq, Sk)
            if edges:  # each row sees keys [lo, hi): the bias's -inf edges bound its tiles
                j = torch.arange(Sk)
                lo = torch.randint(0, Sk // 3, (B, 1, Sq, 1))
                mask = mask.masked_fill((j < lo) | (j >= lo + Sk // 2), float("-inf"))
            mask = mask.to(dtype)
            args = (None, None, 0, 0, D ** -0.5, -1, -1, False, 0.0, None, dropout_p, 5, 0, False)
            shared = mask.expand(B, Hq, Sq, Sk)  # (B, 1, Sq, Sk) -> (B, Hq, Sq, Sk), head stride 0
            out, lse = torch.ops.fastattn.fwd(q, k, v, shared, *args)
            per_head = mask.repeat(1, Hq, 1, 1)  # (B, 1, Sq, Sk) -> (B, Hq, Sq, Sk), a copy per head
            out_1, lse_1 = torch.ops.fastattn.fwd(q, k, v, per_head, *args)
            case = (dtype, threads, B, Hq, Hkv, Sq, Sk, D, edges, dropout_p)
            assert torch.equal(out, out_1) and torch.equal(lse, lse_1), case
            if dropout_p == 0.0:
                assert_rule("out", out, oracle_attention(q, k, v, scale=D ** -0.5, mask=mask),
                            oracle_attention(q, k, v, dtype=dtype, scale=D ** -0.5, mask=mask), dtype)
    finally:
        torch.set_num_threads(prev)
