"""fastattn._C.lean_key and cache_key (csrc/lean.cpp), the lean keys of the SDPA surface and of
flash_attn_with_kvcache in C++, against their references fastattn.lean.key_py and cache_key_py: the same key, or the
same refusal (None), on a matrix of calls that covers every field and every refusal; and the matrix notices any one
field of the key gone wrong (planted); and cache_append (its append of new keys and values) against cache_append_py."""
import os

import pytest
import torch

from fastattn import dispatch, lean
from support import torch_threads

pytestmark = pytest.mark.skipif(lean.cache_append is lean.cache_append_py,
                                reason="fastattn._C was not built (or predates csrc/lean.cpp): lean.py runs its "
                                       "Python references")


def _calls():
    """(name, args of key) covering each key field's values and each refusal of key_py."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)
    q, k, v = t(1, 4, 3, 16), t(1, 4, 40, 16), t(1, 4, 40, 8)
    calls = [("plain", (q, k, v, False, None, False, None))]
    for dt in (torch.float16, torch.bfloat16, torch.float64, torch.int32):
        calls.append((f"dtype {dt}", (q.to(dt), k.to(dt), v.to(dt), False, None, False, None)))
    calls += [
        ("k dtype", (q, k.double(), v, False, None, False, None)),
        ("v dtype", (q, k, v.half(), False, None, False, None)),
        ("q shape", (t(2, 4, 5, 16), t(2, 4, 40, 16), t(2, 4, 40, 8), False, None, False, None)),
        ("gqa", (t(1, 8, 3, 16), k, v, False, None, True, None)),
        ("gqa off", (t(1, 8, 3, 16), k, v, False, None, False, None)),
        ("gqa uneven", (t(1, 6, 3, 16), k, v, False, None, True, None)),
        ("zero key heads", (t(1, 0, 3, 16), t(1, 0, 40, 16), t(1, 0, 40, 8), False, None, True, None)),
        ("batch", (q, t(2, 4, 40, 16), t(2, 4, 40, 8), False, None, False, None)),
        ("head dim", (q, t(1, 4, 40, 8), v, False, None, False, None)),
        ("value length", (q, k, t(1, 4, 41, 8), False, None, False, None)),
        ("value heads", (q, k, t(1, 2, 40, 8), False, None, False, None)),
        ("3-D", (q[0], k[0], v[0], False, None, False, None)),
        ("5-D", (q[None], k[None], v[None], False, None, False, None)),
        ("head-dim stride", (t(1, 4, 3, 32)[..., ::2], k, v, False, None, False, None)),
        ("k stride", (q, t(1, 4, 40, 32)[..., ::2], v, False, None, False, None)),
        ("v stride", (q, k, t(1, 4, 40, 16)[..., ::2], False, None, False, None)),
        ("transposed rows", (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, False, None, False, None)),
        ("causal", (q, k, v, True, None, False, None)),
        ("tensor is_causal", (q, k, v, torch.tensor(True), None, False, None)),
        ("int is_causal", (q, k, v, 1, None, False, None)),
        ("scale", (q, k, v, False, 0.5, False, None)),
        ("int scale", (q, k, v, False, 1, False, None)),
        ("tensor gqa", (q, k, v, False, None, torch.tensor(False), None)),
        ("backend", (q, k, v, False, None, False, "sdpa")),
        ("empty backend", (q, k, v, False, None, False, "")),
        ("subclass", (torch.nn.Parameter(q), k, v, False, None, False, None)),
        ("list", ([1.0], k, v, False, None, False, None)),
        ("meta", (q.to("meta"), k, v, False, None, False, None)),
        ("nested", (torch.nested.nested_tensor([q[0], q[0]]), k, v, False, None, False, None)),
        ("sparse k", (q, k.to_sparse(), v, False, None, False, None)),
        ("grad", (q.clone().requires_grad_(), k, v, False, None, False, None)),
        ("grad v", (q, k, v.clone().requires_grad_(), False, None, False, None)),
    ]
    for Sk in (0, 1, 2, 3, 4, 64, 300, 5000):  # across the declared breaks of Sq = 3
        calls.append((f"Sk={Sk}", (q, t(1, 4, Sk, 16), t(1, 4, Sk, 8), False, None, False, None)))
    for Sq in (1, 2, 17):
        calls.append((f"Sq={Sq}", (t(1, 4, Sq, 16), k, v, False, None, False, None)))
    masks = {"bool": torch.ones(2, 4, 3, 40, dtype=torch.bool), "float": t(1, 1, 3, 40), "row": t(1, 1, 1, 40),
             "last dim 1": t(1, 4, 3, 1), "other dtype": t(1, 1, 3, 40).double(), "3-D": t(1, 3, 40),
             "last dim": t(1, 1, 3, 39), "grad": t(1, 1, 3, 40).requires_grad_(),
             "bool grad-free": torch.zeros(1, 1, 1, 40, dtype=torch.bool),
             "subclass": torch.nn.Parameter(t(1, 1, 3, 40)),
             "meta": t(1, 1, 3, 40).to("meta"), "int": torch.ones(1, 1, 3, 40, dtype=torch.int64),
             "list": [[1.0]], "strided": t(1, 1, 3, 80)[..., ::2]}
    for name, m in masks.items():
        calls.append((f"mask {name}", (q, k, v, False, None, False, None, m)))
    return calls


def _cache_calls():
    """(name, args of cache_key) covering each field's values and each refusal of cache_key_py."""
    g = torch.Generator().manual_seed(1)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)
    q, kc, vc, k, v = t(2, 1, 4, 16), t(2, 64, 2, 16), t(2, 64, 2, 8), t(2, 1, 2, 16), t(2, 1, 2, 8)
    lens = torch.tensor([5, 7], dtype=torch.int32)
    base = (q, kc, vc, None, None, lens, None, True, (-1, -1), 0.0, 0, False, None)

    def with_(**kw):
        names = ("q", "kc", "vc", "k", "v", "lens", "scale", "causal", "window", "softcap", "splits", "lse", "backend")
        return tuple(kw.get(n, a) for n, a in zip(names, base))
    calls = [("plain", base), ("appending", with_(k=k, v=v)), ("int lengths", with_(lens=5))]
    for dt in (torch.float16, torch.bfloat16, torch.float64, torch.int32):
        calls.append((f"dtype {dt}", with_(q=q.to(dt), kc=kc.to(dt), vc=vc.to(dt))))
    calls += [
        ("kc dtype", with_(kc=kc.double())), ("vc dtype", with_(vc=vc.half())),
        ("q shape", with_(q=t(2, 3, 4, 16))), ("kc shape", with_(kc=t(2, 80, 2, 16))),
        ("vc shape", with_(vc=t(2, 64, 2, 4))), ("new shapes", with_(k=t(2, 2, 2, 16), v=t(2, 2, 2, 8))),
        ("new k only", with_(k=k)), ("new v only", with_(v=v)),
        ("new dtype", with_(k=k.double(), v=v)), ("new grad", with_(k=k.clone().requires_grad_(), v=v)),
        ("new subclass", with_(k=torch.nn.Parameter(k), v=v)), ("new meta", with_(k=k.to("meta"), v=v)),
        ("scale", with_(scale=0.5)), ("int scale", with_(scale=1)), ("causal", with_(causal=False)),
        ("int causal", with_(causal=1)), ("window", with_(window=(3, 0))), ("list window", with_(window=[-1, -1])),
        ("window of 3", with_(window=(1, 2, 3))), ("bool window", with_(window=(True, 0))),
        ("softcap", with_(softcap=5.0)), ("int softcap", with_(softcap=0)), ("splits", with_(splits=2)),
        ("bool splits", with_(splits=False)), ("lse", with_(lse=True)), ("int lse", with_(lse=1)),
        ("backend", with_(backend="cpu")), ("empty backend", with_(backend="")),
        ("int64 lengths", with_(lens=lens.long())),
        ("strided lengths", with_(lens=torch.tensor([5, 0, 7, 0], dtype=torch.int32)[::2])),
        ("short lengths", with_(lens=lens[:1])), ("2-D lengths", with_(lens=lens[None])),
        ("list lengths", with_(lens=[5, 7])), ("bool lengths", with_(lens=True)),
        ("3-D q", with_(q=q[0], lens=lens[:1])), ("3-D q, int lengths", with_(q=q[0], lens=5)),
        ("q stride", with_(q=t(2, 1, 4, 32)[..., ::2])), ("kc stride", with_(kc=t(2, 64, 2, 32)[..., ::2])),
        ("vc stride", with_(vc=t(2, 64, 2, 16)[..., ::2])), ("q grad", with_(q=q.clone().requires_grad_())),
        ("kc grad", with_(kc=kc.clone().requires_grad_())), ("subclass", with_(q=torch.nn.Parameter(q))),
        ("meta", with_(vc=vc.to("meta"))), ("nested", with_(q=torch.nested.nested_tensor([q[0], q[1]]))),
        ("sparse", with_(kc=kc.to_sparse())),
    ]
    return calls


