"""torch.ops.fastattn.* called directly (no Python validation, as under torch.compile) with bad indices and
out-of-range scalars: each op must refuse with a RuntimeError naming the argument, never read or write outside its
tensors. The calls run in a child process, so a crash (SIGSEGV, SIGABRT from a corrupted heap) fails the cases it
reached instead of killing the test run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastattn
from fastattn import ops

pytestmark = pytest.mark.skipif(not ops.loaded(), reason=f"C++ extension not loaded ({ops.LOAD_ERROR})")

# The child imports the package this process imported (the checkout, or the sanitized copy of tests/asan).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))

# name -> (op call as Python source over the names defined in _PRELUDE, words the error must contain).
# fwd(...) / bwd(...) / dec(...) fill every other argument with a valid default.
CASES = {
    # fastattn::fwd, varlen: q/k/v (1, 2, 10, 8), valid cu = [0, 4, 10]
    "fwd_cu_q_first_negative": ("fwd(cu_q=T(-3, 4, 10))", "cu_seqlens_q[0] must be 0"),
    "fwd_cu_q_first_positive": ("fwd(cu_q=T(2, 4, 10))", "cu_seqlens_q[0] must be 0"),
    # lengths 6 and 7 fit max_seqlen 7: only the first-value check stands between this call and row -3 of q
    "fwd_cu_q_first_negative_consistent": ("fwd(cu_q=T(-3, 3, 10), mq=7)", "cu_seqlens_q[0] must be 0"),
    "fwd_cu_k_first_negative": ("fwd(cu_k=T(-100000, 4, 10))", "cu_seqlens_k[0] must be 0"),
    "fwd_cu_q_decreasing": ("fwd(cu_q=T(0, 8, 4, 10), cu_k=T(0, 2, 4, 10))", "non-decreasing"),
    "fwd_cu_k_decreasing": ("fwd(cu_q=T(0, 2, 4, 10), cu_k=T(0, 8, 4, 10))", "cu_seqlens_k must be non-decreasing"),
    "fwd_cu_q_past_end": ("fwd(cu_q=T(0, 4, 1000000))", "cu_seqlens_q[-1] = 1000000 must equal the packed"),
    "fwd_cu_k_short_of_end": ("fwd(cu_k=T(0, 4, 9))", "cu_seqlens_k[-1] = 9 must equal the packed length 10"),
    "fwd_cu_huge_middle": ("fwd(cu_q=T(0, 2**31 - 1, 10))", "non-decreasing"),
    "fwd_cu_strided": ("fwd(cu_q=T(0, 0, 4, 4, 10)[::2])", "cu_seqlens_q must be contiguous"),
    "fwd_cu_int64": ("fwd(cu_k=torch.tensor([0, 4, 10]))", "cu_seqlens_k must be int32"),
    "fwd_cu_2d": ("fwd(cu_q=T(0, 4, 10).view(1, 3))", "cu_seqlens_q must be 1-D"),
    "fwd_cu_lengths_differ": ("fwd(cu_q=T(0, 10), cu_k=T(0, 4, 10))", "same length"),
    "fwd_cu_only_q": ("fwd(cu_q=T(0, 4, 10), cu_k=None)", "given together"),
    "fwd_max_seqlen_q_short": ("fwd(mq=5)", "max_seqlen_q = 5 is smaller than the longest sequence (6)"),
    "fwd_max_seqlen_k_negative": ("fwd(mk=-1)", "max_seqlen_k = -1 is smaller"),
    "fwd_alibi_batch_wrong": ("fwd(alibi=torch.ones(5, 2))", "alibi_slopes (B, Hq) must have B = 2"),
    "fwd_alibi_strided": ("fwd(alibi=torch.ones(2, 4)[:, ::2])", "alibi_slopes must be contiguous"),
    "fwd_alibi_heads_wrong": ("fwd(alibi=torch.ones(3))", "alibi_slopes must have shape"),
    "fwd_alibi_fp64": ("fwd(alibi=torch.ones(2, dtype=torch.float64))", "alibi_slopes must be float32"),
    "fwd_window_left_below_minus_one": ("fwd(wl=-2)", "window_left must be >= -1"),
    "fwd_window_right_very_negative": ("fwd(wr=-2**62)", "window_right must be >= -1"),
    "fwd_softcap_nan": ("fwd(softcap=float('nan'))", "softcap must be finite"),
    "fwd_softcap_inf": ("fwd(softcap=float('inf'))", "softcap must be finite"),
    "fwd_softcap_negative": ("fwd(softcap=-1.0)", "softcap must be finite and >= 0"),
    "fwd_dropout_one": ("fwd(dropout=1.0)", "dropout_p must be in [0, 1)"),
    "fwd_dropout_nan": ("fwd(dropout=float('nan'))", "dropout_p must be in [0, 1)"),
    "fwd_dropout_rounds_to_one": ("fwd(dropout=1 - 1e-9)", "rounds to 1 in float32"),
    "fwd_bias_wrong_shape": ("fwd(bias=torch.zeros(1, 2, 10, 9))", "attn_bias must be expanded"),
    "fwd_kv_heads_zero": ("fwd(k=torch.randn(1, 0, 10, 8), v=torch.randn(1, 0, 10, 8))", "multiple of kv heads"),
    # fastattn::bwd: the same checks, and the extra tensors
    "bwd_cu_q_first_negative": ("bwd(cu_q=T(-3, 4, 10))", "cu_seqlens_q[0] must be 0"),
    "bwd_cu_k_past_end": ("bwd(cu_k=T(0, 4, 99))", "cu_seqlens_k[-1] = 99"),
    "bwd_max_seqlen_k_short": ("bwd(mk=1)", "max_seqlen_k = 1 is smaller"),
    "bwd_lse_short": ("bwd(lse=torch.zeros(1, 2, 9))", "lse must be float32 (B, Hq, Sq)"),
    "bwd_dout_short": ("bwd(dout=torch.zeros(1, 2, 9, 8))", "dout must be (B, Hq, Sq, Dv)"),
    "bwd_window_below_minus_one": ("bwd(wl=-7)", "window_left must be >= -1"),
    # fastattn::decode_fwd: q (2, 4, 1, 16), caches (2, 8, 2, 16) or paged (3, 4, 2, 16)
    "decode_seqlens_past_capacity": ("dec(lens=T(9, 1))", "seqlens_k[0] = 9 outside [0, 8]"),
    "decode_seqlens_negative": ("dec(lens=T(3, -1))", "seqlens_k[1] = -1"),
    "decode_seqlens_huge": ("dec(lens=T(2**31 - 1, 1))", "seqlens_k[0]"),
    "decode_seqlens_wrong_batch": ("dec(lens=T(1, 1, 1))", "seqlens_k"),
    "decode_block_table_past_blocks": ("dec(paged=True, bt=T(0, 3, 1, 2).view(2, 2), lens=T(8, 8))",
                                       "block_table[0, 1] = 3 outside [0, 3)"),
    "decode_block_table_minus_one_used": ("dec(paged=True, bt=T(-1, 1, 1, 2).view(2, 2), lens=T(1, 8))",
                                          "block_table[0, 0] = -1"),
    "decode_block_table_wrong_batch": ("dec(paged=True, bt=T(0, 1), lens=T(1, 1))", "block_table"),
    "decode_batch_idx_past_rows": ("dec(bidx=T(0, 2))", "cache_batch_idx[1] = 2 outside [0, 2)"),
    "decode_batch_idx_negative": ("dec(bidx=T(-1, 0))", "cache_batch_idx[0] = -1"),
    "decode_softcap_nan": ("dec(softcap=float('nan'))", "softcap must be finite"),
    "decode_num_splits_negative": ("dec(splits=-1)", "num_splits"),
    # head dims of zero reach no GEMM (oneDNN asked for 80 GiB); one argument on `meta` reaches no fake function
    # that would hand back uninitialised outputs; gradients the ops cannot give are refused, not left None
    "fwd_head_dim_zero": ("fwd(q=torch.randn(1, 2, 10, 0), k=torch.randn(1, 2, 10, 0))", "head dim must be positive"),
    "bwd_value_head_dim_zero": ("bwd(v=torch.randn(1, 2, 10, 0))", "value head dim must be positive"),
    "fwd_bias_on_meta": ("fwd(bias=torch.zeros(1, 2, 10, 10, device='meta'))", "attn_bias is on meta"),
    "fwd_alibi_on_meta": ("fwd(alibi=torch.ones(2, device='meta'))", "alibi_slopes is on meta"),
    "decode_seqlens_on_meta": ("dec(lens=T(3, 8).to('meta'))", "seqlens_k is on meta"),
    "fwd_bias_requires_grad": ("fwd(cu_q=None, cu_k=None, bias=torch.zeros(1, 2, 10, 10, requires_grad=True))",
                               "no gradient for attn_bias"),
    "fwd_alibi_requires_grad": ("fwd(alibi=torch.ones(2, requires_grad=True))", "no gradient for alibi_slopes"),
    "decode_backward": ("dec(grad=True)[0].sum().backward()", "derivative for fastattn::decode_fwd is not implemented"),
}

_PRELUDE = textwrap.dedent("""
    import json, sys, torch
    import fastattn.ops  # registers torch.ops.fastattn.*
    torch.manual_seed(0)
    T = lambda *x: torch.tensor(x, dtype=torch.int32)
    Q = torch.randn(1, 2, 10, 8)
    CU = T(0, 4, 10)

    def fwd(q=Q, k=Q, v=Q, bias=None, cu_q=CU, cu_k=CU, mq=6, mk=6, wl=-1, wr=-1, softcap=0.0, alibi=None,
            dropout=0.0):
        if cu_k is None:
            cu_k, cu_q = cu_q, None
        return torch.ops.fastattn.fwd(q, k, v, bias, cu_q, cu_k, mq, mk, 0.3, wl, wr, True, softcap, alibi,
                                      dropout, 0, 0, False)

    def bwd(cu_q=CU, cu_k=CU, mq=6, mk=6, wl=-1, lse=None, dout=None, v=Q):
        out = torch.zeros(1, 2, 10, v.shape[-1])
        lse = torch.zeros(1, 2, 10) if lse is None else lse
        dout = torch.zeros(out.shape) if dout is None else dout
        return torch.ops.fastattn.bwd(dout, Q, Q, v, out, lse, None, cu_q, cu_k, mq, mk, 0.3, wl, -1, True, 0.0,
                                      None, 0.0, 0, 0, False)

    def dec(lens=T(3, 8), paged=False, bt=None, bidx=None, softcap=0.0, splits=0, grad=False):
        q = torch.randn(2, 4, 1, 16, requires_grad=grad)
        kc = torch.randn(3, 4, 2, 16) if paged else torch.randn(2, 8, 2, 16)
        return torch.ops.fastattn.decode_fwd(q, kc, kc, lens, bt, bidx, 0.25, -1, -1, softcap, None, splits)

    for name, src in json.loads(sys.argv[1]):
        print(json.dumps({"start": name}), flush=True)
        try:
            eval(src)
            res = {"name": name, "raised": None}
        except Exception as e:  # noqa: BLE001
            res = {"name": name, "raised": type(e).__name__, "msg": str(e).splitlines()[0]}
        print(json.dumps(res), flush=True)
