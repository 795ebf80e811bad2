"""The SDPA surface's lean path (fastattn/lean.py): a replayed route is the route a fresh decision takes for every
key length, its outputs are the full path's bit for bit (masks included), and calls it must not take (autograd,
masks it does not read, dropout, strides, subclasses, other backends) take the full path with its checks."""
import random

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import fastattn
from fastattn import dispatch, lean
from fastattn.backends import BACKENDS
from fastattn.backends import cpu as cpu_backend
from fastattn.backends import sdpa as sdpa_backend
from fastattn.functional import _sdpa_params
from support import torch_threads
from support.lean_keys import key_mismatches, unnoticed_fields


@pytest.fixture(autouse=True)
def intel_rules(monkeypatch):
    """The auto rules as measured on the Intel Xeon, whatever this CPU's vendor: the AMD ones hand no fp32 call to
    sdpa, and the lean path's length breaks and thread-count routes are tested where rules fire."""
    monkeypatch.setattr(cpu_backend, "_AMD", False)
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", False)
    monkeypatch.setattr(cpu_backend, "_FP32_BRGEMM", False)  # (sgemm's rules hand the most calls to sdpa)

pytestmark = pytest.mark.skipif(BACKENDS["cpu"].unavailable() != [], reason="needs the C++ extension (cpu backend)")

sdpa = fastattn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(dispatch, "_CHOICES", {})


def _name(route):
    return route.name if route else None


def _route_mismatches(seed=0):
    """(call, replayed route, fresh route) for every call whose lean key replays another route than a fresh decision
    takes. Per class of call, the key lengths around every declared break and a few others, in random order, so each
    class's route is learnt from one length and replayed for the rest."""
    rng = random.Random(seed)
    bad = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for (Hq, Hkv), D in (((12, 12), 64), ((16, 4), 128), ((8, 8), 128)):
            for Sq in (1, 2, 3, 4, 5, 8, 16, 17, 64, 100):
                k_all, v_all = (torch.empty(1, Hkv, 4200, D, dtype=dtype) for _ in range(2))
                q = torch.empty(1, Hq, Sq, D, dtype=dtype)
                breaks = dispatch.length_breaks(Sq)
                lengths = {max(1, min(4200, b + d)) for b in breaks for d in (-1, 0, 1)} | {
                    rng.randrange(1, 4200) for _ in range(4)}
                pad = torch.ones(1, 1, 1, 4200, dtype=torch.bool)  # a key-padding mask (nothing padded)
                for causal, masked in ((False, False), (True, False), (False, True)):
                    order = sorted(lengths)
                    rng.shuffle(order)
                    for Sk in order:
                        k, v = k_all[:, :, :Sk], v_all[:, :, :Sk]  # a cache's first Sk rows
                        mask = pad[..., :Sk] if masked else None
                        key = lean.key(q, k, v, causal, None, Hq != Hkv, None, mask)
                        assert key is not None
                        p = _sdpa_params(q, k, v, mask, 0.0, causal, None, Hq != Hkv)
                        if key not in dispatch._CHOICES:
                            lean.learn(key, p, None)
                        replayed, fresh = _name(dispatch._CHOICES[key]), _name(dispatch.lean_route(p, None))
                        if replayed != fresh:
                            bad.append((f"{str(dtype)[6:]} Hq={Hq} Hkv={Hkv} D={D} Sq={Sq} Sk={Sk} causal={causal} "
                                        f"masked={masked}", replayed, fresh))
    return bad


@pytest.mark.parametrize("threads", [1, 2])
def test_replayed_route_is_a_fresh_decision(threads):
    """On one thread and on two (the step rules differ, backends/cpu.py)."""
    with torch.no_grad(), torch_threads(threads):
        assert _route_mismatches() == []


def _amd_rules(monkeypatch):
    """The AMD EPYC Zen 4's rules (AVX-512, fp32 tiles on brgemm) in place of intel_rules'."""
    monkeypatch.setattr(cpu_backend, "_AMD", True)
    monkeypatch.setattr(cpu_backend, "_AMD_FAMILY", 25)
    monkeypatch.setattr(cpu_backend, "_FP32_BRGEMM", True)


