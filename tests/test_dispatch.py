"""The dispatcher's fast path and its hooks: the cached decision equals the uncached one for every call shape and
feature, describe()/explanations are built only on request or refusal, auto_reasons is consulted only under auto."""
import itertools

import pytest
import torch

import fastattn
from fastattn import dispatch
from fastattn.backends import BACKENDS, PREFERENCE, Backend
from fastattn.functional import _flash_params, _sdpa_params
from fastattn.params import AttnParams
from support import torch_threads


def rnd(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


def _variants():
    """AttnParams that differ in one fact at a time (shape class, features, grad), all CPU."""
    out = []
    for Sq, Sk, Hkv in ((1, 40, 4), (1, 40, 2), (3, 3, 4), (8, 20, 4), (9, 20, 4), (20, 20, 2)):
        for causal, grad, mask in itertools.product((False, True), (False, True), (False, True)):
            q, k, v = rnd(2, 4, Sq, 16, grad=grad), rnd(2, Hkv, Sk, 16), rnd(2, Hkv, Sk, 16)
            m = torch.rand(2, 1, 1, Sk) > 0.2 if mask else None
            out.append(_sdpa_params(q, k, v, m, 0.0, causal, None, Hkv != 4))
        for kw in (dict(softcap=2.0), dict(window_size=(3, 0)), dict(return_lse=True), dict(dropout_p=0.1),
                   dict(causal=True), dict(alibi_slopes=torch.rand(4))):
            q, k, v = rnd(2, Sq, 4, 16), rnd(2, Sk, Hkv, 16), rnd(2, Sk, Hkv, 16)
            a = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None, deterministic=False, return_lse=False)
            a.update(kw)
            out.append(_flash_params(q, k, v, a["dropout_p"], a["softmax_scale"], a["causal"], a["window_size"],
                                     a["softcap"], a["alibi_slopes"], a["deterministic"], a["return_lse"]))
    q, k, v = rnd(2, 4, 16, 24), rnd(2, 4, 16, 24), rnd(2, 4, 16, 40)  # Dv != D
    out.append(_sdpa_params(q, k, v, None, 0.0, False, None, False))
    return out


@pytest.mark.parametrize("requested", ["auto", "cpu", "sdpa", "reference"])
def test_cached_decision_equals_uncached(requested, monkeypatch):
    """A key that misses a fact the declarations read would hand one call another's cached decision."""
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    if BACKENDS[requested if requested != "auto" else "cpu"].unavailable():
        pytest.skip(f"{requested} unavailable here: {BACKENDS[requested].unavailable()}")
    variants = _variants()
    for route in (True, False):
        for p in variants + variants:  # the second pass is all cache hits
            cached = dispatch._choice(p, requested, route)
            fresh = dispatch._decide(p, requested, route)
            assert cached == fresh, (p.describe(), route, cached, fresh)
    assert 0 < len(dispatch._CHOICES) <= 2 * len(variants)


def test_hot_path_builds_no_description(monkeypatch):
    """describe() (and so every explanation) runs only when asked for or on refusal."""
    def boom(self):
        raise AssertionError("describe() on the per-call path")

    q, k, v = rnd(1, 12, 1, 64), rnd(1, 12, 128, 64), rnd(1, 12, 128, 64)
    qb = rnd(8, 12, 16, 64)
    monkeypatch.setattr(AttnParams, "describe", boom)
    for _ in range(3):
        fastattn.scaled_dot_product_attention(q, k, v)
        fastattn.scaled_dot_product_attention(qb, qb, qb, is_causal=True)
        fastattn.flash_attn_func(qb.transpose(1, 2), qb.transpose(1, 2), qb.transpose(1, 2), causal=True)
        fastattn.flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=128)
    monkeypatch.undo()
    assert "call: q(1, 12, 1, 64)" in str(fastattn.explain(q, k, v))


def test_cache_hit_skips_the_declaration_walk(monkeypatch):
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    calls = []
    real = Backend.static_reasons
    monkeypatch.setattr(Backend, "static_reasons", lambda self, p, need=None: calls.append(self.name) or
                        real(self, p, need))
    q = rnd(8, 12, 16, 64)
    for _ in range(5):
        fastattn.scaled_dot_product_attention(q, q, q)
    assert len(calls) == len(PREFERENCE["cpu"]), calls  # the first call only


def test_refusal_messages_unchanged():
    q = rnd(1, 2, 4, 16)
    with pytest.raises(fastattn.BackendUnavailableError,
                       match=r"^fastattn: backend 'sdpa' cannot run this call \(q\(1, 4, 2, 16\) .*\): softcap not "
                             r"supported$"):
        fastattn.flash_attn_func(q, q, q, softcap=1.0, backend="sdpa")


