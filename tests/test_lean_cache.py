"""flash_attn_with_kvcache's lean path (fastattn/lean.py): a replayed decode step gives the full path's outputs and
caches bit for bit, its value checks still run on every call, each field of its key keeps calls apart, calls it must
not take go the full way, and a failure after its append restores the caches."""
import pytest
import torch

import fastattn
from fastattn import dispatch, kvcache, lean
from fastattn.backends import BACKENDS
from support.lean_keys import key_mismatches, unnoticed_fields

pytestmark = pytest.mark.skipif(BACKENDS["cpu"].unavailable() != [], reason="needs the C++ extension (cpu backend)")

kv = fastattn.flash_attn_with_kvcache


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(dispatch, "_CHOICES", {})


def _call(B=1, Sq=1, H=8, Hkv=8, D=16, Dv=16, S=300, snew=0, dtype=torch.float32, lens=200, seed=0, **kw):
    """(args, kwargs) of one call on fresh tensors: q (B, Sq, H, D), caches (B, S, Hkv, D|Dv), snew new tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    kc, vc = (torch.randn(B, S, Hkv, d, generator=g).to(dtype) for d in (D, Dv))
    k = v = None
    if snew:
        k, v = (torch.randn(B, snew, Hkv, d, generator=g).to(dtype) for d in (D, Dv))
    if not isinstance(lens, int):
        lens = torch.tensor(lens, dtype=torch.int32)
    return (q, kc, vc, k, v), dict(cache_seqlens=lens, **kw)


def _copy(call):
    args, kw = call
    return tuple(None if t is None else t.clone() for t in args), dict(kw)


def _outcome(call):
    """What a call gives: (outputs, caches afterwards), or its error's type."""
    args, kw = _copy(call)
    try:
        res = kv(*args, **kw)
    except Exception as e:  # noqa: BLE001  (a refusal is an outcome to compare)
        return type(e).__name__
    return (res if isinstance(res, tuple) else (res,)) + args[1:3]


