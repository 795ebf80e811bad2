"""The block contract (issue #14) of the C++ CPU kernels, at op level: torch.ops.fastattn.fwd/bwd with q_start/k_start
(global positions) and out_fp32, and bwd_acc. A call split into 2-5 query and key blocks at random boundaries,
every block pair computed with its offsets and merged by log-sum-exp in fp32, must give the unsplit call: outputs,
lse, the dropout keep mask (bitwise) and, through bwd_acc into fp32 accumulators, the gradients. Run on the
matrix-unit path and on the fp32 tiles (fastattn._C.cpu_matmul_force_fp32), like tests/test_cpu_paths.py.

Blocks are merged with fastattn.blocks.merge_many (its own edge cases: tests/test_blocks.py)."""
import random
from types import SimpleNamespace as NS

import pytest
import torch

from fastattn import ops
from fastattn.blocks import merge_many
from support.oracle import check_rule, fwd_bwd_inherent
from support.philox import keep_mask

pytestmark = pytest.mark.skipif(not ops.loaded(), reason=f"C++ extension not loaded ({ops.LOAD_ERROR})")
OPS = torch.ops.fastattn if ops.loaded() else None
INF = float("inf")
POS_LIMIT = 2 ** 31
REPORT = ops.cpu_matmul() if ops.loaded() else ""


@pytest.fixture(params=[(torch.float32, "sgemm"), (torch.bfloat16, "units"), (torch.bfloat16, "fp32tiles"),
                        (torch.float16, "units"), (torch.float16, "fp32tiles")], ids=lambda x: f"{x[0]}-{x[1]}"[6:])
def dtype(request):
    dt, path = request.param
    if path == "units" and f"{ {torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dt]}: matrix units" not in REPORT:
        pytest.skip(f"no matrix-unit path for {dt} on this CPU ({REPORT}); the fp32tiles case covers it")
    ops._C.cpu_matmul_force_fp32(path == "fp32tiles")
    yield dt
    ops._C.cpu_matmul_force_fp32(False)


def fwd(q, k, v, c, bias=None, cu=(None, None), ms=(0, 0), qs=None, ks=None, fp32=False, br=None):
    """torch.ops.fastattn.fwd with c's settings; with offsets bottom_right is off unless `br` insists."""
    br = c.br and qs is None and ks is None if br is None else br
    return OPS.fwd(q, k, v, bias, cu[0], cu[1], ms[0], ms[1], c.scale, c.wl, c.wr, br, c.softcap, c.alibi, c.p,
                   c.seed, c.offset, False, qs, ks, fp32)


def bwd_args(dout, q, k, v, out, lse, c, bias=None, cu=(None, None), ms=(0, 0), qs=None, ks=None):
    return (dout, q, k, v, out, lse, bias, cu[0], cu[1], ms[0], ms[1], c.scale, c.wl, c.wr, c.br and qs is None,
            c.softcap, c.alibi, c.p, c.seed, c.offset, False, qs, ks)


