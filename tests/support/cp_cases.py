"""Shared by the distributed tests (tier 0 threads and tier 1 gloo processes): inputs, running CP, references and
the acceptance rule of the CP tests:

    e_X = max|X - X_ref| over out, lse, dq, dk, dv; X_ref = the float64 oracle on the whole sequence;
    e_1 = the same error of single-process fastattn on the whole sequence (same dtype and backend), the larger of
          the public call (flash_attn_func) and the block calls CP is built from (block_forward/block_backward at
          positions 0: CP with W = 1): CP cannot beat the kernel it runs;
    fp32: e_cp <= 2 * e_1 + 1e-6 * m;  bf16/fp16: out, lse e_cp <= 2 * e_1 + 1e-3 * m, grads 2.5 * e_1 + 1e-3 * m,
    m = max(1, max|X_ref|): the floors are relative past magnitude 1 (gradients here reach ~50, where 1e-6 is
    below one fp32 ulp), as the project's tolerance rule is.
The ratio rule catches wrong math that a flat tolerance would hide (a flat 1e-2 passes a dropped block at S=512).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Tuple

import torch

import fastattn
from fastattn.distributed import CPConfig, cp_attention, run_local, unshard_list
from fastattn.blocks import block_backward, block_forward
from tests.support.oracle import oracle_attention


@dataclass(frozen=True)
class Case:
    W: int = 2
    strategy: str = "ring"
    balance: str = "zigzag"
    dtype: torch.dtype = torch.float32
    B: int = 2
    H: int = 4
    Hkv: int = 4
    S: int = 48                      # global length
    D: int = 16
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    alibi: bool = False
    softcap: float = 0.0
    inputs: str = "randn"            # randn (x3: logits span tens) | staircase | large (logits ~ +-1e3)
    layout: str = "bshd"
    backend: str = "reference"
    grad_comm_dtype: torch.dtype = torch.float32
    device: str = "cpu"              # inputs are made on the CPU (same values everywhere) and moved here
    seed: int = 0

    def id(self) -> str:
        parts = [self.strategy, self.balance, f"W{self.W}", str(self.dtype).split(".")[-1], f"S{self.S}"]
        parts += ["causal"] if self.causal else []
        parts += [f"gqa{self.H}/{self.Hkv}"] if self.Hkv != self.H else []
        parts += [f"win{self.window[0]},{self.window[1]}"] if self.window != (-1, -1) else []
        parts += ["alibi"] if self.alibi else []
        parts += [f"softcap{self.softcap:g}"] if self.softcap else []
        parts += [self.inputs] if self.inputs != "randn" else []
        parts += [self.layout] if self.layout != "bshd" else []
        parts += [self.device] if self.device != "cpu" else []
        return "-".join(parts)


def make_inputs(c: Case):
    """Full-sequence q, k, v, dout in BSHD, fp32 (cast by the caller), from the case's seed (same on every rank)."""
    g = torch.Generator().manual_seed(c.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)
    q, k, v = randn(c.B, c.S, c.H, c.D), randn(c.B, c.S, c.Hkv, c.D), randn(c.B, c.S, c.Hkv, c.D)
    if c.inputs == "randn":
        q, k = q * 3, k * 3
    elif c.inputs == "staircase":
        # Logits fall by ~8 per chunk of S/(2W) keys: every merge meets a block whose max differs by several units,
        # so a merge that forgets to rescale one side is wrong by O(1) (uniform-ish inputs would hide it).
        u = torch.ones(c.D) / math.sqrt(c.D)
        chunk = c.S // (2 * c.W)
        step = (torch.arange(c.S) // chunk).float().view(1, c.S, 1, 1)
        q = q + 4.0 * u
        k = k - step * (8.0 * math.sqrt(c.D) / 4.0) * u
    elif c.inputs == "large":
        q, k = q * 30, k * 30  # scores ~ 900 * N(0,1)/... : logsumexp ~ +-1e3, exp overflows without the max form
    else:
        raise ValueError(c.inputs)
    dout = randn(c.B, c.S, c.H, c.D)
    alibi = (torch.rand(c.H, generator=g) * 0.5 + 0.05) if c.alibi else None
    return q, k, v, dout, alibi


def _bhsd(x):
    return x.transpose(1, 2)


def to_layout(x, layout):
    return x if layout == "bshd" else x.transpose(1, 2).contiguous()


def from_layout(x, layout):
    return x if layout == "bshd" else x.transpose(1, 2)


def run_cp_rank(comm, c: Case, rng=None, dropout_p=0.0):
    """One rank's part: shard, CP forward + backward. Returns (out, lse, dq, dk, dv) of this rank, all BSHD/BHS."""
    q, k, v, dout, alibi = make_inputs(c)
    cp = CPConfig(comm, strategy=c.strategy, balance=c.balance, backend=c.backend,
                  grad_comm_dtype=c.grad_comm_dtype)
    alibi = alibi.to(c.device) if alibi is not None else None
    ql, kl, vl = (to_layout(cp.shard(t, 1).to(c.device, c.dtype), c.layout).requires_grad_() for t in (q, k, v))
    before = [t.detach().clone() for t in (ql, kl, vl)]
    out, lse = cp_attention(ql, kl, vl, cp=cp, causal=c.causal, window_size=c.window, softcap=c.softcap,
                            alibi_slopes=alibi, return_lse=True, layout=c.layout, dropout_p=dropout_p, rng=rng)
    out.backward(to_layout(cp.shard(dout, 1).to(c.device, c.dtype), c.layout))
    for t, b in zip((ql, kl, vl), before):  # a ring that receives into its inputs corrupts the saved K/V
        assert torch.equal(t.detach(), b), "cp_attention modified its inputs"
    return tuple((from_layout(x.detach(), c.layout) if x.dim() == 4 else x).cpu()
                 for x in (out, lse, ql.grad, kl.grad, vl.grad))


def gather_results(c: Case, per_rank):
    """Rank results -> whole-sequence (out, lse, dq, dk, dv) in BSHD / (B, H, S)."""
    return tuple(unshard_list([r[i] for r in per_rank], 2 if i == 1 else 1, c.balance) for i in range(5))


def run_cp_local(c: Case, **kw):
    return gather_results(c, run_local(c.W, run_cp_rank, c, **kw))


def reference(c: Case, dropout_mask=None, dropout_p=0.0):
    """Float64 oracle (out, lse, dq, dk, dv) on the whole sequence, from the inputs rounded to c.dtype."""
    q, k, v, dout, alibi = make_inputs(c)
    q, k, v = (t.to(c.dtype).double().requires_grad_() for t in (q, k, v))
    wl, wr = c.window[0], 0 if c.causal else c.window[1]
    scale = c.D ** -0.5
    out = oracle_attention(_bhsd(q), _bhsd(k), _bhsd(v), scale=scale, window=(wl, wr), softcap=c.softcap,
                           alibi_slopes=alibi, dropout_mask=dropout_mask, dropout_p=dropout_p)
    out.backward(_bhsd(dout.double()))
    lse = _oracle_lse(c, q.detach(), k.detach(), alibi, (wl, wr), scale)
    return _bhsd(out).detach(), lse, q.grad, k.grad, v.grad


def _oracle_lse(c, q, k, alibi, window, scale):
    qh, kh = _bhsd(q), _bhsd(k).repeat_interleave(c.H // c.Hkv, dim=1)
    s = qh @ kh.transpose(-1, -2) * scale
    if c.softcap:
        s = c.softcap * torch.tanh(s / c.softcap)
    i, j = torch.arange(c.S).view(-1, 1), torch.arange(c.S).view(1, -1)
    if alibi is not None:
        s = s - alibi.double().view(1, -1, 1, 1) * (i - j).abs()
    vis = torch.ones(c.S, c.S, dtype=torch.bool)
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def single_process(c: Case):
    """fastattn on the whole sequence, one process, same dtype and backend: (out, lse, dq, dk, dv)."""
    q, k, v, dout, alibi = make_inputs(c)
    q, k, v = (t.to(c.device, c.dtype).requires_grad_() for t in (q, k, v))
    alibi = alibi.to(c.device) if alibi is not None else None
    out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=c.causal, window_size=c.window, softcap=c.softcap,
                                           alibi_slopes=alibi, return_attn_probs=True, backend=c.backend)
    out.backward(dout.to(c.device, c.dtype))
    return tuple(x.detach().cpu() for x in (out, lse, q.grad, k.grad, v.grad))


def single_block(c: Case, rng=None, dropout_p=0.0):
    """The block calls on the whole sequence (CP with one rank): (out, lse, dq, dk, dv)."""
    q, k, v, dout, alibi = make_inputs(c)
    q, k, v, dout = (_bhsd(t.to(c.device, c.dtype)) for t in (q, k, v, dout))
    alibi = alibi.to(c.device) if alibi is not None else None
    kw = dict(q_start=0, k_start=0, scale=c.D ** -0.5, window_size=(c.window[0], 0 if c.causal else c.window[1]),
              softcap=c.softcap, alibi_slopes=alibi, backend=c.backend, dropout_p=dropout_p, rng=rng)
    out, lse = block_forward(q, k, v, **kw)
    out = out.to(c.dtype)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, **kw)
    return tuple((_bhsd(x) if x.dim() == 4 else x).cpu()
                 for x in (out, lse, dq.to(c.dtype), dk.to(c.dtype), dv.to(c.dtype)))


