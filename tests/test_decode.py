"""Decode (issue 6): flash_attn_with_kvcache through every decode implementation available here — the Triton
split-KV kernel (interpreter on CPU), the C++ CPU kernel when built, and the generic path — against the float64
oracle; in-place append checked element by element; routing; the op's own index checks; the dense short-query
route."""
import collections
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattn
from fastattn import dispatch
from fastattn.kvcache import explain_kvcache
from support.cuda_emu import emu, needs_cuda_headers
from support.oracle import assert_rule, lse_magnitude, lse_reference, oracle_attention

# ---------------------------------------------------------------- implementations available here
# name -> (backend= to request, device of the tensors); the generic path is reached through a backend without a
# decode kernel. Kernels run on the GPU when there is one (Triton), else on CPU (Triton through its interpreter).
GPU = torch.cuda.is_available()
IMPLS = {"generic": ("reference", "cpu")}
if GPU:
    IMPLS["generic.cuda"] = ("reference", "cuda")
SKIPPED = {}
for _name, _b in fastattn.BACKENDS.items():
    if _b.decode is None:
        continue
    _dev = "cuda" if GPU and "cuda" in _b.devices else "cpu" if "cpu" in _b.devices else None
    _why = _b.unavailable() or _b.decode.unavailable() or ([] if _dev else ["needs a CUDA device"])
    if _why:
        SKIPPED[_b.decode.name] = "; ".join(_why)
    else:
        IMPLS[_b.decode.name] = (_name, _dev)
KERNELS = [n for n in IMPLS if not n.startswith("generic")]


def test_report_skipped_implementations():
    """Not a silent skip: say which decode kernels this machine cannot test, and why; every declared kernel is
    either tested or reported."""
    for name, why in SKIPPED.items():
        print(f"decode kernel {name} not tested here: {why}")
    declared = {b.decode.name for b in fastattn.BACKENDS.values() if b.decode is not None}
    assert declared and declared == set(SKIPPED) | set(KERNELS), (declared, SKIPPED, KERNELS)


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls each backend's decode kernel serves (the tests check routing through it)."""
    calls = collections.Counter()
    for b in fastattn.BACKENDS.values():
        if b.decode is not None:
            def spy(c, _name=b.decode.name, _run=b.decode.run):
                calls[_name] += 1
                return _run(c)

            def spy_lean(c, _name=b.decode.name, _lean=b.decode.cache_lean):  # replayed routes (fastattn/lean.py)
                r = _lean(c)
                return r and r._replace(run=lambda *t: calls.update([_name]) or r.run(*t))
            monkeypatch.setattr(b.decode, "run", spy)
            monkeypatch.setattr(b.decode, "cache_lean", spy_lean)
    monkeypatch.setattr(fastattn.dispatch, "_CHOICES", {})  # no route learnt before the spies
    return calls


def rnd(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype).to(device)


# ---------------------------------------------------------------- cases
# lens: valid keys per row before the append (None: the whole cache); cap: keys per row the cache holds.
CASES = {
    "len1_mha_fp32": dict(B=1, Hq=2, Hkv=2, Sq=1, D=64, Dv=64, lens=[0], snew=1, cap=8, layout="dense",
                          dtype=torch.float32),
    "len17_gqa_ragged_bf16": dict(B=3, Hq=6, Hkv=2, Sq=1, D=40, Dv=40, lens=[16, 5, 0], snew=1, cap=17,
                                  layout="dense", dtype=torch.bfloat16, noncontig=True),
    "len300_mqa_paged16_causal_fp16": dict(B=2, Hq=4, Hkv=1, Sq=2, D=64, Dv=64, lens=[298, 151], snew=2, cap=304,
                                           layout="paged16", dtype=torch.float16, causal=True),
    "paged256_q4_window_dv48_fp32": dict(B=2, Hq=4, Hkv=2, Sq=4, D=32, Dv=48, lens=[296, 40], snew=4, cap=512,
                                         layout="paged256", dtype=torch.float32, window=(100, 0)),
    "batchidx_softcap_alibi_q3_bf16": dict(B=2, Hq=4, Hkv=2, Sq=3, D=80, Dv=80, lens=[200, 13], snew=3, cap=256,
                                           layout="batch_idx", dtype=torch.bfloat16, causal=True, softcap=3.0,
                                           alibi=True),
    "len4096_gqa_bf16": dict(B=1, Hq=8, Hkv=2, Sq=1, D=128, Dv=128, lens=[4095], snew=1, cap=4096, layout="dense",
                             dtype=torch.bfloat16),
    # rows of one KV head that see no key of a block (window 62: its second block starts two keys past token 0's
    # last) next to rows that do: the grouped value products must leave the blind rows alone
    "gqa4_q4_window62_bf16": dict(B=2, Hq=8, Hkv=2, Sq=4, D=64, Dv=64, lens=[300, 70], snew=4, cap=320,
                                  layout="dense", dtype=torch.bfloat16, causal=True, window=(62, 0)),
    # head dims that are not multiples of 8: the vector block helpers' scalar tails (d % 8 and Dv % 8 columns)
    "odd_dims_q2_dv21_fp32": dict(B=2, Hq=3, Hkv=3, Sq=2, D=33, Dv=21, lens=[70, 129], snew=2, cap=136,
                                  layout="dense", dtype=torch.float32),
    "no_append_empty_row_fp32": dict(B=2, Hq=2, Hkv=1, Sq=1, D=16, Dv=16, lens=[0, 9], snew=0, cap=9,
                                     layout="dense", dtype=torch.float32),
    "whole_cache_paged16_fp16": dict(B=2, Hq=4, Hkv=2, Sq=1, D=96, Dv=96, lens=None, snew=0, cap=48,
                                     layout="paged16", dtype=torch.float16),
    # every row one length: the generic path views each row's first L keys, no bias (kvcache._prefix_len)
    "same_len_b3_causal_fp32": dict(B=3, Hq=4, Hkv=2, Sq=1, D=64, Dv=64, lens=[37] * 3, snew=1, cap=64,
                                    layout="dense", dtype=torch.float32, causal=True),
    "same_len_q3_bf16": dict(B=2, Hq=2, Hkv=1, Sq=3, D=32, Dv=32, lens=[20, 20], snew=3, cap=40, layout="dense",
                             dtype=torch.bfloat16),
}


