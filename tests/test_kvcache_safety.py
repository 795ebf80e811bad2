"""flash_attn_with_kvcache's promise: a call that fails leaves every cache bit-for-bit untouched, whatever the reason
(bad argument, unknown backend, a backend or decode kernel that refuses the call, a kernel that fails after the
append). Plus the block-table rules: -1 padding past the used pages is accepted (never read), two rows appending
into one page slot are refused."""
import pytest
import torch

import fastattn
from fastattn import dispatch
from fastattn.backends import BACKENDS
from support.oracle import assert_rule, oracle_attention

B, HQ, HKV, D, PAGE = 2, 4, 2, 16, 8


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _call(layout, *, dtype=torch.float32, d=D, snew=1, **kw):
    """(args, kwargs) of a small call with an append: dense, dense_same_len (every row the same length: the append
    is a slice copy), batch_idx (cache rows 3, 0) or paged (page 8)."""
    if layout == "paged":
        kc, vc = rnd(6, PAGE, HKV, d, dtype=dtype), rnd(6, PAGE, HKV, d, dtype=dtype)
        kw.setdefault("block_table", torch.tensor([[4, 1], [0, 5]], dtype=torch.int32))
    else:
        kc, vc = rnd(4, 16, HKV, d, dtype=dtype), rnd(4, 16, HKV, d, dtype=dtype)
        if layout.startswith("dense"):
            kc, vc = kc[:B], vc[:B]
            if layout == "dense_same_len":
                kw.setdefault("cache_seqlens", torch.tensor([7, 7], dtype=torch.int32))
        else:
            kw.setdefault("cache_batch_idx", torch.tensor([3, 0], dtype=torch.int32))
    kw.setdefault("cache_seqlens", torch.tensor([5, 9], dtype=torch.int32))
    q = rnd(B, 1, HQ, d, dtype=dtype)
    k, v = rnd(B, snew, HKV, d, dtype=dtype), rnd(B, snew, HKV, d, dtype=dtype)
    return (q, kc, vc), dict(k=k, v=v, **kw)


def _refused(args, kw, exc, words):
    kc0, vc0 = args[1].clone(), args[2].clone()
    with pytest.raises(exc, match=words):
        fastattn.flash_attn_with_kvcache(*args, **kw)
    assert torch.equal(args[1], kc0) and torch.equal(args[2], vc0), "the cache changed although the call failed"


LAYOUTS = ["dense", "dense_same_len", "batch_idx", "paged"]

