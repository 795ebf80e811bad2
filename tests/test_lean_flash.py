"""flash_attn_func's lean path (fastattn/lean.py `flash_key`): a replay gives the full path's output bit for bit,
the replayed route is a fresh decision's at every key length around every declared break, calls with a feature the
path does not take go the full way, and its keys stay apart from the SDPA surface's (planted: sharing them replays a
top-left causal route for a bottom-right call)."""
import random

import pytest
import torch

import fastattn
from fastattn import dispatch, lean
from fastattn.backends import BACKENDS
from fastattn.functional import _flash_params
from support import torch_threads

pytestmark = pytest.mark.skipif(BACKENDS["cpu"].unavailable() != [], reason="needs the C++ extension (cpu backend)")

flash = fastattn.flash_attn_func


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(dispatch, "_CHOICES", {})


def _qkv(dtype, B, Hq, Hkv, Sq, Sk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, s, h, D, generator=g).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk))]


def _full(q, k, v, causal):
    """The full path's output (the dispatcher on flash_attn_func's params), as flash_attn_func returns it."""
    p = _flash_params(q, k, v, 0.0, None, causal, (-1, -1), 0.0, None, False, False)
    return dispatch.run(p)[0].transpose(1, 2)  # (B, H, Sq, Dv) -> (B, Sq, H, Dv)


_CALLS = [  # (dtype, B, Hq, Hkv, Sq, Sk, D, causal): bottom-right causal with Sq <, ==, > Sk, decode, GQA, tiny
    (torch.float32, 1, 12, 12, 32, 32, 64, True), (torch.float32, 2, 4, 4, 20, 90, 32, True),
    (torch.float32, 1, 4, 4, 90, 20, 32, True), (torch.float32, 1, 8, 2, 1, 300, 64, True),
    (torch.float32, 2, 8, 8, 100, 100, 64, False), (torch.bfloat16, 1, 12, 12, 128, 128, 64, True),
    (torch.bfloat16, 1, 16, 4, 3, 520, 128, True), (torch.bfloat16, 2, 4, 4, 70, 40, 64, True),
    (torch.bfloat16, 1, 12, 12, 1, 300, 64, False),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("call", _CALLS, ids=lambda c: f"{str(c[0])[6:]}-B{c[1]}H{c[2]}/{c[3]}-Sq{c[4]}-Sk{c[5]}"
                                                           f"-D{c[6]}{'-causal' if c[7] else ''}")
def test_replay_equals_the_full_path(monkeypatch, call, threads):
    dtype, B, Hq, Hkv, Sq, Sk, D, causal = call
    q, k, v = _qkv(dtype, B, Hq, Hkv, Sq, Sk, D, seed=Sq * 1000 + Sk)
    with torch.no_grad(), torch_threads(threads):
        full = _full(q, k, v, causal)
        first = flash(q, k, v, causal=causal)  # learns the route
        route = dispatch._CHOICES[lean.flash_key(q, k, v, 0.0, None, causal, (-1, -1), 0.0, None, False, False,
                                                 None)[0]]
        assert route
        monkeypatch.setattr(dispatch, "run", None)  # a replay never reaches the dispatcher
        for _ in range(2):
            again = flash(q, k, v, causal=causal)
            assert again.shape == full.shape and torch.equal(again, full), route.name
    assert torch.equal(first, full)


def test_replayed_route_is_a_fresh_decision():
    """Per class of call, the key lengths around every declared break (bottom-right causal and not), in random
    order: each class's route is learnt from one length and replayed for the rest."""
    rng = random.Random(0)
    bad = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for (Hq, Hkv), D in (((12, 12), 64), ((16, 4), 128)):
                for Sq in (1, 2, 4, 5, 17, 64):
                    k_all, v_all = (torch.empty(1, 4200, Hkv, D, dtype=dtype) for _ in range(2))
                    q = torch.empty(1, Sq, Hq, D, dtype=dtype)
                    lengths = {max(1, min(4200, b + d)) for b in dispatch.length_breaks(Sq) for d in (-1, 0, 1)}
                    for causal in (False, True):
                        for Sk in rng.sample(sorted(lengths), len(lengths)):
                            k, v = k_all[:, :Sk], v_all[:, :Sk]  # a cache's first Sk rows
                            key = lean.flash_key(q, k, v, 0.0, None, causal, (-1, -1), 0.0, None, False, False,
                                                 None)[0]
                            p = _flash_params(q, k, v, 0.0, None, causal, (-1, -1), 0.0, None, False, False)
                            if key not in dispatch._CHOICES:
                                lean.learn(key, p, None)
                            replayed, fresh = dispatch._CHOICES[key], dispatch.lean_route(p, None)
                            if (replayed and replayed.name) != (fresh and fresh.name):
                                bad.append((str(dtype), Hq, Hkv, Sq, Sk, causal))
    assert bad == []


def test_calls_off_the_lean_path():
    q, k, v = _qkv(torch.float32, 1, 4, 4, 8, 8, 16)
    args = dict(dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None, deterministic=False, return_attn_probs=False, backend=None)

    def key(*qkv, **kw):
        return lean.flash_key(*qkv, **dict(args, **kw))
    with torch.no_grad():
        assert key(q, k, v) is not None
        off = {"dropout": dict(dropout_p=0.1), "int dropout": dict(dropout_p=0), "window": dict(window_size=(4, 0)),
               "list window": dict(window_size=[-1, -1]), "softcap": dict(softcap=5.0), "int softcap": dict(softcap=0),
               "alibi": dict(alibi_slopes=torch.zeros(4)), "deterministic": dict(deterministic=True),
               "lse": dict(return_attn_probs=True), "tensor causal": dict(causal=torch.tensor(True))}
        for name, kw in off.items():
            assert key(q, k, v, **kw) is None, name
        for name, qkv in {"3-D": (q[0], k[0], v[0]), "list": ([1.0], k, v), "subclass": (torch.nn.Parameter(q), k, v),
                          "head-dim stride": (torch.randn(1, 8, 4, 32)[..., ::2], k, v)}.items():
            assert key(*qkv) is None, name
    assert key(q.clone().requires_grad_(), k, v) is not None  # a gradient: replayed only on a hand-over to sdpa
    # A call off the path still gives the full path's answer (dropout 0 as an int: the same result).
    with torch.no_grad():
        assert torch.equal(flash(q, k, v, dropout_p=0, causal=True), _full(q, k, v, True))


def test_keys_apart_from_the_sdpa_surface():
    """A bottom-right causal call (Sq < Sk) after the SDPA surface learnt the same shapes' top-left route."""
    q, k, v = _qkv(torch.float32, 1, 4, 4, 20, 90, 32)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        fastattn.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # top-left, learnt
        assert torch.equal(flash(q, k, v, causal=True), _full(q, k, v, True))
        assert torch.equal(flash(q, k, v, causal=True), _full(q, k, v, True))  # replayed


def test_planted_shared_keys_are_caught(monkeypatch):
    """flash_attn_func's keys without their tag (planted: the SDPA surface's keys) replay the SDPA surface's top-left
    causal route for a bottom-right call: the replay check above fails."""
    real = lean.flash_key

    def planted(*a):
        got = real(*a)
        return None if got is None else ((dispatch.LEAN,) + got[0][2:],) + got[1:]
    monkeypatch.setattr(lean, "flash_key", planted)
    q, k, v = _qkv(torch.float32, 1, 4, 4, 20, 90, 32)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        fastattn.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        assert not torch.equal(flash(q, k, v, causal=True), _full(q, k, v, True))