@pytest.mark.parametrize("threads", [1, 2])
def test_replayed_route_is_a_fresh_decision_on_amd_rules(monkeypatch, threads):
    """The same under the AMD EPYC Zen 4's rules."""
    _amd_rules(monkeypatch)
    with torch.no_grad(), torch_threads(threads):
        assert _route_mismatches() == []


@pytest.mark.parametrize("drop", range(3))
def test_planted_missing_break_is_caught(monkeypatch, drop):
    """A length rule whose threshold is not declared (planted: one of the cpu backend's breaks left out) replays a
    stale route for some key length; on this machine's rules, each of the three must show it (on one thread; the
    masked bf16 bound of break 2 on two)."""
    real = cpu_backend.CpuBackend.length_breaks
    monkeypatch.setattr(cpu_backend.CpuBackend, "length_breaks",
                        lambda self, Sq: real(self, Sq)[:drop] + real(self, Sq)[drop + 1:])
    with torch.no_grad(), torch_threads(2 if drop == 2 else 1):
        bad = _route_mismatches()
    if drop == 2 and not cpu_backend._BF16_AMX:
        pytest.skip("the bf16 rule for tiny masked calls (break 2) applies on AMX machines only")
    assert bad, f"leaving out break {drop} changed no replayed route"


_CALLS = [  # (dtype, B, Hq, Hkv, Sq, D, Sk, causal): the decode kernel, sdpa and the cpu prefill kernel
    (torch.float32, 1, 12, 12, 1, 64, 300, False), (torch.float32, 2, 12, 12, 3, 64, 200, False),
    (torch.float32, 1, 8, 2, 5, 128, 130, True), (torch.float32, 2, 4, 4, 96, 32, 96, True),
    (torch.bfloat16, 1, 12, 12, 1, 64, 300, False), (torch.bfloat16, 1, 16, 4, 4, 128, 520, False),
    (torch.bfloat16, 2, 4, 4, 70, 64, 90, False), (torch.float16, 1, 8, 8, 2, 64, 77, True),
]


@pytest.mark.parametrize("call", _CALLS, ids=lambda c: f"{str(c[0])[6:]}-B{c[1]}H{c[2]}/{c[3]}-Sq{c[4]}-D{c[5]}"
                                                           f"-Sk{c[6]}{'-causal' if c[7] else ''}")
def test_replay_equals_the_full_path(monkeypatch, call):
    dtype, B, Hq, Hkv, Sq, D, Sk, causal = call
    g = torch.Generator().manual_seed(Sq * 1000 + Sk)
    q, k, v = (torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    gqa = Hq != Hkv
    with torch.no_grad():
        full = dispatch.run(_sdpa_params(q, k, v, None, 0.0, causal, None, gqa))[0]
        first = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)  # learns the route
        route = dispatch._CHOICES[lean.key(q, k, v, causal, None, gqa, None)]
        assert route and route.name in (fastattn.explain(q, k, v, is_causal=causal, enable_gqa=gqa).chosen,
                                        "cpu.decode_fwd")
        monkeypatch.setattr(dispatch, "run", None)  # a replay never reaches the dispatcher
        for _ in range(2):
            assert torch.equal(sdpa(q, k, v, is_causal=causal, enable_gqa=gqa), full), route.name
    assert torch.equal(first, full)


def test_calls_off_the_lean_path():
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    assert lean.key(q, k, v, False, None, False, None) is not None
    off = {
        "head-dim stride": (torch.randn(1, 4, 8, 32)[..., ::2], k, v, False, None, False),
        "subclass": (torch.nn.Parameter(q), k, v, False, None, False),
        "3-D": (q[0], k[0], v[0], False, None, False),
        "broadcast heads": (q[:, :1], k, v, False, None, False),
        "value length": (q, k, torch.randn(1, 4, 9, 16), False, None, False),
        "tensor is_causal": (q, k, v, torch.tensor(True), None, False),
        "int scale": (q, k, v, False, 1, False),
    }
    for name, args in off.items():
        assert lean.key(*args, None) is None, name
    with torch.no_grad():
        assert lean.key(q.clone().requires_grad_(), k, v, False, None, False, None)[6] >= 0  # no autograd: a class
    assert lean.key(q.clone().requires_grad_(), k, v, False, None, False, None)[6] == -1 - 8  # a gradient: -1 - Sk
    assert lean.key(q, k, v, False, None, False, None, torch.zeros(1, 1, 8, 8).requires_grad_()) is None  # mask grad