# name -> (call options, exception, message): refusals the dispatch decides (after validation, before the append).
REFUSALS = {
    "unknown_backend": (dict(backend="nope"), ValueError, "unknown backend"),
    "backend_refuses_softcap": (dict(backend="sdpa", softcap=2.0), dispatch.BackendUnavailableError, "softcap"),
    "backend_refuses_lse": (dict(backend="sdpa", return_softmax_lse=True), dispatch.BackendUnavailableError, "lse"),
    "backend_refuses_dtype": (dict(backend="cpu", dtype=torch.float64), dispatch.BackendUnavailableError, "dtype"),
    "backend_refuses_head_dim": (dict(backend="triton", d=8), dispatch.BackendUnavailableError, "head dim"),
    "backend_unavailable": (dict(backend="cuda"), dispatch.BackendUnavailableError, "cuda"),
    "softcap_nan": (dict(softcap=float("nan")), ValueError, "softcap"),
    "softcap_str": (dict(softcap="1"), TypeError, "softcap"),
    "window_float": (dict(window_size=(2.5, 0)), TypeError, "window_size"),
    "window_huge": (dict(window_size=(2 ** 63, 0)), ValueError, "window_size"),
    "alibi_wrong_shape": (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    "rotary_half_given": (dict(rotary_cos=torch.ones(1)), ValueError, "rotary_cos and rotary_sin"),
    "cache_leftpad": (dict(cache_leftpad=torch.zeros(2, dtype=torch.int32)), NotImplementedError, "cache_leftpad"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_call_leaves_caches_untouched(name, layout):
    opts, exc, words = REFUSALS[name]
    opts = dict(opts)
    backend = opts.get("backend")
    if backend not in (None, "nope", "cuda") and BACKENDS[backend].unavailable():
        pytest.skip(f"backend {backend} not available here: {BACKENDS[backend].unavailable()}")
    if backend == "cuda" and not BACKENDS["cuda"].unavailable():
        pytest.skip("the cuda backend is available here, so it does not refuse")
    args, kw = _call(layout, dtype=opts.pop("dtype", torch.float32), d=opts.pop("d", D), **opts)
    _refused(args, kw, exc, words)


i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
# name -> (layout, bad call options, message): values a compiled graph must check as eager mode does (same shapes
# as the good call that compiled it, so the graph is reused).
BAD_VALUES = {
    "seqlens_negative": ("dense", dict(cache_seqlens=i32(-1, 0)), "cache_seqlens"),
    "seqlens_past_capacity": ("dense", dict(cache_seqlens=i32(15, 16)), "cache_seqlens"),
    "batch_idx_out_of_range": ("batch_idx", dict(cache_batch_idx=i32(3, 4)), "cache_batch_idx"),
    "batch_idx_repeated": ("batch_idx", dict(cache_batch_idx=i32(0, 0)), "repeats"),
    "page_minus_one_used": ("paged", dict(block_table=i32([4, 1], [-1, 5])), "block_table"),
    "page_past_num_blocks": ("paged", dict(block_table=i32([4, 1], [6, 5])), "block_table"),
    "pages_shared_slot": ("paged", dict(block_table=i32([4, 1], [4, 5]), cache_seqlens=i32(5, 5)), "same cache slot"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_compiled_call_checks_values(name):
    """torch.compile(fullgraph=True): the value checks run inside the graph (fastattn::kvcache_check) before the
    append, with eager mode's message; a negative length once wrapped to the last slot, silently."""
    layout, bad, words = BAD_VALUES[name]
    f = torch.compile(fastattn.flash_attn_with_kvcache, fullgraph=True, backend="aot_eager")
    args, kw = _call(layout)
    f(*args, **kw)
    args, kw = _call(layout, **bad)
    kc0, vc0 = args[1].clone(), args[2].clone()
    with pytest.raises(ValueError, match=words):
        f(*args, **kw)
    assert torch.equal(args[1], kc0) and torch.equal(args[2], vc0), "the cache changed although the call failed"


def test_compiled_inductor_checks_values():
    """The same under inductor, whose generated code would index with the bad length (a negative one wraps)."""
    f = torch.compile(fastattn.flash_attn_with_kvcache, fullgraph=True)
    args, kw = _call("dense")
    want = fastattn.flash_attn_with_kvcache(args[0], args[1].clone(), args[2].clone(), **kw)
    assert_rule("compiled out", f(*args, **kw), want, None, torch.float32)
    args, kw = _call("dense", cache_seqlens=i32(-1, 0))
    kc0 = args[1].clone()
    with pytest.raises(ValueError, match="cache_seqlens"):
        f(*args, **kw)
    assert torch.equal(args[1], kc0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["decode_kernel", "generic_backend"])
def test_failure_after_the_append_restores_the_caches(where, layout, monkeypatch):
    """Whatever fails once the new rows are written (here: a planted error in the kernel) is undone bit for bit."""
    class Boom(RuntimeError):
        pass

    def boom(*a, **k):
        raise Boom("planted kernel failure")

    if where == "decode_kernel":
        if BACKENDS["cpu"].decode.unavailable():
            pytest.skip(f"C++ CPU decode kernel unavailable: {BACKENDS['cpu'].decode.unavailable()}")
        monkeypatch.setattr(BACKENDS["cpu"].decode, "run", boom)
        # no route learnt by an earlier test: this call takes the full path (its lean replay: test_lean_cache.py)
        monkeypatch.setattr(dispatch, "_CHOICES", {})
        backend = "cpu"
    else:
        monkeypatch.setattr(BACKENDS["reference"], "forward", boom)
        backend = "reference"  # no decode kernel: the generic path
    args, kw = _call(layout, backend=backend)
    _refused(args, kw, Boom, "planted")


@pytest.mark.parametrize("learnt", [False, True])
def test_a_v_cache_that_refuses_the_write_leaves_k_untouched(learnt, monkeypatch):
    """An inference-mode v_cache used outside inference mode refuses its append after k's slots were written (no
    check can see it beforehand): on the learnt route (C++ cache_append) k's slots stayed written; the full path
    restored them."""
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    B, S, H, D = 2, 16, 2, 8
    q, kn, vn = (torch.randn(B, 1, H, D) for _ in range(3))
    if learnt:
        fastattn.flash_attn_with_kvcache(q, torch.zeros(B, S, H, D), torch.zeros(B, S, H, D), k=kn, v=vn,
                                         cache_seqlens=4)  # learns the route
    k_cache = torch.randn(B, S, H, D)
    with torch.inference_mode():
        v_cache = torch.randn(B, S, H, D)
    k0 = k_cache.clone()
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k=kn, v=vn, cache_seqlens=4)
    assert torch.equal(k_cache, k0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_strided_along_the_head_dim_refused(layout):
    """flash-attn's rule: a cache with a gap between head-dim elements is refused. Before, the kernels declined it
    and the generic path copied it before the append wrote into it: the answer missed the new keys (0.7 off)."""
    args, kw = _call(layout, d=2 * D)
    q, kc, vc = args
    _refused((q[..., ::2], kc[..., ::2], vc[..., ::2]), dict(kw, k=kw["k"][..., ::2], v=kw["v"][..., ::2]),
             ValueError, "stride 1 along the head dim")


def test_two_rows_appending_into_one_slot_refused():
    # Rows 0 and 1 (both len 5) map their first page to page 4: both would write page 4 offsets 5 and 6.
    bt = torch.tensor([[4, 1], [4, 5]], dtype=torch.int32)
    args, kw = _call("paged", snew=2, block_table=bt, cache_seqlens=torch.tensor([5, 5], dtype=torch.int32))
    _refused(args, kw, ValueError, r"rows \[0, 1\].*same cache slot \(page 4, offset 5\)")
    # Sharing a page for reading only (prefix sharing) is fine.
    args, kw = _call("paged", snew=1, block_table=torch.tensor([[4, 1], [4, 5]], dtype=torch.int32),
                     cache_seqlens=torch.tensor([8, 9], dtype=torch.int32))
    fastattn.flash_attn_with_kvcache(*args, **kw)
    # One row mapping both its logical pages to page 2 and appending 9 tokens writes offset 0 of page 2 twice.
    args, kw = _call("paged", snew=9, block_table=torch.tensor([[2, 2], [0, 5]], dtype=torch.int32),
                     cache_seqlens=torch.tensor([0, 1], dtype=torch.int32))
    _refused(args, kw, ValueError, r"rows \[0\].*same cache slot")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_block_table_padded_with_minus_one(backend):
    """vLLM / flash-attn pad block tables with -1 past the pages a row uses: accepted, and the result equals the
    oracle on the row's valid keys. -1 inside the used pages, or any other bad value, is still refused."""
    if BACKENDS[backend].unavailable():
        pytest.skip(f"backend {backend} not available here")
    d = 16
    kc, vc = rnd(5, PAGE, HKV, d), rnd(5, PAGE, HKV, d)
    bt = torch.tensor([[3, -1, -1], [0, 4, -1]], dtype=torch.int32)
    lens = torch.tensor([4, 11], dtype=torch.int32)
    q, k, v = rnd(B, 1, HQ, d), rnd(B, 1, HKV, d), rnd(B, 1, HKV, d)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=lens, block_table=bt, causal=True,
                                           backend=backend)
    for b in range(B):
        n = int(lens[b]) + 1
        pages = [int(x) for x in bt[b] if x >= 0]
        keys = torch.cat([kc[p] for p in pages])[:n]  # (n, Hkv, d): the row's valid keys after the append
        vals = torch.cat([vc[p] for p in pages])[:n]
        ref = oracle_attention(q[b:b + 1].transpose(1, 2), keys.unsqueeze(0).transpose(1, 2),
                               vals.unsqueeze(0).transpose(1, 2), scale=d ** -0.5, window=(-1, 0), bottom_right=True)
        assert_rule(f"out[{b}]", out[b:b + 1].transpose(1, 2), ref, None, torch.float32)
    bad = torch.tensor([[-1, -1, -1], [0, 4, -1]], dtype=torch.int32)  # row 0 uses page 0 of its table
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bad, backend=backend)
    bad = torch.tensor([[3, -2, -1], [0, 4, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -2"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bad, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_huge_window_means_unlimited(backend):
    """window_size entries up to 2**63 - 1 (accepted) behave as -1: no overflow in a decode kernel's index math."""
    if BACKENDS[backend].unavailable():
        pytest.skip(f"backend {backend} not available here")
    q, kc, vc = rnd(B, 1, HQ, D), rnd(B, 20, HKV, D), rnd(B, 20, HKV, D)
    lens = torch.tensor([5, 17], dtype=torch.int32)
    want = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=backend)
    for window in ((2 ** 63 - 1, 2 ** 63 - 1), (-1, 2 ** 62), (2 ** 40, 0)):
        got = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, window_size=window, backend=backend)
        ref = want if window[1] != 0 else fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True,
                                                                           backend=backend)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input: a clear error, the cache untouched
BAD = {
    "seqlens_beyond_capacity": (dict(cache_seqlens=torch.tensor([39, 2], dtype=torch.int32), snew=2),
                                ValueError, "capacity"),
    "negative_seqlens": (dict(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32), snew=1), ValueError, "capacity"),
    "seqlens_int64": (dict(cache_seqlens=torch.tensor([1, 2]), snew=1), ValueError, "int32"),
    "block_table_out_of_range": (dict(paged=True, bt_bad=True, snew=1), ValueError, "block_table"),
    "block_table_wrong_dtype": (dict(paged=True, bt_long=True, snew=1), ValueError, "block_table"),
    "new_k_wrong_heads": (dict(k_shape=(2, 1, 3, 16), snew=1), ValueError, "new k"),
    "new_k_v_length_differ": (dict(v_len=2, snew=1), ValueError, "new k"),
    "new_k_wrong_dtype": (dict(k_dtype=torch.float64, snew=1), TypeError, "dtype"),
    "only_k": (dict(only_k=True, snew=1), ValueError, "both k and v"),
    "append_without_seqlens": (dict(cache_seqlens=None, snew=1), ValueError, "cache_seqlens"),
    "batch_idx_repeated_on_append": (dict(batch_idx=[1, 1], snew=1), ValueError, "repeats"),
    "batch_idx_out_of_range": (dict(batch_idx=[0, 4], snew=1), ValueError, "cache_batch_idx"),
    "batch_idx_with_block_table": (dict(paged=True, batch_idx=[0, 1], snew=1), ValueError, "cache_batch_idx"),
    "cache_heads_not_dividing": (dict(cache_heads=3, snew=0), ValueError, "multiple"),
    "num_splits_negative": (dict(num_splits=-1, snew=1), ValueError, "num_splits"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_writing(name):
    opts, exc, words = BAD[name]
    B, Hq, D = 2, 4, 16
    Hkv = opts.get("cache_heads", 2)
    if opts.get("paged"):
        kc, vc = rnd(6, 8, Hkv, D), rnd(6, 8, Hkv, D)
        bt = torch.tensor([[0, 1], [2, 9 if opts.get("bt_bad") else 3]], dtype=torch.int32)
        kw = {"block_table": bt.long() if opts.get("bt_long") else bt}
    else:
        kc, vc = rnd(4 if "batch_idx" in opts else B, 40, Hkv, D), rnd(4 if "batch_idx" in opts else B, 40, Hkv, D)
        kw = {}
    if "batch_idx" in opts:
        kw["cache_batch_idx"] = torch.tensor(opts["batch_idx"], dtype=torch.int32)
    snew = opts["snew"]
    k = rnd(*opts.get("k_shape", (B, snew, 2, D))).to(opts.get("k_dtype", torch.float32))
    v = rnd(B, opts.get("v_len", snew), 2, D)
    if opts.get("only_k"):
        v = None
    if not snew:
        k = v = None
    lens = opts.get("cache_seqlens", torch.tensor([1, 2], dtype=torch.int32))
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(exc, match=words):
        fastattn.flash_attn_with_kvcache(rnd(B, 1, Hq, D), kc, vc, k=k, v=v, cache_seqlens=lens,
                                         num_splits=opts.get("num_splits", 0), **kw)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "the cache changed although the call was refused"
