"""The correctness matrix, generated from each backend's declarations.

A Case describes one call by the features it exercises. `matrix()` gives every (backend, case, dtype, device)
whose needs the backend declares, so a new backend joins the matrix by declaring what it supports."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

import fastattn
from .oracle import base_factor, base_fp32_rel, check_rule, delta_error, oracle_attention

LOW = (torch.float16, torch.bfloat16)
TESTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    name: str
    surface: str = "sdpa"            # sdpa (B,H,S,D) | flash (B,S,H,D) | varlen (total,H,D)
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    Sq: int = 17
    Sk: int = 17
    D: int = 64
    Dv: Optional[int] = None
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    mask: Optional[str] = None       # bool_kpad | float_kpad | float_2d | bool_bcast | bool_rows_empty
    softcap: float = 0.0
    alibi: Optional[str] = None      # h | bh
    seqlens: Tuple[Tuple[int, int], ...] = ()  # varlen (len_q, len_k) per sequence
    noncontig: bool = False
    lse: bool = False
    scale: Optional[float] = None    # None: default 1/sqrt(D)
    grad: bool = True

    @property
    def dv(self):
        return self.Dv or self.D

    def needs(self):
        n = set()
        if self.causal:
            n.add("causal")
        if self.surface in ("flash", "varlen") and (self.causal or self.window != (-1, -1)):
            if self.Sq != self.Sk or self.surface == "varlen":
                n.add("bottom_right")
        if self.window != (-1, -1):
            n.add("window")
            if self.surface in ("flash", "varlen"):
                n.add("bottom_right")
        if self.mask:
            n.add("mask")
        if self.softcap:
            n.add("softcap")
        if self.alibi:
            n.add("alibi")
        if self.surface == "varlen":
            n.add("varlen")
        if self.Hq != self.Hkv:
            n.add("gqa")
        if self.dv != self.D:
            n.add("dv_ne_d")
        if self.lse:
            n.add("lse")
        return n


CASES = [
    Case("basic"),
    Case("len1", Sq=1, Sk=97, D=40),
    Case("sq_gt_sk", Sq=97, Sk=17, D=80, scale=0.3),
    Case("causal_topleft_sq_lt_sk", Sq=17, Sk=97, D=96, causal=True),
    Case("causal_topleft_sq_gt_sk", Sq=97, Sk=17, D=32, causal=True),
    Case("causal_square_257", Sq=257, Sk=257, D=128, causal=True),
    Case("long_1025", B=1, Hq=1, Hkv=1, Sq=1025, Sk=1025, D=64, causal=True),
    Case("hd256", Sq=33, Sk=65, D=256),
    Case("gqa", Hq=4, Hkv=2, Sq=17, Sk=97),
    Case("dv_ne_d", D=64, Dv=32, Sq=33, Sk=17),
    Case("noncontig_sdpa", Sq=33, Sk=65, D=64, noncontig=True, causal=True),
    Case("mask_bool_keypad", Sq=17, Sk=97, mask="bool_kpad"),
    Case("mask_float_keypad", Sq=33, Sk=65, mask="float_kpad", D=80),
    Case("mask_float_2d", Sq=33, Sk=33, mask="float_2d"),
    Case("mask_bool_bcast_heads", Sq=17, Sk=65, mask="bool_bcast", Hq=4, Hkv=4),
    Case("mask_rows_all_masked", Sq=17, Sk=33, mask="bool_rows_empty"),
    Case("mask_and_causal", Sq=65, Sk=65, mask="bool_kpad", causal=True),
    Case("flash_basic", surface="flash", Sq=33, Sk=97, D=64),
    Case("flash_causal_br", surface="flash", Sq=17, Sk=97, D=64, causal=True),
    Case("flash_causal_br_sq_gt_sk", surface="flash", Sq=97, Sk=17, D=16, causal=True),
    Case("flash_mqa_causal", surface="flash", Hq=4, Hkv=1, Sq=97, Sk=97, causal=True),
    Case("flash_noncontig", surface="flash", Sq=65, Sk=33, D=40, noncontig=True),
    Case("flash_window_left", surface="flash", Sq=97, Sk=97, window=(16, 0)),
    Case("flash_window_both", surface="flash", Sq=65, Sk=97, window=(8, 8), D=96),
    Case("flash_softcap", surface="flash", Sq=33, Sk=33, softcap=2.0, scale=0.5),
    Case("flash_alibi_h", surface="flash", Sq=33, Sk=65, alibi="h", causal=True),
    Case("flash_alibi_bh", surface="flash", Sq=17, Sk=33, alibi="bh"),
    Case("flash_lse", surface="flash", Sq=33, Sk=65, causal=True, lse=True, D=80),
    Case("varlen", surface="varlen", seqlens=((1, 1), (17, 33), (97, 97)), D=64),
    Case("varlen_causal", surface="varlen", seqlens=((17, 17), (33, 97), (97, 33)), causal=True, D=40),
    Case("varlen_gqa_empty", surface="varlen", Hq=4, Hkv=2, seqlens=((5, 0), (0, 7), (33, 65)), D=64),
    Case("varlen_lse", surface="varlen", seqlens=((17, 33), (65, 17)), causal=True, lse=True),
] + [
    # Head-dim sweep, odd lengths, alternating causal.
    Case(f"hd{d}", Sq=17, Sk=33, D=d, causal=bool(n % 2)) for n, d in enumerate((16, 40, 64, 80, 96, 128, 160, 256))
]


def matrix(devices=None):
    """(backend name, Case, dtype, device) for every case a backend declares it can take."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for name, b in fastattn.BACKENDS.items():
        if b.unavailable():
            continue
        for dev in devices:
            if dev not in b.devices:
                continue
            for case in CASES:
                lo, hi = b.head_dims
                if not case.needs() <= b.features or not (lo <= case.D <= hi and lo <= case.dv <= hi):
                    continue
                for dt in TESTED_DTYPES:
                    if dt in b.dtypes:
                        out.append((name, case, dt, dev))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the two ways to run a case (through a fastattn surface, or through the oracle)


