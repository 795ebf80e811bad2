"""Public attention functions: an SDPA-compatible one and flash-attn-compatible ones.

Each validates its arguments, builds an AttnParams (q/k/v as (B, H, S, D) views; broadcast dims get stride 0; the
only copies are the rare ones _sdpa_shapes names), and hands it to the dispatcher (fastattn/dispatch.py). A plain
CPU inference call of the SDPA function replays the route of an earlier call with the same facts instead
(fastattn/lean.py)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch, lean
from .backends.sdpa import TORCH_SDPA
from .lean import fx_node, tracing  # asked before the lean keys
from .kvcache import flash_attn_with_kvcache  # noqa: F401  (re-exported)
from .params import (AttnParams, InputValueError, causal_bias_alignment, check_alibi, check_cu_seqlens_padded,
                     check_dropout, check_int, check_qkv, check_softcap, check_tensors, check_window, clamp_window,
                     default_scale, last_dim_contiguous, no_values, normalize_mask)



def _broadcast_size(sizes, what: str, shapes) -> int:
    out = 1
    for s in sizes:
        if s != 1:
            if out != 1 and out != s:
                raise InputValueError(f"fastattn: {what} do not broadcast: {shapes()}")
            out = s
    return out


def _sdpa_shapes(query, key, value, enable_gqa):
    """PyTorch's SDPA shape rules: q (N, ..., Hq, Sq, D), k (..., Hk, Sk, D), v (..., Hv, Sk, Dv), 2-D and up,
    size-1 batch/head dims broadcast (heads also by GQA when enable_gqa). Returns q, k, v as (B, H, S, D) (broadcast
    dims have stride 0: no copies, except merging several broadcast batch dims or GQA with k heads != v heads) and
    the scores' shape (..., Hq, Sq, Sk) with the batch dims unflattened."""
    rank = max(t.dim() for t in (query, key, value))

    def shapes():  # for error messages only
        return f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise InputValueError(f"fastattn: {name} must have at least 2 dims (..., S, D): {shapes()}")
    if key.shape[-2] != value.shape[-2]:
        raise InputValueError(f"fastattn: key and value must have the same sequence length: {shapes()}")
    if query.shape[-1] != key.shape[-1]:
        raise InputValueError(f"fastattn: query and key must have the same head dim: {shapes()}")
    R = max(rank, 4)
    q, k, v = (t[(None,) * (R - t.dim())] for t in (query, key, value))  # left-pad with size-1 dims (views)
    batch = tuple(_broadcast_size(sizes, "batch sizes", shapes) for sizes in zip(q.shape[:-3], k.shape[:-3],
                                                                                 v.shape[:-3]))
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if enable_gqa and (hk, hv) != (hq, hq):
        # As PyTorch: key head j serves query heads [j*hq/hk, (j+1)*hq/hk), value heads likewise with hv.
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise InputValueError(f"fastattn: query heads ({hq}) must be a multiple of key and value heads "
                                  f"({hk}, {hv}) with enable_gqa: {shapes()}")
        if hk == hv or 1 in (hk, hv):
            hkv = max(hk, hv)  # a single k (or v) head serves every group: expanded below
        else:  # k and v grouped differently: bring both to lcm(hk, hv) heads, which divides hq (copies; rare)
            hkv = math.lcm(hk, hv)
            k, v = k.repeat_interleave(hkv // hk, dim=-3), v.repeat_interleave(hkv // hv, dim=-3)
    else:
        hkv = _broadcast_size((hk, hv), "key and value heads", shapes)
        if hq != hkv and 1 not in (hq, hkv):
            hint = "; pass enable_gqa=True for grouped-query attention" if hkv and hq % hkv == 0 else ""
            raise InputValueError(f"fastattn: query has {hq} heads but key/value have {hkv}{hint}: {shapes()}")
        if hq == 1:
            hq = hkv  # q broadcasts over the key/value heads (stride 0); hkv == 1 is GQA with one k/v head
    B = math.prod(batch)
    Sq, Sk, D, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    # (..., H, S, D) -> (B, H, S, D); reshape keeps the stride-0 view unless broadcast batch dims must merge
    q = q.expand(batch + (hq, Sq, D)).reshape(B, hq, Sq, D)
    k = k.expand(batch + (hkv, Sk, D)).reshape(B, hkv, Sk, D)
    v = v.expand(batch + (hkv, Sk, Dv)).reshape(B, hkv, Sk, Dv)
    return q, k, v, batch + (hq, Sq, Sk), rank


def _sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """-> (AttnParams, the output's shape with batch dims unflattened, the output's rank, whether there is nothing to
    compute (no heads or no value features)). The output shape is None when the kernels' (B, H, Sq, Dv) is already
    it (4-D inputs with nothing to broadcast). Each tensor's shape is read once: every read costs ~0.15 us."""
    check_tensors(query, key, value)
    qs, ks, vs = query.shape, key.shape, value.shape
    if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]
            and (qs[1] == ks[1] or enable_gqa and ks[1] > 0 and qs[1] % ks[1] == 0) and qs[3] == ks[3]
            and ks[2] == vs[2]):
        q, k, v, rank, out_shape = query, key, value, 4, None  # the common case: nothing to broadcast
        scores = (qs[0], qs[1], qs[2], ks[2])
        D, nothing = qs[3], qs[1] == 0 or vs[3] == 0
    else:
        q, k, v, scores, rank = _sdpa_shapes(query, key, value, enable_gqa)
        Dv = v.shape[-1]
        out_shape = scores[:-1] + (Dv,)
        D, nothing = q.shape[-1], q.shape[1] == 0 or Dv == 0
    bias = kind = None
    if attn_mask is not None:
        bottom_right = causal_bias_alignment(attn_mask, is_causal, scores[-2], scores[-1])
        if bottom_right is None:
            bias, kind = normalize_mask(attn_mask, q, scores)
        else:  # a CausalBias: causal in its alignment, not a dense mask
            is_causal = True
    else:
        bottom_right = None
    if D == 0:
        # No features: every score is 0 (PyTorch's result, whatever the scale). One zero feature gives the same.
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))  # (B, H, S, 0) -> (B, H, S, 1)
        D = 1
    q, k, v = last_dim_contiguous(q, k, v)
    # Positional (fields in AttnParams' order): binding ten keywords costs ~0.4 us more on every call.
    p = AttnParams(q, k, v, default_scale(scale, D), bias, kind,  # q, k, v, scale, attn_bias, mask_kind
                   -1, 0 if is_causal else -1, bool(bottom_right),  # window_left, window_right, bottom_right
                   0.0, None, check_dropout(dropout_p))  # softcap, alibi_slopes, dropout_p
    return p, out_shape, rank, nothing


