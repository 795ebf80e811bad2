"""Reference models on fastattn, nanoGPT-style, loading transformers checkpoints by parameter name:

    from fastattn.models import GPT2, Bert, BertForSequenceClassification
    gpt = GPT2.from_transformers(hf_gpt2)           # or GPT2(GPT2Config(...)).load_hf_state_dict(state_dict)
    new_tokens = gpt.generate(input_ids, attention_mask, max_new_tokens=20)   # KV cache via flash_attn_with_kvcache
    logits = gpt(cp.shard(input_ids, 1), cp=cp)     # context parallel (fastattn.distributed): this rank's rows

They need only torch (transformers is used only to read a checkpoint, if at all)."""
from .bert import Bert, BertConfig, BertForSequenceClassification
from .gpt2 import GPT2, GPT2Config, KVCache

__all__ = ["Bert", "BertConfig", "BertForSequenceClassification", "GPT2", "GPT2Config", "KVCache"]