""")


@pytest.fixture(scope="module")
def results():
    """Runs every case in one child process; returns (results by name, the case it died in or None, stderr)."""
    todo = [(n, src) for n, (src, _) in CASES.items()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PRELUDE, json.dumps(todo)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    got, started = {}, None
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        if "start" in rec:
            started = rec["start"]
        else:
            got[rec["name"]] = rec
            started = None
    died = None if proc.returncode == 0 else (started, proc.returncode)
    return got, died, proc.stderr[-2000:]


@pytest.mark.parametrize("name", list(CASES))
def test_op_refuses_bad_argument(name, results):
    got, died, stderr = results
    if name not in got:
        where, rc = died or (None, 0)
        pytest.fail(f"the child process died (exit code {rc}) in case {where!r} before reaching {name!r}:\n{stderr}"
                    if where != name else f"{name}: the op crashed the process (exit code {rc}):\n{stderr}")
    rec = got[name]
    words = CASES[name][1]
    assert rec["raised"] == "RuntimeError", f"{name}: expected a RuntimeError naming {words!r}, got {rec}"
    assert words in rec["msg"], f"{name}: {rec['msg']!r} does not say {words!r}"


def test_empty_heads_and_huge_num_splits():
    """Calls that must not crash or allocate without bound (in a child process: a SIGFPE would end the run): no
    query heads (the CPU task order divided by Hq / Hkv), and num_splits far past the key blocks (B * splits
    overflowed int64; 2^40 asked for 512 TiB), which stops at one split per block, bit for bit that call."""
    src = textwrap.dedent("""
        import torch, fastattn
        T = lambda *x: torch.tensor(x, dtype=torch.int32)
        for dt in (torch.float32, torch.bfloat16):
            q, k = torch.randn(1, 0, 4, 8, dtype=dt), torch.randn(1, 1, 4, 8, dtype=dt)
            out, lse = torch.ops.fastattn.fwd(q, k, k, None, None, None, 0, 0, 0.3, -1, -1, False, 0.0, None,
                                              0.0, 0, 0, False)
            assert out.shape == (1, 0, 4, 8) and lse.shape == (1, 0, 4)
            o = fastattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), backend="cpu")
            assert o.shape == (1, 4, 0, 8)
        q, kc = torch.randn(2, 4, 1, 16), torch.randn(2, 300, 2, 16)
        dec = lambda s: torch.ops.fastattn.decode_fwd(q, kc, kc, T(300, 17), None, None, 0.25, -1, -1, 0.0, None, s)
        want = dec(5)  # 300 keys: five blocks of 64
        for s in (6, 2 ** 40, 2 ** 62):
            got = dec(s)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), s
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])


