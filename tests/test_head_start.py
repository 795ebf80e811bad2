"""head_start (issue #15): a call holding query heads [h0, h0 + k) of a larger call, made with head_start = h0, drops
exactly the elements the larger call drops on those heads (the dropout key is the global head head_start + h), so
its out, lse and dq/dk/dv are those heads of the larger call, bit for bit. Checked on every kernel that runs here:
the CPU kernels (fp32, and bf16/fp16 through both tile paths), the Triton kernels (interpreter, fp16/fp32: the
interpreter's bf16 tl.dot is wrong; block calls only, since without block coordinates Triton refuses head_start with
dropout), the CUDA kernels on the CPU emulator (against the CPU kernels' mask), and the block API. The keep mask is
pinned to the Philox oracle (tests/support/philox.py) at the global head. The reference backend (torch's RNG) and
sdpa refuse dropout with head_start through the dispatcher's reasons; without dropout head_start changes nothing.
Each equality is paired with a control: the same slice with head_start = 0 must differ, so the checks can fail."""
import pytest
import torch

import fastattn
from fastattn import blocks
from fastattn.dispatch import BackendUnavailableError, explain_params
from fastattn.params import AttnParams, InputTypeError, InputValueError
from support.philox import keep_mask

CPU_OK = not fastattn.get_backend("cpu").unavailable()
needs_cpu = pytest.mark.skipif(not CPU_OK, reason="fastattn._C (the CPU kernels) not built")
SEED, OFFSET, P = 4321, 17, 0.3
ALL = ("out", "lse", "dq", "dk", "dv")


def _i32(n, x):
    return torch.full((n,), x, dtype=torch.int32)


def _inputs(B, H, Hkv, Sq, Sk, D, dtype, identity_v=False):
    q, k = torch.randn(B, H, Sq, D).to(dtype), torch.randn(B, Hkv, Sk, D).to(dtype)
    v = (torch.eye(Sk).expand(B, Hkv, Sk, Sk) if identity_v else torch.randn(B, Hkv, Sk, D)).to(dtype).contiguous()
    dout = torch.randn(B, H, Sq, v.shape[-1]).to(dtype)
    return q, k, v, dout