NAMES = ("out", "lse", "dq", "dk", "dv")


def errors(got, ref):
    errs = []
    for x, r in zip(got, ref):
        x, r = x.detach().double(), r.detach().double()
        both_inf = torch.isinf(r) & (x == r)
        errs.append(float((x - r).abs().masked_fill(both_inf, 0).max()))
    return errs


def check_acceptance(c: Case, cp_res, one_res, ref, block_res=None) -> str:
    """Asserts the rule of the module docstring; returns the table it printed."""
    for name, x in zip(NAMES, cp_res):
        bad = torch.isnan(x) | (torch.isinf(x) if name != "lse" else torch.isneginf(x))
        assert not bad.any(), f"{c.id()}: {int(bad.sum())} NaN/Inf in CP {name}"
    e_cp, e_1 = errors(cp_res, ref), errors(one_res, ref)
    if block_res is not None:
        e_1 = [max(a, b) for a, b in zip(e_1, errors(block_res, ref))]
    lines, fails = [], []
    for i, name in enumerate(NAMES):
        r = ref[i].detach().double()
        m = max(1.0, float(r.masked_fill(torch.isinf(r), 0).abs().max()))
        if c.dtype == torch.float32:
            tol = 2 * e_1[i] + 1e-6 * m
        else:
            tol = (2.0 if i < 2 else 2.5) * e_1[i] + 1e-3 * m
        lines.append(f"  {name}: e_cp={e_cp[i]:.3g} e_1={e_1[i]:.3g} tol={tol:.3g}")
        if not e_cp[i] <= tol:
            fails.append(name)
    table = f"{c.id()}\n" + "\n".join(lines)
    print(table)
    assert not fails, f"CP error above the acceptance rule for {fails}:\n{table}"
    return table


