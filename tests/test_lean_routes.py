"""The learnt routes' C++ op calls (csrc/lean_routes.cpp, fastattn._C.DecodeRoute / FwdRoute): the same bits as the
torch.ops calls they replace, and the same dispatcher path: a TorchDispatchMode and the profiler see the ops, the
decode op's Autograd fallback still refuses a backward, and a TorchFunctionMode keeps the lean path off (it sees
the ops through torch.ops on the full path)."""
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import dispatch, lean, ops
from fastattn.backends.base import Lean
from support import torch_threads

pytestmark = pytest.mark.skipif(not ops._ROUTES, reason="needs the C++ extension with its lean routes (fastattn._C)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(dispatch, "_CHOICES", {})


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_decode_route_equals_the_op(dtype):
    """DecodeRoute.out / .call against torch.ops.fastattn.decode_fwd with the same arguments: SDPA's layout with and
    without a bias, the cache layout with lengths, windows, softcap and fixed splits."""
    op = torch.ops.fastattn.decode_fwd.default
    q, k, v = _qkv(2, 8, 4, 3, 150, 40, dtype, 1)
    bias = torch.randn(2, 8, 3, 150).to(dtype)
    for scale, wl, wr, softcap, splits in ((0.125, -1, -1, 0.0, 0), (0.3, 70, 0, 5.0, 3), (0.2, -1, 2, 0.0, 1)):
        route = fastattn._C.DecodeRoute(scale, wl, wr, softcap, splits, True)
        rest = (None, None, None, scale, wl, wr, softcap, None, splits, True)
        assert torch.equal(route.out(q, k, v), op(q, k, v, *rest)[0])
        assert torch.equal(route.out(q, k, v, bias), op(q, k, v, *rest, bias)[0])
        kc, vc = (t.transpose(1, 2).contiguous() for t in (k, v))  # (B, Hkv, S, D) -> (B, S, Hkv, D)
        lens = torch.tensor([150, 77], dtype=torch.int32)
        cached = fastattn._C.DecodeRoute(scale, wl, wr, softcap, splits, False)
        want = op(q, kc, vc, lens, None, None, scale, wl, wr, softcap, None, splits)
        got = cached.call(q, kc, vc, lens)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_fwd_route_equals_the_op(dtype):
    """FwdRoute.out against torch.ops.fastattn.fwd below Autograd (ops.attention_runner's Python route)."""
    op = torch.ops.fastattn.fwd.default
    q, k, v = _qkv(2, 6, 3, 37, 53, 24, dtype, 2)
    bias = torch.randn(2, 6, 37, 53).to(dtype)
    for scale, wl, wr, bottom_right, softcap in ((0.2, -1, -1, False, 0.0), (0.1, 10, 0, True, 3.0)):
        route = fastattn._C.FwdRoute(37, 53, scale, wl, wr, bottom_right, softcap, False, False, 0)
        for b in (None, bias):
            want = op(q, k, v, b, None, None, 37, 53, scale, wl, wr, bottom_right, softcap, None, 0.0, 0, 0, False,
                      None, None, False, 0)[0]
            assert torch.equal(route.out(q, k, v, b), want)


def test_a_wrong_binding_is_caught():
    """The equality above is sensitive to the bound arguments: a route bound with another scale differs (so a
    binding that dropped or swapped a field would fail those tests)."""
    q, k, v = _qkv(1, 4, 4, 1, 100, 32, torch.float32, 3)
    rest = (None, None, None, 0.125, -1, -1, 0.0, None, 0, True)
    want = torch.ops.fastattn.decode_fwd.default(q, k, v, *rest)[0]
    assert not torch.equal(fastattn._C.DecodeRoute(0.25, -1, -1, 0.0, 0, True).out(q, k, v), want)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _learnt(q, k, v, **kw):
    """The route the surface's call learns (fastattn/lean.py)."""
    with torch.no_grad():
        fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
        route = dispatch._CHOICES[lean.key(q, k, v, kw.get("is_causal", False), None, q.shape[1] != k.shape[1],
                                           "cpu")]
    return route


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_dispatch_mode_and_profiler_see_the_replayed_op(kind):
    """A replay through the C++ routes still enters the dispatcher at its top: a TorchDispatchMode records the op,
    and so does the profiler."""
    Sq, op = (1, "fastattn.decode_fwd") if kind == "decode" else (40, "fastattn.fwd")
    q, k, v = _qkv(1, 4, 4, Sq, 90, 32, torch.float32, 4)
    route = _learnt(q, k, v)
    assert route.name == ("cpu.decode_fwd" if kind == "decode" else "cpu")
    assert type(route.run.__self__) is (fastattn._C.DecodeRoute if kind == "decode" else fastattn._C.FwdRoute)
    with torch.no_grad():
        with _Ops() as mode:
            fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
        assert any(s.startswith(op) for s in mode.seen), mode.seen
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert any(e.name == op.replace(".", "::") for e in prof.events()), sorted({e.name for e in prof.events()})


def test_function_mode_takes_the_full_path():
    """While a TorchFunctionMode is active the lean path steps aside (lean.tracing), so the mode sees the op as
    torch.ops calls it."""
    q, k, v = _qkv(1, 4, 4, 1, 90, 32, torch.float32, 5)
    _learnt(q, k, v)
    seen = []

    class Funcs(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Funcs():
        assert lean.tracing()
        fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert not lean.tracing()
    assert any("decode_fwd" in s for s in seen), seen


def test_decode_route_keeps_the_autograd_fallback():
    """decode_fwd is inference-only: through the route, as through torch.ops, an output of inputs that record a
    gradient carries a grad_fn whose backward raises."""
    q, k, v = _qkv(1, 2, 2, 1, 20, 16, torch.float32, 6)
    q.requires_grad_()
    out = fastattn._C.DecodeRoute(0.25, -1, -1, 0.0, 0, True).out(q, k, v)
    assert out.requires_grad
    with pytest.raises(RuntimeError):
        out.sum().backward()


def _same(a, b):
    if type(a) is torch.Tensor or type(b) is torch.Tensor:
        return type(a) is type(b) and torch.equal(a, b)
    return a == b


def test_call_matches_its_reference():
    """fastattn._C.lean_call against lean.call_py on the same calls, before and after their routes are learnt, and
    under each refusal: a jit trace, autocast, a torch-function mode, a forward-AD level, a functorch transform."""
    if lean.call is lean.call_py:
        pytest.skip("the extension was built without lean_call")
    calls = []
    for dtype in (torch.float32, torch.bfloat16):
        for Sq, Sk, causal in ((1, 300, False), (40, 90, True), (16, 16, False)):
            q, k, v = _qkv(1, 4, 2, Sq, Sk, 32, dtype, Sq)
            calls.append(((q, k, v, causal, None, True, None), None))
            calls.append(((q, k, v, False, 0.3, True, "cpu"), torch.ones(1, 1, 1, Sk, dtype=torch.bool)))
    for args, mask in calls:
        for _ in range(2):  # unknown key, then learnt
            a, b = lean.call(*args, mask), lean.call_py(*args, mask)
            assert _same(a, b), args[3:]
            if type(a) is tuple:
                q, k, v, causal, scale, gqa, backend = args
                with torch.no_grad():
                    fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale,
                                                          enable_gqa=gqa, backend=backend)
    args, mask = calls[0]
    assert type(lean.call(*args, mask)) is torch.Tensor  # learnt: each refusal below is the only difference

    class Funcs(TorchFunctionMode):
        pass

    import torch.autograd.forward_ad as fwad
    refusals = {"autocast": lambda: torch.autocast("cpu"), "function mode": Funcs, "forward AD": fwad.dual_level}
    for name, ctx in refusals.items():
        with ctx():
            assert lean.call(*args, mask) is None and lean.call_py(*args, mask) is None, name
    seen = []
    torch.func.vmap(lambda q: seen.append(lean.call(q, *args[1:], mask)) or q)(args[0][None])
    torch.jit.trace(lambda q: seen.append(lean.call(q, *args[1:], mask)) or q, (args[0],), check_trace=False)
    assert seen == [None, None]


def test_call_memo_follows_the_choices(monkeypatch):
    """lean_call's memo (csrc/lean_memo.h) replays an entry only while dispatch._CHOICES is unchanged and the call's
    facts equal the entry's: a route replaced in place, a table replaced or cleared, another key length class, another
    requested backend, masked or not, another thread count each take effect on the next call."""
    if lean.call is lean.call_py:
        pytest.skip("the extension was built without lean_call")
    assert ops._C.LEAN_MEMO == (sys.version_info < (3, 13))  # CPython 3.11-3.12 (dict versions); off past them
    q, k, v = _qkv(1, 4, 4, 1, 64, 32, torch.float32, 0)
    args = (q, k, v, False, None, False, None)
    fastattn.scaled_dot_product_attention(q, k, v)  # learns the key's route
    key = lean.key(*args)
    assert type(lean.call(*args)) is torch.Tensor and type(lean.call(*args)) is torch.Tensor  # (the memo's entry)
    ran = []
    spy = Lean("spy", lambda *t: ran.append(len(t)) or t[0])
    dispatch._CHOICES[key] = spy  # in place: the dict's version moves
    assert lean.call(*args) is q and ran == [3]
    monkeypatch.setitem(dispatch._CHOICES, key, False)  # the key takes the full path now
    assert lean.call(*args) is None
    dispatch._CHOICES[key] = spy
    lean.call(*args)
    assert ran == [3, 3]
    dispatch._CHOICES.clear()
    assert lean.call(*args) == key  # nothing learnt: the key, to learn
    dispatch._CHOICES[key] = spy
    assert lean.call(*args) is q and ran == [3, 3, 3]
    monkeypatch.setattr(dispatch, "_CHOICES", {})  # another table
    assert lean.call(*args) == key
    dispatch._CHOICES[key] = spy
    assert lean.call(*args) is q and ran == [3] * 4  # the memo's entry for this table; each call below differs
    # another class of key length (past every break: a class of its own), a requested backend, a mask, threads
    longer = _qkv(1, 4, 4, 1, 64 + max(dispatch.length_breaks(1)) + 1, 32, torch.float32, 1)
    assert lean.call(*longer, False, None, False, None) == lean.key(*longer, False, None, False, None) != key
    assert lean.call(q, k, v, False, None, False, "reference")[1] == "reference"
    assert type(lean.call(*args, torch.ones(1, 1, 1, 64, dtype=torch.bool))) is tuple
    with torch_threads(1 if torch.get_num_threads() > 1 else 2):
        assert type(lean.call(*args)) is tuple
    assert lean.call(*args) is q and ran == [3] * 5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_masked_routes_equal_the_python_bias(dtype):
    """out_masked (the mask's bias made in C++) against the op on ops._lean_bias's bias: bool masks of every
    broadcast shape the lean key takes, and a mask in q's dtype."""
    q, k, v = _qkv(2, 4, 2, 3, 70, 32, dtype, 7)
    qp, kp, vp = _qkv(2, 4, 2, 20, 70, 32, dtype, 8)
    g = torch.Generator().manual_seed(9)
    masks = [torch.rand(2, 1, 1, 70, generator=g) > 0.3, torch.rand(1, 4, 3, 70, generator=g) > 0.5,
             torch.rand(2, 4, 3, 1, generator=g) > 0.2, torch.randn(2, 1, 3, 70, generator=g).to(dtype)]
    decode = fastattn._C.DecodeRoute(0.2, -1, -1, 0.0, 0, True)
    fwd = fastattn._C.FwdRoute(20, 70, 0.2, -1, -1, False, 0.0, False, False, 0)
    for m in masks:
        assert torch.equal(decode.out_masked(q, k, v, m), decode.out(q, k, v, ops._lean_bias(q, k, m)))
        mp = m if m.shape[2] == 1 else m[:, :, :1].expand(-1, -1, 20, -1)  # (.., 3|1, ..) -> (.., 20, ..)
        assert torch.equal(fwd.out_masked(qp, kp, vp, mp), fwd.out(qp, kp, vp, ops._lean_bias(qp, kp, mp)))