def oracle(q, k, v, c, qpos, kpos, bias=None, keep=None, dtype=torch.float64):
    """Naive attention at global positions qpos (B, Sq), kpos (B, Sk), in `dtype` -> (out, lse; +inf = empty)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, Hq, Sk, D|Dv)
    s = q @ k.transpose(-1, -2) * c.scale
    if c.softcap:
        s = c.softcap * torch.tanh(s / c.softcap)
    dist = qpos[:, None, :, None] - kpos[:, None, None, :]  # (B, 1, Sq, Sk): q_pos - k_pos
    if c.alibi is not None:
        s = s - c.alibi.to(dtype).view(-1, q.shape[1], 1, 1) * dist.abs().to(dtype)
    ok = torch.ones_like(dist, dtype=torch.bool)
    if c.wl >= 0:
        ok &= dist <= c.wl
    if c.wr >= 0:
        ok &= dist >= -c.wr
    if bias is not None:
        s = s + bias.to(dtype)
    s = s.masked_fill(~ok, -INF)
    empty = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(empty, 0)
    p = torch.softmax(s, -1).masked_fill(empty, 0)
    if keep is not None:
        p = p * keep / (1 - c.p)
    return p @ v, torch.logsumexp(s, -1).masked_fill(empty.squeeze(-1), INF)


def cuts(n, parts, rng, empty_ok):
    """parts + 1 sorted boundaries of [0, n]; pieces may be empty only when empty_ok."""
    if not empty_ok:
        return [0] + sorted(rng.sample(range(1, n), parts - 1)) + [n]
    return [0] + sorted(rng.randint(0, n) for _ in range(parts - 1)) + [n]


class Layout:
    """Rows of q and k/v per sequence, cut into blocks. Dense (cu None): B sequences of Sq x Sk, blocks are slices
    of dim 2. Varlen: B = 1, sequence n owns rows [cu[n], cu[n+1]), a block is the n pieces packed (index rows)."""

    def __init__(self, lens, dense_b, nq, nk, rng):
        self.dense = dense_b is not None
        self.lens = lens if not self.dense else [lens[0]] * dense_b  # [(sq, sk)] per sequence
        self.n = len(self.lens)
        self.qcuts = [cuts(sq, nq, rng, not self.dense) for sq, _ in self.lens]
        self.kcuts = [cuts(sk, nk, rng, not self.dense) for _, sk in self.lens]
        if self.dense:  # one set of boundaries for every batch row
            self.qcuts, self.kcuts = [self.qcuts[0]] * self.n, [self.kcuts[0]] * self.n
        self.cu_q, self.cu_k = torch.tensor([[0, 0]] + self.lens).cumsum(0, dtype=torch.int32).T.contiguous()

    def block(self, which, b):
        """(rows: slice or index tensor, cu (N+1,) int32 or None, max length, local starts (N,))."""
        cs, cu = (self.qcuts, self.cu_q) if which == "q" else (self.kcuts, self.cu_k)
        starts = torch.tensor([c[b] for c in cs], dtype=torch.int32)
        lens = [c[b + 1] - c[b] for c in cs]
        if self.dense:
            return slice(cs[0][b], cs[0][b + 1]), None, lens[0], starts
        rows = torch.cat([torch.arange(int(cu[n]) + c[b], int(cu[n]) + c[b + 1]) for n, c in enumerate(cs)])
        return rows, torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), max(lens), starts


def take(t, rows, dim=2):
    return t[(slice(None),) * dim + (rows,)] if isinstance(rows, slice) else t.index_select(dim, rows)


def put(dst, rows, src):
    if not isinstance(rows, slice):  # slices were views: already written
        dst.index_copy_(2, rows, src)


CASES = {  # lens: [(Sq, Sk)] (dense: one entry and B), window/br/alibi/softcap/bias/dropout
    "causal_bottom_right": dict(lens=[(150, 300)], B=2, Hq=4, Hkv=2, w=(-1, 0), br=True),
    "causal_bottom_right_tall": dict(lens=[(300, 130)], B=1, Hq=2, Hkv=2, w=(-1, 0), br=True),  # empty rows
    "causal_top_left": dict(lens=[(200, 140)], B=2, Hq=2, Hkv=1, w=(-1, 0), br=False),
    "window": dict(lens=[(333, 333)], B=1, Hq=2, Hkv=2, w=(40, 17), br=True, Dv=24),
    "alibi_softcap": dict(lens=[(90, 610)], B=2, Hq=3, Hkv=1, w=(100, 0), br=True, alibi=True, softcap=7.0),
    "alibi_top_left": dict(lens=[(120, 100)], B=1, Hq=2, Hkv=2, w=(-1, -1), br=False, alibi=True),
    "varlen": dict(lens=[(70, 150), (0, 20), (130, 90), (40, 0), (64, 64)], B=None, Hq=4, Hkv=2, w=(30, 0),
                   br=True, alibi=True),
    "key_padding": dict(lens=[(96, 200)], B=3, Hq=2, Hkv=1, w=(-1, -1), br=False, bias=True),
    "dropout": dict(lens=[(120, 120)], B=2, Hq=2, Hkv=1, w=(-1, 0), br=True, p=0.3, Dv=40),
}


def make_case(name, dtype, rng):
    cf = CASES[name]
    B, Hq, Hkv, D, Dv = cf["B"] or 1, cf["Hq"], cf["Hkv"], 32, cf.get("Dv", 32)
    lay = Layout(cf["lens"], cf["B"], rng.randint(2, 5), rng.randint(2, 5), rng)
    SQ, SK = (cf["lens"][0] if lay.dense else (int(lay.cu_q[-1]), int(lay.cu_k[-1])))
    q, k, v = (torch.randn(B, H, S, d).to(dtype) for H, S, d in ((Hq, SQ, D), (Hkv, SK, D), (Hkv, SK, Dv)))
    alibi = torch.rand(lay.n, Hq) * 0.3 if cf.get("alibi") else None
    c = NS(scale=D ** -0.5, wl=cf["w"][0], wr=cf["w"][1], br=cf["br"], softcap=cf.get("softcap", 0.0), alibi=alibi,
           p=cf.get("p", 0.0), seed=rng.randrange(2 ** 62), offset=rng.randrange(1000))
    # Global starts: bottom-right puts q_start = k_start + sk - sq, top-left q_start = k_start (per sequence).
    diag = [sk - sq if cf["br"] else 0 for sq, sk in lay.lens]
    kbase = [0 if c.p else rng.randint(max(0, -d), 5000) for d in diag]
    base = (torch.tensor([kb + d for kb, d in zip(kbase, diag)], dtype=torch.int32),
            torch.tensor(kbase, dtype=torch.int32))
    bias = None
    if cf.get("bias"):  # key padding (B, 1, 1, Sk): row 1 fully padded (no key at all), the rest at random
        kp = torch.rand(B, 1, 1, SK) < 0.3
        kp[1] = True
        bias = torch.zeros(B, 1, 1, SK).masked_fill(kp, -INF).to(dtype)
    return lay, q, k, v, c, base, bias


def unsplit(lay, q, k, v, c, base, bias, **kw):
    cu = (None, None) if lay.dense else (lay.cu_q, lay.cu_k)
    ms = (q.shape[2], k.shape[2]) if lay.dense else (max(l[0] for l in lay.lens), max(l[1] for l in lay.lens))
    b = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return dict(bias=b, cu=cu, ms=ms, **kw)


def blocks(lay, q, k, v, c, base, bias):
    """Every block pair's call: [(qrows, krows, kwargs)] with per-sequence global starts."""
    out = []
    for a in range(len(lay.qcuts[0]) - 1):
        qr, cuq, mq, q0 = lay.block("q", a)
        for b in range(len(lay.kcuts[0]) - 1):
            kr, cuk, mk, k0 = lay.block("k", b)
            bb = None if bias is None else take(bias, kr, 3).expand(q.shape[0], q.shape[1], take(q, qr).shape[2], -1)
            out.append((a, qr, kr, dict(bias=bb, cu=(cuq, cuk), ms=(mq, mk), qs=base[0] + q0, ks=base[1] + k0)))
    return out


