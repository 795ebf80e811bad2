"""fastattn's benchmark suite: `python -m fastattn.benchmark [--preset quick|full] [filters]`.

Compares every fastattn backend available at run time (fastattn.BACKENDS) with PyTorch SDPA with each of its
kernels forced (sdpa.flash / .efficient / .cudnn / .math), FlexAttention (torch.compile'd) and naive attention
(fastattn's `reference` backend), over sweeps of sequence length, head dim, causal, key padding (and varlen for
flash-style backends), GQA, dtype, and modes fwd / bwd / fwd_bwd / decode; plus a model-level benchmark.

Per (case, implementation) it reports median time, TFLOP/s (FlashAttention's convention, cases.py), GB/s for
decode, peak extra memory (memory.py), speedup over naive and over SDPA's fastest kernel, and whether the output
and gradients pass the project's tolerance rule at a small size (check.py). An implementation that cannot run a
case is listed with its reason. Files: results.json (with the environment), results.csv, PNG plots.

Layout: cases.py (what), inputs.py (tensors, timed steps), impls.py (who), timing.py, memory.py, check.py,
runner.py (the loop), report.py, plots.py, model.py, env.py, cli.py.
"""
from .cases import Case, attention_flops, flops, kv_bytes  # noqa: F401
from .memory import CpuAllocTracker, peak_extra_bytes  # noqa: F401