def _rand(shape, dtype, device, noncontig):
    if not noncontig:
        return torch.randn(shape, device=device).to(dtype)
    # A strided view: extra leading rows/heads sliced away (last dim stays contiguous).
    big = torch.randn((shape[0], shape[1] + 1, shape[2] + 3, shape[3]), device=device).to(dtype)
    return big[:, 1:, 2:-1]


def make_inputs(case: Case, dtype, device):
    """Leaf tensors in the case's surface layout plus everything the oracle needs."""
    g = {}
    if case.surface == "varlen":
        tq = sum(a for a, _ in case.seqlens)
        tk = sum(b for _, b in case.seqlens)
        q = torch.randn(tq, case.Hq, case.D, device=device).to(dtype)
        k = torch.randn(tk, case.Hkv, case.D, device=device).to(dtype)
        v = torch.randn(tk, case.Hkv, case.dv, device=device).to(dtype)
        cq = [0]
        ck = [0]
        for a, b in case.seqlens:
            cq.append(cq[-1] + a)
            ck.append(ck[-1] + b)
        g["cu_q"] = torch.tensor(cq, dtype=torch.int32, device=device)
        g["cu_k"] = torch.tensor(ck, dtype=torch.int32, device=device)
        g["max_q"] = max(a for a, _ in case.seqlens)
        g["max_k"] = max(b for _, b in case.seqlens)
        nb = len(case.seqlens)
    else:
        B = case.B
        if case.surface == "sdpa":  # (B, H, S, D)
            q = _rand((B, case.Hq, case.Sq, case.D), dtype, device, case.noncontig)
            k = _rand((B, case.Hkv, case.Sk, case.D), dtype, device, case.noncontig)
            v = _rand((B, case.Hkv, case.Sk, case.dv), dtype, device, case.noncontig)
        else:  # (B, S, H, D)
            q = _rand((B, case.Sq, case.Hq, case.D), dtype, device, case.noncontig)
            k = _rand((B, case.Sk, case.Hkv, case.D), dtype, device, case.noncontig)
            v = _rand((B, case.Sk, case.Hkv, case.dv), dtype, device, case.noncontig)
        nb = B
    g["mask"] = _make_mask(case, dtype, device)
    if case.alibi:
        shape = (case.Hq,) if case.alibi == "h" else (nb, case.Hq)
        g["alibi"] = torch.rand(shape, device=device) * 0.5 + 0.05
    g["scale"] = case.scale if case.scale is not None else 1.0 / math.sqrt(case.D)
    return q, k, v, g


