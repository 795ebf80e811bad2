"""Shared by the transformers benchmarks (bench_hf_bert.py, bench_hf_decode.py): transformers' "sdpa" and
"fastattn" attention functions timed in place, so a model's forward splits into its attention and the rest."""
from __future__ import annotations

import collections
import contextlib
import time

import torch

import fastattn.integrations.transformers as fa_hf  # registers "fastattn"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timed(name, fn, spent):
    def run(*a, **kw):
        t = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            spent[name] += time.process_time() - t
    return run


@contextlib.contextmanager
def timed_attention():
    """Within the block, transformers' AttentionInterface entries "sdpa" and "fastattn" add their CPU seconds to the
    yielded dict under their names (the kernels with the Python around them); restored on exit."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    spent = collections.defaultdict(float)
    mapping = AttentionInterface._global_mapping
    saved = {k: mapping[k] for k in ("sdpa", "fastattn")}
    mapping["sdpa"] = _timed("sdpa", sdpa_attention_forward, spent)
    mapping["fastattn"] = _timed("fastattn", fa_hf.fastattn_attention_forward, spent)
    try:
        yield spent
    finally:
        mapping.update(saved)