@pytest.mark.parametrize("causal", [False, True])
def test_training_calls_replay_routes_that_record_the_gradient(monkeypatch, causal):
    """A call that records a gradient replays its route where the route records it (Lean.records_grad): PyTorch's
    own SDPA (auto's rule for small fp32 training calls of one head), whose autograd records it, and the cpu kernels'
    C++ route (csrc/lean_routes.cpp FwdGrad): the same outputs and gradients, bit for bit, as the full path's, and
    the hand-over's as torch's call."""
    g = torch.Generator().manual_seed(3)
    small = [torch.randn(1, 1, 40, 16, generator=g) for _ in range(4)]  # W = B * Hq * Sq * Sk * D < 2^21: sdpa
    big = [torch.randn(1, 8, 300, 64, generator=g) for _ in range(4)]  # the cpu kernels

    def call(tensors, **kw):
        q, k, v = (t.clone().requires_grad_() for t in tensors[:3])
        out = sdpa(q, k, v, is_causal=causal, **kw)
        out.backward(tensors[3])
        return out.detach(), q.grad, k.grad, v.grad, lean.key(q, k, v, causal, None, False, kw.get("backend"),
                                                              kw.get("attn_mask"))

    with torch_threads(1):
        dispatch._CHOICES.clear()
        pad = torch.ones(1, 1, 1, 300, dtype=torch.bool)  # (B, 1, 1, Sk) key padding
        pad[..., 250:] = False
        for tensors, kw, name in ((small, {}, "sdpa"), (big, {}, "cpu"), (small, dict(backend="cpu"), "cpu"),
                                  (big, dict(attn_mask=pad), "cpu")):
            first = call(tensors, **kw)
            route = dispatch._CHOICES[first[-1]]
            assert route and route.name == name and route.records_grad, (kw, route)
            with monkeypatch.context() as m:
                m.setattr(dispatch, "run", None)  # a replay never reaches the dispatcher
                replayed = call(tensors, **kw)
            assert all(torch.equal(a, b) for a, b in zip(first[:4], replayed[:4])), (name, kw)
        q, k, v = (t.clone().requires_grad_() for t in small[:3])
        out = sdpa_backend.TORCH_SDPA(q, k, v, is_causal=causal)
        out.backward(small[3])
        first = call(small)
        for a, b in zip(first[:4], (out.detach(), q.grad, k.grad, v.grad)):
            assert torch.equal(a, b)