def _same(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return a == b


def _validations(monkeypatch):
    """A list that grows by one every time a call takes the full path."""
    seen, real = [], kvcache._validate
    monkeypatch.setattr(kvcache, "_validate", lambda *a: seen.append(1) or real(*a))
    return seen


CASES = {
    "fp32 decode": dict(),
    "bf16 append": dict(dtype=torch.bfloat16, snew=1),
    "fp16 GQA two tokens causal": dict(dtype=torch.float16, Sq=2, H=8, Hkv=2, causal=True, snew=2),
    "batch 3 appending, same lengths": dict(B=3, lens=[120, 120, 120], snew=1, return_softmax_lse=True),
    "batch 3 without append, own lengths": dict(B=3, lens=[5, 299, 0]),
    "int lengths, append": dict(lens=77, snew=3, Sq=3),
    "window, softcap, scale, splits": dict(window_size=(20, 0), softcap=3.0, softmax_scale=0.3, num_splits=3,
                                           snew=1),
    "Dv != D, full cache": dict(D=32, Dv=8, lens=299, snew=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replay_equals_the_full_path(case, monkeypatch):
    full = _outcome(_call(**CASES[case]))  # learns the route
    seen = _validations(monkeypatch)
    replay = _outcome(_call(**CASES[case]))
    assert seen == [], "the second call did not replay"
    assert _same(replay, full)


def test_appends_into_rows_of_other_lengths_take_the_full_path(monkeypatch):
    kw = dict(B=2, snew=1)
    _outcome(_call(lens=[10, 10], **kw))
    seen = _validations(monkeypatch)
    call = _call(lens=[10, 40], **kw)
    got = _outcome(call)
    assert seen == [1]
    dispatch._CHOICES.clear()
    assert _same(got, _outcome(call))


@pytest.mark.parametrize("lens, snew", [(-1, 0), (300, 1), ([0, 301], 0), ([299, 299], 2)])
def test_value_checks_still_run_on_a_learnt_key(lens, snew):
    B = 1 if isinstance(lens, int) else len(lens)
    _outcome(_call(B=B, snew=snew, lens=0))
    args, kw = _call(B=B, snew=snew, lens=lens)
    before = [t.clone() for t in args[1:3]]
    with pytest.raises(ValueError, match="cache_seqlens"):
        kv(*args, **kw)
    assert all(torch.equal(a, b) for a, b in zip(args[1:3], before)), "a refused call changed a cache"


def test_calls_off_the_lean_path(monkeypatch):
    seen = _validations(monkeypatch)
    base = _call(snew=1)
    for _ in range(2):
        _outcome(base)
    assert len(seen) == 1  # learnt, then replayed
    (q, kc, vc, k, v), kw = base
    off = [((q.transpose(2, 3).contiguous().transpose(2, 3), kc, vc, k, v), kw),  # q not unit-strided in D
           ((q, kc, vc, k, v), dict(kw, cache_seqlens=torch.tensor([200], dtype=torch.int64))),
           ((q, kc, vc, k, v), dict(kw, cache_seqlens=torch.tensor([200, 7], dtype=torch.int32)[::2])),  # strided
           ((q, kc, vc, k, v), dict(kw, window_size=[-1, -1])),
           ((q, kc, vc, k, v), dict(kw, softcap=0)),
           ((q, kc, vc, k, v), dict(kw, return_softmax_lse=1)),
           ((q, kc, vc, k.double(), v), kw),
           ((q, kc, vc, k, None), kw),
           ((q, kc, vc, k, v), dict(kw, alibi_slopes=torch.zeros(8))),
           ((torch.nested.nested_tensor([q[0]]), kc, vc, k, v), kw)]  # no strides to read: refused by the full path
    for i, call in enumerate(off):
        _outcome(call)
        assert len(seen) == 2 + i, f"call {i} took the lean path"
    with torch.enable_grad():
        _outcome(((q.requires_grad_(), kc, vc, k, v), kw))
    assert len(seen) == 2 + len(off)


def test_failure_after_the_append_restores_the_caches(monkeypatch):
    call = _call(B=2, lens=[50, 50], snew=2)
    _outcome(call)  # learns
    route = next(r for key, r in dispatch._CHOICES.items() if key[1] is lean._CACHE)

    def boom(*a):
        raise RuntimeError("planted failure after the append")
    monkeypatch.setitem(dispatch._CHOICES, next(k for k in dispatch._CHOICES if k[1] is lean._CACHE),
                        route._replace(run=boom))
    (q, kc, vc, k, v), kw = _copy(call)
    before = kc.clone(), vc.clone()
    with pytest.raises(RuntimeError, match="planted"):
        kv(q, kc, vc, k, v, **kw)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def _pairs():
    """(field, call a, call b): two calls whose lean keys differ in that field only and whose outcomes differ (some
    refused by the full path: a key field also stands for the checks its first call passed)."""
    return [("requested", _call(), _call(backend="reference")),
            ("dtype", _call(), _call(dtype=torch.float64)),
            ("query shape", _call(), _call(Sq=17)),  # past the decode kernel's 16 rows
            ("key cache shape", _call(), ((_call()[0][0], torch.zeros(1, 299, 8, 16)) + _call()[0][2:], _call()[1])),
            ("value cache shape", _call(), _call(Dv=300)),  # past the decode kernel's head dims
            ("new keys", _call(snew=1), ((_call(snew=1)[0][:3] + tuple(t[:, :, :1] for t in _call(snew=1)[0][3:])),
                                         _call()[1])),  # one head where 8 are due: copy_ would broadcast it
            ("causal", _call(Sq=2), _call(Sq=2, causal=True)),
            ("window", _call(), _call(window_size=(4, 0))),
            ("softcap", _call(), _call(softcap=1.0)),
            ("scale", _call(), _call(softmax_scale=0.5)),
            ("num_splits", _call(S=4000, lens=3999), _call(S=4000, lens=3999, num_splits=1))]


def _key_mismatches():
    return key_mismatches(_pairs(), _outcome, _same)


def test_key_keeps_calls_apart():
    assert _key_mismatches() == []


def test_planted_key_field_is_caught(monkeypatch):
    """Each field of the lean key but its tags, blanked in turn (planted), lets some call replay another's route."""
    args, kw = _call()
    n = len(lean.cache_key(*args, kw["cache_seqlens"], None, False, (-1, -1), 0.0, 0, False, None))
    monkeypatch.setattr(lean, "cache_call", lean.cache_call_py)  # the reference asks lean.cache_key (C++: its own)
    missed = unnoticed_fields(monkeypatch, lean, "cache_key", n, 2, _key_mismatches)
    assert missed == [], f"no pair notices lean cache key field(s) {missed} missing"


def test_cache_call_matches_its_reference():
    """fastattn._C.lean_cache_call against lean.cache_call_py on copies of the same calls (every case above, before
    and after its route is learnt; lengths past the cache and appends into rows of different lengths, which go the
    full path), their outputs and the caches after them; and under a refusal (autocast, a forward-AD level)."""
    if lean.cache_call is lean.cache_call_py:
        pytest.skip("the extension was built without lean_cache_call")
    # (learnt from the first, then the second: the same key, values the full path must take)
    extra = {"past the cache": (dict(lens=100, snew=2), dict(lens=299, snew=2)),
             "rows of other lengths appending": (dict(B=2, lens=[5, 5], snew=1), dict(B=2, lens=[3, 9], snew=1))}

    def both(call):
        got = []
        for f in (lean.cache_call, lean.cache_call_py):
            (q, kc, vc, k, v), kw = _copy(call)
            r = f(q, kc, vc, k, v, kw["cache_seqlens"], kw.get("softmax_scale"), kw.get("causal", False),
                  kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), kw.get("num_splits", 0),
                  kw.get("return_softmax_lse", False), None)
            got.append((r, kc, vc))
        (a, kca, vca), (b, kcb, vcb) = got
        assert torch.equal(kca, kcb) and torch.equal(vca, vcb)
        if isinstance(a, torch.Tensor) or isinstance(a, tuple) and len(a) == 2:
            assert _same(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,))
        else:
            assert a == b
        return a

    for name, (learn, case) in {**{n: (c, c) for n, c in CASES.items()}, **extra}.items():
        dispatch._CHOICES.clear()
        call = _call(**case)
        first = both(call)
        assert isinstance(first, tuple) and len(first) == 13, name  # a key to learn
        _outcome(_call(**learn))  # learns it
        again = both(call)
        assert (again is None) == (name in extra), name
    import torch.autograd.forward_ad as fwad
    call = _call()
    _outcome(call)
    for ctx in (lambda: torch.autocast("cpu"), fwad.dual_level):
        with ctx():
            (q, kc, vc, k, v), kw = _copy(call)
            assert lean.cache_call(q, kc, vc, k, v, kw["cache_seqlens"], None, False, (-1, -1), 0.0, 0, False,
                                   None) is None


def test_cache_call_memo_follows_the_choices(monkeypatch):
    """lean_cache_call's memo (csrc/lean_cache.cpp) replays an entry only while dispatch._CHOICES is unchanged and
    the call's facts equal the entry's: a route replaced in place, a table cleared or replaced, and a call differing
    in any one key field (a shape, the window, softcap, scale, num_splits, the new tokens, the backend) each take
    effect on the next call."""
    if lean.cache_call is lean.cache_call_py:
        pytest.skip("the extension was built without lean_cache_call")

    def args(call):  # lean.cache_call's 13 arguments
        (q, kc, vc, k, v), kw = call
        return (q, kc, vc, k, v, kw["cache_seqlens"], kw.get("softmax_scale"), kw.get("causal", False),
                kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), kw.get("num_splits", 0), False,
                kw.get("backend"))

    base = _call(lens=100, softmax_scale=0.25)
    _outcome(base)  # learns the route
    a = args(base)
    key = lean.cache_key(*a)
    assert type(lean.cache_call(*a)) is torch.Tensor and type(lean.cache_call(*a)) is torch.Tensor  # (the memo's)
    ran = []
    real = dispatch._CHOICES[key]

    def spy(qt, kc, vc, lens):
        ran.append(1)
        return real.run(qt, kc, vc, lens)
    dispatch._CHOICES[key] = real._replace(run=spy)  # in place: the dict's version moves
    lean.cache_call(*a)
    assert ran == [1]
    dispatch._CHOICES[key] = False  # the key takes the full path now
    assert lean.cache_call(*a) is None
    dispatch._CHOICES.clear()
    assert lean.cache_call(*a) == key  # nothing learnt: the key, to learn
    monkeypatch.setattr(dispatch, "_CHOICES", {key: real._replace(run=spy)})  # another table
    lean.cache_call(*a)
    assert ran == [1, 1]
    assert type(lean.cache_call(*a)) is torch.Tensor and ran == [1, 1, 1]  # this table's entry; each call below differs
    others = [args(_call(lens=100, softmax_scale=0.25, **kw)) for kw in (
        dict(S=301), dict(window_size=(8, -1)), dict(window_size=(-1, 8)), dict(softcap=5.0), dict(num_splits=2),
        dict(snew=1), dict(backend="reference"), dict(causal=True))]
    others += [args(_call(lens=100, softmax_scale=s)) for s in (0.5, None)]
    for other in others:
        assert lean.cache_call(*other) == lean.cache_key(*other) != key, other[6:]
    assert ran == [1, 1, 1]
