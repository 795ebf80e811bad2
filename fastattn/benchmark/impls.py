"""The implementations a benchmark compares. Every fastattn backend is picked up from fastattn.BACKENDS at run
time (new backends join without edits), next to PyTorch SDPA with each of its kernels forced, FlexAttention
(compiled) and naive attention (fastattn's `reference` backend).

An implementation that cannot run a case raises Refused with the reasons (fastattn.explain's, or the
exception's); the report lists them instead of dropping the row."""
from __future__ import annotations

import functools
from typing import Dict, List

import torch
import torch.nn.functional as F

import fastattn
from fastattn.backends.sdpa import TORCH_SDPA
import fastattn.kvcache
from fastattn.dispatch import BackendUnavailableError

from .cases import Case
from .inputs import Inputs, Runner, leaves_for

NAIVE = "fastattn.reference"


class Refused(Exception):
    def __init__(self, reasons):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__("; ".join(self.reasons))


class Impl:
    name = "?"
    family = "?"          # fastattn | sdpa | flex
    description = ""

    def unavailable(self, device: str) -> List[str]:
        """Reasons it cannot run at all on this device; empty when it can."""
        return []

    def applies(self, case: Case) -> bool:
        """False for cases outside what this entry measures by definition (a varlen variant on unpadded
        input): no row at all, rather than a refusal in every such case."""
        return True

    def build(self, case: Case, inp: Inputs, grad: bool) -> Runner:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------- fastattn
class FastattnImpl(Impl):
    family = "fastattn"

    def __init__(self, backend: str, varlen: bool = False):
        self.backend = backend
        self.varlen = varlen
        self.name = f"fastattn.{backend}" + ("+varlen" if varlen else "")
        if backend == "auto":  # what a user gets without choosing: the dispatcher's pick for each case
            self.description = "fastattn's default dispatch (backend='auto')"
            return
        b = fastattn.get_backend(backend)
        self.description = b.description + (" (padding as packed varlen sequences)" if varlen else "")
        if backend == "reference":
            self.description = "naive attention: " + b.description

    def unavailable(self, device):
        if self.backend == "auto":
            return []
        b = fastattn.get_backend(self.backend)
        why = list(b.unavailable())
        if device not in b.devices:
            why.append(f"device {device} not supported (supports {', '.join(sorted(b.devices))})")
        if self.varlen and "varlen" not in b.features:
            why.append("varlen not supported")
        return why

    def applies(self, case):
        return case.padding or not self.varlen

    def build(self, case, inp, grad):
        name = self.backend
        if case.mode == "decode":
            if self.varlen:
                raise Refused("varlen variant runs only on padding cases")
            # flash-attn layout: q (B, 1, Hq, D), cache (B, Sk, Hkv, D), every row's cache full (cache_seqlens = Sk),
            # as generation calls it.
            q = inp.q.transpose(1, 2).contiguous()
            kc, vc = inp.k.transpose(1, 2).contiguous(), inp.v.transpose(1, 2).contiguous()
            lens = torch.full((case.batch,), case.seqlen_k, dtype=torch.int32, device=q.device)
            fwd = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, backend=name)  # noqa: E731
            notes = []
            explain = getattr(fastattn.kvcache, "explain_kvcache", None)
            if explain is not None:
                try:
                    ex = explain(q, kc, vc, cache_seqlens=lens, backend=name)
                    notes.append(f"split-KV kernel {ex.kernel}" if ex.kernel else "generic path")
                except Exception as e:  # noqa: BLE001 - the call itself reports real errors
                    notes.append(f"explain_kvcache: {type(e).__name__}")
            return Runner(_first_call(fwd), [], inp.dout, to_bhsd=lambda t: t.transpose(1, 2), notes=notes)
        if self.varlen:
            if not case.padding:
                raise Refused("varlen variant runs only on padding cases")
            q, k, v = leaves_for(inp, grad, [inp.pack(t) for t in (inp.q, inp.k, inp.v)])
            cu, L = inp.cu_seqlens, int(inp.lengths.max())
            fwd = lambda: fastattn.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=case.causal,  # noqa: E731
                                                          backend=name)
            return Runner(_first_call(fwd), [q, k, v], inp.pack(inp.dout), to_bhsd=inp.unpack)
        q, k, v = leaves_for(inp, grad)
        kw = dict(attn_mask=inp.mask, is_causal=case.causal, enable_gqa=case.gqa)
        refused = fastattn.explain(q, k, v, backend=name, **kw).refused.get(name)
        if refused:
            raise Refused(refused)
        fwd = lambda: fastattn.scaled_dot_product_attention(q, k, v, backend=name, **kw)  # noqa: E731
        return Runner(_first_call(fwd), [q, k, v], inp.dout)


