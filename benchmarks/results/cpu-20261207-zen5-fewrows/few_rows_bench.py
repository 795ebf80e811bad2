# Training calls (forward+backward through the SDPA function, backend cpu) of 1-4 query tokens: torch against the forward on either kernel.
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/few_rows_bench.py 1  (or 2)
"""fwd+bwd (and fwd with grad) training calls of few query rows: torch SDPA vs fastattn cpu with the fwd on the
decode kernel (default) and on the prefill kernel (FASTATTN_CPU_FEW_ROWS=prefill), interleaved, median of rounds."""
import os, sys, time, itertools
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # benchmarks/
import torch, fastattn
from bench_random_calls import tensors
from fastattn.backends.sdpa import TORCH_SDPA
from fastattn import ops
from interleave import calls_per_batch, ratios_to, rounds_of, sdpa_call, with_env
threads = int(sys.argv[1]); torch.set_num_threads(threads)
clock = time.process_time if threads == 1 else time.perf_counter
print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {threads} thread(s), {'CPU' if threads == 1 else 'wall'} time, median of 9 interleaved rounds; x torch")
print(f"{'call':<44} {'torch us':>9} {'prefill':>8} {'decode':>8}")
gen = torch.Generator().manual_seed(0)
cpu = lambda *a, **k_: fastattn.scaled_dot_product_attention(*a, backend="cpu", **k_)
for dt, (B, Hkv, G), Sq, Sk, D, mask in itertools.chain(
        itertools.product(["fp32", "bf16"], [(2, 1, 1), (1, 12, 1), (8, 2, 1)], [1, 2, 4], [256, 1024, 4096], [64, 128], ["none"]),
        itertools.product(["fp32", "bf16"], [(4, 2, 4), (2, 4, 2)], [1], [1024], [64, 128], ["none"]),
        itertools.product(["fp32"], [(2, 4, 1)], [2], [1024], [64], ["causal", "pad", "float_b"])):
    c = dict(dtype=dt, grad=True, B=B, Hkv=Hkv, G=G, Hq=Hkv * G, D=D, mask=mask, bshd=False, Sq=Sq, Sk=Sk)
    q, k, v, do, kw = tensors(c, gen)
    if mask == "causal":  # bottom-right: a step's tokens at the end (transformers' form, as a window on the cpu op)
        kw.pop("is_causal", None); kw["attn_mask"] = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    impls = {"torch": sdpa_call(TORCH_SDPA, q, k, v, do, **kw),
             "prefill": with_env("FASTATTN_CPU_FEW_ROWS", "prefill", sdpa_call(cpu, q, k, v, do, **kw)),
             "decode": with_env("FASTATTN_CPU_FEW_ROWS", "decode", sdpa_call(cpu, q, k, v, do, **kw))}
    per = rounds_of(impls, clock, 9, calls_per_batch(impls, clock))
    x = ratios_to(per)
    name = f"{dt} B{B} H{Hkv*G}{'/'+str(Hkv) if G > 1 else ''} Sq{Sq} Sk{Sk} D{D} {mask}"
    print(f"{name:<44} {sorted(per['torch'])[4]*1e6:>9.0f} {x['prefill']:>7.2f}x {x['decode']:>7.2f}x", flush=True)
