"""Fresh CPU outputs of 32 MB or more are advised to transparent huge pages before the kernels write them
(csrc/cpu/workspace.h, advise_huge_pages): glibc maps every allocation that large afresh, so without the advice a
training loop's large gradients fault in each 4 KB page again on every call. The check reads the kernel's own record
of the advice, the `hg` flag of the mapping that holds the tensor in /proc/self/smaps, so it does not depend on free
huge pages being at hand: set on the outputs of the fwd and bwd ops (out, dQ, dK, dV) past the size, not set with
FASTATTN_CPU_HUGE_PAGES=0 nor below the size; the values the same bits either way."""
import os
import sys

import pytest
import torch

from fastattn import ops

pytestmark = [pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps: Linux"),
              pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                                 reason="a Linux kernel built without transparent huge pages refuses the advice")]

ARGS = (None, None, None, 0, 0, 0.125, -1, -1, False, 0.0, None, 0.0, 0, 0, False)


def _advised(t):
    """Whether the mapping holding t's first whole 2 MB page carries VmFlags `hg` (MADV_HUGEPAGE)."""
    huge = 2 << 20
    addr = (t.data_ptr() + huge - 1) // huge * huge
    assert addr + huge <= t.data_ptr() + t.nbytes, "the tensor holds no whole 2 MB page"
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _calls():
    """One token of 8 heads against 8192 keys at head dim 128 (fp32): dK and dV of 32 MB each, cheap to compute;
    and a forward whose out is 32 MB (B8 H8 Sq1024 D128 against 16 keys)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 1, 128), torch.randn(1, 8, 8192, 128), torch.randn(1, 8, 8192, 128)
    out, lse = torch.ops.fastattn.fwd(q, k, v, *ARGS)
    grads = torch.ops.fastattn.bwd(torch.randn_like(out), q, k, v, out, lse, *ARGS)
    big_q, small_kv = torch.randn(8, 8, 1024, 128), torch.randn(8, 8, 16, 128)
    big_out = torch.ops.fastattn.fwd(big_q, small_kv, small_kv, *ARGS)[0]
    return {"dq": grads[0], "dk": grads[1], "dv": grads[2], "out": big_out}


def test_large_outputs_are_advised_to_huge_pages_and_the_switch_turns_it_off(monkeypatch):
    monkeypatch.delenv("FASTATTN_CPU_HUGE_PAGES", raising=False)
    on = _calls()
    assert _advised(on["dk"]) and _advised(on["dv"]) and _advised(on["out"])
    assert on["dq"].nbytes < 32 << 20  # (small: left alone, so holds no advised page of its own to check)
    monkeypatch.setenv("FASTATTN_CPU_HUGE_PAGES", "0")
    off = _calls()
    assert not any(_advised(off[n]) for n in ("dk", "dv", "out"))
    assert all(torch.equal(on[n], off[n]) for n in on)


def test_outputs_below_the_size_are_left_alone(monkeypatch):
    """A 16 MB gradient (4096 keys) may come from glibc's heap, shared with other allocations: no advice."""
    monkeypatch.delenv("FASTATTN_CPU_HUGE_PAGES", raising=False)
    q, k, v = torch.randn(1, 8, 1, 128), torch.randn(1, 8, 4096, 128), torch.randn(1, 8, 4096, 128)
    out, lse = torch.ops.fastattn.fwd(q, k, v, *ARGS)
    dk = torch.ops.fastattn.bwd(torch.randn_like(out), q, k, v, out, lse, *ARGS)[1]
    assert dk.nbytes == 16 << 20 and not _advised(dk)
