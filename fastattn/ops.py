"""The C++ op stack seen from Python: loads `fastattn._C` (which registers torch.ops.fastattn.fwd/bwd/decode_fwd
from TORCH_LIBRARY in csrc/ops.cpp), and registers their fake functions and autograd (all of it here), so the ops
run under torch.compile(fullgraph=True). The CPU and CUDA backends both call `cpp_attention` and `cpp_decode`;
`cpp_attention` runs eager calls past the registered Python autograd kernel (call_fwd: inference below the Autograd
key, training through an autograd.Function with the same backward)."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from .params import AttnParams, DecodeCall, bool_bias

_C = None
LOAD_ERROR: Optional[str] = None
if importlib.util.find_spec("fastattn._C") is None:
    LOAD_ERROR = "not built: no fastattn/_C*.so (install with `pip install --no-build-isolation -e .`)"
else:
    try:
        from . import _C  # noqa: F811  (registers the ops)
    except ImportError as e:  # typically built against another torch (ABI mismatch): rebuild
        LOAD_ERROR = f"{type(e).__name__}: {e} (rebuild after a torch upgrade)"


def loaded() -> bool:
    return _C is not None


def cuda_built() -> bool:
    return _C is not None and bool(_C.cuda_built())


def cpu_matmul() -> str:
    """CPU model, ISA found, and how the CPU kernels multiply each dtype's tiles (probed once per process):
    bf16/fp16 on the matrix units (oneDNN brgemm: AMX, AVX512-BF16, AVX512-FP16) or converted to fp32. Without AMX
    the choice is timed (the forward's score tile on both paths) and the rates are part of the reason."""
    if _C is None or not hasattr(_C, "cpu_matmul"):
        return "C++ extension not loaded"
    return str(_C.cpu_matmul())


def cpu_matmul_report() -> dict:
    """`cpu_matmul()` as data: {"cpu": model, "vendor": cpuid's ("GenuineIntel", "AuthenticAMD"), "bf16"/"fp16":
    "brgemm" | "fp32", ISA flags (cpuid) and "amx_bf16_usable"/"amx_fp16_usable" (oneDNN's view): "1" | "0",
    "bf16_brgemm_gflops", "bf16_fp32_gflops", "fp16_...": the timed tile rates as integer strings ("0": not timed),
    "decode_fetch": how the decode kernel fetches a dense cache ahead, with FASTATTN_CPU_PREFETCH as set now,
    "process_cpus": the CPUs this process may run on, "bwd_min_tasks": the tasks the backward cuts its (sequence, KV
    head) pairs into at least (8, or one per CPU; FASTATTN_CPU_BWD_TASKS as set now)}."""
    if _C is None or not hasattr(_C, "cpu_matmul_report"):
        return {}
    return dict(_C.cpu_matmul_report())


def cpu_tile_gflops(dtype: torch.dtype) -> float:
    """GFLOP/s of the CPU kernels' own tile product for dtype (the forward's 64 x 512 x 128 score tile on the path
    the dtype takes: brgemm in it, or fp32 tiles) on all of torch's threads at once, measured now (~0.05 s).
    0.0 without the C++ extension."""
    if _C is None or not hasattr(_C, "cpu_tile_gflops"):
        return 0.0
    return float(_C.cpu_tile_gflops(str(dtype)[6:]))


def has_kernel(dispatch_key: str, op: str = "fwd") -> bool:
    """True when fastattn::<op> has an implementation registered for this dispatch key (CPU, CUDA).
    Backends call it once at import: torch.compile cannot trace the dispatcher query."""
    return (_C is not None and hasattr(torch.ops.fastattn, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::" + op, dispatch_key))


def _out_like_q(q: torch.Tensor, dv: int, dtype=None) -> torch.Tensor:
    """Mirror of alloc_out_like_q in csrc/common.h: out in q's memory order (BSHD or BHSD), q's dtype unless given."""
    B, H, S, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty(B, S, H, dv, dtype=dtype).transpose(1, 2)  # (B, S, H, Dv) -> (B, H, S, Dv)
    return q.new_empty(B, H, S, dv, dtype=dtype)


def autograd_pair(bwd_op):
    """(backward, setup_context) for a fwd op with fastattn::fwd's schema whose backward op has fastattn::bwd's
    (the C++ ops and the Triton ops share it). lse is marked non-differentiable: no backward takes its gradient.
    With out_fp32 the backward gets out rounded to q.dtype, as bwd's contract asks; head_start (the dropout
    counters' head offset) goes to the backward as it went to the forward."""

    def setup_context(ctx, inputs, output):
        (q, k, v, bias, cu_q, cu_k, mq, mk, scale, wl, wr, br, softcap, alibi, dropout_p, seed, offset,
         deterministic, q_start, k_start, out_fp32, head_start) = _fwd_inputs(inputs)
        for t, name in ((bias, "attn_bias"), (alibi, "alibi_slopes")):
            if t is not None and t.requires_grad:  # the backward ops return no gradient for them
                raise RuntimeError(f"fastattn: the fused kernels give no gradient for {name}; the public functions "
                                   f"route a differentiable mask to a backend with 'mask_grad'")
        out, lse = output
        ctx.mark_non_differentiable(lse)
        rounded = out.to(q.dtype) if out_fp32 and out.dtype != q.dtype else out
        ctx.save_for_backward(q, k, v, rounded, lse, bias, cu_q, cu_k, alibi, q_start, k_start)
        ctx.args = (mq, mk, scale, wl, wr, br, softcap, dropout_p, seed, offset, deterministic, head_start)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias, cu_q, cu_k, alibi, q_start, k_start = ctx.saved_tensors
        mq, mk, scale, wl, wr, br, softcap, dropout_p, seed, offset, deterministic, head_start = ctx.args
        dq, dk, dv = bwd_op()(dout.to(q.dtype), q, k, v, out, lse, bias, cu_q, cu_k, mq, mk, scale, wl, wr, br,
                              softcap, alibi, dropout_p, seed, offset, deterministic, q_start, k_start, head_start)
        return (dq, dk, dv) + (None,) * 19

    return backward, setup_context


def _fwd_inputs(inputs):
    """fwd's inputs with the trailing defaults filled in (a caller may stop after `deterministic`)."""
    defaults = (False, None, None, False, 0)  # deterministic, q_start, k_start, out_fp32, head_start
    return tuple(inputs) + defaults[len(inputs) - 17:]


# The Python autograd kernel that register_autograd installs runs on every call, and without a gradient to record it
# only re-dispatches below the Autograd key (torch/_library/autograd.py redispatch_no_grad): several microseconds
# of Python per call. With one, its forward rebuilds the op's arguments from the schema (utils.fill_defaults, which
# reads schema.arguments, a fresh list of 22 Argument objects, once per argument): 118 us of a 16-token
# forward+backward's 253 us on one EPYC Zen 4 thread (torch 2.14.1; PyTorch's own SDPA: 52 us), the same on a GPU,
# where it would outlast the kernels. Eager calls therefore go below the Autograd key directly: inference calls
# under the guard redispatch_no_grad uses, calls that record a gradient through `eager_function`'s
# autograd.Function, whose setup_context and backward are the registered ones (autograd_pair). While torch.compile
# traces, the op as registered.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
# The learnt routes' op calls in C++ (csrc/lean_routes.cpp); an extension built before them keeps the Python ones.
_ROUTES = _C is not None and hasattr(_C, "DecodeRoute")


def eager_function(fwd_op, bwd_op):
    """A torch.autograd.Function for eager calls of fwd_op (fastattn::fwd's schema, every argument given), whose
    forward runs the op below the Autograd key and whose setup_context and backward are autograd_pair(bwd_op)'s:
    the graph, the saved tensors and the gradients of the op as registered, without its Python autograd kernel."""
    backward, setup_context = autograd_pair(bwd_op)

    class EagerFwd(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: Function.apply binds the latter's arguments
        # through inspect.signature (27 us a call)
        @staticmethod
        def forward(ctx, *args):
            with _BELOW_AUTOGRAD():
                output = fwd_op(*args)
            setup_context(ctx, args, output)
            return output

    EagerFwd.backward = staticmethod(torch.autograd.function.once_differentiable(backward))
    return EagerFwd


def call_fwd(op, function, args: tuple):
    """op(*args) (fastattn::fwd's schema, all 22 arguments) the fastest way that keeps its autograd: through
    `function` (eager_function(op, ...)) when a tensor input records a gradient, below the Autograd key when none
    does, and as registered while torch.compile traces or where torch lacks the guard."""
    if torch.compiler.is_compiling() or _BELOW_AUTOGRAD is None:
        return op(*args)
    q, k, v, bias, alibi = args[0], args[1], args[2], args[3], args[13]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or bias is not None and bias.requires_grad
                                    or alibi is not None and alibi.requires_grad):
        return function.apply(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def _same_device(q, **tensors) -> None:
    """A fake function's check: every tensor argument on q's device. One argument on `meta` sends a real call to
    the fake functions (the Meta key), which would hand back uninitialised outputs on q's device."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == q.device, lambda: f"fastattn: {name} is on {t.device} but q is on {q.device}")


if _C is not None:

    @torch.library.register_fake("fastattn::fwd")
    def _fwd_fake(q, k, v, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                  window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset, deterministic=False,
                  q_start=None, k_start=None, out_fp32=False, head_start=0):
        _same_device(q, k=k, v=v, attn_bias=attn_bias, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                     alibi_slopes=alibi_slopes, q_start=q_start, k_start=k_start)
        B, H, S, _ = q.shape
        out = _out_like_q(q, v.shape[-1], torch.float32 if out_fp32 else None)
        return out, q.new_empty(B, H, S, dtype=torch.float32)

    @torch.library.register_fake("fastattn::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset,
                  deterministic, q_start=None, k_start=None, head_start=0):
        _same_device(q, dout=dout, k=k, v=v, out=out, lse=lse, attn_bias=attn_bias, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes, q_start=q_start, k_start=k_start)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("fastattn::bwd_acc")
    def _bwd_acc_fake(dout, q, k, v, out, lse, attn_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      scale, window_left, window_right, bottom_right, softcap, alibi_slopes, dropout_p, seed, offset,
                      deterministic, q_start, k_start, dq_acc, dk_acc, dv_acc, head_start=0):
        _same_device(q, dout=dout, k=k, v=v, out=out, lse=lse, attn_bias=attn_bias, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes, q_start=q_start, k_start=k_start,
                     dq_acc=dq_acc, dk_acc=dk_acc, dv_acc=dv_acc)
        return None

    _bwd, _setup = autograd_pair(lambda: torch.ops.fastattn.bwd)
    torch.library.register_autograd("fastattn::fwd", _bwd, setup_context=_setup)
    _EagerFwd = eager_function(torch.ops.fastattn.fwd.default, lambda: torch.ops.fastattn.bwd)

if _C is not None and hasattr(torch.ops.fastattn, "decode_fwd"):

    @torch.library.register_fake("fastattn::decode_fwd")
    def _decode_fwd_fake(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, scale, window_left,
                         window_right, softcap, alibi_slopes, num_splits, kv_bhsd=False, attn_bias=None):
        _same_device(q, k_cache=k_cache, v_cache=v_cache, seqlens_k=seqlens_k, block_table=block_table,
                     cache_batch_idx=cache_batch_idx, alibi_slopes=alibi_slopes, attn_bias=attn_bias)
        B, H, S, _ = q.shape
        return _out_like_q(q, v_cache.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)


def dropout_seed(p: AttnParams):
    """(seed, offset) for the kernels' counter-based RNG, drawn from torch's default generator so results are
    reproducible under torch.manual_seed. (0, 0) without dropout, so no host sync then."""
    if p.dropout_p <= 0:
        return 0, 0
    if p.rng is not None:  # block calls: every block of one logical call shares the caller's (seed, offset)
        return p.rng
    if not torch.compiler.is_compiling() and _values_ignored():  # (dynamo does not trace the mode queries)
        return 0, 0
    # Not int(): under torch.export these are symbols of a traced draw (a fresh seed per call of the program).
    seed, offset = torch.randint(0, 2**62, (2,), dtype=torch.int64).tolist()
    return seed, offset


def _values_ignored() -> bool:
    """Inside a plain FakeTensorMode (shape and memory estimators): no tensor has values and nothing records the
    call, so the seed's value cannot matter, and reading a drawn one would raise."""
    mode = detect_fake_mode()
    return mode is not None and mode.shape_env is None and get_proxy_mode() is None


def _fwd_rest(p: AttnParams, seed: int, offset: int) -> tuple:
    """fastattn::fwd's arguments after q, k, v, in its schema's order (csrc/ops.cpp)."""
    return (p.attn_bias, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k, p.scale, p.window_left,
            p.window_right, p.bottom_right, p.softcap, p.alibi_slopes, p.dropout_p, seed, offset, p.deterministic,
            p.q_start, p.k_start, p.out_fp32, p.head_start)


def cpp_attention(p: AttnParams):
    """Runs torch.ops.fastattn.fwd on p (differentiable). Returns (out (B,H,Sq,Dv), lse (B,H,Sq) fp32). An eager
    plain call on CPU tensors that records a gradient (_fwd_route's; no mask that records one) runs through the C++
    route's autograd node (csrc/lean_routes.cpp FwdGrad: the saved tensors and the bwd call of eager_function's,
    without its Python: ~40 us less a forward+backward, one thread, Intel Xeon); not while a torch-function mode is
    active, which sees the op through torch.ops here. The CUDA backend keeps the Python Function until the node is
    measured and tested on a GPU."""
    if (p.requires_grad and p.q.is_cpu and (p.attn_bias is None or not p.attn_bias.requires_grad)
            and not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()):
        route = _fwd_route(p, True)
        if route is not None:
            return route.pair(p.q, p.k, p.v, p.attn_bias)
    return call_fwd(torch.ops.fastattn.fwd.default, _EagerFwd, (p.q, p.k, p.v) + _fwd_rest(p, *dropout_seed(p)))


def _fwd_route(p: AttnParams, grad: bool):
    """fastattn._C.FwdRoute with p's fixed arguments for a plain p (no varlen, alibi, dropout or block offsets; with
    grad, no fp32 output either: the route then records the gradient of a call that has one to record), or None
    (another p, or an extension without the C++ routes)."""
    if (not _ROUTES or p.cu_seqlens_q is not None or p.alibi_slopes is not None or p.dropout_p > 0
            or p.q_start is not None or p.k_start is not None or grad and p.out_fp32):
        return None
    return _C.FwdRoute(p.max_seqlen_q, p.max_seqlen_k, p.scale, p.window_left, p.window_right, p.bottom_right,
                       p.softcap, p.deterministic, p.out_fp32, p.head_start, grad)


def attention_runner(p: AttnParams):
    """cpp_attention(p)'s output as a function of (q, k, v) for calls whose other arguments are p's (the
    SDPA surface's lean path, fastattn/lean.py): plain calls (no varlen, alibi, dropout, block), below Autograd as
    cpp_attention runs them. With a mask (p from a 4-D bool or q-dtype attn_mask), a function of (q, k, v, mask)
    that turns the mask into its bias as the full path does (params._mask_4d). None for any other p, or where torch
    lacks that guard. For a p that records a gradient: the C++ route, whose autograd node saves and calls what
    eager_function's does (csrc/lean_routes.cpp FwdGrad), or None where the extension lacks it."""
    if (_BELOW_AUTOGRAD is None or p.cu_seqlens_q is not None or p.alibi_slopes is not None or p.dropout_p > 0
            or p.q_start is not None):
        return None
    route = _fwd_route(p, p.requires_grad)  # one C++ call (csrc/lean_routes.cpp: torch.ops parsed ~3 us of arguments)
    if route is not None:
        return route.out if p.attn_bias is None else route.out_masked  # (the mask's bias made in C++ too)
    if p.requires_grad:
        return None  # the Python runners below run the op below Autograd: no gradient recorded
    fwd, below, rest = torch.ops.fastattn.fwd.default, _BELOW_AUTOGRAD, _fwd_rest(p, 0, 0)[1:]  # no tensor held

    def call(q, k, v, bias=None):
        with below():
            return fwd(q, k, v, bias, *rest)[0]
    if p.attn_bias is None:
        return call

    def run_masked(q, k, v, mask):
        return call(q, k, v, _lean_bias(q, k, mask))
    return run_masked


def _lean_bias(q, k, mask):
    """A lean call's 4-D bool or q-dtype mask as the bias the ops take, expanded to (B, Hq, Sq, Sk) (as the full
    path turns it, params._mask_4d)."""
    qs = q.shape
    bias = bool_bias(mask, q) if mask.dtype is torch.bool else mask
    return bias.expand(qs[0], qs[1], qs[2], k.shape[2])  # (B|1, Hq|1, Sq|1, Sk|1) -> (B, Hq, Sq, Sk)


def cpp_block_backward(p: AttnParams, dout, out, lse, dq_acc, dk_acc, dv_acc) -> None:
    """torch.ops.fastattn.bwd_acc on a block call: adds the block's fp32 grads into dq_acc/dk_acc/dv_acc."""
    seed, offset = dropout_seed(p)
    torch.ops.fastattn.bwd_acc(dout, p.q, p.k, p.v, out, lse, p.attn_bias, p.cu_seqlens_q, p.cu_seqlens_k,
                               p.max_seqlen_q, p.max_seqlen_k, p.scale, p.window_left, p.window_right,
                               p.bottom_right, p.softcap, p.alibi_slopes, p.dropout_p, seed, offset, p.deterministic,
                               p.q_start, p.k_start, dq_acc, dk_acc, dv_acc, p.head_start)


def cpp_decode(c: DecodeCall):
    """Runs torch.ops.fastattn.decode_fwd on c (inference only). Returns (out (B,Hq,Sq,Dv), lse (B,Hq,Sq) fp32)."""
    # The overload itself: the packet's __call__ would resolve it on every call (~0.3 us).
    return torch.ops.fastattn.decode_fwd.default(c.q, c.k_cache, c.v_cache, *_decode_rest(c))


def _decode_rest(c: DecodeCall) -> tuple:
    """fastattn::decode_fwd's arguments after q, k_cache, v_cache, in its schema's order (csrc/ops.cpp)."""
    wl, wr = c.window_left, c.window_right
    if wl > 0 or wr > 0:  # c.windows() inlined for the common case: no window (or causal), nothing to clamp
        wl, wr = c.windows()
    rest = (c.seqlens_k, c.block_table, c.cache_batch_idx, c.scale, wl, wr, c.softcap, c.alibi_slopes, c.num_splits,
            c.kv_bhsd)
    return rest if c.attn_bias is None else rest + (c.attn_bias,)


def decode_runner(c: DecodeCall):
    """cpp_decode(c)'s output as a function of (q, k, v) for dense calls whose other arguments are c's (the lean
    path, fastattn/lean.py): c in SDPA's layout without lengths (kv_bhsd) and without a window to clamp (the
    clamped window would depend on the length). None for any other c."""
    if not c.kv_bhsd or c.seqlens_k is not None or c.window_left > 0 or c.window_right > 0:
        return None
    if _ROUTES and c.alibi_slopes is None:  # one C++ call (csrc/lean_routes.cpp; the mask's bias made there too)
        route = _decode_route(c)
        return route.out if c.attn_bias is None else route.out_masked
    op, rest = torch.ops.fastattn.decode_fwd.default, _decode_rest(c)[:10]  # no tensor held: no mask

    def call(q, k, v, bias=None):
        return op(q, k, v, *rest, bias)[0]
    if c.attn_bias is None:
        return call

    def run_masked(q, k, v, mask):
        return call(q, k, v, _lean_bias(q, k, mask))
    return run_masked


def cache_runner(c: DecodeCall):
    """cpp_decode(c) as a function of (q, k_cache, v_cache, seqlens_k) -> (out, lse) for dense cache calls whose
    other arguments are c's (flash_attn_with_kvcache's lean path, fastattn/lean.py): c in the cache's own layout
    without block_table, cache_batch_idx or alibi. None for any other c."""
    if c.kv_bhsd or c.block_table is not None or c.cache_batch_idx is not None or c.alibi_slopes is not None:
        return None
    if _ROUTES and c.attn_bias is None:  # one C++ call (csrc/lean_routes.cpp)
        return _decode_route(c).call
    op, rest = torch.ops.fastattn.decode_fwd.default, _decode_rest(c)[3:]  # after seqlens_k, block_table, batch idx

    def run(q, k_cache, v_cache, seqlens_k):
        return op(q, k_cache, v_cache, seqlens_k, None, None, *rest)
    return run


def _decode_route(c: DecodeCall):
    """fastattn._C.DecodeRoute with c's fixed arguments (_decode_rest's scalars)."""
    _, _, _, scale, wl, wr, softcap, _, splits, kv_bhsd = _decode_rest(c)[:10]
    return _C.DecodeRoute(scale, wl, wr, softcap, splits, kv_bhsd)
