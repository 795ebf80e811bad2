"""Shared by the transformers benchmarks (bench_hf_bert.py, bench_hf_decode.py): transformers' "sdpa" and
"fastattn" attention functions timed in place, so a model's forward splits into its attention and the rest."""
from __future__ import annotations

import collections
import contextlib
import time

import torch

import fastattn.integrations.transformers as fa_hf  # registers "fastattn"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_clock = time.process_time


def use_threads(n: int) -> str:
    """torch on n threads, and the clock the timers read: CPU time on one thread (immune to the host's other load),
    wall time on more (CPU time would add the threads' up). Returns the clock's name."""
    global _clock
    torch.set_num_threads(n)
    _clock = time.process_time if n == 1 else time.perf_counter
    return "CPU time" if n == 1 else "wall time"


def clock() -> float:
    """Seconds on the clock use_threads chose (CPU time until it is called)."""
    return _clock()


def _timed(name, fn, spent):
    def run(*a, **kw):
        t = _clock()
        try:
            return fn(*a, **kw)
        finally:
            spent[name] += _clock() - t
    return run


@contextlib.contextmanager
def timed_attention():
    """Within the block, transformers' AttentionInterface entries "sdpa" and "fastattn" add their seconds (clock()) to
    the yielded dict under their names (the kernels with the Python around them); restored on exit."""
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