def check_case(c: Case, **kw):
    cp_res = run_cp_local(c, **kw)
    return check_acceptance(c, cp_res, single_process(c), reference(c), single_block(c))


def with_(c: Case, **kw) -> Case:
    return replace(c, **kw)


def block_backends(device: str = "cpu", dropout: bool = False):
    """Backends that take block calls on this device (dropout: also with dropout, keyed on positions), found by
    trying a tiny call: a backend declaring 'block' may still refuse dropout (the reference uses torch's RNG)."""
    import fastattn.blocks as blocks
    from fastattn.backends import BACKENDS
    from fastattn.dispatch import BackendUnavailableError
    found = []
    for name, b in BACKENDS.items():
        if "block" not in b.features or b.unavailable() or device not in b.devices:
            continue
        if name == "triton" and not torch.cuda.is_available():
            continue  # the interpreter is far too slow for a CP matrix
        q = torch.randn(1, 2, 8, 16, device=device)
        try:
            blocks.block_forward(q, q, q, q_start=8, k_start=0, backend=name, dropout_p=0.5 if dropout else 0.0,
                                 rng=(1, 2) if dropout else None)
        except BackendUnavailableError:  # a refusal (e.g. dropout on the reference): not for this test. Anything
            continue                     # else is a broken kernel and must fail, not shrink the matrix.
        found.append(name)
    return found


