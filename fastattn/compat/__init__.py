"""Import paths laid out like other attention libraries', so switching is a change of import.

    from flash_attn import flash_attn_func                    ->  from fastattn.compat.flash_attn import flash_attn_func
    from flash_attn.bert_padding import unpad_input, pad_input ->  from fastattn.compat.flash_attn.bert_padding import ...

Re-exports only: the functions live in fastattn.functional, fastattn.packed, fastattn.kvcache and fastattn.padding."""