def test_huge_window_means_unlimited():
    """A window wider than every sequence (up to 2**63 - 1) is clamped to 'unlimited', not overflowed."""
    import torch

    q = torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    args = lambda wl, wr: (q, q, q, None, cu, cu, 6, 6, 0.3, wl, wr, True, 0.0, None, 0.0, 0, 0, False)  # noqa: E731
    want, _ = torch.ops.fastattn.fwd(*args(-1, -1))
    for wl, wr in ((2 ** 63 - 1, 2 ** 63 - 1), (2 ** 62, -1), (-1, 2 ** 40)):
        got, _ = torch.ops.fastattn.fwd(*args(wl, wr))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


_TRITON_BAD_VALUES = textwrap.dedent("""
    import torch
    from fastattn.backends.triton.kernels import decode, op  # noqa: F401  (register the triton ops)
    T = lambda *x: torch.tensor(x, dtype=torch.int32)
    q = torch.randn(1, 2, 40, 16)
    for cu_q, cu_k, mq, mk in (((-30, 10, 40), (0, 20, 40), 64, 64), ((0, 30, 10, 40), (0, 5, 30, 40), 40, 40),
                               ((0, 20, 1000), (0, 39, 2**31 - 1), 2000, 2**31 - 1), ((0, 20, 40), (0, 20, 40), 3, 2)):
        out, lse = torch.ops.fastattn.triton_fwd(q, q, q, None, T(*cu_q), T(*cu_k), mq, mk, 0.25, -1, 0, True, 0.0,
                                                 None, 0.0, 0, 0, False)
    qd, kc = torch.randn(2, 4, 1, 16), torch.randn(3, 8, 2, 16)
    for lens, bt, bidx in ((T(99, -5), None, T(0, 1)), (T(16, 16), T(7, -3, 1, 2).view(2, 2), None),
                           (T(4, 4), None, T(-1, 2**31 - 1))):
        out, lse = torch.ops.fastattn.triton_decode_fwd(qd, kc, kc, lens, bt, bidx, 0.25, 2**62, -1, 0.0, None, 0)
        assert torch.isfinite(out).all()
    print("ok")
""")


def test_triton_kernels_clamp_bad_values():
    """The Triton ops do not read index values on the host (a sync on GPUs): their kernels clamp varlen rows, cache
    lengths, rows and pages into the tensors. Bad values (here through the interpreter) must not crash the process."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_BAD_VALUES], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
