"""Integrations with model libraries. Each submodule imports its library lazily:

    import fastattn.integrations.transformers      # registers attn_implementation="fastattn" (transformers >= 5)
                                                   # and "fastattn_cp" (context parallel, inside
                                                   # fastattn.distributed.context_parallel(cp))
"""