def make_cache(c, dev):
    """Returns (k_cache, v_cache, extra kwargs, logical(kc) -> (B, cap, Hkv, D) per-row view of the cache)."""
    B, Hkv, D, Dv, cap, dt = c["B"], c["Hkv"], c["D"], c["Dv"], c["cap"], c["dtype"]
    if c["layout"].startswith("paged"):
        page = int(c["layout"][5:])
        nb = -(-cap // page)
        nblocks = B * nb + 3  # spare pages nobody uses
        kc, vc = rnd(nblocks, page, Hkv, D, dtype=dt, device=dev), rnd(nblocks, page, Hkv, Dv, dtype=dt, device=dev)
        bt = torch.randperm(nblocks)[:B * nb].view(B, nb).int().to(dev)  # shuffled physical pages
        return kc, vc, {"block_table": bt}, lambda x: x[bt.long()].reshape(B, nb * page, *x.shape[2:])
    if c["layout"] == "batch_idx":
        kc, vc = rnd(B + 2, cap, Hkv, D, dtype=dt, device=dev), rnd(B + 2, cap, Hkv, Dv, dtype=dt, device=dev)
        idx = torch.randperm(B + 2)[:B].int().to(dev)
        return kc, vc, {"cache_batch_idx": idx}, lambda x: x[idx.long()]
    kc, vc = rnd(B, cap, Hkv, D, dtype=dt, device=dev), rnd(B, cap, Hkv, Dv, dtype=dt, device=dev)
    return kc, vc, {}, lambda x: x


def run_case(c, impl, calls, num_splits=0):
    backend, dev = IMPLS[impl]
    B, Hq, Hkv, Sq, D, Dv, dt = c["B"], c["Hq"], c["Hkv"], c["Sq"], c["D"], c["Dv"], c["dtype"]
    q = (rnd(B, Sq, Hq, D + 8, dtype=dt, device=dev)[..., :D] if c.get("noncontig")
         else rnd(B, Sq, Hq, D, dtype=dt, device=dev))
    kc, vc, kw, logical = make_cache(c, dev)
    lens = None if c["lens"] is None else torch.tensor(c["lens"], dtype=torch.int32, device=dev)
    snew = c["snew"]
    k_new = rnd(B, snew, Hkv, D, dtype=dt, device=dev) if snew else None
    v_new = rnd(B, snew, Hkv, Dv, dtype=dt, device=dev) if snew else None
    # the expected cache after the append, written element by element
    want_k, want_v = logical(kc).clone(), logical(vc).clone()
    kc0, vc0 = kc.clone(), vc.clone()
    for b in range(B):
        for t in range(snew):
            want_k[b, int(lens[b]) + t] = k_new[b, t]
            want_v[b, int(lens[b]) + t] = v_new[b, t]
    window = tuple(c.get("window", (-1, -1)))
    if c.get("causal"):
        window = (window[0], 0)
    alibi = (torch.rand(Hq) * 0.5).to(dev) if c.get("alibi") else None
    softcap = c.get("softcap", 0.0)
    before = dict(calls)
    out, lse = fastattn.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=lens,
                                                causal=c.get("causal", False), window_size=c.get("window", (-1, -1)),
                                                softcap=softcap, alibi_slopes=alibi, num_splits=num_splits,
                                                return_softmax_lse=True, backend=backend, **kw)
    used = {n: v - before.get(n, 0) for n, v in calls.items() if v != before.get(n, 0)}
    # in-place append: the appended rows hold the new tokens, nothing else in the cache changed
    assert torch.equal(logical(kc), want_k) and torch.equal(logical(vc), want_v)
    if c["layout"].startswith("paged"):  # spare pages untouched
        spare = torch.ones(kc.shape[0], dtype=torch.bool, device=dev)
        spare[kw["block_table"].long().flatten()] = False
        assert torch.equal(kc[spare], kc0[spare]) and torch.equal(vc[spare], vc0[spare])
    elif c["layout"] == "batch_idx":
        spare = torch.ones(kc.shape[0], dtype=torch.bool, device=dev)
        spare[kw["cache_batch_idx"].long()] = False
        assert torch.equal(kc[spare], kc0[spare]) and torch.equal(vc[spare], vc0[spare])
    assert out.shape == (B, Sq, Hq, Dv) and lse.shape == (B, Hq, Sq)
    K, V, q, out, lse = (t.cpu() for t in (logical(kc), logical(vc), q, out, lse))  # the oracle runs on CPU
    alibi = alibi.cpu() if alibi is not None else None
    for b in range(B):
        L = K.shape[1] if lens is None else int(lens[b]) + snew
        qb = q[b:b + 1].transpose(1, 2)  # (1, Sq, Hq, D) -> (1, Hq, Sq, D)
        kb, vb = K[b:b + 1, :L].transpose(1, 2), V[b:b + 1, :L].transpose(1, 2)
        args = dict(scale=D ** -0.5, window=window, bottom_right=True, softcap=softcap, alibi_slopes=alibi)
        ref = oracle_attention(qb, kb, vb, **args)
        base = oracle_attention(qb, kb, vb, dtype=dt, **args) if dt != torch.float32 else None
        assert_rule(f"out[{b}]", out[b:b + 1].transpose(1, 2), ref, base, dt)
        lref = lse_reference(qb, kb, D ** -0.5, window, softcap, alibi)
        lbase = lse_reference(qb, kb, D ** -0.5, window, softcap, alibi, dtype=dt) if base is not None else None
        assert_rule(f"lse[{b}]", lse[b:b + 1], lref, lbase, dt, magnitude=lse_magnitude(qb, kb, D ** -0.5))
    return used


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_kvcache_matches_oracle(impl, case, decode_calls):
    c = CASES[case]
    if impl == "triton.decode_split" and c["D"] < 16:
        pytest.skip("the Triton decode kernel takes head dims >= 16 (tl.dot); the router sends this call to the "
                    "generic path")
    if impl == "cuda.decode_fwd" and _cuda_kernel_refuses(c):
        # then the generic path runs on the dense `cuda` backend, which takes neither a mask (ragged cache
        # lengths) nor fp32: the explicit request must refuse, naming why, before it writes to the cache
        with pytest.raises(fastattn.BackendUnavailableError, match="backend 'cuda' cannot run this call"):
            run_case(c, impl, decode_calls)
        assert not decode_calls
        return
    used = run_case(c, impl, decode_calls)
    if impl.startswith("generic"):
        assert not used, f"generic path expected, decode kernels ran: {used}"
    else:
        assert used == {impl: 1}, f"expected {impl} to serve the call, counters moved: {used}"


