"""Rotary embedding inside flash_attn_with_kvcache (flash-attn's rotary_cos / rotary_sin / rotary_interleaved),
against an independent float64 reference: the rotation written as complex multiplication, then the oracle."""
import pytest
import torch

import fastattn

from support.oracle import assert_rule, oracle_attention


def _tables(seqlen_ro, rotary_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv[None, :]  # (seqlen_ro, rotary_dim / 2)
    return ang.cos(), ang.sin()


def _rotate_ref(x, cos, sin, pos, interleaved):
    """float64: x (B, S, H, D) at positions pos (B, S), as complex multiplication of the rotated pairs."""
    x = x.double()
    half = cos.shape[1]
    rd = 2 * half
    if interleaved:
        pairs = x[..., :rd].reshape(*x.shape[:-1], half, 2)  # (B, S, H, half, 2): dims (2j, 2j+1)
    else:
        pairs = torch.stack((x[..., :half], x[..., half:rd]), dim=-1)  # dims (j, j + half)
    z = torch.view_as_complex(pairs.contiguous())
    w = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[pos].unsqueeze(2)  # e^{i angle}, (B, S, 1, half)
    r = torch.view_as_real(z * w)
    r = r.flatten(-2) if interleaved else torch.cat((r[..., 0], r[..., 1]), dim=-1)
    return torch.cat((r, x[..., rd:]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (6, 2))])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # 16 < head dim 32: the last dims pass through
def test_rotary_in_kvcache_matches_reference(dtype, interleaved, causal, window, rotary_dim):
    B, cap, Hq, Hkv, D, Sq = 3, 24, 4, 2, 32, 3
    lens = torch.tensor([0, 5, 13], dtype=torch.int32)
    kc = torch.randn(B, cap, Hkv, D).to(dtype)
    vc = torch.randn(B, cap, Hkv, D).to(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    q = torch.randn(B, Sq, Hq, D).to(dtype)
    k_new = torch.randn(B, Sq, Hkv, D).to(dtype)
    v_new = torch.randn(B, Sq, Hkv, D).to(dtype)
    cos, sin = _tables(cap + 4, rotary_dim)
    q_in, k_in = q.clone(), k_new.clone()
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, rotary_cos=cos.to(dtype),
                                           rotary_sin=sin.to(dtype), cache_seqlens=lens, causal=causal,
                                           window_size=window, rotary_interleaved=interleaved)
    assert torch.equal(q, q_in) and torch.equal(k_new, k_in), "q and k must not be rotated in place"

    start = lens.long()[:, None]
    pos_k = start + torch.arange(Sq)
    pos_q = pos_k if (causal or window != (-1, -1)) else start.expand(B, Sq)  # non-local: all at cache_seqlens
    # The tables as the call saw them (rounded to dtype), the rotation itself exact.
    cos_d, sin_d = cos.to(dtype).double(), sin.to(dtype).double()
    k_rot = _rotate_ref(k_new, cos_d, sin_d, pos_k, interleaved)
    q_rot = _rotate_ref(q, cos_d, sin_d, pos_q, interleaved)
    wl, wr = window if not causal else (window[0], 0)
    for b in range(B):
        n = int(lens[b])
        # The appended keys are the rotated ones (rounded once to dtype), values as given; nothing else changed.
        assert_rule(f"k_cache[{b}] appended", kc[b, n:n + Sq], k_rot[b], k_rot[b].to(dtype), dtype)
        assert torch.equal(vc[b, n:n + Sq], v_new[b])
        keep = torch.ones(cap, dtype=torch.bool)
        keep[n:n + Sq] = False
        assert torch.equal(kc[b, keep], kc0[b, keep]) and torch.equal(vc[b, keep], vc0[b, keep])
        L = n + Sq
        keys = torch.cat((kc0[b:b + 1, :n].double(), k_rot[b:b + 1]), dim=1)  # (1, L, Hkv, D)
        qb = q_rot[b:b + 1].transpose(1, 2)  # (1, Sq, Hq, D) -> (1, Hq, Sq, D)
        kb, vb = keys.transpose(1, 2), vc[b:b + 1, :L].transpose(1, 2)
        kw = dict(scale=D ** -0.5, window=(wl, wr), bottom_right=True)
        ref = oracle_attention(qb, kb, vb, **kw)
        base = oracle_attention(qb.to(dtype), kb.to(dtype), vb, dtype=dtype, **kw)
        assert_rule(f"out[{b}]", out[b:b + 1].transpose(1, 2), ref, base, dtype)


def test_rotary_paged_cache_and_decode_step():
    """One decode step into a paged cache: the same keys and output as the dense call."""
    B, Hq, Hkv, D, page, nb = 2, 4, 4, 16, 4, 3
    lens = torch.tensor([3, 9], dtype=torch.int32)
    cos, sin = _tables(page * nb, D)
    kc = torch.randn(B, page * nb, Hkv, D)
    vc = torch.randn(B, page * nb, Hkv, D)
    q, k1, v1 = torch.randn(B, 1, Hq, D), torch.randn(B, 1, Hkv, D), torch.randn(B, 1, Hkv, D)
    perm = torch.randperm(B * nb)
    block_table = perm.view(B, nb).to(torch.int32)
    kp = torch.empty(B * nb, page, Hkv, D)
    vp = torch.empty(B * nb, page, Hkv, D)
    kp[perm] = kc.reshape(B * nb, page, Hkv, D)  # (B, cap, H, D) -> (B*nb, page, H, D)
    vp[perm] = vc.reshape(B * nb, page, Hkv, D)
    kw = dict(k=k1, v=v1, rotary_cos=cos.float(), rotary_sin=sin.float(), cache_seqlens=lens, causal=True)
    dense = fastattn.flash_attn_with_kvcache(q, kc, vc, **kw)
    paged = fastattn.flash_attn_with_kvcache(q, kp, vp, block_table=block_table, **kw)
    assert torch.allclose(dense, paged, atol=1e-6, rtol=1e-5)
    assert torch.equal(kp[perm].reshape(B, page * nb, Hkv, D), kc)


@pytest.mark.parametrize("kw, match", [
    (dict(rotary_cos=torch.ones(32, 8)), "both rotary_cos and rotary_sin"),
    (dict(rotary_cos=torch.ones(32, 8), rotary_sin=torch.ones(32, 8), k=None, v=None), "pass k and v"),
    (dict(rotary_cos=torch.ones(32, 20), rotary_sin=torch.ones(32, 20)), r"rotary_dim = 2 \* rotary_cos.shape\[1\] = 40"),
    (dict(rotary_cos=torch.ones(8, 8), rotary_sin=torch.ones(8, 8)), "cover 8 positions but the cache holds 16"),
    (dict(rotary_cos=torch.ones(32, 8), rotary_sin=torch.ones(32, 4)), "must have the same shape"),
    (dict(rotary_cos=torch.ones(32, 8, dtype=torch.int64), rotary_sin=torch.ones(32, 8)), "floating tensor"),
])
def test_rotary_bad_input_writes_nothing(kw, match):
    B, cap, H, D = 2, 16, 2, 32
    kc, vc = torch.randn(B, cap, H, D), torch.randn(B, cap, H, D)
    kc0 = kc.clone()
    args = dict(k=torch.randn(B, 1, H, D), v=torch.randn(B, 1, H, D), cache_seqlens=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        fastattn.flash_attn_with_kvcache(torch.randn(B, 1, H, D), kc, vc, **args)
    assert torch.equal(kc, kc0)
    with pytest.raises(ValueError, match=match):
        fastattn.explain_kvcache(torch.randn(B, 1, H, D), kc, vc, **args)
