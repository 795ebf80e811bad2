"""`triton`: fastattn's Triton kernels (fastattn/backends/triton/kernels): FlashAttention-2-style fused forward and
backward. On CPU tensors they run through Triton's interpreter when TRITON_INTERPRET=1 is set before triton is
imported (how CI tests them; slow, for testing only).

fp32 inputs use IEEE fp32 dot products (input_precision="ieee"), not TF32, so fp32 meets the 1e-5 rule.
The backward computes dQ in its own pass (no atomics): it is always deterministic.

Block calls ("block", fastattn/blocks.py): q_start/k_start global positions, fp32 out, and an accumulating
backward (fastattn::triton_bwd_acc). Dropout there is keyed on (sequence, head, global query and key position), so
every split of a call into blocks drops the same elements; it is Triton's own stream (not the CPU/CUDA Philox mask),
and a call without block coordinates keeps its own linear-index stream (a different mask from a block call)."""
from __future__ import annotations

import importlib.util
import os

import torch

from ...ops import call_fwd, dropout_seed
from ...params import AttnParams, DecodeCall, InputValueError
from ..base import Backend, DecodeKernel
from ..sdpa import pytorch_fused

# On a GPU `auto` hands every call PyTorch's SDPA runs as one fused kernel to `sdpa`: on an H200 (torch 2.11 cu130,
# cuDNN 9.19, benchmarks/results/gpu-h200-20261204/) PyTorch's pick there, cuDNN, ran every one of the 30 gpu-first
# cases measured (29 bf16, one fp16) faster than these kernels: prefill (fwd and fwd+bwd, hd 64/128, S 1k-16k, causal
# or not) 1.23-2.92x, a padded BERT batch 4.2-4.7x, one-token decode 1.9-15x; a second run's fp16 forward at S 2k
# 1.38-1.49x (fp32 not reached; PyTorch picks its mem-efficient kernel there). The hand-over is PyTorch's own speed
# by construction, on any GPU. These kernels keep the calls SDPA cannot run fused: softcap, ALiBi, varlen, lse,
# windows, bottom-right causal with Sq != Sk, causal with a mask, dropout on the Philox stream, deterministic, block
# calls (backends/sdpa.py pytorch_fused).
CUDA_HANDOVER = ("sdpa: PyTorch's own fused kernel is faster on this GPU (H200, bf16/fp16: cuDNN 1.2-2.9x these Triton "
                 "kernels on prefill, 1.9-15x on decode, measured 2026-12-04)")


def gpu_handover(p: AttnParams) -> bool:
    """Whether `auto` hands p to sdpa (CUDA_HANDOVER): a CUDA call that hands_over."""
    return p.q.is_cuda and hands_over(p)


def hands_over(p: AttnParams) -> bool:
    """Whether p is a call PyTorch runs as its own fused call (its own mask allowed) and not a block call: what
    gpu_handover gives to sdpa when p is on a GPU."""
    return p.q_start is None and pytorch_fused(p, mask=True)


# Looked up once at import: torch 2.11's dynamo refuses to trace importlib.util.find_spec, and
# torch.compile(fullgraph=True) reaches unavailable() through dispatch.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonDecode(DecodeKernel):
    """kernels/decode.py: split-KV decode on the cache in its own layout (dense or paged)."""
    name = "triton.decode_split"
    head_dims = (16, 256)
    max_rows = 128

    def unavailable(self):
        try:
            from .kernels import decode  # noqa: F401  (imports triton: only when asked)
        except Exception as e:  # noqa: BLE001  (no triton, or an incompatible one)
            return [f"triton decode kernel not importable ({type(e).__name__}: {e})"]
        return []

    def run(self, c: DecodeCall):
        from .kernels import decode  # registers torch.ops.fastattn.triton_decode_fwd
        args = (c.q, c.k_cache, c.v_cache, c.seqlens_k, c.block_table, c.cache_batch_idx, c.scale, c.window_left,
                c.window_right, c.softcap, c.alibi_slopes, c.num_splits)
        if _plain_eager(c.q, c.k_cache, c.v_cache, c.seqlens_k, c.block_table, c.cache_batch_idx, c.alibi_slopes):
            return decode.launch_decode(*args)  # what the op runs, without its dispatch (no autograd to register)
        return torch.ops.fastattn.triton_decode_fwd(*args)