def _mismatches(reference, calls=_calls, ours=lambda *a: lean.key(*a)):
    """The calls whose C++ key differs from reference's (grad on and off, one thread and two)."""
    bad = []
    for grad, threads in ((True, 1), (False, 1), (False, 2)):
        with torch_threads(threads), torch.set_grad_enabled(grad):
            for name, args in calls():
                if ours(*args) != reference(*args):
                    bad.append((name, grad, threads))
    return bad


def _cache_mismatches(reference):
    return _mismatches(reference, _cache_calls, lambda *a: lean.cache_key(*a))


def test_cpp_key_equals_reference():
    assert _mismatches(lean.key_py) == []
    keys = [lean.key(*args) for _, args in _calls()]
    assert sum(k is not None for k in keys) >= 20 and sum(k is None for k in keys) >= 20  # both kinds exercised


def test_ambient_backend(monkeypatch):
    """The requested backend: the argument, else use_backend's, else FASTATTN_BACKEND, else auto."""
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    args = (q, k, v, False, None, False)
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    assert lean.key(*args, None)[1] == "auto" and lean.key(*args, "") == lean.key_py(*args, "")
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert lean.key(*args, None)[1] == "reference" == lean.key_py(*args, None)[1]
    with dispatch.use_backend("sdpa"):
        assert lean.key(*args, None)[1] == "sdpa" == lean.key_py(*args, None)[1]
        assert lean.key(*args, "cpu")[1] == "cpu"
    # os.environ replaced wholesale: the C++ key reads its encoded mapping only while it is the object lean saw
    monkeypatch.setattr(os, "environ", {**os.environ, "FASTATTN_BACKEND": "sdpa"})
    assert lean.key(*args, None)[1] == "sdpa" == lean.key_py(*args, None)[1]


