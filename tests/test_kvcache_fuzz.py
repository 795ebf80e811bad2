"""Seeded fuzz of flash_attn_with_kvcache (tests/test_fuzz.py covers the SDPA, flash-attn and varlen surfaces): random
steps on a dense cache — batch, grouped heads, 1-3 query tokens, head dims, cache capacities, lengths all equal (the
view path, kvcache._prefix_len) or ragged, appends of 0-3 tokens, causal, windows, softcap, alibi, fp32 or bf16, on
auto / cpu / sdpa / reference — against the float64 oracle under the tolerance rule, the cache after the append
checked bit for bit. FASTATTN_FUZZ_SEED replays a run (as test_fuzz.py); FASTATTN_KVCACHE_FUZZ_CASES sets the count.
"""
import os
import random

import pytest
import torch

import fastattn
from fastattn.backends import BACKENDS
from support.oracle import assert_rule, oracle_attention

SEED = int(os.environ.get("FASTATTN_FUZZ_SEED", random.SystemRandom().randrange(2 ** 31)))
N = int(os.environ.get("FASTATTN_KVCACHE_FUZZ_CASES", "120"))
print(f"[kvcache fuzz seed {SEED}] replay with FASTATTN_FUZZ_SEED={SEED}")
BACKEND_CHOICES = [b for b in ("cpu", "sdpa", "reference") if not BACKENDS[b].unavailable()] + [None, None]


def _draw(i):
    r = random.Random(SEED * 1000003 + i)
    Hkv = r.choice([1, 2])
    c = dict(B=r.choice([1, 2, 3]), Hkv=Hkv, Hq=Hkv * r.choice([1, 2, 4]), Sq=r.choice([1, 1, 2, 3]),
             D=r.choice([16, 40, 64]), cap=r.choice([16, 33, 64, 100]), causal=r.random() < 0.5,
             window=(r.choice([-1, -1, 5, 20]), r.choice([-1, -1, 0, 3])), softcap=r.choice([0.0, 0.0, 0.0, 4.0]),
             alibi=r.random() < 0.2, dtype=r.choice([torch.float32, torch.float32, torch.bfloat16]),
             backend=r.choice(BACKEND_CHOICES))
    c["snew"] = r.choice([0, 0, 1, c["Sq"]])
    top = c["cap"] - c["snew"]
    c["lens"] = ([r.randrange(0, top + 1)] * c["B"] if r.random() < 0.5
                 else [r.randrange(0, top + 1) for _ in range(c["B"])])
    c["whole"] = not c["snew"] and r.random() < 0.1  # no cache_seqlens: every row the whole cache
    return c


@pytest.mark.parametrize("i", range(N))
def test_kvcache_fuzz(i):
    c = _draw(i)
    B, Hq, Hkv, Sq, D, cap, snew, dt = (c[n] for n in ("B", "Hq", "Hkv", "Sq", "D", "cap", "snew", "dtype"))
    g = torch.Generator().manual_seed(SEED + i)
    q = torch.randn(B, Sq, Hq, D, generator=g).to(dt)  # (B, Sq, Hq, D)
    kc, vc = (torch.randn(B, cap, Hkv, D, generator=g).to(dt) for _ in range(2))  # (B, cap, Hkv, D)
    k, v = ((torch.randn(B, snew, Hkv, D, generator=g).to(dt) for _ in range(2)) if snew else (None, None))
    alibi = torch.rand(Hq, generator=g) * 0.3 if c["alibi"] else None
    lens = None if c["whole"] else torch.tensor(c["lens"], dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    want_k, want_v = kc.clone(), vc.clone()
    ends = []
    for b in range(B):
        L = cap if lens is None else c["lens"][b]
        if snew:
            want_k[b, L:L + snew], want_v[b, L:L + snew] = k[b], v[b]
        ends.append(L + snew)
    try:
        out = fastattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=c["causal"],
                                               window_size=c["window"], softcap=c["softcap"], alibi_slopes=alibi,
                                               backend=c["backend"])
    except fastattn.BackendUnavailableError as e:  # an explicit backend that does not take the call says why
        assert c["backend"] is not None, f"auto refused: {e}"
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "a refused call changed the cache"
        return
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), \
        f"FASTATTN_FUZZ_SEED={SEED} case {i}: the cache after the append differs: {c}"
    window = (c["window"][0], 0) if c["causal"] else c["window"]
    for b in range(B):
        qb = q[b:b + 1].transpose(1, 2)  # (1, Sq, Hq, D) -> (1, Hq, Sq, D)
        kb, vb = (t[b:b + 1, :ends[b]].transpose(1, 2) for t in (want_k, want_v))  # (1, Hkv, L, D)
        args = dict(scale=D ** -0.5, window=window, bottom_right=True, softcap=c["softcap"], alibi_slopes=alibi)
        ref = oracle_attention(qb, kb, vb, **args)
        base = oracle_attention(qb, kb, vb, dtype=dt, **args) if dt != torch.float32 else None
        assert_rule(f"FASTATTN_FUZZ_SEED={SEED} case {i} row {b} ({c})", out[b:b + 1].transpose(1, 2), ref, base, dt)