def positions(lay, base):
    """Global positions of every query / key row: (B, Sq), (B, Sk) dense; (1, total) varlen."""
    qp = [torch.arange(sq) + int(base[0][n]) for n, (sq, _) in enumerate(lay.lens)]
    kp = [torch.arange(sk) + int(base[1][n]) for n, (_, sk) in enumerate(lay.lens)]
    return (torch.stack(qp), torch.stack(kp)) if lay.dense else (torch.cat(qp)[None], torch.cat(kp)[None])


def sequences(lay, c):
    """A varlen layout's sequences: (query rows, key rows, c with that sequence's alibi row) each."""
    for n in range(lay.n):
        qs, ks = slice(int(lay.cu_q[n]), int(lay.cu_q[n + 1])), slice(int(lay.cu_k[n]), int(lay.cu_k[n + 1]))
        yield qs, ks, NS(**{**vars(c), "alibi": None if c.alibi is None else c.alibi[n:n + 1]})


def oracle_all(lay, q, k, v, c, base, bias, keep, dout, dtype):
    """(out, lse, dq, dk, dv) of the float64 oracle, or the naive one in `dtype` (varlen: per sequence)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    qp, kp = positions(lay, base)
    if lay.dense:
        out, lse = oracle(q, k, v, c, qp, kp, bias, keep, dtype)
    else:
        res = [oracle(q[:, :, qs], k[:, :, ks], v[:, :, ks], cn, qp[:, qs], kp[:, ks], None, None, dtype)
               for qs, ks, cn in sequences(lay, c)]
        out, lse = (torch.cat(x, 2) for x in zip(*res))
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    return (out.detach(), lse.detach()) + grads


def delta_terms(lay, q, k, c, base, bias, dout, out, ref_out):
    """check_rule's inherent for (out, dq, dk, dv): the error the merged O the blocks' backward read forces on dQ and
    dK through delta (fwd_bwd_inherent), per sequence for varlen (the largest). P without dropout: the dS it shifts."""
    qp, kp = positions(lay, base)
    if lay.dense:
        attend = lambda q_, k_, v_: oracle(q_, k_, v_, c, qp, kp, bias)[0]  # noqa: E731
        return fwd_bwd_inherent(attend, q, k, dout, out, ref_out, c.scale)
    terms = [0.0] * 4
    for qs, ks, cn in sequences(lay, c):
        attend = lambda q_, k_, v_: oracle(q_, k_, v_, cn, qp[:, qs], kp[:, ks])[0]  # noqa: E731,B023 (called now)
        t = fwd_bwd_inherent(attend, q[:, :, qs], k[:, :, ks], dout[:, :, qs], out[:, :, qs], ref_out[:, :, qs],
                             c.scale)
        terms = [max(a, b) for a, b in zip(terms, t)]
    return terms


def keep_of(q, k, c, base):
    """The kernels' keep mask (B, Hq, Sq, Sk) of an unsplit call, read off dropout(P) @ I (P > 0 everywhere)."""
    eye = torch.eye(k.shape[2]).expand(*k.shape[:2], -1, -1).to(q.dtype)
    out, _ = OPS.fwd(q, k, eye, None, None, None, 0, 0, c.scale, -1, -1, False, 0.0, None, c.p, c.seed, c.offset,
                     False, base[0], base[1], False)
    return out != 0