def test_env_and_context_changes_take_effect(monkeypatch):
    q = rnd(1, 2, 4, 16)
    monkeypatch.setenv("FASTATTN_BACKEND", "sdpa")
    with pytest.raises(fastattn.BackendUnavailableError, match="'sdpa'"):
        fastattn.flash_attn_func(q, q, q, softcap=1.0)
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    fastattn.flash_attn_func(q, q, q, softcap=1.0)
    with fastattn.use_backend("sdpa"), pytest.raises(fastattn.BackendUnavailableError, match="'sdpa'"):
        fastattn.flash_attn_func(q, q, q, softcap=1.0)


class _Declining(Backend):
    """Takes every CPU call, but asks auto to pass it over for short sequences."""
    name = "declining"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    features = BACKENDS["reference"].features
    runs = 0

    def auto_reasons(self, p):
        return ["sdpa is faster below 64 keys"] if p.seqlen_k < 64 else []

    def forward(self, p):
        type(self).runs += 1
        return BACKENDS["reference"].forward(p)


def test_auto_reasons_only_under_auto(monkeypatch):
    monkeypatch.setitem(BACKENDS, "declining", _Declining())
    monkeypatch.setitem(PREFERENCE, "cpu", ["declining"] + PREFERENCE["cpu"])
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    _Declining.runs = 0
    short, long_ = rnd(1, 2, 8, 16), rnd(1, 2, 80, 16)
    ex = fastattn.explain(short, short, short)
    assert ex.chosen != "declining" and ex.declined["declining"] == ["sdpa is faster below 64 keys"], str(ex)
    assert "declining: passed over by auto — sdpa is faster below 64 keys" in str(ex), str(ex)
    fastattn.scaled_dot_product_attention(short, short, short)
    assert _Declining.runs == 0
    assert fastattn.explain(long_, long_, long_).chosen == "declining"
    fastattn.scaled_dot_product_attention(long_, long_, long_)
    assert _Declining.runs == 1
    assert fastattn.explain(short, short, short, backend="declining").chosen == "declining"
    fastattn.scaled_dot_product_attention(short, short, short, backend="declining")
    assert _Declining.runs == 2


# ------------------------------------------------------------- the cpu backend's speed rule for tiny fp32 calls

def _runs_on_cpu_kernels(fn) -> bool:
    seen = []
    real = BACKENDS["cpu"].forward
    BACKENDS["cpu"].forward = lambda p: seen.append(1) or real(p)
    try:
        fn()
    finally:
        del BACKENDS["cpu"].forward
    return bool(seen)