def _heads(q, k, v, dout, h0, n):
    """Query heads [h0, h0 + n) with their K/V heads (h0 and n multiples of the GQA group)."""
    g = q.shape[1] // k.shape[1]
    assert h0 % g == 0 and n % g == 0
    kv = slice(h0 // g, (h0 + n) // g)
    return q[:, h0:h0 + n], k[:, kv], v[:, kv], dout[:, h0:h0 + n]


def _assert_slice(full, part, h0, n, g, names=ALL):
    """Every result of the sliced call equals those heads of the full call, bit for bit."""
    for name, f, x in zip(names, full, part):
        if name == "-":
            continue
        want = f[:, h0 // g:(h0 + n) // g] if name in ("dk", "dv") else f[:, h0:h0 + n]
        assert torch.equal(x, want), f"{name}: max diff {float((x.float() - want.float()).abs().max())}"


def _assert_differs(full, part, h0, n):
    assert not torch.equal(part[0], full[0][:, h0:h0 + n]), "head_start has no effect: the check cannot fail"


# ------------------------------------------------------------------------------------------------- CPU kernels
def _cpu(q, k, v, dout, *, block, head_start, wl=-1, wr=-1, starts=(5, 0)):
    """fastattn::fwd, then bwd (plain call) or bwd_acc (block call at positions `starts`): (out, lse, dq, dk, dv)."""
    B, scale = q.shape[0], q.shape[-1] ** -0.5
    qs, ks = (_i32(B, starts[0]), _i32(B, starts[1])) if block else (None, None)
    out, lse = torch.ops.fastattn.fwd(q, k, v, None, None, None, 0, 0, scale, wl, wr, False, 0.0, None, P, SEED,
                                      OFFSET, False, qs, ks, block, head_start)
    out = out.to(q.dtype)
    if not block:
        grads = torch.ops.fastattn.bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, scale, wl, wr, False, 0.0,
                                       None, P, SEED, OFFSET, False, None, None, head_start)
    else:
        grads = [torch.zeros(t.shape) for t in (q, k, v)]
        torch.ops.fastattn.bwd_acc(dout, q, k, v, out, lse, None, None, None, 0, 0, scale, wl, wr, False, 0.0, None,
                                   P, SEED, OFFSET, False, qs, ks, *grads, head_start)
    return (out, lse) + tuple(grads)


@pytest.fixture
def tile_path(request):
    """bf16/fp16 tiles on the matrix units where this CPU has them ("native") or forced through fp32 sgemm: the
    two kernel families (fwd_lowp/bwd_lowp and fwd/bwd) key dropout in different lines."""
    fastattn.ops._C.cpu_matmul_force_fp32(request.param == "fp32-tiles")
    yield request.param
    fastattn.ops._C.cpu_matmul_force_fp32(False)


@needs_cpu
@pytest.mark.parametrize("tile_path", ["native", "fp32-tiles"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", [False, True], ids=["plain", "block"])
@pytest.mark.parametrize("H,Hkv,h0,n", [(4, 4, 1, 2), (6, 3, 2, 4)], ids=["mha", "gqa"])
def test_cpu_head_slice_equals_full_call(tile_path, dtype, block, H, Hkv, h0, n):
    if dtype == torch.float32 and tile_path == "fp32-tiles":
        pytest.skip("fp32 has one tile path")
    q, k, v, dout = _inputs(2, H, Hkv, 37, 45, 16, dtype)
    kw = dict(block=block, wl=20, wr=3)
    full = _cpu(q, k, v, dout, head_start=0, **kw)
    part = _cpu(*_heads(q, k, v, dout, h0, n), head_start=h0, **kw)
    _assert_slice(full, part, h0, n, H // Hkv)
    _assert_differs(full, _cpu(*_heads(q, k, v, dout, h0, n), head_start=0, **kw), h0, n)


@needs_cpu
@pytest.mark.parametrize("block", [False, True], ids=["plain", "block"])
def test_cpu_mask_is_the_philox_oracle_at_the_global_head(block):
    """v = identity exposes the keep mask (out = P * keep / (1 - p)): head h of a call with head_start = 5 drops
    what the Philox oracle drops for head 5 + h (at positions 5 + i, j for the block call)."""
    B, H, Sq, Sk, h0 = 2, 2, 9, 11, 5
    q, k, v, dout = _inputs(B, H, H, Sq, Sk, 8, torch.float32, identity_v=True)
    out = _cpu(q * 0.1, k, v, dout, block=block, head_start=h0)[0]
    for b in range(B):
        for h in range(H):
            want = keep_mask(SEED, OFFSET, P, b, h0 + h, Sq, Sk, q0=5 if block else 0)
            assert torch.equal(out[b, h] != 0, want), (b, h)


@needs_cpu
@pytest.mark.parametrize("head_start,match", [(-1, "head_start must be >= 0"), (2 ** 31 - 1, r"<= 2\^31")])
def test_cpu_op_checks_head_start(head_start, match):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.fwd(q, q, q, None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, None, 0.1, 1, 2, False,
                               None, None, False, head_start)
    out, lse = torch.ops.fastattn.fwd(q, q, q, None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, None, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.bwd(q, q, q, q, out, lse, None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, None, 0.1, 1,
                               2, False, None, None, head_start)
    acc = [torch.zeros(q.shape) for _ in range(3)]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.bwd_acc(q, q, q, q, out, lse, None, None, None, 0, 0, 1.0, -1, -1, False, 0.0, None, 0.1,
                                   1, 2, False, None, None, *acc, head_start)


@needs_cpu
def test_cpu_autograd_and_opcheck_carry_head_start():
    """The registered autograd hands head_start to bwd (else the backward regenerates another mask), and the
    schema, fake and autograd registrations agree (torch.library.opcheck)."""
    q, k, v, dout = _inputs(1, 4, 2, 12, 12, 8, torch.float32)
    *part, dpart = _heads(q, k, v, dout, 2, 2)
    leaves = [t.clone().requires_grad_() for t in part]
    args = (*leaves, None, None, None, 0, 0, 8 ** -0.5, -1, -1, False, 0.0, None, P, SEED, OFFSET, False, None, None,
            False, 2)
    out, _ = torch.ops.fastattn.fwd(*args)
    out.backward(dpart)
    full = _cpu(q, k, v, dout, block=False, head_start=0)
    got = (out.detach(), None) + tuple(t.grad for t in leaves)
    _assert_slice(full, got, 2, 2, 2, names=("out", "-", "dq", "dk", "dv"))
    torch.library.opcheck(torch.ops.fastattn.fwd.default, args, test_utils=("test_schema", "test_faketensor",
                                                                             "test_autograd_registration"))


# ------------------------------------------------------------------------------------------------- block API
@needs_cpu
def test_block_api_head_slice_and_checks():
    q, k, v, dout = _inputs(2, 4, 2, 20, 20, 16, torch.float32)
    kw = dict(q_start=3, k_start=0, causal=True, dropout_p=P, rng=(SEED, OFFSET), backend="cpu")

    def run(q, k, v, dout, **extra):
        o, l = blocks.block_forward(q, k, v, **kw, **extra)
        return (o, l) + blocks.block_backward(dout, q, k, v, o.to(q.dtype), l, **kw, **extra)
    full = run(q, k, v, dout)
    _assert_slice(full, run(*_heads(q, k, v, dout, 2, 2), head_start=2), 2, 2, 2)
    _assert_differs(full, run(*_heads(q, k, v, dout, 2, 2)), 2, 2)
    for bad, err, match in ((-2, InputValueError, "head_start must be >= 0"), (2 ** 31, InputValueError, "2\\*\\*31"),
                            (1.0, InputTypeError, "head_start must be an int"), (True, InputTypeError, "must be an int"),
                            (torch.tensor(1), InputTypeError, "must be an int")):
        with pytest.raises(err, match=match):
            blocks.block_forward(q, k, v, **kw, head_start=bad)


def test_reference_and_sdpa_refuse_dropout_with_head_start():
    """Backends whose dropout is torch's RNG cannot key it on heads: they say so (no silent fallback). Without
    dropout head_start changes nothing, so any backend takes it."""
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(BackendUnavailableError, match="dropout in a block call"):
        blocks.block_forward(q, q, q, q_start=0, k_start=0, dropout_p=0.5, rng=(1, 2), head_start=2,
                             backend="reference")
    p = AttnParams(q=q, k=q, v=q, scale=0.25, dropout_p=0.5, head_start=2)
    ex = explain_params(p, "auto")
    assert "dropout with head_start" in "; ".join(ex.refused.get("reference", []))
    assert "block not supported" in "; ".join(ex.refused["sdpa"]) and "head_start 2" in p.describe()
    if CPU_OK:
        assert ex.chosen == "cpu"
    o_full, _ = blocks.block_forward(q, q, q, q_start=0, k_start=0, backend="reference")
    o_part, _ = blocks.block_forward(q[:, 1:], q[:, 1:], q[:, 1:], q_start=0, k_start=0, head_start=1,
                                     backend="reference")
    assert torch.equal(o_part, o_full[:, 1:])


# ------------------------------------------------------------------------------------------------- Triton
TRITON = fastattn.get_backend("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_op():
    if TRITON.unavailable() or DEV not in TRITON.devices:
        pytest.skip(f"triton backend unavailable here: {TRITON.unavailable()}")
    from fastattn.backends.triton.kernels import op
    return op


def _triton(op, q, k, v, dout, head_start):
    B, scale = q.shape[0], q.shape[-1] ** -0.5
    qs, ks = _i32(B, 7).to(DEV), _i32(B, 2).to(DEV)
    out, lse = op.launch_fwd(q, k, v, None, None, None, 0, 0, scale, 12, 0, False, 0.0, None, P, SEED, OFFSET, qs,
                             ks, True, head_start)
    out = out.to(q.dtype)
    grads = [torch.zeros(t.shape, device=DEV) for t in (q, k, v)]
    torch.ops.fastattn.triton_bwd_acc(dout, q, k, v, out, lse, None, None, None, 0, 0, scale, 12, 0, False, 0.0,
                                      None, P, SEED, OFFSET, False, qs, ks, *grads, head_start)
    return (out, lse) + tuple(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_head_slice_equals_full_call(triton_op, dtype):
    """GQA (4 query heads on 2 K/V heads, B = 2): heads [2, 4) with head_start = 2 are heads 2, 3 of the full call."""
    q, k, v, dout = (t.to(DEV) for t in _inputs(2, 4, 2, 24, 20, 16, dtype))
    full = _triton(triton_op, q, k, v, dout, 0)
    part = _triton(triton_op, *_heads(q, k, v, dout, 2, 2), 2)
    _assert_slice(full, part, 2, 2, 2)
    _assert_differs(full, _triton(triton_op, *_heads(q, k, v, dout, 2, 2), 0), 2, 2)


def test_triton_refuses_head_start_with_dropout_outside_blocks(triton_op):
    q = torch.randn(1, 2, 16, 16, device=DEV)
    with pytest.raises(InputValueError, match="needs block coordinates"):
        triton_op.launch_fwd(q, q, q, None, None, None, 0, 0, 0.25, -1, -1, False, 0.0, None, 0.2, 1, 2, None, None,
                             False, 1)
    with pytest.raises(InputValueError, match="head_start must be an int >= 0"):
        triton_op.launch_fwd(q, q, q, None, None, None, 0, 0, 0.25, -1, -1, False, 0.0, None, 0.0, 1, 2, None, None,
                             False, -1)
    p = AttnParams(q=q, k=q, v=q, scale=0.25, dropout_p=0.5, head_start=1)
    assert any("dropout with head_start outside a block call" in r for r in TRITON.reasons(p))
    triton_op.launch_fwd(q, q, q, None, None, None, 0, 0, 0.25, -1, -1, False, 0.0, None, 0.0, 1, 2, None, None,
                         False, 1)  # no dropout: head_start is harmless


# ------------------------------------------------------------------------------------------------- CUDA (emulated)
from support.cuda_emu import needs_cuda_headers  # noqa: E402


def _emu(q, k, v, dout, head_start, block):
    from support.cuda_emu import emu
    B, scale = q.shape[0], q.shape[-1] ** -0.5
    qs, ks = (_i32(B, 6), _i32(B, 3)) if block else (None, None)  # k_start % 4: per-element draws
    out, lse = emu().fwd(q, k, v, None, None, 0, 0, scale, -1, 0, False, P, SEED, OFFSET, qs, ks, False,
                         head_start=head_start)
    grads = emu().bwd(dout, q, k, v, out, lse, None, None, 0, 0, scale, -1, 0, False, P, SEED, OFFSET, qs, ks,
                      head_start=head_start)
    return (out, lse) + tuple(grads)


@needs_cuda_headers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [False, True], ids=["plain", "block"])
def test_cuda_emulated_head_slice_equals_full_call(dtype, block):
    """The CUDA kernels (CPU emulator): heads [2, 4) of a GQA call (4 on 2 K/V heads) with head_start = 2 equal heads
    2, 3 of the full call, and drop what the CPU kernels drop there (v = identity exposes the mask)."""
    q, k, v, dout = _inputs(1, 4, 2, 33, 40, 32, dtype)
    full = _emu(q, k, v, dout, 0, block)
    part = _emu(*_heads(q, k, v, dout, 2, 2), 2, block)
    _assert_slice(full, part, 2, 2, 2)
    _assert_differs(full, _emu(*_heads(q, k, v, dout, 2, 2), 0, block), 2, 2)
    if CPU_OK:
        qi, ki, vi, di = _inputs(1, 4, 2, 33, 40, 32, dtype, identity_v=True)
        qi = qi * 0.1  # no probability underflows to 0: out != 0 is exactly the keep mask
        got = _emu(*_heads(qi, ki, vi, di, 2, 2), 2, block)[0] != 0
        want = _cpu(qi, ki, vi, di, block=block, head_start=0, wr=0, starts=(6, 3))[0][:, 2:] != 0
        assert torch.equal(got, want), f"{int((got != want).sum())} keep decisions differ from the CPU kernels"