def _first_call(fwd):
    """Wraps a forward so that a BackendUnavailableError (raised at call time) becomes Refused."""
    def call():
        try:
            return fwd()
        except BackendUnavailableError as e:
            raise Refused(str(e).split(": ", 1)[-1]) from None
    return call


# ------------------------------------------------------------------------------------------------- PyTorch SDPA
SDPA_KERNELS = {  # our name -> (SDPBackend attribute, devices)
    "flash": ("FLASH_ATTENTION", {"cpu", "cuda"}),
    "efficient": ("EFFICIENT_ATTENTION", {"cuda"}),
    "cudnn": ("CUDNN_ATTENTION", {"cuda"}),
    "math": ("MATH", {"cpu", "cuda"}),
}


class SdpaImpl(Impl):
    family = "sdpa"

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.name = f"sdpa.{kernel}"
        attr, self.devices = SDPA_KERNELS[kernel]
        self.description = f"torch SDPA forced to SDPBackend.{attr}"

    def unavailable(self, device):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError as e:
            return [f"torch.nn.attention.sdpa_kernel not importable: {e}"]
        if device not in self.devices:
            return [f"PyTorch has no {self.kernel} SDPA kernel on {device}"]
        return []

    def context(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[self.kernel][0]))

    def build(self, case, inp, grad):
        q, k, v = leaves_for(inp, grad)
        kw = dict(attn_mask=inp.mask, is_causal=case.causal)
        if case.gqa:
            kw["enable_gqa"] = True

        # Refusals surface at the first call as RuntimeError plus warnings saying why (the harness keeps both).
        # PyTorch's own function even under a global swap of F.scaled_dot_product_attention for fastattn's.
        fwd = lambda: TORCH_SDPA(q, k, v, **kw)  # noqa: E731
        return Runner(fwd, [q, k, v], inp.dout, context=self.context)


# ------------------------------------------------------------------------------------------------- FlexAttention
@functools.lru_cache(maxsize=None)
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention
    # Every (dtype, head dim, mask) variant is a recompile; the default limit (8) would silently fall back to
    # eager after that, so raise it.
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 512))
    # dynamic=True: one compile per variant instead of one per sequence length (compiles cost ~10 s on CPU).
    return torch.compile(flex_attention, dynamic=True)


class FlexImpl(Impl):
    family = "flex"
    name = "flex"
    description = "torch.nn.attention.flex_attention compiled with torch.compile(dynamic=True)"

    def unavailable(self, device):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return [f"flex_attention not importable: {e}"]
        return []

    def build(self, case, inp, grad):
        from torch.nn.attention.flex_attention import create_block_mask
        if grad and inp.q.device.type == "cpu":
            raise Refused("FlexAttention has no backward on CPU (torch raises NotImplementedError)")
        q, k, v = leaves_for(inp, grad)
        lengths = inp.lengths

        def mask_mod(b, h, q_idx, kv_idx):
            keep = kv_idx < lengths[b] if case.padding else kv_idx >= 0
            return keep & (q_idx >= kv_idx) if case.causal else keep

        block_mask = None
        if case.causal or case.padding:
            block_mask = create_block_mask(mask_mod, case.batch if case.padding else None, None, case.seqlen_q,
                                           case.seqlen_k, device=inp.q.device)
        flex = _compiled_flex()
        fwd = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=case.gqa)  # noqa: E731
        return Runner(fwd, [q, k, v], inp.dout)


# ------------------------------------------------------------------------------------------------- registry
def all_impls() -> Dict[str, Impl]:
    """Every implementation known at run time. PyTorch's come first in each case, so the crash probes of the native
    fastattn backends (run in child processes) overlap with their measurements; naive is last."""
    out: Dict[str, Impl] = {}
    for kernel in SDPA_KERNELS:
        out[f"sdpa.{kernel}"] = SdpaImpl(kernel)
    out["flex"] = FlexImpl()
    names = [n for n in fastattn.BACKENDS if n not in ("sdpa", "reference")]
    for n in ["sdpa"] + names:
        out[f"fastattn.{n}"] = FastattnImpl(n)
        if "varlen" in fastattn.get_backend(n).features:
            out[f"fastattn.{n}+varlen"] = FastattnImpl(n, varlen=True)
    out["fastattn.auto"] = FastattnImpl("auto")
    out[NAIVE] = FastattnImpl("reference")
    return out