@pytest.fixture
def intel_rules(monkeypatch):
    """The fp32 rules as measured on the Intel Xeon with fp32 on sgemm, whatever this CPU's vendor and engine
    (test_amd_fp32_rules: the EPYC's; test_intel_brgemm_fp32_rules: the Xeon's on brgemm)."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_AMD", False)
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", False)
    monkeypatch.setattr(cpu_backend, "_FP32_BRGEMM", False)


def test_tiny_fp32_calls_go_to_sdpa_only_where_sdpa_runs_them_fused(intel_rules):
    from fastattn.backends import cpu as cpu_backend
    """auto leaves tiny fp32 calls (Sk <= 64, Sq * Sk <= 1024) to PyTorch's SDPA, which is faster there, masked
    inference calls included (the mask goes to torch at its own size), but never a call sdpa would run through a dense
    mask of its own making or refuse (then the naive reference backend would take it)."""
    t = rnd(2, 4, 16, 32)
    bshd = lambda x: x.transpose(1, 2)  # noqa: E731 (B, H, S, D) -> (B, S, H, D)
    assert fastattn.explain(t, t, t).chosen == "sdpa"
    assert fastattn.explain(t, t, t, is_causal=True).chosen == "sdpa"
    big = rnd(2, 4, 80, 32)
    assert fastattn.explain(big, big, big).chosen == "cpu"
    mask = torch.ones(16, 16, dtype=torch.bool)
    assert fastattn.explain(t, t, t, attn_mask=mask).chosen == "sdpa"
    assert fastattn.explain(t.clone().requires_grad_(), t, t, attn_mask=mask).chosen == "cpu"  # the rule: inference
    if cpu_backend._BF16_AMX:  # bf16 (on AMX): Sq * Sk <= 1024 on one thread, <= 256 on more
        b16, b32 = rnd(2, 4, 16, 32).bfloat16(), rnd(2, 4, 32, 32).bfloat16()
        pad = torch.ones(2, 1, 1, 32, dtype=torch.bool)  # (B, 1, 1, Sk)
        with torch_threads(1):
            assert fastattn.explain(b32, b32, b32, attn_mask=pad).chosen == "sdpa"
        with torch_threads(2):
            assert fastattn.explain(b32, b32, b32, attn_mask=pad).chosen == "cpu"
            assert fastattn.explain(b16, b16, b16, attn_mask=pad[..., :16]).chosen == "sdpa"
    assert fastattn.explain(t, t, t, attn_mask=mask, is_causal=True).chosen == "cpu"  # sdpa: a mask of its own
    assert fastattn.explain(t, t, t, dropout_p=0.1).chosen == "cpu"  # dropout keeps the Philox stream
    assert not _runs_on_cpu_kernels(lambda: fastattn.flash_attn_func(bshd(t), bshd(t), bshd(t), causal=True))
    kept = {"softcap": dict(softcap=2.0), "alibi": dict(alibi_slopes=torch.rand(4)), "window": dict(window_size=(4, 0)),
            "lse": dict(return_attn_probs=True), "deterministic": dict(deterministic=True)}
    for name, kw in kept.items():
        assert _runs_on_cpu_kernels(lambda: fastattn.flash_attn_func(bshd(t), bshd(t), bshd(t), causal=True, **kw)), \
            f"{name}: a tiny call sdpa cannot run fused left the cpu kernels"
    # bottom-right causal with Sq != Sk: sdpa would need a dense mask (grad: no decode-kernel route for 8 rows)
    q = rnd(2, 4, 8, 32).requires_grad_()
    assert _runs_on_cpu_kernels(lambda: fastattn.flash_attn_func(bshd(q), bshd(t), bshd(t), causal=True))


def test_small_fp32_training_calls_go_to_sdpa(monkeypatch):
    """auto hands small unmasked fp32 training calls to sdpa where the cpu kernels measured slower. On an Intel CPU
    with AVX-512 (since the C++ autograd node) only one head: at head dim > 64 W = B * Hq * Sq * Sk * D up to 2^22,
    3 * 2^22 without a causal band, at 64 or less up to 2^16, on any thread count. On AMD CPUs (not re-measured
    since) W up to 2^21 on one thread, 2^17 on more, 2^22 for one head. Inference calls of the same shapes, bigger
    training calls and calls sdpa would not run fused stay on the cpu kernels. (Without AVX-512:
    test_avx2_only_rules.)"""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", False)
    monkeypatch.setattr(cpu_backend, "_AMD", False)
    def explain(B, H, S, grad=True, D=64, **kw):
        q = rnd(B, H, S, D).requires_grad_(grad)
        return fastattn.explain(q, q, q, **kw)

    def chosen(*a, **kw):
        return explain(*a, **kw).chosen

    for threads in (1, 2):
        with torch_threads(threads):
            ex = explain(1, 1, 181, D=128)  # W just under 2^22
            assert ex.chosen == "sdpa" and "small fp32 training" in str(ex), str(ex)
            assert chosen(1, 1, 181, D=128, is_causal=True) == "sdpa"
            assert chosen(1, 1, 182, D=128, is_causal=True) == "cpu"
            assert chosen(1, 1, 313, D=128) == "sdpa" and chosen(1, 1, 314, D=128) == "cpu"  # no band: 3 * 2^22
            assert chosen(1, 1, 32) == "sdpa" and chosen(1, 1, 33) == "cpu"  # head dim 64: 2^16
            assert chosen(1, 2, 16) == "cpu" and chosen(1, 4, 128) == "cpu" and chosen(8, 12, 16) == "cpu"
            assert chosen(1, 1, 181, D=128, grad=False) == "cpu"  # inference
            assert chosen(1, 1, 181, D=128, dropout_p=0.1) == "cpu"  # dropout keeps the Philox stream
    with torch_threads(1):
        monkeypatch.setattr(cpu_backend, "_AMD", True)
        monkeypatch.setattr(cpu_backend, "_AMD_FAMILY", 25)  # the Zen 4 (Zen 5: test_amd_zen5_small_training)
        assert chosen(1, 2, 128) == "sdpa" and chosen(1, 8, 96) == "cpu"  # 2^21
        assert chosen(1, 1, 256) == "sdpa" and chosen(1, 1, 272) == "cpu"  # one head: 2^22
        assert chosen(1, 4, 128) == "cpu"  # (no few-head bounds)
        assert chosen(1, 2, 128, grad=False) == "cpu"
        q = rnd(1, 2, 128, 64).bfloat16().requires_grad_()
        assert fastattn.explain(q, q, q).chosen == "cpu" or "small fp32 training" not in str(fastattn.explain(q, q, q))
    with torch_threads(2):
        assert chosen(1, 2, 32) == "sdpa" and chosen(1, 2, 48) == "cpu"  # AMD: 2^17
        assert chosen(1, 1, 256) == "sdpa" and chosen(1, 2, 128) == "cpu" and chosen(1, 1, 384) == "cpu"


def test_amd_zen5_small_training(monkeypatch):
    """On AMD's family 26 (the EPYC Zen 5, AVX-512) no small fp32 training call goes to sdpa, at any thread count
    (the kernels 1.07x torch's SDPA or more from B1 H1 S16), where the Zen 4's family 25 hands unmasked ones over up
    to its bounds."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", False)
    monkeypatch.setattr(cpu_backend, "_AMD", True)
    pad = torch.ones(1, 1, 1, 16, dtype=torch.bool)  # (B, 1, 1, Sk)
    pad[..., :4] = False

    def chosen(B, H, S, D=64, **kw):
        q = rnd(B, H, S, D).requires_grad_()
        return fastattn.explain(q, q, q, **kw).chosen

    for family, small in ((26, "cpu"), (25, "sdpa")):
        monkeypatch.setattr(cpu_backend, "_AMD_FAMILY", family)
        for threads in (1, 2):
            with torch_threads(threads):
                assert chosen(1, 1, 16) == small and chosen(1, 1, 16, is_causal=True) == small, (family, threads)
                assert chosen(1, 1, 256) == small and chosen(1, 1, 181, D=128) == small, (family, threads)
                assert chosen(1, 2, 16) == small, (family, threads)
                assert chosen(1, 1, 16, attn_mask=pad) == "cpu", (family, threads)  # (masked: AVX2 rules only)

