"""fastattn: fused attention kernels (Triton, CUDA C++, C++ CPU) behind drop-in PyTorch APIs.

    import fastattn
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)     # like F.scaled_dot_product_attention
    out = fastattn.flash_attn_func(q, k, v, causal=True)                     # like flash_attn.flash_attn_func
    print(fastattn.explain(q, k, v, is_causal=True))                          # which backend runs, and why
    with fastattn.use_backend("reference"): ...                               # or backend=..., FASTATTN_BACKEND

`python -m fastattn.info` reports versions, devices, what was built and each backend's availability.
"""
from . import ops  # noqa: F401  (loads the C++ ops when built)
from .backends import BACKENDS, get_backend
from .dispatch import BackendUnavailableError, use_backend
from .params import InputTypeError, InputValueError
from .functional import (explain, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                         scaled_dot_product_attention)
from .packed import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_kvpacked_func,
                     flash_attn_varlen_qkvpacked_func)
from .padding import index_first_axis, pad_input, unpad_input
from . import nn  # fastattn.nn.MultiheadAttention
from . import blocks  # block calls with global offsets and the safe merge (context parallelism's kernel contract)
from .nn import patch, unpatch
from .kvcache import explain_kvcache

__version__ = "0.1.0"


def available_backends(device: str = "cpu"):
    """Names of the backends that can run at all on this device type (built, device present)."""
    return [n for n, b in BACKENDS.items() if not b.unavailable() and device in b.devices]


__all__ = ["scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
           "explain", "use_backend", "available_backends", "get_backend", "BACKENDS", "BackendUnavailableError",
           "InputValueError", "InputTypeError", "__version__", "nn", "blocks", "patch", "unpatch", "explain_kvcache",
           "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "unpad_input", "pad_input", "index_first_axis"]
