"""flash-attn's top-level functions (flash_attn 2.x names, signatures and (B, S, H, D) layout), from fastattn."""
from fastattn.functional import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from fastattn.packed import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_kvpacked_func,
                             flash_attn_varlen_qkvpacked_func)

# The flash-attn release whose API these functions follow (bottom-right causal, windows, ALiBi, softcap, lse,
# unpad_input's five return values), for callers that check flash_attn.__version__.
__version__ = "2.7.0"

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