def test_every_auto_rule_runs():
    """Each speed rule's branch on this machine, once: a rule that fires only on some CPUs (bf16 tiny calls on AMX)
    must not fail where it fires (a NameError there once reached only the benchmark)."""
    from fastattn.backends import cpu as cpu_backend
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for S, Sk in ((16, 16), (1, 300), (300, 300)):
            q, k = rnd(1, 4, S, 64).to(dt), rnd(1, 4, Sk, 64).to(dt)
            for causal in (False, True):
                ex = fastattn.explain(q, k, k, is_causal=causal and S == Sk)
                assert ex.chosen in ("cpu", "sdpa"), str(ex)
                with torch.no_grad():
                    fastattn.scaled_dot_product_attention(q, k, k, is_causal=causal and S == Sk)
    if cpu_backend._BF16_AMX:  # the bf16 tiny-call rule is for AMX machines (and one thread)
        q, k = rnd(1, 4, 1, 64).bfloat16(), rnd(1, 4, 300, 64).bfloat16()
        with torch_threads(2):
            assert fastattn.explain(q, k, k).chosen == "cpu"  # the decode kernel splits the keys across threads
        with torch_threads(1):
            _bf16_one_thread_rules(cpu_backend, q, k)


def _bf16_one_thread_rules(cpu_backend, q, k):
    """The bf16 rules on one thread (AMX): decode steps ours, MHA (since the decode kernel fetches ahead) and
    grouped-query; tiny calls too (those of fewer than 16 batch x heads since the lean path is one C++ call)."""
    assert fastattn.explain(q, k, k).chosen == "cpu"
    for Sk in (300, 5000):
        gqa = rnd(1, 1, Sk, 64).bfloat16()
        assert fastattn.explain(q, gqa, gqa, enable_gqa=True).chosen == "cpu"
        assert fastattn.explain(q, gqa.expand(1, 4, -1, 64), gqa.expand(1, 4, -1, 64)).chosen == "cpu"  # MHA
    assert fastattn.explain(k, k, k).chosen == "cpu"  # a bf16 prefill is ours
    tiny = rnd(1, 4, 48, 64).bfloat16()
    assert fastattn.explain(tiny, tiny, tiny).chosen == "cpu"
    many = rnd(4, 4, 48, 64).bfloat16()
    assert fastattn.explain(many, many, many).chosen == "cpu"
    assert fastattn.explain(tiny.requires_grad_(), tiny, tiny).chosen == "cpu"  # training stays ours
    wide = rnd(2, 4, 128, 128).bfloat16()  # short non-causal with head dim 128: ours since the faster softmax
    assert fastattn.explain(wide, wide, wide).chosen == "cpu"


def test_multi_token_step_rules(intel_rules):
    """Steps of 2-16 query tokens: fp32 ones go to sdpa under auto (both sides of each length boundary); bf16 ones on
    AMX stay on the cpu kernels (MHA steps of 3-4 tokens too since 2026-12-05); a dense call past 4 query rows
    per KV head takes the prefill kernel rather than the decode kernel, one-token steps keep the decode kernel."""
    from fastattn.backends import cpu as cpu_backend

    def chosen(Sq, Hq=4, Hkv=4, D=64, dt=torch.float32, **kw):
        q, k = rnd(1, Hq, Sq, D).to(dt), rnd(1, Hkv, 300, D).to(dt)
        return fastattn.explain(q, k, k, enable_gqa=Hq != Hkv, **kw)

    with torch_threads(1):
        assert chosen(1).chosen == "cpu" and chosen(17).chosen == "cpu"
        assert chosen(2).chosen == "sdpa" and chosen(16).chosen == "sdpa"
        q, k = rnd(1, 4, 8, 64).requires_grad_(), rnd(1, 4, 4096, 64)  # (past the small training calls' bound)
        assert fastattn.explain(q, k, k).chosen == "cpu"  # training is not a step
        if cpu_backend._BF16_AMX:
            bf = torch.bfloat16
            assert chosen(2, dt=bf).chosen == "cpu" and chosen(5, dt=bf).chosen == "cpu"
            assert chosen(3, dt=bf).chosen == "cpu" and chosen(4, dt=bf).chosen == "cpu"
            assert chosen(4, D=128, dt=bf).chosen == "cpu" and chosen(4, Hq=8, Hkv=2, dt=bf).chosen == "cpu"
    with torch_threads(2):  # more than one thread: fp32 steps of 5-16 tokens (13-16 grouped-query), bf16 MHA steps: cpu
        assert chosen(2).chosen == "sdpa" and chosen(4).chosen == "sdpa"
        assert chosen(5).chosen == "cpu" and chosen(16).chosen == "cpu"
        assert chosen(5, Hq=8, Hkv=2).chosen == "sdpa" and chosen(12, Hq=8, Hkv=2).chosen == "sdpa"  # grouped-query:
        assert chosen(13, Hq=8, Hkv=2).chosen == "cpu"                                                 # up to 12
        if cpu_backend._BF16_AMX:
            assert chosen(3, dt=torch.bfloat16).chosen == "cpu" and chosen(4, dt=torch.bfloat16).chosen == "cpu"
    # Decode kernel or prefill kernel (backend="cpu": the route, not the auto rule).
    kernel = lambda *a, **kw: chosen(*a, backend="cpu", **kw).decode.kernel  # noqa: E731
    assert kernel(4) == "cpu.decode_fwd" and kernel(5) is None
    assert kernel(1, Hq=16, Hkv=1) == "cpu.decode_fwd" and kernel(2, Hq=4, Hkv=2) == "cpu.decode_fwd"
    assert kernel(2, Hq=6, Hkv=2) is None


