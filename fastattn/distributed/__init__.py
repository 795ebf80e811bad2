"""Context parallelism: attention over a sequence split across the ranks of a torch.distributed group.

    from fastattn.distributed import CPConfig, cp_attention
    cp = CPConfig(group=None, strategy="ring", balance="zigzag")      # default process group (gloo/NCCL)
    q, k, v = (cp.shard(t, dim=1) for t in (q_full, k_full, v_full))   # this rank's tokens, zigzag order
    out = cp_attention(q, k, v, cp=cp, causal=True)                    # this rank's rows of full attention
    out = cp_attention(q, k, v, cp=cp, key_padding_mask=cp.shard(mask, dim=1))   # padded keys travel masked
    print(cp.explain(heads_q=16, heads_kv=4, causal=True))
    cp2 = CPConfig(group=mesh_2d)      # hybrid (USP): a DeviceMesh with dims "ulysses" and "ring" (or ulysses_group=,
                                       # ring_group=); cp2.shard lays tokens out for it, the rest is the same

    local = shard_batch(batch, cp, shift_labels=True)        # input_ids, labels, position_ids (global), masks
    with context_parallel(cp):                               # the reference models and attn_implementation=
        logits = model(local["input_ids"], position_ids=local["position_ids"])          # "fastattn_cp" read it

DTensor inputs (dtensor.py): q, k, v placed Shard(seq dim) on a 1-D CP mesh give DTensors back (cp= optional: from
the mesh, contiguous token order); FastattnContextParallel(cp) is a ParallelStyle for parallelize_module.

Packed varlen documents (flash-attn's cu_seqlens; varlen.py, varlen_api.py; ulysses / hybrid: varlen_ulysses.py):
    q, k, v = (shard_varlen(t, cu_seqlens, 0, W, rank, "zigzag") for t in (q_full, k_full, v_full))   # per document
    out = cp_varlen_attention(q, k, v, cu_seqlens, cp=cp, causal=True)           # GLOBAL cu_seqlens
    # ring-flash-attention drop-ins: ring_/zigzag_ring_flash_attn_varlen_func (LOCAL cu_seqlens = global // W),
    # llama3_flash_attn_varlen_func + llama3_flash_attn_prepare_cu_seqlens (any document lengths, total % W)

Strategies ring / allgather / ulysses / hybrid (config.py; ring.py, allgather.py, ulysses.py, hybrid.py), each one
custom op for torch.compile (ops.py), layouts zigzag / contiguous (layout.py), communicators over a ProcessGroup or
DeviceMesh dim, a 2-D group for the hybrid, or simulated in one process (comm.py), loss normalised by global tokens
(loss.py), whole batches sharded alike (batch.py), the active config for code without a cp argument (context.py).
Kernels: fastattn.blocks.
"""
from .api import cp_attention, ring_flash_attn_func, zigzag_ring_flash_attn_func
from .batch import pad_batch, shard_batch
from .comm import CountingComm, CPComm, CPCommError, HybridComm, LocalComm, TorchComm, run_local
from .config import CPConfig, CPUnsupportedError
from .context import active_cp, context_parallel
try:
    from .dtensor import FastattnContextParallel
except ImportError:  # a torch built without torch.distributed has no DTensor: the style refuses when built
    def FastattnContextParallel(*args, **kwargs):
        raise RuntimeError("fastattn.distributed.FastattnContextParallel: this torch build has no torch.distributed "
                           "(no DTensor, no parallelize_module)")
from .layout import (global_positions, shard, shard_varlen, unshard, unshard_list, unshard_varlen,
                     unshard_varlen_list, varlen_positions)
from .loss import cp_cross_entropy, cp_replicated_loss, global_loss
from .varlen_api import (cp_varlen_attention, explain_varlen, llama3_flash_attn_prepare_cu_seqlens,
                         llama3_flash_attn_varlen_func, plan_varlen, ring_flash_attn_varlen_func,
                         zigzag_ring_flash_attn_varlen_func)
from .varlen_ulysses import shard_2d as shard_varlen_2d, unshard_2d_list as unshard_varlen_2d_list

__all__ = ["cp_attention", "ring_flash_attn_func", "zigzag_ring_flash_attn_func", "CPConfig",
           "CPUnsupportedError", "CPComm", "CPCommError", "TorchComm", "LocalComm", "CountingComm", "HybridComm",
           "run_local",
           "shard", "unshard", "unshard_list", "global_positions", "cp_cross_entropy", "cp_replicated_loss",
           "global_loss",
           "shard_batch", "pad_batch", "context_parallel", "active_cp", "FastattnContextParallel",
           "cp_varlen_attention", "ring_flash_attn_varlen_func", "zigzag_ring_flash_attn_varlen_func",
           "llama3_flash_attn_varlen_func", "llama3_flash_attn_prepare_cu_seqlens", "shard_varlen", "unshard_varlen",
           "unshard_varlen_list", "varlen_positions", "plan_varlen", "explain_varlen", "shard_varlen_2d",
           "unshard_varlen_2d_list"]
