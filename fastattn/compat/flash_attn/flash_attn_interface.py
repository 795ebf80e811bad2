"""flash_attn.flash_attn_interface's public functions (the path transformers and others import from)."""
from fastattn.compat.flash_attn import *  # noqa: F401,F403
from fastattn.compat.flash_attn import __all__  # noqa: F401
