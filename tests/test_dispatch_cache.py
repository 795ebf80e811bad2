"""The per-call fast path cannot change a decision: a call that follows a cached one differing in a single fact (the
requested backend, device, dtype, a feature, grad, a shape class, ...) gets the backend, kernel or refusal it gets on
a cold cache; value checks still run after a cached success; the caches are safe under threads and torch.compile.

Each PAIR differs in one fact that changes the decision (checked: the two cold outcomes differ). Some need a
backend that refuses more than the real ones do: `Picky` (declared per pair) is placed first in auto's order.
test_planted_key_field_is_caught blanks one field of the cache keys at a time and shows that some pair then fails,
so every field of dispatch._key and dispatch._decode_key is covered."""
import importlib
import threading
from dataclasses import dataclass
from functools import partial as C
from typing import Callable, Optional

import pytest
import torch

import fastattn
from fastattn import dispatch
from fastattn.backends import BACKENDS, PREFERENCE, Backend, DecodeKernel
from fastattn.backends import cpu as cpu_backend
from fastattn.backends.cpp_decode import CPU_DECODE
from fastattn.functional import _sdpa_params
from fastattn.params import AttnParams, DecodeCall


@pytest.fixture(autouse=True)
def no_tiny_rule(monkeypatch):
    """The pairs below are small fp32 calls that pin the declarations' decisions; the cpu backend's speed rules for
    tiny fp32 calls (tests/test_dispatch.py) and small masked ones would hand many of them to sdpa and blur what each
    pair changes."""
    monkeypatch.setattr(cpu_backend, "_TINY_AREA", 0)
    monkeypatch.setattr(cpu_backend, "_AVX2_MASKED_GRAD_SK", 0)  # (CPUs without AVX-512: small masked fp32 training)
    monkeypatch.setattr(cpu_backend, "_AVX2_MASKED_GRAD_SK_NARROW", 0)
    monkeypatch.setattr(dispatch, "_CHOICES", {})  # no route learnt under this rule outlives the test (lean.py)

pytestmark = pytest.mark.skipif(BACKENDS["cpu"].unavailable() != [], reason="needs the C++ extension (cpu backend)")

sdpa, flash = fastattn.scaled_dot_product_attention, fastattn.flash_attn_func


