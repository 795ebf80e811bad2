"""flash-attn's top-level functions (flash_attn 2.x names, signatures and (B, S, H, D) layout), from fastattn."""
from fastattn.functional import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from fastattn.packed import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_kvpacked_func,
                             flash_attn_varlen_qkvpacked_func)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