def test_length_classes_follow_replaced_choices(monkeypatch):
    """_CHOICES replaced (as tests do): the key's length class reads the new table, filled by length_breaks."""
    q, k, v = (torch.randn(1, 2, s, 8) for s in (5, 40, 40))
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    assert lean.key(q, k, v, False, None, False, None) == lean.key_py(q, k, v, False, None, False, None)
    assert (dispatch.LEAN, 5) in dispatch._CHOICES


def _blanked(reference, field):
    """reference with key field `field` changed (planted)."""
    def planted(*args):
        key = reference(*args)
        return None if key is None else key[:field] + ("?",) + key[field + 1:]
    return planted


def _taking(reference):
    """reference without its refusals (planted): every call gets a key."""
    return lambda *args: reference(*args) or ("taken",)


@pytest.mark.parametrize("field", range(1, 11))
def test_planted_field_is_caught(field):
    """A reference with one key field changed (planted) differs from the C++ key on some call of the matrix."""
    assert _mismatches(_blanked(lean.key_py, field)) != []


def test_planted_refusal_is_caught():
    """A reference that takes every call (no refusals) differs from the C++ key on the matrix's refused calls."""
    assert len(_mismatches(_taking(lean.key_py))) >= 20


def test_cpp_cache_key_equals_reference():
    assert _cache_mismatches(lean.cache_key_py) == []
    keys = [lean.cache_key(*args) for _, args in _cache_calls()]
    assert sum(k is not None for k in keys) >= 15 and sum(k is None for k in keys) >= 20  # both kinds exercised