def install_keyed_dropout(monkeypatch):
    """Gives the reference backend a dropout keyed on global positions (a hash of seed, offset, batch, global head
    head_start + h and the query/key positions; not the kernels' Philox), so the CP dropout plumbing (one rng for every block, positions
    per block) is tested even where no kernel takes block calls with dropout. Forward and block backward."""
    import fastattn.backends.reference as R

    def keep(p, positions, shape):
        B, H, Sq, Sk = shape
        (q_pos, k_pos), (seed, offset) = positions, p.rng
        heads = p.head_start + torch.arange(H)  # global query heads
        x = (q_pos.view(-1, 1, Sq, 1) * 1000003 + k_pos.view(-1, 1, 1, Sk) * 7919
             + heads.view(1, H, 1, 1) * 104729 + torch.arange(B).view(B, 1, 1, 1) * 15485863
             + seed % 1000003 + offset % 997)
        x = (x * 2654435761) % 2 ** 32
        x = ((x ^ (x >> 13)) * 1274126177) % 2 ** 32
        return ((x % 10000).float() / 10000 >= p.dropout_p).float() / (1 - p.dropout_p)

    def probs(p):
        q, k = p.q.float(), p.k.float()
        pos = R._block_positions(p, slice(None), slice(None), None)
        s, _ = R.scores(q, k, p.scale, None, p.window_left, p.window_right, False, p.softcap, p.alibi_slopes, pos)
        return s, pos

    def forward(self, p):
        if not (p.is_block and p.dropout_p > 0):
            return real_forward(self, p)
        s, pos = probs(p)
        lse = torch.logsumexp(s, -1)
        P = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0) * keep(p, pos, s.shape)
        v = p.v.float().repeat_interleave(p.q.shape[1] // p.v.shape[1], dim=1)
        return P @ v, lse.masked_fill(torch.isneginf(lse), float("inf"))

    def block_backward(self, p, dout, out, lse, dq_acc, dk_acc, dv_acc):
        if not (p.is_block and p.dropout_p > 0):
            return real_bwd(self, p, dout, out, lse, dq_acc, dk_acc, dv_acc)
        s, pos = probs(p)
        g = p.q.shape[1] // p.k.shape[1]
        P = torch.exp(s - lse.unsqueeze(-1)).masked_fill(torch.isinf(lse).unsqueeze(-1), 0)
        m = keep(p, pos, s.shape)
        do = dout.float()
        ke, ve = (t.float().repeat_interleave(g, dim=1) for t in (p.k, p.v))
        dv = (P * m).transpose(-1, -2) @ do
        ds = P * ((do @ ve.transpose(-1, -2)) * m - (do * out.float()).sum(-1, keepdim=True))
        dk = p.scale * ds.transpose(-1, -2) @ p.q.float()
        B, Hkv = p.k.shape[:2]
        dq_acc += p.scale * ds @ ke
        dk_acc += dk.view(B, Hkv, g, *dk.shape[2:]).sum(2)  # (B, Hq, Sk, D) -> (B, Hkv, Sk, D): sum the group
        dv_acc += dv.view(B, Hkv, g, *dv.shape[2:]).sum(2)

    real_forward, real_bwd = R.ReferenceBackend.forward, R.ReferenceBackend.block_backward
    monkeypatch.setattr(R.ReferenceBackend, "forward", forward)
    monkeypatch.setattr(R.ReferenceBackend, "block_backward", block_backward)
    monkeypatch.setattr(R.ReferenceBackend, "extra_reasons", lambda self, p: [])


# --------------------------------------------------------------------------------------------------------------
# packed varlen documents (tests/distributed/test_cp_varlen.py, gloo_tasks.varlen_case)

@dataclass(frozen=True)
class VarlenCase:
    W: int = 2
    docs: Tuple[int, ...] = (37, 128, 301, 46)   # global document lengths, packed in this order
    api: str = "cp"                  # cp (cp_varlen_attention) | ring | zigzag | llama3 (the drop-in functions)
    strategy: str = "ring"           # api="cp" only
    sharding: str = "per_doc"        # api="cp" only: per_doc | stream
    balance: str = "zigzag"          # api="cp" only
    dtype: torch.dtype = torch.float32
    H: int = 4
    Hkv: int = 2
    D: int = 16
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    alibi: str = ""                  # "" | "H" (Hq,) slopes | "NH" (documents, Hq) slopes
    softcap: float = 0.0
    backend: str = "reference"
    seed: int = 0

    @property
    def layout(self) -> Tuple[str, str]:
        """(sharding, balance) the inputs are laid out in."""
        return {"ring": ("per_doc", "contiguous"), "zigzag": ("per_doc", "zigzag"),
                "llama3": ("stream", "contiguous")}.get(self.api, (self.sharding, self.balance))

    @property
    def cu(self) -> torch.Tensor:
        return torch.tensor([0] + list(torch.tensor(self.docs).cumsum(0).tolist()), dtype=torch.int32)

    def id(self) -> str:
        parts = [self.api] + ([self.strategy, self.sharding, self.balance] if self.api == "cp" else [])
        parts += [f"W{self.W}", str(self.dtype).split(".")[-1], "docs" + ",".join(map(str, self.docs))]
        parts += ["causal"] if self.causal else []
        parts += [f"gqa{self.H}/{self.Hkv}"] if self.Hkv != self.H else []
        parts += [f"win{self.window[0]},{self.window[1]}"] if self.window != (-1, -1) else []
        parts += [f"alibi{self.alibi}"] if self.alibi else []
        parts += [f"softcap{self.softcap:g}"] if self.softcap else []
        parts += [self.backend] if self.backend != "reference" else []
        return "-".join(parts)


def make_varlen_inputs(c: VarlenCase):
    """Packed q, k, v, dout (T, H, D) fp32 and ALiBi slopes, from the case's seed (the same on every rank)."""
    g = torch.Generator().manual_seed(c.seed)
    T = sum(c.docs)

    def randn(*shape):
        return torch.randn(*shape, generator=g)
    q, k, v = randn(T, c.H, c.D) * 3, randn(T, c.Hkv, c.D) * 3, randn(T, c.Hkv, c.D)
    dout = randn(T, c.H, c.D)
    shape = {"": None, "H": (c.H,), "NH": (len(c.docs), c.H)}[c.alibi]
    alibi = None if shape is None else torch.rand(*shape, generator=g) * 0.5 + 0.05
    return q, k, v, dout, alibi


def varlen_shard(c: VarlenCase, x, rank: int, dim: int = 0):
    from fastattn.distributed import layout
    sharding, balance = c.layout
    if sharding == "per_doc":
        return layout.shard_varlen(x, c.cu, dim, c.W, rank, balance)
    return layout.shard(x, dim, c.W, rank, balance)


def varlen_unshard(c: VarlenCase, shards, dim: int = 0):
    from fastattn.distributed import layout
    sharding, balance = c.layout
    if sharding == "per_doc":
        return layout.unshard_varlen_list(shards, c.cu, dim, balance)
    return layout.unshard_list(shards, dim, balance)


def varlen_call(comm, c: VarlenCase, q, k, v, alibi, rng=None, dropout_p=0.0, check_shapes=False):
    """The case's API on this rank's shards: (out, lse (H, T/W))."""
    from fastattn.distributed import cp_varlen_attention
    kw = dict(causal=c.causal, window_size=c.window, softcap=c.softcap, alibi_slopes=alibi, dropout_p=dropout_p)
    if c.api == "cp":
        cp = CPConfig(comm, strategy=c.strategy, balance=c.balance, backend=c.backend, check_shapes=check_shapes)
        return cp_varlen_attention(q, k, v, c.cu, cp=cp, sharding=c.sharding, return_lse=True, rng=rng, **kw)
    return _drop_in(comm, c, q, k, v, alibi, kw)


def _drop_in(comm, c: VarlenCase, q, k, v, alibi, kw):
    from fastattn.distributed import (llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func,
                                      ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_func)
    if c.api in ("ring", "zigzag"):
        fn = ring_flash_attn_varlen_func if c.api == "ring" else zigzag_ring_flash_attn_varlen_func
        local = c.cu // c.W
        out, lse, none = fn(q, k, v, local, int((local[1:] - local[:-1]).max()), return_attn_probs=True,
                            group=comm, **kw)
    else:
        cu_q, cu_k, mq, mk, ks = llama3_flash_attn_prepare_cu_seqlens(c.cu, c.causal, comm.rank, c.W)
        if alibi is not None and alibi.dim() == 2:  # (documents, H) -> the documents of this rank's slice
            first = int(torch.searchsorted(c.cu, ks.start, right=True)) - 1
            kw = dict(kw, alibi_slopes=alibi[first:first + cu_q.numel() - 1])
        out, lse, none = llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 1, ks, return_attn_probs=True,
                                                       group=comm, **kw)
    assert none is None
    return out, lse


