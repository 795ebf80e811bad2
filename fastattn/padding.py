"""flash-attn's bert_padding helpers: remove padding before a varlen call and put it back after.

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)   # x (B, S, ...)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out_unpad, indices, B, S)                                            # (B, S, ...), 0 at padding

Return values as in the current flash-attn release (unpad_input returns five values, the last being the number of
tokens each sequence uses). Plain index_select/index_copy, whose gradients autograd already has."""
import torch
import torch.nn.functional as F

from .params import InputTypeError, InputValueError, _shape


def _what(t) -> str:
    return _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_indices(indices, name="indices"):
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        dtype = f" {indices.dtype}" if isinstance(indices, torch.Tensor) else ""
        raise InputValueError(f"fastattn: {name} must be a 1-D int64/int32 tensor, got {_what(indices)}{dtype}")


def index_first_axis(input, indices):
    """input[indices] along the first axis: input (N, ...), indices (nnz,) -> (nnz, ...). Differentiable in input."""
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise InputValueError(f"fastattn: index_first_axis needs input of at least 2 dims (N, ...), got {_what(input)}")
    _check_indices(indices)
    return input.index_select(0, indices)


def index_put_first_axis(values, indices, first_axis_dim: int):
    """A zero (first_axis_dim, ...) tensor with rows `indices` set to values (nnz, ...). Differentiable in values."""
    _check_indices(indices)
    if not isinstance(values, torch.Tensor) or values.dim() < 2 or values.shape[0] != indices.shape[0]:
        raise InputValueError(f"fastattn: values must be (nnz, ...) with nnz = len(indices) = {indices.shape[0]}, got "
                         f"{_what(values)}")
    if not torch.compiler.is_compiling() and indices.numel() and \
            not 0 <= int(indices.min()) <= int(indices.max()) < first_axis_dim:
        raise InputValueError(f"fastattn: indices must lie in [0, {first_axis_dim}) (batch * seqlen), got "
                              f"{int(indices.min())}..{int(indices.max())}")
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, indices.long(), values)  # (index_copy takes int64 only; flash-attn's takes int32 too)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states (B, S, ...), attention_mask (B, S) bool/int (nonzero = a token) ->
    (hidden (total, ...), indices (total,) int64 into the flattened B*S axis, cu_seqlens (B+1,) int32,
    max_seqlen_in_batch (int), seqused (B,) int32).

    unused_mask (B, S): slots that are allocated but unused; they are kept in the unpadded tensor (and counted in
    cu_seqlens) but not in seqused, which counts attention_mask's tokens only."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise InputValueError(f"fastattn: hidden_states must be (B, S, ...), got {_what(hidden_states)}")
    if attention_mask is None:
        raise InputValueError("fastattn: unpad_input needs attention_mask (B, S) (nonzero = a token), got None")
    for name, m in (("attention_mask", attention_mask), ("unused_mask", unused_mask)):
        if m is not None and (not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(hidden_states.shape[:2])):
            raise InputValueError(f"fastattn: {name} must be (B, S) = {tuple(hidden_states.shape[:2])} like "
                             f"hidden_states {_shape(hidden_states)}, got {_what(m)}")
    keep = attention_mask.bool() if unused_mask is None else (attention_mask.bool() | unused_mask.bool())
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    return (*_gather(hidden_states, keep, keep.sum(dim=-1, dtype=torch.int32)), seqused)


def _gather(hidden_states, keep, seqlens):
    """(hidden_states' kept slots (total, ...), their indices (total,) into the flattened B*S axis, cu_seqlens (N+1,)
    int32 of the sequences' lengths `seqlens` (N,), their max): keep (B, S) bool marks the slots, in row order."""
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])  # (B, S, ...) -> (B*S, ...)
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Rows that each pack several sequences back to back from slot 0: attention_mask_in_length (B, S) int lists
    row b's sequence lengths in order (zeros after them), e.g. [[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]]. Returns
    (hidden (total, ...), indices (total,) int64 into the flattened B*S axis, cu_seqlens (N+1,) int32 over the N
    sequences in row order, max_seqlen_in_batch (int)): flash-attn's function of that name."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise InputValueError(f"fastattn: hidden_states must be (B, S, ...), got {_what(hidden_states)}")
    m = attention_mask_in_length
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(hidden_states.shape[:2]) or m.is_floating_point():
        raise InputValueError(f"fastattn: attention_mask_in_length must be an integer (B, S) = "
                              f"{tuple(hidden_states.shape[:2])} tensor, got {_what(m)}")
    S = m.shape[1]
    used = m.sum(dim=-1)  # (B,): slots each row's sequences fill
    if not torch.compiler.is_compiling() and m.numel() and (bool((m < 0).any()) or bool((used > S).any())):
        raise InputValueError(f"fastattn: attention_mask_in_length must hold lengths >= 0 summing to at most the "
                              f"row length {S} per row, got row sums {used.tolist()}")
    keep = torch.arange(S, device=m.device).unsqueeze(0) < used.unsqueeze(1)  # (B, S): the filled slots
    return _gather(hidden_states, keep, m.flatten()[m.flatten() != 0].to(torch.int32))  # lengths (N,) in row order


def pad_input(hidden_states, indices, batch: int, seqlen: int):
    """The inverse of unpad_input: hidden_states (total, ...) -> (batch, seqlen, ...), zeros where nothing was
    kept. Differentiable in hidden_states."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *out.shape[1:])  # (B*S, ...) -> (B, S, ...)


class IndexFirstAxis(torch.autograd.Function):
    """flash-attn's autograd.Function form of index_first_axis: IndexFirstAxis.apply(input, indices)."""

    @staticmethod
    def forward(ctx, input, indices):
        out = index_first_axis(input, indices)  # checks both
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return index_put_first_axis(grad_output, indices, ctx.first_axis_dim), None


class IndexPutFirstAxis(torch.autograd.Function):
    """flash-attn's autograd.Function form of index_put_first_axis: IndexPutFirstAxis.apply(values, indices, n)."""

    @staticmethod
    def forward(ctx, values, indices, first_axis_dim):
        ctx.save_for_backward(indices)
        return index_put_first_axis(values, indices, first_axis_dim)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return grad_output.index_select(0, indices), None, None


class IndexFirstAxisResidual(torch.autograd.Function):
    """(input[indices], input detached): the second output carries a residual path whose gradient the first's is
    added into (flash-attn's index_first_axis_residual)."""

    @staticmethod
    def forward(ctx, input, indices):
        out = index_first_axis(input, indices)
        ctx.save_for_backward(indices)
        return out, input.detach()

    @staticmethod
    def backward(ctx, grad_output, grad_residual):
        (indices,) = ctx.saved_tensors
        return grad_residual.index_add(0, indices.long(), grad_output), None


index_first_axis_residual = IndexFirstAxisResidual.apply

__all__ = ["unpad_input", "pad_input", "index_first_axis", "index_put_first_axis",
           "unpad_input_for_concatenated_sequences", "IndexFirstAxis", "IndexPutFirstAxis", "IndexFirstAxisResidual",
           "index_first_axis_residual"]