def _plain_eager(*tensors) -> bool:
    """No torch.compile tracing, no dispatch or torch-function mode (fake tensors, export, DTensor's machinery) and
    plain tensors: nothing the op's registration would do differently from its Python function. Skipping the op's
    dispatch saves ~15 us a call on torch 2.14 and ~45 us on 2.11 (measured on CPU, Triton launch stubbed)."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) is torch.Tensor for t in tensors))


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels (GPU; CPU through TRITON_INTERPRET=1)"
    devices = frozenset({"cuda", "cpu"} if interpreting() else {"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_dims = (16, 256)
    min_capability = (8, 0)  # bf16 tensor cores; tested configs target sm80/sm90
    features = frozenset({"causal", "bottom_right", "window", "mask", "dropout", "gqa", "varlen", "softcap", "alibi",
                          "grad", "deterministic", "lse", "dv_ne_d", "block"})
    decode = TritonDecode()

    def unavailable(self):
        if not TRITON_INSTALLED:
            return ["triton is not installed"]
        if not interpreting() and not torch.cuda.is_available():
            return ["no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU, slowly)"]
        return []

    def extra_reasons(self, p: AttnParams):
        r = []
        if p.attn_bias is not None and p.is_varlen:
            r.append("attn_mask together with varlen")
        if p.head_start and p.dropout_p > 0 and not p.is_block:
            r.append("dropout with head_start outside a block call (the plain dropout stream is keyed on the "
                     "call's linear element index)")
        return r

    def auto_reasons(self, p: AttnParams):
        return [CUDA_HANDOVER] if gpu_handover(p) else []

    def length_breaks(self, Sq: int):
        """gpu_handover's native causal rule changes at Sk = Sq (backends/sdpa.py native_causal)."""
        return (Sq - 1,)

    def forward(self, p: AttnParams):
        from .kernels import op  # imports triton, registers torch.ops.fastattn.triton_fwd
        seed, offset = dropout_seed(p)
        return call_fwd(torch.ops.fastattn.triton_fwd.default, op.EAGER_FWD,
                        (p.q, p.k, p.v, self._bias(p), p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k,
                         p.scale, p.window_left, p.window_right, p.bottom_right, p.softcap, self._alibi(p),
                         p.dropout_p, seed, offset, p.deterministic, p.q_start, p.k_start, p.out_fp32, p.head_start))

    def block_backward(self, p: AttnParams, dout, out, lse, dq_acc, dk_acc, dv_acc) -> None:
        from .kernels import op  # noqa: F401  (registers torch.ops.fastattn.triton_bwd_acc)
        if p.dropout_p > 0 and p.rng is None:  # a fresh seed would regenerate a different mask than the forward's
            raise InputValueError("fastattn: block_backward with dropout needs the forward's rng (seed, offset)")
        seed, offset = dropout_seed(p)
        torch.ops.fastattn.triton_bwd_acc(dout, p.q, p.k, p.v, out, lse, self._bias(p), p.cu_seqlens_q,
                                          p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k, p.scale, p.window_left,
                                          p.window_right, p.bottom_right, p.softcap, self._alibi(p), p.dropout_p,
                                          seed, offset, p.deterministic, p.q_start, p.k_start, dq_acc, dk_acc,
                                          dv_acc, p.head_start)

    @staticmethod
    def _bias(p: AttnParams):
        bias = p.attn_bias
        if bias is not None and bias.stride(-1) != 1 and bias.stride(-1) != 0:
            bias = bias.contiguous()  # rare: a transposed float mask
        return bias

    @staticmethod
    def _alibi(p: AttnParams):
        return p.alibi_slopes.contiguous() if p.alibi_slopes is not None else None