def _sdpa_params(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> AttnParams:
    return _sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def _nothing_to_compute(p: AttnParams):
    """Zero heads or zero value features: an empty output, with (zero) gradients for every input as PyTorch."""
    B, Hq, Sq, _ = p.q.shape
    out = p.q.new_zeros(B, Hq, Sq, p.v.shape[-1])
    if p.requires_grad:
        out = out + sum(t.sum() for t in (p.q, p.k, p.v, p.attn_bias) if t is not None) * 0  # keeps the graph
    return out


_any_autocast = torch._C._is_any_autocast_enabled  # 0.1 us; asked first on every call
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_Tensor = torch.Tensor
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")


def _autocast(query, key, value, attn_mask):
    """PyTorch's autocast rule for its SDPA ("lower precision fp"): inside torch.autocast on the inputs' device,
    fp32/fp16/bf16 query, key, value and float mask run in the autocast dtype (fp64 stays). Without it, a model
    whose rotary embedding returns fp32 q and k beside a bf16 v (Llama and most RoPE models under autocast) had
    its call refused for mixed dtypes."""
    dev = query.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):  # (meta has no autocast state)
        return query, key, value, attn_mask
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        low = type(t) is torch.Tensor and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return t.to(dt) if low and t.dtype != dt else t  # (a CausalBias mask is no tensor to cast)
    return cast(query), cast(key), cast(value), None if attn_mask is None else cast(attn_mask)


