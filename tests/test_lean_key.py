"""fastattn._C.lean_key (csrc/lean_key.cpp), the SDPA surface's lean key in C++, against its reference
fastattn.lean.key_py: the same key, or the same refusal (None), on a matrix of calls that covers every field and
every refusal; and the matrix notices any one field of the key gone wrong (planted)."""
import pytest
import torch

from fastattn import dispatch, lean

pytestmark = pytest.mark.skipif(lean.key is lean.key_py,
                                reason="fastattn._C was not built (or predates lean_key): lean.key is key_py itself")


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
             "bool grad-free": torch.zeros(1, 1, 1, 40, dtype=torch.bool), "subclass": torch.nn.Parameter(t(1, 1, 3, 40)),
             "meta": t(1, 1, 3, 40).to("meta"), "int": torch.ones(1, 1, 3, 40, dtype=torch.int64),
             "list": [[1.0]], "strided": t(1, 1, 3, 80)[..., ::2]}
    for name, m in masks.items():
        calls.append((f"mask {name}", (q, k, v, False, None, False, None, m)))
    return calls


def _mismatches(reference):
    """The calls whose C++ key differs from reference's (grad on and off)."""
    bad = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for name, args in _calls():
                if lean.key(*args) != reference(*args):
                    bad.append((name, grad))
    return bad


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


def test_length_classes_follow_replaced_choices(monkeypatch):
    """_CHOICES replaced (as tests do): the key's length class reads the new table, filled by length_breaks."""
    q, k, v = (torch.randn(1, 2, s, 8) for s in (5, 40, 40))
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    assert lean.key(q, k, v, False, None, False, None) == lean.key_py(q, k, v, False, None, False, None)
    assert (dispatch.LEAN, 5) in dispatch._CHOICES


@pytest.mark.parametrize("field", range(1, 10))
def test_planted_field_is_caught(field):
    """A reference with one key field changed (planted) differs from the C++ key on some call of the matrix."""
    def planted(*args):
        key = lean.key_py(*args)
        return None if key is None else key[:field] + ("?",) + key[field + 1:]
    assert _mismatches(planted) != []


def test_planted_refusal_is_caught():
    """A reference that takes every call (no refusals) differs from the C++ key on the matrix's refused calls."""
    def planted(*args):
        return lean.key_py(*args) or ("taken",)
    assert len(_mismatches(planted)) >= 20