def test_masked_step_rules(intel_rules):
    """Masked inference steps (a bool key-padding mask, 300 keys) fall under the step rules: fp32 steps of 2-16
    tokens on one thread, 2-4 on more (2-12 grouped-query) go to sdpa; one-token steps (bf16 MHA on AMX too,
    since 2026-12-05) take the split-KV decode kernel with the mask; training and masks sdpa would not
    run fused stay on the cpu kernels."""
    from fastattn.backends import cpu as cpu_backend

    def explain(Sq, Hq=4, Hkv=4, dt=torch.float32, grad=False, **kw):
        q, k = rnd(2, Hq, Sq, 64).to(dt).requires_grad_(grad), rnd(2, Hkv, 300, 64).to(dt)
        mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)  # (B, 1, 1, Sk)
        mask[1, ..., :100] = False
        return fastattn.explain(q, k, k, attn_mask=mask, enable_gqa=Hq != Hkv, **kw)

    def chosen(*a, **kw):
        return explain(*a, **kw).chosen

    for threads in (1, 2):
        with torch_threads(threads):
            ex = explain(1)
            assert ex.chosen == "cpu" and ex.decode.kernel == "cpu.decode_fwd", str(ex)  # the mask rides along
            assert chosen(1, Hq=8, Hkv=2) == "cpu"
            assert chosen(2) == "sdpa" and chosen(4) == "sdpa"
            assert chosen(5) == ("sdpa" if threads == 1 else "cpu") and chosen(17) == "cpu"
            assert chosen(8, Hq=8, Hkv=2) == "sdpa" and chosen(13, Hq=8, Hkv=2) == ("sdpa" if threads == 1 else "cpu")
            assert chosen(4, grad=True) == "cpu" and chosen(4, is_causal=True) == "cpu"  # training; sdpa's own mask
            assert chosen(1, dt=torch.float16) == "cpu" and chosen(4, dt=torch.float16) == "cpu"  # fp16: no rule
            assert chosen(1, dt=torch.bfloat16) == "cpu" and chosen(1, Hq=8, Hkv=2, dt=torch.bfloat16) == "cpu"
            assert chosen(2, dt=torch.bfloat16) == "cpu" and chosen(4, dt=torch.bfloat16) == "cpu"