def _make_mask(case: Case, dtype, device):
    B, H, Sq, Sk = case.B, case.Hq, case.Sq, case.Sk
    if case.mask is None:
        return None
    if case.mask in ("bool_kpad", "float_kpad"):
        keep = torch.ones(B, 1, 1, Sk, dtype=torch.bool, device=device)
        for b in range(B):  # right padding of a random length, at least two keys kept: with one key per row
            # everywhere, dQ and dK are exactly 0 and the rule's relative floor would leave no room for rounding
            n = int(torch.randint(2, Sk + 1, ()))
            keep[b, ..., n:] = False
        if case.mask == "bool_kpad":
            return keep
        return torch.zeros(B, 1, 1, Sk, device=device).masked_fill(~keep, float("-inf")).to(dtype)
    if case.mask == "float_2d":
        return torch.randn(Sq, Sk, device=device).to(dtype)
    if case.mask == "bool_bcast":
        return torch.rand(1, H, Sq, Sk, device=device) > 0.3
    if case.mask == "bool_rows_empty":
        m = torch.rand(B, H, Sq, Sk, device=device) > 0.5
        m[:, :, ::3] = False  # every third query row sees no key at all
        return m
    raise ValueError(case.mask)


def run_fastattn(case: Case, q, k, v, g, backend):
    """Calls the case's surface. Returns (out, lse or None) in the surface layout."""
    kw = dict(backend=backend)
    if case.surface == "sdpa":
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=g["mask"], is_causal=case.causal,
                                                    scale=case.scale, enable_gqa=case.Hq != case.Hkv, **kw)
        return out, None
    common = dict(softmax_scale=case.scale, causal=case.causal, window_size=case.window, softcap=case.softcap,
                  alibi_slopes=g.get("alibi"), return_attn_probs=case.lse, **kw)
    if case.surface == "flash":
        r = fastattn.flash_attn_func(q, k, v, **common)
    else:
        r = fastattn.flash_attn_varlen_func(q, k, v, g["cu_q"], g["cu_k"], g["max_q"], g["max_k"], **common)
    return (r[0], r[1]) if case.lse else (r, None)