def _masks(B, H, Sq, Sk, dtype, g):
    """name -> a 4-D mask of the lean path's kinds for scores (B, H, Sq, Sk)."""
    keep = torch.rand(B, 1, 1, Sk, generator=g) > 0.3
    keep[..., 0] = True
    return {"bool key padding": keep,
            "float dense": torch.randn(B, H, Sq, Sk, generator=g).to(dtype),
            "bool per query, broadcast batch": torch.rand(1, 1, Sq, Sk, generator=g) > 0.2,
            "float per query, broadcast keys": torch.randn(B, 1, Sq, 1, generator=g).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Sq, causal", [(1, False), (37, False), (37, True)])
def test_masked_replay_equals_the_full_path(monkeypatch, dtype, Sq, causal):
    """Masked calls replay their route (a mask that grows with the cache keeps its key) with the full path's bits."""
    g = torch.Generator().manual_seed(Sq)
    B, H = 2, 4
    q = torch.randn(B, H, Sq, 32, generator=g).to(dtype)
    k_all, v_all = (torch.randn(B, H, 301, 32, generator=g).to(dtype) for _ in range(2))
    with torch.no_grad():
        for name, mask_all in _masks(B, H, Sq, 301, dtype, g).items():
            dispatch._CHOICES.clear()
            for Sk in (300, 301):
                k, v = k_all[:, :, :Sk], v_all[:, :, :Sk]
                mask = mask_all[..., :Sk] if mask_all.shape[3] > 1 else mask_all
                key = lean.key(q, k, v, causal, None, False, None, mask)
                assert key is not None, name
                learnt = bool(dispatch._CHOICES.get(key))
                assert learnt == (Sk == 301), f"{name}: a mask one key longer must keep the key"
                got = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
                with monkeypatch.context() as m:
                    m.setattr(lean, "key", lambda *a: None)  # the full path
                    want = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
                assert torch.equal(got, want), f"{name} Sk={Sk}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_masked_calls_replay_torch_with_the_full_paths_bits(monkeypatch, dtype):
    """Tiny masked calls (auto's rule sends them to sdpa) replay PyTorch's call on the mask itself: the full path's
    outputs bit for bit, a row that sees no key included (0, as the full path's fix-up gives). bf16 takes the rule
    of AMX machines, where it holds, so that the replay is tested on every CPU (without AMX the rule leaves bf16 to the
    cpu kernels: see test_dispatch)."""
    if dtype is torch.bfloat16:
        monkeypatch.setattr(cpu_backend, "_BF16_AMX", True)
        monkeypatch.setattr(cpu_backend, "_RULE_DTYPES", cpu_backend._RULE_DTYPES | {torch.bfloat16})
    g = torch.Generator().manual_seed(7)
    B, H, S = 3, 4, 16
    q, k, v = (torch.randn(B, H, S, 32, generator=g).to(dtype) for _ in range(3))
    keep = torch.rand(B, 1, S, S, generator=g) > 0.3
    keep[1, 0, 5] = False  # batch 1, query 5: no key
    masks = {"bool": keep, "float": torch.randn(B, H, S, S, generator=g).to(dtype).masked_fill(~keep, float("-inf"))}
    with torch.no_grad():
        for name, mask in masks.items():
            dispatch._CHOICES.clear()
            sdpa(q, k, v, attn_mask=mask)  # learns
            route = dispatch._CHOICES[lean.key(q, k, v, False, None, False, None, mask)]
            assert route and route.name == fastattn.explain(q, k, v, attn_mask=mask).chosen == "sdpa", name
            got = sdpa(q, k, v, attn_mask=mask)
            with monkeypatch.context() as m:
                m.setattr(lean, "key", lambda *a: None)  # the full path
                want = sdpa(q, k, v, attn_mask=mask)
            assert torch.equal(got, want), name
            assert (got[1, :, 5] == 0).all(), name
    with monkeypatch.context() as m:  # a torch that gave NaN for such rows: no replay, the full path's fix-up
        m.setattr(sdpa_backend, "_zeroes_unseen_rows", lambda: False)
        dispatch._CHOICES.clear()
        with torch.no_grad():
            sdpa(q, k, v, attn_mask=keep)
            assert dispatch._CHOICES[lean.key(q, k, v, False, None, False, None, keep)] is False


def test_masks_off_the_lean_path():
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    m = torch.zeros(1, 1, 8, 8)
    assert lean.key(q, k, v, False, None, False, None, m) is not None
    off = {"3-D": m[0], "another float dtype": m.double(), "int": m.int(), "subclass": torch.nn.Parameter(m),
           "last dim neither Sk nor 1": torch.zeros(1, 1, 8, 9),
           "causal bias": causal_lower_right(8, 8)}
    for name, mask in off.items():
        assert lean.key(q, k, v, False, None, False, None, mask) is None, name
    with torch.enable_grad():
        assert lean.key(q, k, v, False, None, False, None, m.clone().requires_grad_()) is None
    with torch.no_grad():
        sdpa(q, k, v, attn_mask=m)
        sdpa(q, k, v, attn_mask=m)  # replayed
        # Masks whose batch, heads or queries do not broadcast: their own keys, refused by the full path
        for bad in ((2, 1, 8, 8), (1, 2, 8, 8), (1, 1, 7, 8)):
            with pytest.raises(fastattn.InputValueError, match="not broadcastable"):
                sdpa(q, k, v, attn_mask=torch.zeros(bad))


def test_checks_still_run_on_a_learnt_key():
    q, k, v = (torch.randn(1, 4, 1, 16) for _ in range(3))
    with torch.no_grad():
        sdpa(q, k, v)
        sdpa(q, k, v)
        assert dispatch._CHOICES[lean.key(q, k, v, False, None, False, None)]
        with pytest.raises(fastattn.InputTypeError, match="must share a dtype"):
            sdpa(q, k.double(), v)
        with pytest.raises(fastattn.InputValueError, match="same sequence length"):
            sdpa(q, k, torch.randn(1, 4, 2, 16))


def test_requested_backend_and_masks_change_the_route(monkeypatch):
    q, k, v = (torch.randn(1, 4, 1, 16) for _ in range(3))
    ran = []
    real = BACKENDS["reference"].forward
    monkeypatch.setattr(BACKENDS["reference"], "forward", lambda p: ran.append(p) or real(p))
    with torch.no_grad():
        for _ in range(2):
            sdpa(q, k, v)
        assert ran == []
        with fastattn.use_backend("reference"):
            sdpa(q, k, v)
        monkeypatch.setenv("FASTATTN_BACKEND", "reference")
        sdpa(q, k, v)
        monkeypatch.delenv("FASTATTN_BACKEND")
        sdpa(q, k, v, backend="reference")
        assert len(ran) == 3
        sdpa(q, k, v, attn_mask=torch.zeros(1, 1))  # a mask: the full path (auto's choice, not the reference)
        assert len(ran) == 3


def _pairs():
    """(field, call a, call b): two calls whose lean keys differ in that field only and whose outcomes differ."""
    def qkv(Sq=1, Sk=300, H=8, Hkv=8, D=16, Dv=16, dtype=torch.float32):
        g = torch.Generator().manual_seed(Sq + Sk + H + Hkv + D + Dv)
        return [torch.randn(1, h, s, d, generator=g).to(dtype) for h, s, d in ((H, Sq, D), (Hkv, Sk, D), (Hkv, Sk, Dv))]
    thread_pair = qkv(Sq=14, H=4, Hkv=2, D=64, Dv=64)
    return [("requested", (qkv(), {}), (qkv(), dict(backend="sdpa"))),
            ("dtype", (qkv(), {}), (qkv(dtype=torch.float64), {})),
            ("query shape", (qkv(D=16), {}), (qkv(D=32), {})),  # the default scale
            ("key heads", (qkv(Sq=2), {}), (qkv(Sq=2, Hkv=2), dict(enable_gqa=True))),
            ("value head dim", (qkv(), {}), (qkv(Dv=300), {})),
            ("length class", (qkv(Sk=300), {}), (qkv(Sk=40), {})),
            ("is_causal", (qkv(Sq=2, Sk=2), {}), (qkv(Sq=2, Sk=2), dict(is_causal=True))),
            ("scale", (qkv(), {}), (qkv(), dict(scale=0.5))),
            ("mask", (qkv(), {}), (qkv(), dict(attn_mask=torch.randn(1, 1, 1, 300)))),
            # fp32 grouped-query steps of 14 tokens: sdpa's on one thread, the cpu kernels' on two (backends/cpu.py)
            ("one thread", (thread_pair, dict(threads=1, enable_gqa=True)),
             (thread_pair, dict(threads=2, enable_gqa=True))),
            # the cpu kernels' without a gradient to record, sdpa's with one (a small training call)
            ("length: records a gradient", (qkv(Sq=40, Sk=40, H=2, Hkv=2), {}),
             (qkv(Sq=40, Sk=40, H=2, Hkv=2), dict(grad=True)))]


def _outcome(call):
    """(output, whether it records a gradient), or the refusal's exception name."""
    args, kw = call
    kw = dict(kw)
    grad = kw.pop("grad", False)
    if grad:
        args = [t.clone().requires_grad_() for t in args]
    with torch_threads(kw.pop("threads", torch.get_num_threads())), torch.set_grad_enabled(grad):
        try:
            out = sdpa(*args, **kw)
            return out.detach(), out.requires_grad
        except Exception as e:  # noqa: BLE001  (a refusal is an outcome to compare)
            return type(e).__name__


def _same(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return torch.equal(a[0], b[0]) and a[1] == b[1]
    return a == b


def _key_mismatches():
    return key_mismatches(_pairs(), _outcome, _same)


def test_key_keeps_calls_apart():
    assert _key_mismatches() == []


def test_planted_key_field_is_caught(monkeypatch):
    """Each field of the lean key but its tag, blanked in turn (planted), lets some call replay another's route."""
    n = len(lean.key(*(torch.randn(1, 1, 1, 8) for _ in range(3)), False, None, False, None))
    monkeypatch.setattr(lean, "call", lean.call_py)  # the reference, which asks lean.key (the C++ one asks its own)
    missed = unnoticed_fields(monkeypatch, lean, "key", n, 1, _key_mismatches)
    assert missed == [], f"no pair notices lean key field(s) {missed} missing"