def _jit_traced(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
    """The SDPA call under torch.jit.trace (TorchScript): fastattn's dispatch branches on sizes, which a trace would
    freeze into the graph, so `auto` records PyTorch's own SDPA, whose trace runs at any shape; a named fused
    backend refuses."""
    name = dispatch.requested_backend(backend, compiling=False)
    if name not in ("auto", "sdpa"):
        raise InputValueError(f"fastattn: torch.jit.trace cannot record backend={name!r} (its choices depend on "
                              f"sizes the trace would freeze); trace with backend 'auto' or 'sdpa' (PyTorch's SDPA), "
                              f"or use torch.compile / torch.export")
    kw = {"enable_gqa": True} if enable_gqa else {}
    return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      **kw)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend: Optional[str] = None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Args:
        query: (N, ..., Hq, Sq, D)   key: (N, ..., Hkv, Sk, D)   value: (N, ..., Hkv, Sk, Dv); any strides, 2-D and up,
            e.g. (B, H, S, D) or (N, L, E). Size-1 batch or head dims of any of them broadcast as in PyTorch (stride-0
            views, no copies but the rare ones _sdpa_shapes names). Hq must equal Hkv (or one of them be 1) unless
            enable_gqa=True (then Hq % Hkv == 0).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (N, ..., Hq, Sq, Sk); or a
            torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right), run as causal attention in
            that alignment (never read as a dense mask).
        dropout_p: dropout on the attention probabilities, applied whenever > 0 (as in PyTorch's function).
        is_causal: query i sees keys j <= i (top-left alignment, as PyTorch). May be combined with a tensor attn_mask.
        scale: defaults to 1/sqrt(D).
        backend: 'auto' (default) or a backend name; see fastattn.explain and `python -m fastattn.info`.

    Returns: (N, ..., Hq, Sq, Dv) in query's dtype. Rows whose keys are all masked give 0 (PyTorch may give NaN).
    Bad input raises fastattn.InputValueError / InputTypeError (ValueError / TypeError and RuntimeError).
    Inside torch.autocast, inputs are cast as PyTorch casts its SDPA's (fp32/fp16/bf16 to the autocast dtype).

    Equivalent PyTorch:
        s = (query @ key.transpose(-2, -1)) * scale  (+ mask, causal -> -inf above the diagonal)
        out = torch.softmax(s, -1) @ value
    """
    lean_key = None
    if dropout_p == 0.0 and not _is_dynamo_compiling():  # a plain call: the lean path, one C++ call (fastattn/lean.py)
        lean_key = lean.call(query, key, value, is_causal, scale, enable_gqa, backend, attn_mask)
        if type(lean_key) is _Tensor:
            return lean_key
    if torch.jit.is_tracing():
        return _jit_traced(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    if isinstance(query, torch.fx.Proxy):  # torch.fx.symbolic_trace: one call of this function in the graph
        return fx_node(scaled_dot_product_attention, query, {k: v for k, v in locals().items() if k != "lean_key"})
    if _any_autocast() and isinstance(query, torch.Tensor):
        query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
        if dropout_p == 0.0 and not tracing():  # the lean path on the cast inputs (lean.call refuses autocast)
            lean_key = lean.replay(query, key, value, is_causal, scale, enable_gqa, backend, attn_mask)
            if type(lean_key) is _Tensor:
                return lean_key
    p, out_shape, rank, nothing = _sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if nothing:
        out = _nothing_to_compute(p)
    else:
        out, _ = dispatch.run(p, backend)
    if lean_key is not None:  # no route learnt yet for its key
        lean.learn(lean_key, p, backend)
    if out_shape is None:
        return out
    final = out_shape[len(out_shape) - rank:]  # drops the size-1 dims that padded inputs below 4-D
    return out if out.shape == final else out.reshape(final)  # (B, H, Sq, Dv) -> (N, ..., H, Sq, Dv), a view


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              softcap=0.0, bottom_right=False, return_lse=False, *, backend: Optional[str] = None):
    """The SDPA call with flash-attn's extras, for the model integrations: 4-D (B, H, S, D) inputs and SDPA's
    arguments, plus softcap (softcap * tanh(scores / softcap) on the scaled scores, before attn_mask is added, as
    Gemma 2), causality aligned bottom-right when bottom_right (query i sees keys j <= i + Sk - Sq), and the lse.

    Returns out (B, Hq, Sq, Dv), or (out, lse (B, Hq, Sq) float32, not differentiable) with return_lse; rows that see
    no key give out 0 and lse +inf. Autocast as scaled_dot_product_attention."""
    if _any_autocast() and isinstance(query, torch.Tensor):
        query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    p, _, rank, nothing = _sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if rank != 4:
        raise InputValueError(f"fastattn: attention takes 4-D (B, H, S, D) inputs, got query {tuple(query.shape)}, "
                              f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    p.softcap = check_softcap(softcap)
    p.bottom_right = p.bottom_right or (bool(bottom_right) and bool(is_causal))
    p.return_lse = bool(return_lse)
    if nothing:  # no heads or no value features: nothing for an lse to weigh
        out = _nothing_to_compute(p)
        lse = out.new_full(out.shape[:3], math.inf, dtype=torch.float32)
    else:
        out, lse = dispatch.run(p, backend)
    return (out, lse) if return_lse else out


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
            backend: Optional[str] = None) -> dispatch.Explanation:
    """Which backend would run this SDPA-style call, and why each other one was refused. print() it."""
    if _any_autocast() and isinstance(query, torch.Tensor):
        query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    p = _sdpa_params(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return dispatch.explain_params(p, backend)


def _bshd(out):
    """out contiguous in flash-attn's layout, as flash-attn returns it (callers .view() it): the fused kernels write
    it so already; a backend that computes (B, H, S, D) (reference, sdpa) gets one copy."""
    return out if out.is_contiguous() else out.contiguous()


def _no_probs(out):
    """The S_dmask slot of return_attn_probs: an empty tensor (flash-attn's when it returns no probabilities)."""
    return out.new_empty(0)


def _as_int(n):
    return n if isinstance(n, (int, torch.SymInt)) else int(n)


def _flash_params(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_lse, varlen=None):
    wl, wr = check_window(window_size)
    if causal:
        wr = 0
    softcap = check_softcap(softcap)
    if varlen is None:
        check_qkv(q, k, v, layout="bshd", names=("q", "k", "v"))
        B, Sq, Hq, D = q.shape
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D) views
        extra = {}
    else:
        check_qkv(q, k, v, layout="bshd", names=("q", "k", "v"), varlen=True)
        cu_q, cu_k, max_q, max_k = varlen
        max_q, max_k = check_int(max_q, "max_seqlen_q"), check_int(max_k, "max_seqlen_k")
        cu_q, end_q = check_cu_seqlens_padded(cu_q, "cu_seqlens_q", q.shape[0], q.device)
        cu_k, end_k = check_cu_seqlens_padded(cu_k, "cu_seqlens_k", k.shape[0], q.device)
        if end_q is not None:  # rows past the last sequence (a batch padded to a fixed size) take no part
            q, k, v = q[:end_q], k[:end_k], v[:end_k]
        if cu_q.numel() != cu_k.numel():
            raise InputValueError(f"fastattn: cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} "
                             f"must describe the same number of sequences")
        if not no_values(cu_q, cu_k):
            lq, lk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
            if lq > max_q or lk > max_k:
                raise InputValueError(f"fastattn: max_seqlen_q={max_q}, max_seqlen_k={max_k} are smaller than the "
                                      f"longest sequences ({lq}, {lk})")
        B, Hq, D = 1, q.shape[1], q.shape[2]
        # (total, H, D) -> (1, H, total, D) views
        qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        # max_seqlen_* pass through as given: int() of a traced (symbolic) length would specialise the graph on it.
        extra = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=_as_int(max_q), max_seqlen_k=_as_int(max_k))
    wl, wr = clamp_window(wl, wr, qt.shape[2] + kt.shape[2])
    qt, kt, vt = last_dim_contiguous(qt, kt, vt)
    alibi = check_alibi(alibi_slopes, (cu_q.numel() - 1) if varlen else B, Hq, q.device)
    return AttnParams(q=qt, k=kt, v=vt, scale=default_scale(softmax_scale, D), window_left=wl, window_right=wr,
                      bottom_right=True, softcap=float(softcap), alibi_slopes=alibi, dropout_p=check_dropout(dropout_p),
                      deterministic=bool(deterministic), return_lse=bool(return_lse), **extra)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend: Optional[str] = None):
    """flash-attn's flash_attn_func: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> (B, Sq, Hq, Dv).

    Hq % Hkv == 0 gives GQA/MQA. causal and window_size align bottom-right when Sq != Sk:
        Sq=2, Sk=5 causal:  1 1 1 1 0      Sq=5, Sk=2 causal:  0 0   (rows with no key give 0)
                            1 1 1 1 1                          0 0
                                                               0 0
                                                               1 0
                                                               1 1
    window_size=(left, right): query i sees keys in [i + Sk - Sq - left, i + Sk - Sq + right]; -1 = unlimited.
    softcap > 0: scores become softcap * tanh(scores / softcap). alibi_slopes: fp32 (Hq,) or (B, Hq).
    return_attn_probs=True returns (out, softmax_lse (B, Hq, Sq) fp32, S_dmask): S_dmask is an empty tensor, as
    flash-attn's without dropout; the probabilities themselves are never materialised (flash-attn returns them only
    with dropout, for testing), so code that reads them fails loudly rather than on wrong values.
    """
    if isinstance(q, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node
        return fx_node(flash_attn_func, q, locals())
    plain = route = None
    if not tracing():  # a plain call: the lean path's (fastattn/lean.py)
        plain = lean.flash_key(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               deterministic, return_attn_probs, backend)
        if plain is not None:
            route = dispatch._CHOICES.get(plain[0])
            if route:
                return route.run(plain[1], plain[2], plain[3]).transpose(1, 2)  # (B, H, Sq, Dv) -> (B, Sq, H, Dv)
    p = _flash_params(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)
    out, lse = dispatch.run(p, backend)
    if plain is not None and route is None:
        lean.learn(plain[0], p, backend)
    out = _bshd(out.transpose(1, 2))  # (B, H, Sq, Dv) -> (B, Sq, H, Dv)
    return (out, lse, _no_probs(out)) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           backend: Optional[str] = None):
    """flash-attn's flash_attn_varlen_func: packed sequences without padding.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_seqlens_q/k int32 (N+1,) cumulative
    lengths starting at 0; sequence n is rows [cu[n], cu[n+1]). Returns (total_q, Hq, Dv); with
    return_attn_probs, (out, softmax_lse (Hq, total_q), S_dmask) (S_dmask empty: see flash_attn_func).
    Causal/window align bottom-right per sequence.
    Rows past cu_seqlens_q[-1] / cu_seqlens_k[-1] (a batch padded to a fixed size) take no part: their output is 0,
    their lse +inf (eager mode; under torch.compile the totals must equal the row counts).
    """
    if isinstance(q, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node
        return fx_node(flash_attn_varlen_func, q, locals())
    if block_table is not None:
        raise NotImplementedError("fastattn: flash_attn_varlen_func(block_table=...) (paged KV) is not supported; "
                                  "use flash_attn_with_kvcache")
    p = _flash_params(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    out, lse = dispatch.run(p, backend)
    out = _bshd(out[0].transpose(0, 1))  # (1, H, used, Dv) -> (used, H, Dv)
    pad = q.shape[0] - out.shape[0]  # rows past cu_seqlens_q[-1]: no part in the attention
    if pad:
        out = F.pad(out, (0, 0, 0, 0, 0, pad))  # (used, H, Dv) -> (total_q, H, Dv), zeros
    if not return_attn_probs:
        return out
    lse = F.pad(lse[0], (0, pad), value=math.inf) if pad else lse[0]  # no key seen: +inf, as empty rows
    return out, lse, _no_probs(out)


__all__ = ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
           "explain"]