def check(name, got, ref, naive, dtype, inherent=0.0):
    """fp32: 1e-5 relative to ref; bf16/fp16: the tolerance rule (ref: float64 oracle, naive: oracle in dtype)."""
    ok, msg = check_rule(name, got, ref, naive, dtype, inherent=inherent)
    print(msg)
    assert ok, msg


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_merge_to_the_unsplit_call(name, dtype):
    rng = random.Random(torch.initial_seed())
    lay, q, k, v, c, base, bias = make_case(name, dtype, rng)
    kw = unsplit(lay, q, k, v, c, base, bias)
    ref_out, ref_lse = fwd(q, k, v, c, qs=base[0], ks=base[1], **kw)
    # Without offsets the same call is the special case q_start - k_start = sk - sq (bottom-right) or 0 (alibi is
    # always bottom-right aligned); dropout keys on positions, so it agrees only where they do (starts 0 here).
    if (c.alibi is None or c.br) and (c.p == 0 or int(base[0].abs().sum() + base[1].abs().sum()) == 0):
        plain = fwd(q, k, v, c, **kw)
        assert torch.equal(plain[0], ref_out) and torch.equal(plain[1], ref_lse)
    ref32 = fwd(q, k, v, c, qs=base[0], ks=base[1], fp32=True, **kw)  # out_fp32: the unrounded accumulator
    assert ref32[0].dtype == torch.float32 and torch.equal(ref32[0].to(dtype), ref_out)
    if dtype != torch.float32:  # most entries of non-empty rows are not representable in the dtype
        rows = ref_lse != INF
        assert (ref32[0][rows] != ref_out.float()[rows]).float().mean() > 0.5, f"out_fp32 was rounded to {dtype}"
    assert torch.equal(ref32[1], ref_lse)

    calls = blocks(lay, q, k, v, c, base, bias)
    parts = {}
    for a, qr, kr, bkw in calls:
        o, l = fwd(take(q, qr), take(k, kr), take(v, kr), c, fp32=True, **bkw)
        assert o.dtype == torch.float32
        parts.setdefault(a, []).append((o, l))
    out32, lse = torch.empty(ref32[0].shape), torch.empty(ref_lse.shape)
    for a, ps in parts.items():
        o, l = merge_many(*zip(*ps))
        qr = lay.block("q", a)[0]
        if isinstance(qr, slice):
            out32[:, :, qr], lse[:, :, qr] = o, l
        else:
            out32.index_copy_(2, qr, o)
            lse.index_copy_(2, qr, l)
    out = out32.to(dtype)  # rounded once
    assert torch.equal(lse == INF, ref_lse == INF)  # empty rows: +inf in both, and out 0
    assert (out32[ref_lse == INF] == 0).all() and (ref_lse == INF).any() == name.endswith(("tall", "varlen",
                                                                                             "padding"))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=1e-5, atol=1e-5)

    # Backward: every block pair adds into fp32 accumulators that start non-zero, with the merged out and lse.
    dout = torch.randn(out.shape).to(dtype)
    init = [torch.randn(t.shape) for t in (q, k, v)]
    acc = [t.clone() for t in init]
    for a, qr, kr, bkw in calls:
        bq, bk, bv = take(acc[0], qr), take(acc[1], kr), take(acc[2], kr)
        OPS.bwd_acc(*bwd_args(take(dout, qr), take(q, qr), take(k, kr), take(v, kr), take(out, qr), take(lse, qr), c,
                              **bkw), bq, bk, bv)
        for t, rows, b_ in zip(acc, (qr, kr, kr), (bq, bk, bv)):
            put(t, rows, b_)
    grads = [a_ - i_ for a_, i_ in zip(acc, init)]

    keep = keep_of(q, k, c, base) if c.p else None
    ref = oracle_all(lay, q, k, v, c, base, bias, keep, dout, torch.float64)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        ref_g = OPS.bwd(*bwd_args(dout, q, k, v, ref_out, ref_lse, c, qs=base[0], ks=base[1], **kw))
        for n_, got, want, orc in zip(names, [out32] + grads, (ref32[0],) + tuple(ref_g), ref[:1] + ref[2:]):
            check(n_, got, want, None, dtype)  # blocks == unsplit
            check("unsplit " + n_, want, orc, None, dtype)  # unsplit == oracle at these positions
        return
    naive = oracle_all(lay, q, k, v, c, base, bias, keep, dout, dtype)
    inherent = delta_terms(lay, q, k, c, base, bias, dout, out, ref[0])
    for i, (n_, got) in enumerate(zip(names, [out] + grads)):
        check(n_, got, ref[i + (i > 0)], naive[i + (i > 0)], dtype, inherent[i])


