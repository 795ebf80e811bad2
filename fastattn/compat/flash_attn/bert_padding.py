"""flash_attn.bert_padding's helpers, from fastattn.padding."""
from fastattn.padding import index_first_axis, index_put_first_axis, pad_input, unpad_input

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]
