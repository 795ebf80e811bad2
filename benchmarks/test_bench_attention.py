"""Representative attention cases per implementation, for pytest-benchmark's history and comparisons.

    pytest benchmarks/ --benchmark-only                         # run
    pytest benchmarks/ --benchmark-only --benchmark-autosave    # keep a run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare     # compare against the last saved run

Implementations come from fastattn.benchmark's registry (every fastattn backend available now, SDPA with each
kernel forced, FlexAttention, naive); one that cannot take a case is skipped with its reason."""
import pytest
import torch

from fastattn.benchmark import cases as C
from fastattn.benchmark.impls import Refused, all_impls
from fastattn.benchmark.inputs import make_inputs, step_for
from fastattn.benchmark.probe import crash_reasons

# (id, cpu case, cuda case): one long-sequence forward, a causal training step, a padded batch, one decode step.
CASES = [
    ("fwd-hd64", C.Case("fwd", "fp32", 1, 8, 8, 1024, 1024, 64),
     C.Case("fwd", "bf16", 2, 32, 32, 8192, 8192, 64)),
    ("fwd_bwd-hd128-causal", C.Case("fwd_bwd", "fp32", 1, 4, 4, 1024, 1024, 128, causal=True),
     C.Case("fwd_bwd", "bf16", 2, 16, 16, 8192, 8192, 128, causal=True)),
    ("fwd-hd64-pad", C.Case("fwd", "fp32", 4, 8, 8, 512, 512, 64, padding=True),
     C.Case("fwd", "bf16", 8, 32, 32, 2048, 2048, 64, padding=True)),
    ("decode-gqa-hd128", C.Case("decode", "fp32", 1, 16, 4, 1, 4096, 128),
     C.Case("decode", "bf16", 8, 32, 8, 1, 16384, 128)),
]
# flex compiles for ~10 s per variant on CPU; it is part of `python -m fastattn.benchmark`, not this history.
IMPLS = [n for n in all_impls() if n != "flex" or torch.cuda.is_available()]
_crashes = {}


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
@pytest.mark.parametrize("name", IMPLS)
def test_attention(benchmark, device, name, case_id):
    impl = all_impls()[name]
    why = impl.unavailable(device.split(":")[0])
    if not why and hasattr(impl, "backend"):
        if impl.backend not in _crashes:
            _crashes[impl.backend] = crash_reasons(impl.backend, device)
        why = _crashes[impl.backend]
    if why:
        pytest.skip("; ".join(why))
    _, cpu_case, cuda_case = next(c for c in CASES if c[0] == case_id)
    case = cuda_case if device.startswith("cuda") else cpu_case
    inp = make_inputs(case, device)
    try:
        runner = impl.build(case, inp, grad=case.mode in ("bwd", "fwd_bwd"))
        with runner.context():
            step = step_for(runner, case.mode)
            step()
    except Refused as e:
        pytest.skip(str(e))
    except RuntimeError as e:
        pytest.skip(f"{type(e).__name__}: {str(e).splitlines()[0]}")

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed():
        step()
        sync()

    benchmark.extra_info.update(case=case.label, flops=C.flops(case), kv_bytes=C.kv_bytes(case))
    with runner.context():
        benchmark.pedantic(timed, rounds=10 if device.startswith("cuda") else 3, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.median
    benchmark.extra_info["tflops"] = C.flops(case) / mean / 1e12