def _cuda_kernel_refuses(c) -> bool:
    """Whether csrc/cuda/decode_kernel.cuh cannot take case c: more than 8 query rows per KV head, or head dims
    that are not whole 16-byte vectors."""
    vec = 16 // torch.empty(0, dtype=c["dtype"]).element_size()
    return (c["Hq"] // c["Hkv"]) * c["Sq"] > 8 or c["D"] % vec or c["Dv"] % vec


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("num_splits", [1, 5])
def test_num_splits_do_not_change_results(impl, num_splits, decode_calls):
    c = dict(B=2, Hq=4, Hkv=2, Sq=2, D=32, Dv=32, lens=[700, 97], snew=2, cap=720, layout="paged16",
             dtype=torch.float32, window=(300, 0))
    assert run_case(c, impl, decode_calls, num_splits=num_splits) == {impl: 1}


@pytest.mark.skipif("cpu.decode_fwd" not in IMPLS, reason="C++ CPU decode kernel not built in fastattn._C")
def test_cpu_kernel_deterministic_and_opcheck():
    q, kc, vc = rnd(1, 1, 8, 64).transpose(1, 2), rnd(1, 2000, 2, 64), rnd(1, 2000, 2, 64)  # q (1,1,8,64)->(1,8,1,64)
    lens = torch.tensor([1999], dtype=torch.int32)
    a = torch.ops.fastattn.decode_fwd(q, kc, vc, lens, None, None, 0.125, -1, -1, 0.0, None, 0)
    b = torch.ops.fastattn.decode_fwd(q, kc, vc, lens, None, None, 0.125, -1, -1, 0.0, None, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    small = (q[:, :4], kc[:, :40], vc[:, :40], torch.tensor([37], dtype=torch.int32), None, None, 0.125, -1, -1, 0.0,
             None, 3)
    torch.library.opcheck(torch.ops.fastattn.decode_fwd.default, small, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpu.decode_fwd" not in IMPLS, reason="C++ CPU decode kernel not built in fastattn._C")
@pytest.mark.parametrize("lone_row", ["stream", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_kernel_head_alone_same_bits(dtype, lone_row, monkeypatch):
    """A head's rows give the same bits whatever rows share its work item: the CPU kernel runs a GQA group's rows (and
    a head's query tokens) together, four, two or one at a time, each row's sums in the order it has alone (the
    design decode_tiles.h states). Fixed key splits (num_splits), as the splits change rounding. Both ways of running
    a row alone on its KV head (FASTATTN_CPU_LONE_ROW: streamed key rows and 8-lane P V, AMD's default, or the 16-lane
    chunk kernels, Intel's) on any CPU, and the two give the same bits."""
    g = torch.Generator().manual_seed(3)
    # (6, 2) with 3 tokens: 9 rows a KV head, run as 4 + 4 + 1 together and 2 + 1 alone; a row alone at D <= 64
    # takes pv_avx2 ("stream") or pv_rows on one row ("chunks") on AVX-512 CPUs (D = 36: pv_avx2's scalar tail too),
    # the others pv_rows; (7, 7) one token: each item one row, scores_avx512_row ("stream") or the chunk loop; on
    # AVX-512 the scores of each run of 4 rows by scores_avx512_rows4 (at D = 128 too: (8, 2)), 301 keys leaving it a
    # last pass of one key
    other = {"stream": "chunks", "chunks": "stream"}[lone_row]
    for (Hq, Hkv), Sq, D in (((7, 7), 1, 64), ((6, 6), 2, 128), ((8, 4), 1, 128), ((6, 2), 3, 64), ((6, 2), 3, 36),
                             ((5, 5), 1, 36), ((8, 2), 1, 128)):
        q = torch.randn(1, Hq, Sq, D, generator=g).to(dtype)
        k, v = (torch.randn(1, Hkv, 301, D, generator=g).to(dtype) for _ in range(2))
        monkeypatch.setenv("FASTATTN_CPU_LONE_ROW", other)
        full_other = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, 0.125, -1, -1, 0.0, None, 2, True)
        monkeypatch.setenv("FASTATTN_CPU_LONE_ROW", lone_row)
        full = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, 0.125, -1, -1, 0.0, None, 2, True)
        assert torch.equal(full[0], full_other[0]) and torch.equal(full[1], full_other[1]), (Hq, Hkv, Sq, D)
        grp = Hq // Hkv
        for h in range(Hq):
            hk = h // grp
            alone = torch.ops.fastattn.decode_fwd(q[:, h:h + 1], k[:, hk:hk + 1], v[:, hk:hk + 1], None, None, None,
                                                  0.125, -1, -1, 0.0, None, 2, True)
            assert torch.equal(full[0][:, h], alone[0][:, 0]) and torch.equal(full[1][:, h], alone[1][:, 0]), \
                (Hq, Hkv, Sq, D, h)


@pytest.mark.skipif("cpu.decode_fwd" not in IMPLS, reason="C++ CPU decode kernel not built in fastattn._C")
@pytest.mark.parametrize("lone_row", ["stream", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_kernel_cache_layouts_same_bits(dtype, lone_row, monkeypatch):
    """SDPA's head-major cache (B, Hkv, S, D) gives each KV head its own work item, flash-attn's key-major one
    (B, S, Hkv, D) puts a chunk of heads in one (csrc/cpu/decode.cpp, work_heuristic): with the key splits fixed, the
    two layouts give the same bits, on one thread and on two (head chunks change no result), whichever way a row
    alone on its KV head runs (FASTATTN_CPU_LONE_ROW), and so does a paged cache holding the same keys."""
    monkeypatch.setenv("FASTATTN_CPU_LONE_ROW", lone_row)
    g = torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    try:
        for (Hq, Hkv), Sq, D, S in (((12, 12), 1, 64, 700), ((16, 4), 1, 128, 300), ((6, 2), 3, 40, 257)):
            q = torch.randn(1, Hq, Sq, D, generator=g).to(dtype)
            k, v = (torch.randn(1, Hkv, S, D, generator=g).to(dtype) for _ in range(2))  # (B, Hkv, S, D)
            kk, vk = (t.transpose(1, 2).contiguous() for t in (k, v))  # (B, Hkv, S, D) -> (B, S, Hkv, D)
            for n in (1, 2):
                torch.set_num_threads(n)
                for splits in (1, 3):
                    hm = torch.ops.fastattn.decode_fwd(q, k, v, None, None, None, 0.125, -1, -1, 0.0, None, splits,
                                                       True)
                    km = torch.ops.fastattn.decode_fwd(q, kk, vk, None, None, None, 0.125, -1, -1, 0.0, None,
                                                       splits)
                    assert torch.equal(hm[0], km[0]) and torch.equal(hm[1], km[1]), (Hq, Hkv, Sq, D, n, splits)
                    # a paged cache (pages in reverse order) reads each key through the block table where the dense
                    # layouts take its address from its index (bf16 rows alone on a head: scores_bf16_dp_strided)
                    pages = -(-S // 16)
                    kp, vp = (torch.zeros(pages * 16, Hkv, D, dtype=dtype) for _ in range(2))
                    kp[:S], vp[:S] = kk[0], vk[0]
                    kp, vp = (t.view(pages, 16, Hkv, D).flip(0).contiguous() for t in (kp, vp))  # (P*16,..)->(P,16,..)
                    table = torch.arange(pages - 1, -1, -1, dtype=torch.int32)[None]
                    pg = torch.ops.fastattn.decode_fwd(q, kp, vp, torch.tensor([S], dtype=torch.int32), table, None,
                                                       0.125, -1, -1, 0.0, None, splits)
                    assert torch.equal(hm[0], pg[0]) and torch.equal(hm[1], pg[1]), (Hq, Hkv, Sq, D, n, splits)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", KERNELS)
def test_compile_fullgraph_decode_step_with_append(impl, decode_calls):
    """A decode step (append + kernel) traces as one graph: the ops' fake functions and the routing are traceable."""
    torch._dynamo.reset()
    backend, dev = IMPLS[impl]
    q, kc, vc = (rnd(*s, device=dev) for s in ((2, 1, 4, 32), (2, 50, 2, 32), (2, 50, 2, 32)))
    kn, vn = rnd(2, 1, 2, 32, device=dev), rnd(2, 1, 2, 32, device=dev)
    lens = torch.tensor([10, 41], dtype=torch.int32, device=dev)

    def step(q, kc, vc, kn, vn, lens):
        return fastattn.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens, causal=True,
                                                backend=backend)

    kc2, vc2 = kc.clone(), vc.clone()
    eager = step(q, kc, vc, kn, vn, lens)
    n0 = decode_calls[impl]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, kn, vn, lens)
    assert decode_calls[impl] > n0
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


_SM90_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastattn.backends.triton.kernels import decode as d

    def sig(fn, ptr, consts):
        out = {}
        for n in fn.arg_names:
            if n in consts: out[n] = "constexpr"
            elif n in ("Q", "K", "V", "Out"): out[n] = ptr
            elif n in ("SeqlensK", "BlockTable", "BatchIdx"): out[n] = "*i32"
            elif n in ("Alibi", "Lse", "OutP", "LseP"): out[n] = "*fp32"
            elif n in ("qk_scale2", "cap_in", "cap_out2"): out[n] = "fp32"
            else: out[n] = "i32"
        return out

    def build(fn, ptr, consts):
        src = ASTSource(fn, sig(fn, ptr, consts), constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        ptx = k.asm["ptx"]
        assert "st.local" not in ptx and "ld.local" not in ptx, "register spills"
        print(fn.__name__, ptr, "ok")

    for ptr, paged, on in (("*bf16", True, True), ("*fp32", False, False)):
        build(d.decode_split, ptr, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128, HEAD_D=128, HEAD_DV=128,
                                        PAGED=paged, PAGE=256, BATCH_IDX=not paged, WINDOW_LEFT=on, WINDOW_RIGHT=on,
                                        SOFTCAP=on, ALIBI=on, SPLIT=on, PRECISION="ieee" if ptr == "*fp32" else "tf32",
                                        UPCAST=False))
    build(d.decode_combine, "*bf16", dict(BLOCK_S=8, BLOCK_DV=128, HEAD_DV=128))

    # the triton_op (what torch.compile traces on a GPU) runs its launcher on fake CUDA tensors
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 4, 3, 64, device="cuda", dtype=torch.bfloat16)
        kc = torch.empty(9, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        i32 = dict(device="cuda", dtype=torch.int32)
        out, lse = torch.ops.fastattn.triton_decode_fwd(q, kc, kc, torch.empty(2, **i32), torch.empty(2, 4, **i32),
                                                        None, 0.1, -1, 0, 0.0, None, 3)
        assert out.shape == (2, 4, 3, 64) and lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    print("triton_op fake ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real above")
def test_triton_decode_compiles_for_sm90_without_a_gpu():
    """The interpreter does not type-check the compiled path: build PTX for sm_90 in a process without
    TRITON_INTERPRET (no GPU needed) and require no register spills; trace the triton_op on fake CUDA tensors."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fastattn.__file__))
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0 and ("ImportError" in r.stderr or "unexpected keyword" in r.stderr):
        pytest.skip(f"this triton's compile API differs: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" ok") == 4, r.stdout


# ---------------------------------------------------------------- routing
def _small_call(dev="cpu"):
    q, kc, vc = rnd(2, 1, 4, 32, device=dev), rnd(2, 40, 2, 32, device=dev), rnd(2, 40, 2, 32, device=dev)
    return q, kc, vc, torch.tensor([3, 39], dtype=torch.int32, device=dev)


@pytest.mark.parametrize("impl", KERNELS)
def test_explicit_backend_uses_its_decode_kernel(impl, decode_calls):
    backend, dev = IMPLS[impl]
    q, kc, vc, lens = _small_call(dev)
    ex = explain_kvcache(q, kc, vc, cache_seqlens=lens, backend=backend)
    assert ex.kernel == impl and "split-KV decode kernel" in str(ex), str(ex)
    fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=backend)
    assert decode_calls == {impl: 1}
    with fastattn.use_backend(backend):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
    assert decode_calls == {impl: 2}


def test_backend_without_kernel_and_autograd_take_the_generic_path(decode_calls):
    q, kc, vc, lens = _small_call()
    ex = explain_kvcache(q, kc, vc, cache_seqlens=lens, backend="reference")
    assert ex.kernel is None and "no split-KV decode kernel" in str(ex) and "chosen: reference" in str(ex), str(ex)
    for impl in KERNELS:
        backend, dev = IMPLS[impl]
        q, kc, vc, lens = _small_call(dev)
        qg = q.clone().requires_grad_()
        ex = explain_kvcache(qg, kc, vc, cache_seqlens=lens, backend=backend)
        assert ex.kernel is None and "autograd" in str(ex), str(ex)
        long_q = rnd(2, fastattn.BACKENDS[backend].decode.max_rows // 2 + 1, 4, 32, device=dev)  # G = 2: past the cap
        ex = explain_kvcache(long_q, kc, vc, cache_seqlens=lens, backend=backend)
        assert ex.kernel is None and "prefill kernel fits better" in str(ex), str(ex)
    q, kc, vc, lens = _small_call()
    out = fastattn.flash_attn_with_kvcache(q.clone().requires_grad_(), kc, vc, cache_seqlens=lens, backend="reference")
    out.sum().backward()  # the generic path is differentiable
    assert not decode_calls


@pytest.mark.parametrize("dev", ["cpu"] + (["cuda"] if GPU else []))
def test_auto_prefers_the_device_backends_kernel(dev):
    q, kc, vc, lens = _small_call(dev)
    ex = explain_kvcache(q, kc, vc, cache_seqlens=lens)
    served = {IMPLS[n][0] for n in KERNELS if IMPLS[n][1] == dev}
    first = next((n for n in fastattn.backends.PREFERENCE[dev] if n in served), None)
    if first is None:
        assert ex.kernel is None, str(ex)
    else:
        assert ex.backend == first, str(ex)
    print(ex)


# ---------------------------------------------------------------- dense short-query route (HF GPT-2 decode)
def _sdpa(q, k, v, mask=None, causal=False):
    from fastattn.functional import _sdpa_params
    return _sdpa_params(q, k, v, mask, 0.0, causal, None, False)


def _routes(p, backend):
    """Whether dispatch.run sends p to `backend`'s decode kernel (explain's decode section says so)."""
    ex = dispatch.explain_params(p, backend)
    return ex.decode is not None and ex.decode.kernel is not None


def _dense_dtype(backend):
    """fp32 where the dense backend takes it, else fp16 (the `cuda` backend): a dense call reaches a decode kernel
    only through a backend that could run the call itself."""
    return torch.float32 if torch.float32 in fastattn.BACKENDS[backend].dtypes else torch.float16


def _check_out(out, q, k, v, dt):
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    base = oracle_attention(qc, kc, vc, scale=q.shape[-1] ** -0.5, dtype=dt) if dt != torch.float32 else None
    assert_rule("out", out, oracle_attention(qc, kc, vc, scale=q.shape[-1] ** -0.5), base, dt)


@pytest.mark.parametrize("impl", KERNELS)
def test_dense_short_query_route(impl, decode_calls):
    backend, dev = IMPLS[impl]
    B, H, N, D, dt = 2, 4, 77, 64, _dense_dtype(backend)
    q, k, v = (rnd(*s, dtype=dt, device=dev) for s in ((B, H, 1, D), (B, H, N, D), (B, H, N, D)))
    p = _sdpa(q, k, v)
    assert _routes(p, backend), str(dispatch.explain_params(p, backend))
    out, lse = dispatch.run(p, backend)
    assert decode_calls == {impl: 1}
    _check_out(out, q, k, v, dt)
    assert torch.isfinite(lse).all()
    # a mask: only for kernels that take one (tests/test_decode_mask.py checks the results)
    masked = _sdpa(q, k, v, torch.rand(B, 1, 1, N, device=dev) > 0.2)
    takes = fastattn.BACKENDS[backend].decode.takes_bias
    assert _routes(masked, backend) == takes, str(dispatch.explain_params(masked, backend))
    if "mask" in fastattn.BACKENDS[backend].features:
        dispatch.run(masked, backend)
    else:  # the `cuda` backend: neither its decode kernel nor its dense kernel takes a mask
        with pytest.raises(fastattn.BackendUnavailableError, match="mask not supported"):
            dispatch.run(masked, backend)
    assert decode_calls == {impl: 1 + takes}
    # not a short-query call, or not one the kernels' bottom-right rule can express: no route
    for other in (_sdpa(q, k, v, causal=True), _sdpa(rnd(B, H, 64, D, dtype=dt, device=dev), k, v),
                  _sdpa(q.clone().requires_grad_(), k, v)):
        assert not _routes(other, backend), str(dispatch.explain_params(other, backend))
        dispatch.run(other, backend)
    assert not _routes(p, "reference")
    dispatch.run(p, "reference")
    assert decode_calls == {impl: 1 + takes}


@pytest.mark.parametrize("impl", KERNELS)
def test_dispatcher_routes_short_queries(impl, decode_calls):
    """Through the public SDPA surface: GPT-2-style decode (no mask, no grad) reaches the backend's decode kernel."""
    backend, dev = IMPLS[impl]
    B, H, N, D, dt = 2, 4, 77, 64, _dense_dtype(backend)
    q, k, v = (rnd(*s, dtype=dt, device=dev) for s in ((B, H, 1, D), (B, H, N, D), (B, H, N, D)))
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    assert decode_calls == {impl: 1}
    _check_out(out, q, k, v, dt)
    fastattn.scaled_dot_product_attention(q.clone().requires_grad_(), k, v, backend=backend).sum().backward()
    assert decode_calls == {impl: 1}  # autograd: the backend's normal forward


# ---------------------------------------------------------------- the op's own checks (the API's: test_kvcache_safety.py)
@pytest.mark.skipif("cpu.decode_fwd" not in IMPLS, reason="C++ CPU decode kernel not built in fastattn._C")
def test_cpu_op_checks_indices_itself():
    """The op can be called directly: it checks every index it follows (no out-of-bounds read)."""
    q, kc, vc = rnd(2, 4, 1, 16), rnd(2, 8, 2, 16), rnd(2, 8, 2, 16)
    op = torch.ops.fastattn.decode_fwd
    with pytest.raises(RuntimeError, match="seqlens_k"):
        op(q, kc, vc, torch.tensor([9, 1], dtype=torch.int32), None, None, 0.25, -1, -1, 0.0, None, 0)
    with pytest.raises(RuntimeError, match="block_table"):
        op(q, kc, vc, torch.tensor([8, 9], dtype=torch.int32), torch.tensor([[0], [5]], dtype=torch.int32)[:, [0, 0]],
           None, 0.25, -1, -1, 0.0, None, 0)
    with pytest.raises(RuntimeError, match="cache_batch_idx"):
        op(q, kc, vc, torch.tensor([1, 1], dtype=torch.int32), None, torch.tensor([0, 2], dtype=torch.int32), 0.25,
           -1, -1, 0.0, None, 0)


# ---------------------------------------------------------------- the op's SDPA layout and whole-cache forms
@pytest.mark.skipif("cpu.decode_fwd" not in IMPLS, reason="C++ CPU decode kernel not built in fastattn._C")
@pytest.mark.parametrize("layout", ["dense", "batch_idx", "paged"])
def test_cpu_op_sdpa_layout_and_whole_cache(layout):
    """decode_fwd(kv_bhsd=True) reads caches given as (Bc, Hkv, S, D) exactly as their transpose(1, 2) in the cache
    layout, and seqlens_k=None as every row's whole capacity: the same bits as the explicit form, in every layout
    (the window makes the lengths matter; Hkv != S, so a flag that is ignored mislays the dims)."""
    op = torch.ops.fastattn.decode_fwd
    B, Hq, Hkv, Sq, S, D, Dv = 2, 4, 2, 2, 24, 16, 8
    q = rnd(B, Hq, Sq, D)
    kb, vb = rnd(B + 1, Hkv, S, D), rnd(B + 1, Hkv, S, Dv)  # SDPA's layout, one spare row or page
    bt = bidx = None
    cap = S
    if layout == "paged":
        bt = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)  # pages of S keys, a shared one
        cap = 2 * S
    elif layout == "batch_idx":
        bidx = torch.tensor([2, 0], dtype=torch.int32)
    else:
        kb, vb = kb[:B], vb[:B]
    kc, vc = kb.transpose(1, 2), vb.transpose(1, 2)  # (.., Hkv, S, D) -> (.., S, Hkv, D) views
    full = torch.full((B,), cap, dtype=torch.int32)
    lens = torch.tensor([cap - 5, 3], dtype=torch.int32)
    for wl, wr in ((-1, -1), (7, 0)):
        args = (bt, bidx, 0.25, wl, wr, 0.0, None, 3)
        want = op(q, kc, vc, full, *args)
        for got in (op(q, kb, vb, None, *args, True), op(q, kb, vb, full, *args, True), op(q, kc, vc, None, *args)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        want = op(q, kc, vc, lens, *args)
        got = op(q, kb, vb, lens, *args, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.library.opcheck(op.default, (q, kb, vb, None, bt, bidx, 0.25, 7, 0, 0.0, None, 3, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpu.decode_fwd" not in IMPLS, reason="C++ CPU decode kernel not built in fastattn._C")
def test_dense_route_passes_kv_through(monkeypatch):
    """A dense short-query call reaches a kernel that takes_sdpa_layout with its own k/v (DecodeCall.kv_bhsd, no
    lengths tensor): no views or tensors built per call, and the same bits as the cache-layout call dense_call
    describes (GQA, several queries, a bottom-right window)."""
    from fastattn.backends.cpp_decode import CPU_DECODE
    from fastattn.params import AttnParams
    q, k, v = rnd(2, 4, 2, 32), rnd(2, 2, 50, 32), rnd(2, 2, 50, 16)  # 4 query rows per KV head: the decode kernel
    for wl, wr in ((-1, -1), (9, 0)):
        p = AttnParams(q=q, k=k, v=v, scale=0.2, window_left=wl, window_right=wr, bottom_right=True)
        seen = []
        real = CPU_DECODE.run
        monkeypatch.setattr(CPU_DECODE, "run", lambda c: seen.append(c) or real(c))
        out, lse = dispatch.run(p, "cpu")
        monkeypatch.undo()
        (c,) = seen
        assert c.kv_bhsd and c.k_cache is k and c.v_cache is v and c.seqlens_k is None
        assert c.kv_heads == 2 and c.slots == 50 and c.windows() == dispatch.dense_call(p).windows()
        want, want_lse = CPU_DECODE.run(dispatch.dense_call(p))  # (B, S, H, D) views and a lengths tensor
        assert torch.equal(out, want) and torch.equal(lse, want_lse)


@needs_cuda_headers
def test_cuda_op_sdpa_layout_and_whole_cache_emulated():
    """The CUDA op's planning (decode_host.h) and kernel (seqlens nullptr = whole cache) run by the CPU emulator:
    kv_bhsd and seqlens_k=None give the bits of the explicit cache-layout call."""
    B, Hq, Hkv, Sq, S, D = 2, 4, 2, 1, 40, 32
    q = rnd(B, Hq, Sq, D)
    kb, vb = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    kc, vc = kb.transpose(1, 2).contiguous(), vb.transpose(1, 2).contiguous()  # 16-byte aligned cache rows
    kb, vb = kc.transpose(1, 2), vc.transpose(1, 2)  # (B, S, Hkv, D) -> (B, Hkv, S, D) views
    full = torch.full((B,), S, dtype=torch.int32)
    args = (None, None, D ** -0.5, 5, 0, 0.0, None, 2, 132)
    want = emu().decode_fwd(q, kc, vc, full, *args)
    for got in (emu().decode_fwd(q, kb, vb, None, *args, True), emu().decode_fwd(q, kc, vc, None, *args)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cuda_kernel_alignment_check_traces():
    """The CUDA decode kernel's 16-byte alignment check (backends/cpp_decode.py) also answers while torch.compile
    traces, where data_ptr() cannot be read (a decode step under torch.compile stopped there on an H200): eager
    reads the pointer; a trace assumes alignment and leaves the check to the op."""
    from fastattn.backends.cpp_decode import _misaligned
    torch._dynamo.reset()
    f = torch.compile(lambda t: t.sum() * 0 + int(_misaligned(t)), fullgraph=True, backend="eager")
    base = torch.zeros(64)
    assert int(f(base[1:])) == 0
    assert [_misaligned(base[i:]) for i in (0, 1, 4)] == [False, True, False]  # fp32: 4 elements to 16 bytes