def _oracle_lse(q, k, scale, window, bottom_right, softcap, alibi, dtype):
    """log-sum-exp of the oracle's scores (computed in dtype), +inf for rows with no visible key."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k[:, torch.arange(Hq, device=k.device) // (Hq // Hkv)].to(dtype)
    s = torch.einsum("bhid,bhjd->bhij", q.to(dtype), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    Sq, Sk = s.shape[-2:]
    i = torch.arange(Sq, device=q.device).view(Sq, 1)
    j = torch.arange(Sk, device=q.device).view(1, Sk)
    if alibi is not None:
        s = s - alibi.to(dtype).view(-1, Hq, 1, 1) * (i + Sk - Sq - j).abs().to(dtype)
    diag = i + (Sk - Sq if bottom_right else 0)
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if window[0] >= 0:
        ok = ok & (j >= diag - window[0])
    if window[1] >= 0:
        ok = ok & (j <= diag + window[1])
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s.float() if dtype in LOW else s, dim=-1)  # lse is always returned in fp32
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def run_oracle(case: Case, q, k, v, g, dtype=torch.float64):
    """Oracle (in `dtype`) on the same inputs, in the surface layout. Returns (out, lse or None)."""
    window = (case.window[0], 0) if case.causal else case.window
    br = case.surface != "sdpa"
    scale = g["scale"]
    if case.surface == "varlen":
        outs, lses = [], []
        cq, ck = g["cu_q"].tolist(), g["cu_k"].tolist()
        for n in range(len(cq) - 1):
            # (len, H, D) -> (1, H, len, D)
            qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in
                          ((q, cq[n], cq[n + 1]), (k, ck[n], ck[n + 1]), (v, ck[n], ck[n + 1])))
            al = g.get("alibi")
            if al is not None and al.dim() == 2:
                al = al[n]
            o = oracle_attention(qs, ks, vs, scale=scale, window=window, bottom_right=True, softcap=case.softcap,
                                 alibi_slopes=al, dtype=dtype)
            outs.append(o[0].transpose(0, 1))  # (1, H, len, Dv) -> (len, H, Dv)
            if case.lse:
                lses.append(_oracle_lse(qs, ks, scale, window, True, case.softcap, al, dtype)[0])
        return torch.cat(outs, 0), (torch.cat(lses, -1) if case.lse else None)
    if case.surface == "flash":
        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
    else:
        qb, kb, vb = q, k, v
    o = oracle_attention(qb, kb, vb, scale=scale, mask=g["mask"], window=window, bottom_right=br,
                         softcap=case.softcap, alibi_slopes=g.get("alibi"), dtype=dtype)
    lse = _oracle_lse(qb, kb, scale, window, br, case.softcap, g.get("alibi"), dtype) if case.lse else None
    return (o.transpose(1, 2) if case.surface == "flash" else o), lse


def run_case(backend, case, dtype, device):
    """Runs one matrix cell; returns a list of (ok, message) for out, lse and each gradient."""
    q, k, v, g = make_inputs(case, dtype, device)
    want_grad = case.grad and "grad" in fastattn.get_backend(backend).features
    leaves = [t.detach().clone().requires_grad_(want_grad) for t in (q, k, v)]
    out, lse = run_fastattn(case, *leaves, g, backend)

    ref_leaves = [t.detach().double().requires_grad_(want_grad) for t in (q, k, v)]
    ref, ref_lse = run_oracle(case, *ref_leaves, g)
    base_leaves = [t.detach().clone().requires_grad_(want_grad) for t in (q, k, v)]
    base, base_lse = run_oracle(case, *base_leaves, g, dtype=dtype) if dtype in LOW else (ref, ref_lse)

    results = [check_rule("out", out, ref, base, dtype)]
    if case.lse:
        results.append(check_rule("lse", lse, ref_lse, base_lse, dtype))
    if want_grad:
        dout = torch.randn_like(ref)
        grads = torch.autograd.grad(out, leaves, dout.to(dtype).to(device))
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
        base_grads = (torch.autograd.grad(base, base_leaves, dout.to(dtype)) if dtype in LOW else ref_grads)
        # The error the backend's own O forces on dQ/dK through delta = rowsum(dO * O), as test_fuzz adds: a row that
        # sees 2 keys had its dQ err at 4.5x the naive backward's (Triton, bf16, FASTATTN_TEST_SEED=544).
        ident = lambda t: t  # noqa: E731 (the leaves are the views the call sees)
        inherent = delta_error(lambda q_, k_, v_: run_oracle(case, q_, k_, v_, g)[0], leaves[0], leaves[1], ident,
                               ident, dout.to(dtype), out, ref, g["scale"]) + (0.0,)
        for name, a, r, bb, e in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads, inherent):
            results.append(check_rule(name, a, r, bb, dtype, factor=base_factor(backend, device, dtype, name),
                                      fp32_rel=base_fp32_rel(backend, device, name), inherent=e))
    return results


def cell_id(x):
    """pytest id of a matrix cell (backend, case, dtype, device)."""
    b, case, dt, dev = x
    return f"{b}-{case.name}-{str(dt)[6:]}-{dev}"