@pytest.mark.parametrize("varlen", [False, True])
def test_dropout_keep_mask_is_keyed_on_global_positions(varlen, dtype):
    """Block calls drop bitwise what the unsplit call drops, and that is csrc/philox.h at (q_pos, k_pos)."""
    rng = random.Random(torch.initial_seed())
    B, H, (sq, sk) = (1, 2, (27, 45)) if varlen else (2, 2, (24, 41))
    lay = Layout([(20, 45), (7, 0), (0, 9), (27, 30)] if varlen else [(sq, sk)], None if varlen else B,
                 rng.randint(2, 5), rng.randint(2, 5), rng)
    SQ, SK = int(lay.cu_q[-1]) if varlen else sq, int(lay.cu_k[-1]) if varlen else sk
    q, k = torch.randn(B, H, SQ, 16).to(dtype), torch.randn(B, H, SK, 16).to(dtype)
    v = torch.eye(SK).expand(B, H, SK, SK).to(dtype)  # out[i, j] = dropout(P)[i, j]: the keep mask (P > 0)
    hi = POS_LIMIT - max(max(l) for l in lay.lens) - 1  # up to the largest positions allowed
    base = tuple(torch.tensor([rng.choice([0, rng.randrange(hi), hi]) for _ in range(lay.n)], dtype=torch.int32)
                 for _ in range(2))
    c = NS(scale=0.25, wl=-1, wr=-1, br=False, softcap=0.0, alibi=None, p=0.35, seed=rng.randrange(-2 ** 63, 2 ** 63),
           offset=rng.randrange(2 ** 40))
    kw = unsplit(lay, q, k, v, c, base, None)
    ref, _ = fwd(q, k, v, c, qs=base[0], ks=base[1], fp32=True, **kw)
    got = torch.zeros_like(ref)
    for a, qr, kr, bkw in blocks(lay, q, k, v, c, base, None):
        o, _ = fwd(take(q, qr), take(k, kr), take(take(v, kr), kr, 3), c, fp32=True, **bkw)
        if isinstance(qr, slice):
            got[:, :, qr, kr] = o
        else:
            got.index_copy_(2, qr, got.index_select(2, qr).index_copy(3, kr, o))
    assert torch.equal(got != 0, ref != 0)
    for n in range(lay.n):
        qs = slice(None) if not varlen else slice(int(lay.cu_q[n]), int(lay.cu_q[n + 1]))
        ks = slice(None) if not varlen else slice(int(lay.cu_k[n]), int(lay.cu_k[n + 1]))
        for h in range(H):
            want = keep_mask(c.seed, c.offset, c.p, n, h, *lay.lens[n], int(base[0][n]), int(base[1][n]))
            assert torch.equal(ref[0 if varlen else n, h, qs, ks] != 0, want), f"sequence {n} head {h}"