def run_varlen_rank(comm, c: VarlenCase, rng=None, dropout_p=0.0):
    """One rank: shard, CP forward + backward. Returns (out, lse, dq, dk, dv) of this rank."""
    from fastattn.dispatch import use_backend
    q, k, v, dout, alibi = make_varlen_inputs(c)
    ql, kl, vl = (varlen_shard(c, t, comm.rank).to(c.dtype).requires_grad_() for t in (q, k, v))
    before = [t.detach().clone() for t in (ql, kl, vl)]
    with use_backend(c.backend):  # the drop-ins have no backend argument: this thread's context, fwd and bwd
        out, lse = varlen_call(comm, c, ql, kl, vl, alibi, rng=rng, dropout_p=dropout_p)
        out.backward(varlen_shard(c, dout, comm.rank).to(c.dtype))
    for t, b in zip((ql, kl, vl), before):
        assert torch.equal(t.detach(), b), "CP varlen attention modified its inputs"
    return tuple(x.detach() for x in (out, lse, ql.grad, kl.grad, vl.grad))


def gather_varlen(c: VarlenCase, per_rank):
    return tuple(varlen_unshard(c, [r[i] for r in per_rank], 1 if i == 1 else 0) for i in range(5))


def run_varlen_local(c: VarlenCase, **kw):
    return gather_varlen(c, run_local(c.W, run_varlen_rank, c, **kw))


