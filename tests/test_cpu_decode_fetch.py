"""The CPU decode kernel's ways of fetching the cache ahead (FASTATTN_CPU_PREFETCH=none|block|stream, read per call;
csrc/cpu/decode_fetch.h fetch_mode, fetch_ahead there) change no result: every mode gives the bits of `none` on
each cache layout, dtype and row grouping the block helpers run, and those bits are the oracle's within tolerance."""
import pytest
import torch

import fastattn  # noqa: F401  (registers torch.ops.fastattn)
from fastattn import ops

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

MODES = ("none", "block", "stream")


def _decode(q, k, v, kv_bhsd, **kw):
    """fastattn::decode_fwd with fixed key splits (the splits change rounding, the fetch mode must not)."""
    return torch.ops.fastattn.decode_fwd(q, k, v, kw.get("lens"), kw.get("table"), kw.get("idx"), 0.125, -1, -1, 0.0,
                                         None, 3, kv_bhsd)


def _cases(dtype, g):
    """(name, q, k, v, kv_bhsd, extra): SDPA's head-major cache (a row alone on its KV head; GQA groups of 4; three
    tokens of a group of 3, run as 4 + 4 + 1 rows), flash-attn's key-major one with cache_batch_idx and seqlens, and
    a paged one (which fetches nothing ahead in any mode)."""
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    for name, (Hq, Hkv), Sq, D, S in (("mha", (12, 12), 1, 64, 700), ("gqa", (16, 4), 1, 128, 300),
                                      ("group3", (6, 2), 3, 40, 257), ("odd_d", (5, 5), 1, 36, 333)):
        yield name, rnd(1, Hq, Sq, D), rnd(1, Hkv, S, D), rnd(1, Hkv, S, D), True, {}
    q, k, v = rnd(2, 8, 1, 64), rnd(3, 400, 4, 64), rnd(3, 400, 4, 64)  # k, v: (B, S, Hkv, D), rows 2 and 0
    extra = {"lens": torch.tensor([390, 129], dtype=torch.int32), "idx": torch.tensor([2, 0], dtype=torch.int32)}
    yield "key_major", q, k, v, False, extra
    kp, vp = rnd(10, 64, 4, 64), rnd(10, 64, 4, 64)  # 10 pages of 64 keys
    extra = {"lens": torch.tensor([300, 200], dtype=torch.int32),
             "table": torch.tensor([[9, 3, 5, 1, 7], [0, 2, 4, 6, 8]], dtype=torch.int32)}
    yield "paged", q, kp, vp, False, extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fetch_modes_same_bits(dtype, monkeypatch):
    g = torch.Generator().manual_seed(11)
    for name, q, k, v, kv_bhsd, extra in _cases(dtype, g):
        got = {}
        for mode in MODES:
            monkeypatch.setenv("FASTATTN_CPU_PREFETCH", mode)
            got[mode] = _decode(q, k, v, kv_bhsd, **extra)
        for mode in MODES[1:]:
            assert torch.equal(got[mode][0], got["none"][0]) and torch.equal(got[mode][1], got["none"][1]), \
                (name, mode)
        if name in ("mha", "gqa", "group3"):  # the bits are right, not only equal: a float64 reference
            grp = q.shape[1] // k.shape[1]
            kr, vr = (t.double().repeat_interleave(grp, dim=1) for t in (k, v))
            s = q.double() @ kr.transpose(-1, -2) * 0.125  # (1, Hq, Sq, S)
            ref = torch.softmax(s, -1) @ vr
            tol = 1e-5 if dtype is torch.float32 else 2e-2
            torch.testing.assert_close(got["none"][0].double(), ref, atol=tol, rtol=tol, msg=name)


def test_fetch_mode_switch_values(monkeypatch):
    """An unknown value of the switch is named by fastattn.backends.cpu.environment_notes; the three modes are not."""
    from fastattn.backends import cpu as cpu_backend
    monkeypatch.setenv("FASTATTN_CPU_PREFETCH", "sideways")
    assert any("FASTATTN_CPU_PREFETCH='sideways'" in n for n in cpu_backend.environment_notes())
    for mode in MODES:
        monkeypatch.setenv("FASTATTN_CPU_PREFETCH", mode)
        assert not any("FASTATTN_CPU_PREFETCH" in n for n in cpu_backend.environment_notes())


def test_fetch_mode_reported(monkeypatch):
    """`info` and the benchmarks' CPU line name the fetch the decode kernel takes (ops.cpu_matmul_report's
    "decode_fetch", read per call as the switch is): each mode as set, and by default the CPU's own (the hardware
    prefetchers alone on AMD CPUs before family 26, where stream was not compared; else each row 64 keys ahead, 32 on
    AMD CPUs)."""
    report = lambda: ops.cpu_matmul_report()["decode_fetch"]  # noqa: E731
    for mode, words in (("none", "hardware prefetchers"), ("block", "next block"), ("stream", "keys ahead")):
        monkeypatch.setenv("FASTATTN_CPU_PREFETCH", mode)
        assert words in report(), (mode, report())
        assert words in ops.cpu_matmul(), mode
    monkeypatch.delenv("FASTATTN_CPU_PREFETCH")
    r = ops.cpu_matmul_report()
    amd = r["vendor"] == "AuthenticAMD"
    if amd and int(r["family"]) < 26:
        assert report() == "the hardware prefetchers alone", report()
    else:
        assert report() == f"a dense cache's rows fetched {32 if amd else 64} keys ahead", report()