@pytest.mark.parametrize("field", range(2, 13))
def test_planted_cache_field_is_caught(field):
    assert _cache_mismatches(_blanked(lean.cache_key_py, field)) != []


def test_planted_cache_refusal_is_caught():
    assert len(_cache_mismatches(_taking(lean.cache_key_py))) >= 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,snew,lo", [(1, 1, 0), (2, 1, 63), (3, 4, 10), (2, 2, 0)])
def test_cpp_cache_append_equals_reference(dtype, B, snew, lo):
    """cache_append (C++) and cache_append_py write the same slots, return the same old slots and lengths and bump
    the caches' versions alike; caches whose rows lie back to back (moved with memcpy: the contiguous layout, and
    batch rows a padded stride apart) and a cache in SDPA's head-major layout read through a transposed view (strided
    slots: copy_), and new keys that are not contiguous (copy_) included."""
    g = torch.Generator().manual_seed(B * 100 + snew * 10 + lo)
    for layout in ("bshd", "bshd padded rows", "bhsd view", "strided new"):
        caches = [torch.randn(B, 70 if layout == "bshd padded rows" else 64, 2, d, generator=g).to(dtype)[:, :64]
                  for d in (16, 8)]
        if layout == "bhsd view":  # (B, H, S, D) storage seen as (B, S, H, D)
            caches = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in caches]
        k, v = (torch.randn(B, snew, 2, d, generator=g).to(dtype) for d in (16, 8))
        if layout == "strided new":
            k = torch.randn(B, 2, snew, 16, generator=g).to(dtype).transpose(1, 2)  # (B, H, Snew, D) -> (B, Snew, H, D)
        ref = [c.clone() for c in caches]
        versions = [c._version for c in caches + ref]
        got = lean.cache_append(*caches, k, v, lo)
        want = lean.cache_append_py(*ref, k, v, lo)
        assert all(torch.equal(a, b) for a, b in zip(caches + list(got), ref + list(want))), layout
        bumped = [c._version - v0 for c, v0 in zip(caches + ref, versions)]
        assert bumped[:2] == bumped[2:] and min(bumped) > 0, (layout, bumped)
        assert got[2].dtype == torch.int32 and got[2].tolist() == [lo + snew] * B
        lean.cache_append(*caches, got[0], got[1], lo)  # the restore
        lean.cache_append_py(*ref, want[0], want[1], lo)
        assert all(torch.equal(a, b) for a, b in zip(caches, ref))


def test_cpp_cache_append_refuses_slots_outside():
    kc, vc = torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4)
    before = kc.clone()
    with pytest.raises(RuntimeError, match="outside caches"):
        lean.cache_append(kc, vc, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 7)
    assert torch.equal(kc, before)


def test_planted_append_is_caught():
    """An append one slot off (planted) differs from the reference on the parity check's data."""
    kc, vc = torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4)
    k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    a, b = [kc.clone(), vc.clone()], [kc.clone(), vc.clone()]
    lean.cache_append(*a, k, v, 3)
    lean.cache_append_py(*b, k, v, 4)  # planted: the wrong slot
    assert not torch.equal(a[0], b[0])