def rnd(*shape, grad=False, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def qkv(B=1, Hq=4, Sq=32, Sk=None, D=16, Hkv=None, Dv=None, **kw):
    """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""
    Sk, Hkv, Dv = Sk or Sq, Hkv or Hq, Dv or D
    return rnd(B, Hq, Sq, D, **kw), rnd(B, Hkv, Sk, D), rnd(B, Hkv, Sk, Dv)


def bshd(*ts):
    return tuple(t.transpose(1, 2) for t in ts)  # (B, H, S, D) -> (B, S, H, D) views


class PickyDecode(DecodeKernel):
    name = "picky.decode"

    def run(self, c):
        return CPU_DECODE.run(c)


class Picky(Backend):
    """Runs through the reference backend, but declares only what a pair gives it."""
    name = "picky"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})

    def __init__(self, features):
        self.features = frozenset(features)
        self.decode = PickyDecode()

    def forward(self, p):
        return BACKENDS["reference"].forward(p)


@dataclass
class Pair:
    name: str  # the fact the two calls differ in
    a: Callable  # functools.partial: arguments bound when the pair is made
    b: Callable
    picky: Optional[set] = None  # install Picky with these features first in auto's order


def _p(q, k, v, **kw):
    return AttnParams(q=q, k=k, v=v, scale=q.shape[-1] ** -0.5, **kw)


def _no_grad(fn, *args, **kw):
    with torch.no_grad():
        return fn(*args, **kw)


def _vmapped(fn, *args, **kw):
    """fn(*args) under torch.func.vmap over a new leading dim of size 1 (inside, the same shapes)."""
    return torch.func.vmap(lambda *xs: fn(*xs, **kw))(*(t[None] for t in args))


def _forward_ad(fn, q, *args, **kw):
    """fn(q, ...) with a tangent on q."""
    with torch.autograd.forward_ad.dual_level():
        return fn(torch.autograd.forward_ad.make_dual(q, torch.ones_like(q)), *args, **kw)


def _pairs():
    P = []
    qkv32 = qkv(Sq=32)
    P.append(Pair("requested backend", C(sdpa, *qkv32, is_causal=True),
                  C(sdpa, *qkv32, is_causal=True, backend="reference")))
    pd = _sdpa_params(*qkv(Sq=1, Sk=40), None, 0.0, False, None, False)
    P.append(Pair("route_decode", C(dispatch.run, pd), C(dispatch.run, pd, route_decode=False)))
    P.append(Pair("device", C(sdpa, *qkv32), C(sdpa, *(t.to("meta") for t in qkv32))))
    P.append(Pair("dtype", C(sdpa, *qkv32), C(sdpa, *(t.double() for t in qkv32))))
    # The CPU decode kernel takes up to 16 query rows per KV head ((Hq / Hkv) * Sq; one-token fp32 steps: fp32
    # steps of 2-16 tokens go to sdpa under auto).
    P.append(Pair("query heads", C(sdpa, *qkv(Hq=16, Hkv=1, Sq=1, Sk=20), enable_gqa=True),
                  C(sdpa, *qkv(Hq=32, Hkv=1, Sq=1, Sk=20), enable_gqa=True)))
    P.append(Pair("kv heads", C(sdpa, *qkv(Hq=32, Sq=1, Sk=20)),
                  C(sdpa, *qkv(Hq=32, Hkv=1, Sq=1, Sk=20), enable_gqa=True)))
    d64 = qkv(Sq=32, D=64)  # cpu takes head dims up to 256
    P.append(Pair("head dim", C(sdpa, *d64), C(sdpa, *qkv(Sq=32, D=300, Dv=64))))
    P.append(Pair("value head dim", C(sdpa, *d64), C(sdpa, *qkv(Sq=32, D=64, Dv=300))))
    P.append(Pair("query length class", C(sdpa, *qkv(Sq=1, Sk=40)), C(sdpa, *qkv(Sq=12, Sk=40))))
    # Top-left causal or window with Sq != Sk: no decode kernel (they align bottom-right).
    P.append(Pair("Sq == Sk", C(sdpa, *qkv(Sq=4, Sk=4), is_causal=True, backend="cpu"),
                  C(sdpa, *qkv(Sq=4, Sk=6), is_causal=True, backend="cpu")))  # (auto: fp32 4-token steps to sdpa)
    a = qkv(Sq=2, Sk=5)
    P.append(Pair("window left", C(dispatch.run, _p(*a)), C(dispatch.run, _p(*a, window_left=3))))
    a = qkv(Sq=1, Sk=5)  # one token (auto: fp32 steps of 2-16 tokens go to sdpa either way)
    P.append(Pair("causal", C(sdpa, *a), C(sdpa, *a, is_causal=True)))
    a = bshd(*qkv(Sq=16))
    P.append(Pair("causal or window right", C(flash, *a, window_size=(-1, 1)), C(flash, *a, causal=True),
                  picky={"window", "bottom_right"}))
    a = qkv(Sq=4, Sk=6)
    P.append(Pair("bottom-right", C(sdpa, *a, is_causal=True), C(flash, *bshd(*a), causal=True)))
    a = qkv(Sq=1, Sk=40)
    # (the cpu decode kernel takes the mask: Picky's, which takes none, leaves masked steps to Picky's forward)
    P.append(Pair("mask", C(sdpa, *a), C(sdpa, *a, attn_mask=torch.rand(1, 1, 1, 40) > 0.3), picky={"mask"}))
    a = qkv(Sq=32, grad=True)
    P.append(Pair("mask grad", C(sdpa, *a, attn_mask=rnd(1, 1, 32, 32)),
                  C(sdpa, *a, attn_mask=rnd(1, 1, 32, 32, grad=True))))
    a = bshd(*qkv(Sq=1, Sk=40))
    P.append(Pair("dropout", C(flash, *a), C(flash, *a, dropout_p=0.1)))
    a = bshd(*qkv(Sq=32))
    cu = torch.tensor([0, 32], dtype=torch.int32)
    packed = tuple(t[0] for t in a)  # (1, S, H, D) -> (S, H, D)
    P.append(Pair("varlen", C(flash, *a), C(fastattn.flash_attn_varlen_func, *packed, cu, cu, 32, 32), picky=set()))
    P.append(Pair("softcap", C(flash, *a, backend="sdpa"), C(flash, *a, softcap=2.0, backend="sdpa")))
    P.append(Pair("alibi", C(flash, *a, backend="sdpa"), C(flash, *a, alibi_slopes=torch.rand(4), backend="sdpa")))
    P.append(Pair("lse", C(flash, *a, backend="sdpa"), C(flash, *a, return_attn_probs=True, backend="sdpa")))
    g = bshd(*qkv(Sq=32, grad=True))
    P.append(Pair("deterministic", C(flash, *g, backend="sdpa"), C(flash, *g, deterministic=True, backend="sdpa")))
    ag = qkv(Sq=1, Sk=40, grad=True)
    P.append(Pair("requires grad", C(sdpa, *qkv(Sq=1, Sk=40)), C(sdpa, *ag)))
    P.append(Pair("grad mode", C(_no_grad, sdpa, *ag), C(sdpa, *ag)))
    a = qkv(Sq=32)
    P.append(Pair("forward AD", C(sdpa, *a), C(_forward_ad, sdpa, *a)))
    P.append(Pair("torch.func transform", C(sdpa, *a), C(_vmapped, sdpa, *a)))
    a = qkv(B=2, Sq=16)
    z = torch.zeros(2, dtype=torch.int32)
    P.append(Pair("block", C(dispatch.select, _p(*a), "sdpa"), C(dispatch.select, _p(*a, q_start=z, k_start=z),
                                                                    "sdpa")))

    # flash_attn_with_kvcache's choice of split-KV kernel (dispatch._decode_key); `choose_decode` answers directly.
    def dc(B=1, Hq=4, Hkv=4, D=16, Dv=None, dtype=torch.float32, device="cpu", grad=False):
        kc, vc = rnd(B, 40, Hkv, D, dtype=dtype, device=device), rnd(B, 40, Hkv, Dv or D, dtype=dtype, device=device)
        return DecodeCall(q=rnd(B, Hq, 1, D, dtype=dtype, device=device, grad=grad), k_cache=kc, v_cache=vc,
                          seqlens_k=torch.full((B,), 40, dtype=torch.int32, device=device))
    choose = dispatch.choose_decode
    c = dc()
    for name, other, kw in (("decode: requested backend", c, dict(backend="reference")),
                            ("decode: device", dc(device="meta"), {}), ("decode: dtype", dc(dtype=torch.float64), {}),
                            ("decode: empty", dc(B=0), {}), ("decode: head dim", dc(D=300, Dv=16), {}),
                            ("decode: value head dim", dc(Dv=300), {}), ("decode: rows", dc(Hq=32, Hkv=1), {}),
                            ("decode: requires grad", dc(grad=True), {})):
        P.append(Pair(name, C(choose, c), C(choose, other, **kw)))
    qf, kc, vc = rnd(1, 1, 4, 16), rnd(1, 40, 4, 16), rnd(1, 40, 4, 16)
    kv = fastattn.flash_attn_with_kvcache
    P.append(Pair("kvcache: requested backend", C(kv, qf, kc, vc, cache_seqlens=30),
                  C(kv, qf, kc, vc, cache_seqlens=30, backend="sdpa")))
    return P


_LOG = threading.local()  # per thread: what ran during the current _outcome


def _note(tag):
    if hasattr(_LOG, "ran"):
        _LOG.ran.append(tag)


@pytest.fixture
def spied(monkeypatch):
    """Every backend's forward and every decode kernel's run note what ran (per thread)."""
    def spy(obj, attr, tag):
        real = getattr(obj, attr)
        monkeypatch.setattr(obj, attr, lambda *a, **kw: _note(tag) or real(*a, **kw))

    def spy_lean(obj, tag, attr="lean"):  # the lean paths replay the Lean runner instead (fastattn/lean.py)
        real = getattr(obj, attr)

        def lean(*a):
            r = real(*a)
            return r and r._replace(run=lambda *t: _note(tag) or r.run(*t))
        monkeypatch.setattr(obj, attr, lean)
    for b in BACKENDS.values():
        spy(b, "forward", ("forward", b.name))
        spy_lean(b, ("forward", b.name))
        if b.decode is not None and not hasattr(b.decode, "_spied"):
            spy(b.decode, "run", ("decode", b.decode.name))
            spy_lean(b.decode, ("decode", b.decode.name))
            spy_lean(b.decode, ("decode", b.decode.name), "cache_lean")
            monkeypatch.setattr(b.decode, "_spied", True, raising=False)
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    monkeypatch.setattr(dispatch, "_DECODES", {})
    return monkeypatch


def _outcome(fn):
    """What happened: the kernels that ran (or the backend chosen), or the error raised."""
    _LOG.ran = []
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001  (a refusal is an outcome to compare)
        return ("raised", type(e).__name__, str(e))
    return ("ran", tuple(_LOG.ran), r.name if isinstance(r, Backend) else None)


def _cold(fn):
    dispatch._CHOICES.clear()
    dispatch._DECODES.clear()
    return _outcome(fn)


def _with_picky(mp, features):
    mp.setitem(BACKENDS, "picky", Picky(features))
    mp.setitem(PREFERENCE, "cpu", ["picky"] + [n for n in PREFERENCE["cpu"] if n != "picky"])


def _mismatches(mp, pairs):
    """Pairs whose second call (or first, the other way round) behaves differently after the other was cached."""
    bad = []
    for pr in pairs:
        with mp.context() as m:
            if pr.picky is not None:
                _with_picky(m, pr.picky)
            cold = {"a": _cold(pr.a), "b": _cold(pr.b)}
            assert cold["a"] != cold["b"], f"pair {pr.name!r} does not change the decision: {cold['a']}"
            for first, then in (("a", "b"), ("b", "a")):
                dispatch._CHOICES.clear()
                dispatch._DECODES.clear()
                _outcome(getattr(pr, first))
                warm = _outcome(getattr(pr, then))
                if warm != cold[then]:
                    bad.append((pr.name, then, warm, cold[then]))
    return bad


def test_cache_never_changes_a_decision(spied):
    assert _mismatches(spied, _pairs()) == []


def _blank(real, i):
    def planted(*args):
        key = real(*args)
        return key[:i] + ("?",) + key[i + 1:]
    return planted


@pytest.mark.parametrize("which", ["_key", "_decode_key"])
def test_planted_key_field_is_caught(spied, which):
    """A key missing any one field (planted: that field blanked) lets some pair reuse the other's decision."""
    real = getattr(dispatch, which)
    pd = _sdpa_params(*qkv(Sq=1, Sk=40), None, 0.0, False, None, False)
    n = len(dispatch._key(pd, "auto", True) if which == "_key" else dispatch._decode_key(dispatch.dense_call(pd),
                                                                                          "auto"))
    pairs = _pairs()
    missed = []
    for i in range(n):
        with spied.context() as m:
            m.setattr(dispatch, which, _blank(real, i))
            if not _mismatches(m, pairs):
                missed.append(i)
    assert missed == [], f"{which}: no pair notices field(s) {missed} missing from the key"


def test_value_checks_run_after_a_cached_success(spied):
    """Only decisions are cached: a call with the same shapes but bad values still raises."""
    q, k, v = (rnd(10, 4, 16) for _ in range(3))
    good, bad = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 6, 4], dtype=torch.int32)
    fastattn.flash_attn_varlen_func(q, k, v, good, good, 6, 6)
    with pytest.raises(fastattn.InputValueError, match=r"cu_seqlens_q must be non-decreasing"):
        fastattn.flash_attn_varlen_func(q, k, v, bad, good, 6, 6)
    with pytest.raises(fastattn.InputValueError, match=r"max_seqlen_q=5, max_seqlen_k=6 are smaller"):
        fastattn.flash_attn_varlen_func(q, k, v, good, good, 5, 6)
    qf, kc, vc = rnd(2, 1, 4, 16), rnd(2, 40, 4, 16), rnd(2, 40, 4, 16)
    fastattn.flash_attn_with_kvcache(qf, kc, vc, cache_seqlens=torch.tensor([30, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_seqlens \(min 30, max 41\)"):
        fastattn.flash_attn_with_kvcache(qf, kc, vc, cache_seqlens=torch.tensor([30, 41], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_batch_idx .* repeats a cache row"):
        fastattn.flash_attn_with_kvcache(qf, kc, vc, k=rnd(2, 1, 4, 16), v=rnd(2, 1, 4, 16), cache_seqlens=3,
                                         cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))
    q, k, v = qkv(Sq=8)
    sdpa(q, k, v)
    with pytest.raises(fastattn.InputTypeError, match="key, value must share a dtype"):
        sdpa(q, k.double(), v)


def test_threads_get_their_own_decisions(spied):
    """Calls from several threads, each a different decision on a shared cache, match their single-thread results."""
    # (torch keeps one forward-AD level for the process: two threads cannot each open one)
    calls = [fn for pr in _pairs() if pr.picky is None and pr.name != "forward AD" for fn in (pr.a, pr.b)]
    want = [_cold(fn) for fn in calls]
    errors = []

    def work(offset):
        try:
            for i in range(len(calls)):  # each thread walks the calls from its own starting point
                j = (i + offset) % len(calls)
                got = _outcome(calls[j])
                if got != want[j]:
                    errors.append((j, got, want[j]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    dispatch._CHOICES.clear()
    threads = [threading.Thread(target=work, args=(7 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dispatch._CHOICES  # the threads filled the shared cache


def test_thread_results_match(monkeypatch):
    """Outputs computed concurrently through the fast path equal the same calls made one at a time."""
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    cases = [qkv(Sq=1, Sk=40), qkv(Sq=32), qkv(Hq=8, Hkv=2, Sq=8, Sk=20)]
    want = [sdpa(*c, enable_gqa=True) for c in cases]
    errors = []

    def work(t):
        try:
            for r in range(20):
                i = (t + r) % len(cases)
                out = sdpa(*cases[i], enable_gqa=True)
                if not torch.equal(out, want[i]):
                    errors.append((t, i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_compile_after_warm_cache_matches_eager():
    """torch.compile(fullgraph=True) traces the dispatcher with the cache bypassed: a warm cache (and the decode route,
    and a requested backend) neither breaks the trace nor changes the result."""
    q, k, v = qkv(Sq=1, Sk=40)
    qp, kp, vp = qkv(Sq=16)
    eager = (sdpa(q, k, v), sdpa(qp, kp, vp, is_causal=True), sdpa(qp, kp, vp, backend="sdpa"))

    def fn(q, k, v, qp, kp, vp):
        return sdpa(q, k, v), sdpa(qp, kp, vp, is_causal=True), sdpa(qp, kp, vp, backend="sdpa")
    compiled = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, qp, kp, vp)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_graph_does_not_depend_on_the_cache():
    """The trace bypasses the cache: new entries made by eager calls afterwards do not recompile the graph."""
    from torch._dynamo.testing import CompileCounter
    cnt = CompileCounter()
    fn = torch.compile(lambda q, k, v: sdpa(q, k, v), fullgraph=True, backend=cnt)
    a = qkv(Sq=1, Sk=40)
    fn(*a)
    for kw in (dict(Sq=3, Sk=7), dict(Sq=32, D=8), dict(Hq=2, Sq=16)):  # eager calls: new cache entries
        sdpa(*qkv(**kw))
        sdpa(*qkv(**kw), backend="reference")
    torch.testing.assert_close(fn(*a), sdpa(*a), rtol=1e-5, atol=1e-6)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("traces_contextvars", [True, False], ids=["contextvar-traced", "read-at-trace"])
def test_compile_follows_use_backend(monkeypatch, traces_contextvars):
    """Under torch.compile the backend named by use_backend(...) still decides. torch 2.11's dynamo cannot trace
    ContextVar.get (the GPU machine's stack): there the name is read when the graph is traced; both ways are forced
    here on whatever torch runs the suite (the contextvar-traced way only where this torch can trace it)."""
    if traces_contextvars and not dispatch._dynamo_traces_contextvars():
        importlib.import_module("torch._dynamo.variables")  # what the check looks for
        if not dispatch._dynamo_traces_contextvars():
            pytest.skip("this torch's dynamo cannot trace ContextVar.get")
    monkeypatch.setattr(dispatch, "_dynamo_traces_contextvars",
                        torch.compiler.assume_constant_result(lambda: traces_contextvars))
    torch._dynamo.reset()  # a graph of this lambda compiled by the other case would be reused, not traced again
    ran = []
    ref = BACKENDS["reference"]
    monkeypatch.setattr(type(ref), "forward", lambda self, p, _f=type(ref).forward: ran.append(1) or _f(self, p))
    q, k, v = qkv(Sq=16)
    fn = torch.compile(lambda q, k, v: sdpa(q, k, v), fullgraph=True, backend="eager")
    with fastattn.use_backend("reference"):
        out = fn(q, k, v)
    assert ran, "the compiled call did not run on the backend use_backend named"
    torch.testing.assert_close(out, sdpa(q, k, v, backend="reference"), rtol=1e-5, atol=1e-6)