def _doc_kw(c: VarlenCase):
    return dict(scale=c.D ** -0.5, window=(c.window[0], 0 if c.causal else c.window[1]), softcap=c.softcap)


def reference_varlen(c: VarlenCase):
    """Float64 oracle per document on the packed inputs rounded to c.dtype: (out, lse (H, T), dq, dk, dv)."""
    q, k, v, dout, alibi = make_varlen_inputs(c)
    q, k, v = (t.to(c.dtype).double().requires_grad_() for t in (q, k, v))
    outs, lses = [], []
    cu = c.cu.tolist()
    wl, wr = _doc_kw(c)["window"]
    for n in range(len(c.docs)):
        a, b = cu[n], cu[n + 1]
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[n])
        qd, kd, vd = (_bhsd(t[a:b].unsqueeze(0)) for t in (q, k, v))  # (L, H, D) -> (1, H, L, D)
        outs.append(_bhsd(oracle_attention(qd, kd, vd, alibi_slopes=slopes, **_doc_kw(c)))[0])
        s = qd.detach() @ kd.detach().repeat_interleave(c.H // c.Hkv, 1).transpose(-1, -2) * c.D ** -0.5
        if c.softcap:
            s = c.softcap * torch.tanh(s / c.softcap)
        i, j = torch.arange(b - a).view(-1, 1), torch.arange(b - a).view(1, -1)
        if slopes is not None:
            s = s - slopes.double().view(1, -1, 1, 1) * (i - j).abs()
        vis = torch.ones(b - a, b - a, dtype=torch.bool)
        vis &= (j >= i - wl) if wl >= 0 else vis
        vis &= (j <= i + wr) if wr >= 0 else vis
        lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)[0]  # (H, L)
        lses.append(lse.masked_fill(torch.isneginf(lse), float("inf")))
    out = torch.cat(outs)
    out.backward(dout.double())
    return out.detach(), torch.cat(lses, 1), q.grad, k.grad, v.grad