def test_intel_brgemm_fp32_rules(monkeypatch):
    """On an Intel CPU whose fp32 tiles run on brgemm (measured on the Xeon): fp32 steps go to sdpa at 2 tokens (not
    grouped-query ones at head dim <= 64 on one thread), MHA at head dim > 64 at 2-16; on more than one thread MHA up
    to 8 (16 at head dim > 64), grouped-query steps (their heads packed as rows) still at 2 only, but at 2-3 with a
    mask beyond key padding; tiny calls stay on the cpu kernels, tiny masked ones on one thread only, tiny training
    ones (more than one head) at any thread count since the C++ autograd node."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_AMD", False)
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", False)
    monkeypatch.setattr(cpu_backend, "_FP32_BRGEMM", True)
    pad = torch.ones(2, 1, 1, 16, dtype=torch.bool)  # (B, 1, 1, Sk)
    pad[1, ..., :4] = False

    def explain(Sq, Hq=4, Hkv=4, D=64, Sk=300, **kw):
        q, k = rnd(2, Hq, Sq, D), rnd(2, Hkv, Sk, D)
        return fastattn.explain(q, k, k, enable_gqa=Hq != Hkv, **kw)

    def chosen(*a, **kw):
        return explain(*a, **kw).chosen

    with torch_threads(1):
        assert "brgemm tiles" in str(explain(2))
        assert chosen(2) == "sdpa" and chosen(3) == "cpu" and chosen(16) == "cpu"  # head dim 64
        assert chosen(2, Hq=8, Hkv=2) == "cpu" and chosen(3, Hq=8, Hkv=2) == "cpu"  # grouped-query at head dim 64
        assert chosen(16, D=128) == "sdpa" and chosen(17, D=128) == "cpu"  # MHA, head dim > 64
        assert chosen(2, Hq=8, Hkv=2, D=128) == "sdpa" and chosen(3, Hq=8, Hkv=2, D=128) == "cpu"
        assert chosen(16, Sk=16) == "cpu" and chosen(16, Sk=16, attn_mask=pad) == "cpu"  # tiny, tiny masked
        assert chosen(4, attn_mask=torch.ones(2, 1, 1, 300, dtype=torch.bool)) == "cpu"  # masked steps: the same
        rows = torch.ones(4, 300, dtype=torch.bool).tril(296)  # (Sq, Sk): a causal step's mask
        assert chosen(4, Hq=8, Hkv=2, attn_mask=rows) == "cpu" and chosen(4, attn_mask=rows) == "cpu"
        assert chosen(3, Hq=8, Hkv=2, attn_mask=rows[1:]) == "sdpa"  # masked grouped-query: 2-3 tokens
        assert chosen(3, Hq=8, Hkv=2, attn_mask=torch.ones(2, 8, 1, 300, dtype=torch.bool)) == "sdpa"  # per head
        assert chosen(4, Hq=8, Hkv=2, attn_mask=torch.ones(2, 8, 1, 300, dtype=torch.bool)) == "cpu"
        assert chosen(16, Hq=8, Hkv=2, attn_mask=torch.zeros(1, 300)) == "cpu"  # key padding: one row for all
        tiny_grad = rnd(8, 12, 32, 64).requires_grad_()  # (past the small training calls' bound)
        assert fastattn.explain(tiny_grad, tiny_grad, tiny_grad).chosen == "cpu"
    with torch_threads(2):
        assert chosen(8) == "sdpa" and chosen(9) == "cpu" and chosen(16, D=128) == "sdpa"
        assert chosen(2, Hq=8, Hkv=2) == "sdpa" and chosen(3, Hq=8, Hkv=2) == "cpu"
        assert chosen(2, Hq=8, Hkv=2, D=128) == "sdpa" and chosen(3, Hq=8, Hkv=2, D=128) == "cpu"
        assert chosen(3, Hq=8, Hkv=2, attn_mask=torch.ones(3, 300, dtype=torch.bool)) == "sdpa"
        assert chosen(4, Hq=8, Hkv=2, attn_mask=torch.ones(4, 300, dtype=torch.bool)) == "cpu"
        assert chosen(16, Sk=16) == "cpu" and chosen(16, Sk=16, attn_mask=pad) == "sdpa"
        assert fastattn.explain(tiny_grad, tiny_grad, tiny_grad).chosen == "cpu"  # tiny training calls (1.03-1.35x)


def test_amd_fp32_rules(monkeypatch):
    """On AMD CPUs (measured on an EPYC, Zen 4) fp32 inference steps, one-token steps and tiny calls, masked or not,
    stay on the cpu kernels at any thread count (one-token MHA steps at head dim <= 64 from 1024 keys went to sdpa on
    one thread until the decode kernel's 2026-12-05 changes)."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_AMD", True)
    monkeypatch.setattr(cpu_backend, "_AMD_FAMILY", 25)
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", False)
    pad = torch.ones(2, 1, 1, 300, dtype=torch.bool)  # (B, 1, 1, Sk)
    pad[1, ..., :100] = False

    def chosen(Sq, Hq=4, Hkv=4, Sk=300, mask=None, D=64, grad=False):
        q, k = rnd(2, Hq, Sq, D).requires_grad_(grad), rnd(2, Hkv, Sk, D)
        return fastattn.explain(q, k, k, attn_mask=mask, enable_gqa=Hq != Hkv).chosen

    for threads in (1, 2):
        with torch_threads(threads):
            for Sq in (2, 4, 8, 16):
                assert chosen(Sq) == "cpu" and chosen(Sq, mask=pad) == "cpu", Sq  # MHA steps
                assert chosen(Sq, Hq=8, Hkv=2) == "cpu" and chosen(Sq, Hq=8, Hkv=2, mask=pad) == "cpu", Sq  # GQA
            assert chosen(16, Sk=16) == "cpu" and chosen(16, Sk=16, mask=pad[..., :16]) == "cpu"  # tiny
            long_pad = torch.ones(2, 1, 1, 1024, dtype=torch.bool)  # (B, 1, 1, Sk)
            long_pad[1, ..., :100] = False
            assert chosen(1, Sk=1024) == "cpu" and chosen(1, Sk=1024, mask=long_pad) == "cpu", threads
            assert chosen(1, Sk=1023) == "cpu" and chosen(1, Sk=1023, mask=long_pad[..., :1023]) == "cpu"
            assert chosen(1, Hq=8, Hkv=2, Sk=1024) == "cpu" and chosen(1, Sk=1024, D=80) == "cpu"
            if threads == 1:  # a training call (past the small-training rule's bound): not a step
                assert chosen(1, Hq=16, Hkv=16, Sk=4096, grad=True) == "cpu"


def test_avx2_only_rules(monkeypatch):
    """On CPUs without AVX-512 (measured on AMD EPYC Zen 1 and Zen 3) MHA inference steps of 4-16 tokens in fp32 (5-16
    only at head dim > 64 or under 512 keys) and 2-16 in bf16 go to sdpa (masked: bf16 only), and tiny fp32 calls with
    a mask; fp32 steps of 2-3 tokens, of 5-16 at head dim 64 from 512 keys, grouped-query steps, one-token steps,
    training, fp16 and unmasked tiny calls stay on the cpu kernels, at any thread count; bf16 grouped-query steps of
    2-8 tokens at head dim 64 go to sdpa on more than one thread. On more than one thread of AMD's family 25 and
    later (Zen 3) those and tiny masked fp32 calls stay ours, and on any thread count there small fp32 training calls
    of more than one head and small masked ones (_AVX2_AS_ZEN1 false)."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_AMD", True)
    monkeypatch.setattr(cpu_backend, "_AMD_FAMILY", 25)  # (the Zen 1 is 23: _AVX2_AS_ZEN1 stands for it)
    monkeypatch.setattr(cpu_backend, "_AVX2_ONLY", True)
    monkeypatch.setattr(cpu_backend, "_BF16_AMX", False)  # (no AVX-512, no AMX: the AMX bf16 rules are not these)
    monkeypatch.setattr(cpu_backend, "_RULE_DTYPES", cpu_backend._RULE_DTYPES | {torch.bfloat16})
    pad = torch.ones(2, 1, 1, 300, dtype=torch.bool)  # (B, 1, 1, Sk)
    pad[1, ..., :100] = False

    def chosen(Sq, Hq=4, Hkv=4, Sk=300, mask=None, dt=torch.float32, grad=False, D=64):
        q, k = rnd(2, Hq, Sq, D).to(dt).requires_grad_(grad), rnd(2, Hkv, Sk, D).to(dt)
        return fastattn.explain(q, k, k, attn_mask=None if mask is None else mask, enable_gqa=Hq != Hkv).chosen

    for threads, zen1 in ((1, True), (2, True), (1, False), (2, False)):
        monkeypatch.setattr(cpu_backend, "_AVX2_AS_ZEN1", zen1)
        zen1_parallel = zen1 and threads > 1
        with torch_threads(threads):
            for Sq in (2, 3, 4, 8, 16):
                assert chosen(Sq) == ("cpu" if Sq < 4 else "sdpa"), Sq  # fp32 MHA steps (both sides of 4)
                # from 512 keys at head dim <= 64, steps past 4 tokens are the kernels' (score tiles on K's rows)
                assert chosen(Sq, Sk=512) == ("sdpa" if Sq == 4 else "cpu"), Sq
                assert chosen(Sq, Sk=511) == chosen(Sq, Sk=512, D=72) == chosen(Sq), Sq
                assert chosen(Sq, dt=torch.bfloat16) == "sdpa", Sq
                assert chosen(Sq, mask=pad) == "cpu" and chosen(Sq, mask=pad, dt=torch.bfloat16) == "sdpa", Sq
                assert chosen(Sq, Hq=8, Hkv=2) == "cpu", Sq  # fp32 GQA steps
                gqa_bf16 = "sdpa" if zen1_parallel and Sq <= 8 else "cpu"  # (head dim 64)
                assert chosen(Sq, Hq=8, Hkv=2, dt=torch.bfloat16) == gqa_bf16, (threads, Sq)
                assert chosen(Sq, dt=torch.float16) == "cpu", Sq
                assert chosen(Sq, Hq=16, Hkv=16, Sk=2048, grad=True) == "cpu", Sq  # (past the small-training rule)
            assert chosen(1) == "cpu" and chosen(1, dt=torch.bfloat16) == "cpu" and chosen(17) == "cpu"
            tiny_masked = "cpu" if threads > 1 and not zen1 else "sdpa"
            assert chosen(16, Sk=16) == "cpu" and chosen(16, Sk=16, mask=pad[..., :16]) == tiny_masked  # tiny
            # small training calls: 2^21 (2^17 on more than one thread), 2^22 for one head; the Zen 3 one head only
            small_grad = "cpu" if not zen1 else "sdpa"
            assert chosen(128, Hq=1, Hkv=1, Sk=128, grad=True) == small_grad and chosen(128, Sk=128, grad=True) == "cpu"
            assert chosen(16, Hq=12, Hkv=12, Sk=16, grad=True) == small_grad
            # one head: 2^22 (the Zen 3: causal 2^19 on one thread; on more than one also Sq * Sk <= 320^2)
            for S, D in ((90, 64), (91, 64), (64, 128), (65, 128), (256, 64), (257, 64), (320, 64), (321, 64),
                         (320, 128), (321, 128), (128, 256), (129, 256)):
                one = rnd(1, 1, S, D).requires_grad_()
                for causal in (False, True):
                    zen3_bound = 1 << 19 if causal and threads == 1 else 1 << 22
                    to_sdpa = S * S * D <= (1 << 22 if zen1 else zen3_bound) or (threads > 1 and not zen1 and S <= 320)
                    ex = fastattn.explain(one, one, one, is_causal=causal)
                    assert ex.chosen == ("sdpa" if to_sdpa else "cpu"), (S, D, causal)
            one = rnd(1, 1, 64, 64).requires_grad_()  # masked: one head as unmasked (the Zen 1: 48 keys, one thread)
            ex = fastattn.explain(one, one, one, attn_mask=pad[:1, ..., :64])
            assert ex.chosen == ("cpu" if zen1 else "sdpa") and (zen1 or "small fp32 training" in str(ex)), str(ex)
            # small masked training calls (only the Zen 1's: up to 80 keys, 48 at head dim <= 64 on one thread)
            masked_grad = "sdpa" if zen1 and threads == 1 else "cpu"
            assert chosen(16, Sk=48, mask=pad[..., :48], grad=True) == masked_grad
            assert chosen(16, Sk=80, mask=pad[..., :80], grad=True, D=128) == ("sdpa" if zen1 else "cpu")
            assert chosen(16, Sk=81, mask=pad[..., :81], grad=True, D=128) == "cpu"


def test_fp16_step_rule(monkeypatch):
    """Where fp16's tiles run in fp32 and torch's fp16 SDPA has AVX512-FP16 (Intel Xeon AMX without AMX-FP16), fp16
    inference steps of 5-32 tokens without grouped-query heads go to sdpa at head dim > 64 from 200 keys a query token;
    masked ones at 5-16 tokens, and at 17-32 with head dim > 64. Grouped-query steps, one-token and short steps (the
    decode kernel), tiny calls, training and longer calls stay ours, as everything does on AMD CPUs."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "_FP16_FP32_TILES", True)
    monkeypatch.setattr(cpu_backend, "_AMD", False)
    monkeypatch.setattr(cpu_backend, "_RULE_DTYPES", cpu_backend._RULE_DTYPES | {torch.float16})

    def chosen(Sq, Hq=8, Hkv=8, Sk=300, D=64, grad=False, mask=False):
        q, k = rnd(1, Hq, Sq, D).half().requires_grad_(grad), rnd(1, Hkv, Sk, D).half()
        pad = torch.ones(1, 1, 1, Sk, dtype=torch.bool) if mask else None  # (B, 1, 1, Sk)
        return fastattn.explain(q, k, k, enable_gqa=Hq != Hkv, attn_mask=pad).chosen

    for threads in (1, 2):
        with torch_threads(threads):
            for Sq in (5, 8, 16, 17, 32):
                # unmasked: head dim > 64 and at least 200 keys a token (the line itself, and one key short of it)
                assert chosen(Sq, D=128, Sk=200 * Sq) == "sdpa", (threads, Sq)
                assert chosen(Sq, D=128, Sk=200 * Sq - 1) == "cpu" and chosen(Sq, Sk=4096) == "cpu", (threads, Sq)
                assert chosen(Sq, Hq=8, Hkv=4, D=128, Sk=4096) == "cpu", (threads, Sq)
                assert chosen(Sq, Hq=16, Hkv=4, D=128, Sk=4096) == "cpu", (threads, Sq)
                assert chosen(Sq, D=128, Sk=64) == "cpu" and chosen(Sq, D=128, Sk=4096, grad=True) == "cpu"
                # masked: 5-16 tokens, 17-32 at head dim > 64 (MHA; grouped-query masked steps stay ours)
                assert chosen(Sq, mask=True) == ("sdpa" if Sq <= 16 else "cpu"), (threads, Sq)
                assert chosen(Sq, D=128, mask=True) == "sdpa", (threads, Sq)
                assert chosen(Sq, Hq=8, Hkv=4, mask=True) == "cpu", (threads, Sq)
            for Sq in (1, 4, 33, 300):
                assert chosen(Sq, D=128, Sk=8192) == "cpu" and chosen(Sq, D=128, mask=True) == "cpu", (threads, Sq)
    q, k = rnd(1, 8, 8, 128).half(), rnd(1, 8, 2048, 128).half()
    assert "fp16 inference steps of 5-32" in str(fastattn.explain(q, k, k))
    assert "masked fp16 inference steps of 5-16" in str(fastattn.explain(q, k, k, attn_mask=torch.ones(2048) > 0))
    monkeypatch.setattr(cpu_backend, "_AMD", True)
    assert chosen(8, D=128, Sk=4096) == "cpu" and chosen(8, mask=True) == "cpu"