@pytest.mark.parametrize("keys", [300, 1100])
def test_bwd_acc_adds_unrounded_fp32(dtype, keys):
    """bwd_acc into zeros is bwd before its rounding: rounded to the dtype it is bwd bitwise, and it is not itself
    rounded (low precision: most entries are not representable in the dtype). Four (sequence, kv head) pairs: each
    head's keys cut into chunks (csrc/cpu/params.h bwd_key_chunks), 1100 keys also on the matrix units' 512-key
    blocks."""
    q, k, v = (torch.randn(2, 2, s, 32).to(dtype) for s in (70, keys, keys))
    c = NS(scale=32 ** -0.5, wl=-1, wr=0, br=False, softcap=0.0, alibi=None, p=0.2, seed=3, offset=5)
    qs, ks = torch.tensor([230, 7], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    out, lse = fwd(q, k, v, c, qs=qs, ks=ks)
    dout = torch.randn(out.shape).to(dtype)
    args = bwd_args(dout, q, k, v, out, lse, c, qs=qs, ks=ks)
    want = OPS.bwd(*args)
    acc = [torch.zeros(t.shape) for t in (q, k, v)]
    OPS.bwd_acc(*args, *acc)
    if dtype != torch.float32:  # and closer to the float64 oracle than bwd's rounded gradients (measured 0.1-0.8x)
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        pos = [torch.arange(s)[None] + st[:, None].long() for s, st in ((70, qs), (keys, ks))]
        o64, _ = oracle(q64, k64, v64, c, *pos, keep=keep_of(q, k, c, (qs, ks)))
        ref = torch.autograd.grad(o64, (q64, k64, v64), dout.double())
    for i, (name, a, w) in enumerate(zip(("dq", "dk", "dv"), acc, want)):
        assert torch.equal(a.to(dtype), w), name
        if dtype != torch.float32:
            seen = a[a != 0]  # (keys past every query's causal band get exact zeros)
            assert (seen != seen.to(dtype).float()).float().mean() > 0.5, f"{name} was rounded to {dtype}"
            err_acc, err_bwd = ((x.double() - ref[i]).abs().mean() for x in (a, w))
            assert err_acc < 0.9 * err_bwd, f"{name}: fp32 error {err_acc:.3g} vs rounded {err_bwd:.3g}"


def test_windows_at_extreme_offsets(dtype):
    """|q_start - k_start| near 2^31 with a finite window: no key visible (out 0, lse +inf, zero grads), no overflow
    and no tile computed (K/V are NaN); near 2^31 the window edge is exact and only windows >= 2^31 mean "none"."""
    q, k = torch.randn(1, 2, 40, 16).to(dtype), torch.full((1, 1, 600, 16), float("nan")).to(dtype)
    c = NS(scale=0.25, wl=8, wr=8, br=False, softcap=0.0, alibi=None, p=0.0, seed=0, offset=0)
    far = POS_LIMIT - 601
    for qs, ks in ((far, 0), (0, far)):
        st = torch.tensor([qs], dtype=torch.int32), torch.tensor([ks], dtype=torch.int32)
        out, lse = fwd(q, k, k, c, qs=st[0], ks=st[1], fp32=True)
        assert (out == 0).all() and (lse == INF).all()
        acc = [torch.ones(t.shape) for t in (q, k, k)]
        OPS.bwd_acc(*bwd_args(torch.ones_like(q), q, k, k, torch.zeros_like(q), lse, c, qs=st[0], ks=st[1]), *acc)
        assert all((a == 1).all() for a in acc)
    k, v = torch.randn(1, 1, 600, 16).to(dtype), torch.eye(600)[None, None].to(dtype)  # out != 0: visible keys
    for qs, ks, wl, wr in [(POS_LIMIT - 41, 0, w, -1) for w in (POS_LIMIT - 3, POS_LIMIT - 302, POS_LIMIT - 1,
                                                                POS_LIMIT, 2 ** 62)] + \
                          [(0, far, -1, w) for w in (far + 20, far + 599, POS_LIMIT - 1, POS_LIMIT)]:
        c.wl, c.wr, c.scale = wl, wr, 0.1  # small scores: no P underflows to 0 in fp16
        st = torch.tensor([qs], dtype=torch.int32), torch.tensor([ks], dtype=torch.int32)
        out, lse = fwd(q, k, v, c, qs=st[0], ks=st[1], fp32=True)
        dist = (torch.arange(40) + qs)[:, None] - (torch.arange(600) + ks)[None]  # q_pos - k_pos, int64
        want = (dist <= wl if wl >= 0 else True) & (dist >= -wr if wr >= 0 else True)
        assert torch.equal(out[0] != 0, want.expand(2, -1, -1)), (qs, ks, wl, wr)
        assert torch.equal(lse[0] == INF, ~want.any(-1).expand(2, -1)), (qs, ks, wl, wr)


def test_bad_block_arguments_are_refused():
    q, k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 1, 12, 16), torch.randn(2, 1, 12, 16)
    c = NS(scale=0.25, wl=-1, wr=0, br=False, softcap=0.0, alibi=None, p=0.0, seed=0, offset=0)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    bad = [
        (dict(qs=i32(0, 0)), "q_start and k_start must be given together"),
        (dict(ks=i32(0, 0)), "q_start and k_start must be given together"),
        (dict(qs=torch.zeros(2, dtype=torch.int64), ks=i32(0, 0)), "q_start must be int32, got Long"),
        (dict(qs=i32(0, 0), ks=i32(0, 0, 0)), r"k_start must have shape \(N,\) with N = 2 \(batch size\), got \[3\]"),
        (dict(qs=i32(0, 0, 0, 0)[::2], ks=i32(0, 0)), "q_start must be contiguous"),
        (dict(qs=i32(0, 0), ks=i32(0, 0), br=True), "bottom_right must be False with q_start/k_start"),
        (dict(qs=i32(-1, 0), ks=i32(0, 0)), r"q_start\[0\] = -1 must be >= 0"),
        (dict(qs=i32(0, 0), ks=i32(0, POS_LIMIT - 12)), r"k_start\[1\] = 2147483636 must be >= 0 with k_start \+ "
                                                        r"length \(12\) < 2\^31"),
    ]
    # Not here: q_start on another device. This machine has only the cpu, and a meta q_start dispatches to the
    # fake (fastattn/ops.py), not to the C++ op, whose device check ("q_start must be on cpu") needs a second device.
    for kw, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            fwd(q, k, v, c, **kw)
    with pytest.raises(RuntimeError, match=r"q_start must have shape \(N,\) with N = 3 \(number of varlen seq"):
        cu = i32(0, 4, 4, 8), i32(0, 12, 12, 12)
        fwd(q[:1], k[:1], v[:1], c, cu=cu, ms=(4, 12), qs=i32(0, 0), ks=i32(0, 0, 0))
    qs = ks = i32(3, 0)
    out, lse = fwd(q, k, v, c, qs=qs, ks=ks)
    args = bwd_args(torch.ones_like(out), q, k, v, out, lse, c, qs=qs, ks=ks)
    good = [torch.zeros(t.shape) for t in (q, k, v)]
    for i, (acc, msg) in enumerate([
            (torch.zeros(q.shape, dtype=torch.bfloat16), "dq_acc must be float32, got BFloat16"),
            (torch.zeros(2, 1, 12, 8), r"dk_acc must have k's shape \[2, 1, 12, 16\], got \[2, 1, 12, 8\]"),
            (torch.zeros(2, 1, 12, 32)[..., ::2], "dv_acc must have stride 1 on the last dim"),
            (torch.zeros(1, 1, 1, 16).expand(2, 2, 8, 16), "dq_acc must not have elements sharing memory"),
            (good[2], "dk_acc must not share memory with dv_acc")]):
        accs = list(good)
        accs[i % 3] = acc
        with pytest.raises(RuntimeError, match=msg):
            OPS.bwd_acc(*args, *accs)
    # Non-dense views, which ATen's overlap tests leave undecided ("too hard"): rows that overlap, and two
    # accumulators sharing half their columns, are refused; rows of their own are taken.
    rows = torch.zeros(2048).as_strided((2, 2, 8, 16), (256, 128, 4, 1))  # row i, column j+4 = row i+1, column j
    with pytest.raises(RuntimeError, match="dq_acc must not have elements sharing memory"):
        OPS.bwd_acc(*args, rows, good[1], good[2])
    buf = torch.zeros(2, 1, 12, 40)
    with pytest.raises(RuntimeError, match="dk_acc must not share memory with dv_acc"):
        OPS.bwd_acc(*args, good[0], buf[..., :16], buf[..., 8:24])
    with pytest.raises(RuntimeError, match="dq_acc must not share memory with k"):
        kbuf = torch.randn(2, 3, 12, 16)
        OPS.bwd_acc(*bwd_args(torch.ones_like(out), q, kbuf[:, :1], v, out, lse, c, qs=qs, ks=ks),
                    kbuf[:, :2, 4:], good[1], good[2])  # head 0, rows 4-11: k's
    narrow = torch.zeros(2, 2, 8, 32)[..., 4:20]  # (2, 2, 8, 16), not dense, each element its own
    kv = torch.zeros(2, 12, 2, 1, 16)  # dK and dV interleaved in one packed buffer (B, S, 2, Hkv, D), as CP's
    OPS.bwd_acc(*args, narrow, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2))
    assert narrow.abs().sum() > 0 and kv[:, :, 0].abs().sum() > 0 and kv[:, :, 1].abs().sum() > 0
    # dK | dV column ranges of one buffer with Dv != D (CP's all-gather backward): accepted, each gets its own
    q8, v8 = torch.randn(2, 2, 8, 16), torch.randn(2, 1, 12, 8)
    o8, l8 = fwd(q8, k, v8, c, qs=qs, ks=ks)
    dkv = torch.zeros(2, 1, 12, 24)
    OPS.bwd_acc(*bwd_args(torch.ones_like(o8), q8, k, v8, o8, l8, c, qs=qs, ks=ks), torch.zeros(q8.shape),
                dkv[..., :16], dkv[..., 16:])
    assert dkv[..., :16].abs().sum() > 0 and dkv[..., 16:].abs().sum() > 0
    with pytest.raises(RuntimeError, match="dk_acc must not share memory with dv_acc"):
        OPS.bwd_acc(*bwd_args(torch.ones_like(o8), q8, k, v8, o8, l8, c, qs=qs, ks=ks), torch.zeros(q8.shape),
                    dkv[..., :16], dkv[..., 15:23])
    with pytest.raises(RuntimeError, match="bottom_right must be False"):
        OPS.bwd(*args[:14], True, *args[15:])


def test_opcheck_block_arguments():
    """Schemas, fakes and bwd_acc's mutation annotations agree with the kernels (torch.library.opcheck)."""
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 47, 16), torch.randn(2, 2, 47, 24)
    c = NS(scale=0.25, wl=9, wr=0, br=False, softcap=0.0, alibi=None, p=0.2, seed=7, offset=3)
    qs, ks = torch.tensor([40, 0], dtype=torch.int32), torch.tensor([30, 5], dtype=torch.int32)
    fargs = (q, k, v, None, None, None, 0, 0, c.scale, c.wl, c.wr, False, 0.0, None, c.p, c.seed, c.offset, False,
             qs, ks, True)
    torch.library.opcheck(OPS.fwd.default, fargs, test_utils=("test_schema", "test_faketensor"))
    out, lse = fwd(q, k, v, c, qs=qs, ks=ks)
    args = bwd_args(torch.randn_like(out), q, k, v, out, lse, c, qs=qs, ks=ks)
    torch.library.opcheck(OPS.bwd_acc.default, args + tuple(torch.randn(t.shape) for t in (q, k, v)),
                          test_utils=("test_schema", "test_faketensor"))