def single_process_varlen(c: VarlenCase):
    """fastattn.flash_attn_varlen_func on the whole packed sequence, one process: (out, lse, dq, dk, dv)."""
    q, k, v, dout, alibi = make_varlen_inputs(c)
    q, k, v = (t.to(c.dtype).requires_grad_() for t in (q, k, v))
    m = max(c.docs)
    out, lse, _ = fastattn.flash_attn_varlen_func(q, k, v, c.cu, c.cu, m, m, causal=c.causal, window_size=c.window,
                                                  softcap=c.softcap, alibi_slopes=alibi, return_attn_probs=True,
                                                  backend=c.backend)
    out.backward(dout.to(c.dtype))
    return tuple(x.detach() for x in (out, lse, q.grad, k.grad, v.grad))


def single_block_varlen(c: VarlenCase, rng=None, dropout_p=0.0):
    """The varlen block calls on the whole packed sequence (CP with one rank): (out, lse, dq, dk, dv)."""
    q, k, v, dout, alibi = make_varlen_inputs(c)
    q, k, v, dout = (t.to(c.dtype).transpose(0, 1).unsqueeze(0) for t in (q, k, v, dout))  # (T, H, D) -> (1, H, T, D)
    z = torch.zeros(len(c.docs), dtype=torch.int32)
    kw = dict(q_start=z, k_start=z, cu_seqlens_q=c.cu, cu_seqlens_k=c.cu, scale=c.D ** -0.5,
              window_size=(c.window[0], 0 if c.causal else c.window[1]), softcap=c.softcap, alibi_slopes=alibi,
              backend=c.backend, dropout_p=dropout_p, rng=rng)
    out, lse = block_forward(q, k, v, **kw)
    out = out.to(c.dtype)
    grads = block_backward(dout, q, k, v, out, lse, **kw)
    return tuple(x[0].transpose(0, 1).to(c.dtype) if x.dim() == 4 else x[0] for x in (out, lse) + tuple(grads))


def check_varlen_case(c: VarlenCase, **kw):
    return check_acceptance(c, run_varlen_local(c, **kw), single_process_varlen(c), reference_varlen(c),
                            single_block_varlen(c))


# --- the hybrid strategy: Ulysses over U ranks x ring over R = W / U ranks (a 2-D group) ---------------------------

@dataclass(frozen=True)
class HybridCase(Case):
    """A Case on a 2-D group, simulated by run_local(mesh=(U, R)) or built from a 2-D DeviceMesh (tier 1)."""
    strategy: str = "hybrid"
    U: int = 2

    @property
    def R(self) -> int:
        return self.W // self.U

    def id(self) -> str:
        return super().id().replace(f"-W{self.W}-", f"-W{self.W}=U{self.U}xR{self.R}-", 1)


def gather_hybrid_results(c: HybridCase, per_rank):
    """Rank results (flattened rank order) -> whole-sequence (out, lse, dq, dk, dv) in BSHD / (B, H, S)."""
    from fastattn.distributed import hybrid
    return tuple(hybrid.unshard_list([r[i] for r in per_rank], 2 if i == 1 else 1, c.U, c.R, c.balance)
                 for i in range(5))


def run_hybrid_local(c: HybridCase, **kw):
    return gather_hybrid_results(c, run_local(c.W, run_cp_rank, c, mesh=(c.U, c.R), **kw))


def check_hybrid_case(c: HybridCase, **kw):
    return check_acceptance(c, run_hybrid_local(c, **kw), single_process(c), reference(c), single_block(c))
