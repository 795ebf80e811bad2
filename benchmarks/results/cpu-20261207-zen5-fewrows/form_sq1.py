# One-token training calls: the backward's two forms (ops._C.cpu_bwd_form_force) against torch.
# Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-fewrows/form_sq1.py
import os, sys, time, itertools
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # benchmarks/
import torch, fastattn
from fastattn import ops
from bench_random_calls import tensors
from fastattn.backends.sdpa import TORCH_SDPA
from interleave import calls_per_batch, ratios_to, rounds_of, sdpa_call, switched
torch.set_num_threads(1); clock = time.process_time
gen = torch.Generator().manual_seed(0)
cpu = lambda *a, **k_: fastattn.scaled_dot_product_attention(*a, backend="cpu", **k_)
for dt, (B, H), Sq, D, Sk in itertools.product(["fp32", "bf16"], [(2, 1), (1, 1), (8, 1), (1, 12)], [1, 2, 4], [64, 128], [512, 2048]):
    c = dict(dtype=dt, grad=True, B=B, Hkv=H, G=1, Hq=H, D=D, mask="none", bshd=False, Sq=Sq, Sk=Sk)
    q, k, v, do, kw = tensors(c, gen)
    ours = sdpa_call(cpu, q, k, v, do, **kw)
    impls = {"torch": sdpa_call(TORCH_SDPA, q, k, v, do, **kw), "transposed": switched(ops._C.cpu_bwd_form_force, 2, ours),
             "plain": switched(ops._C.cpu_bwd_form_force, 1, ours)}
    per = rounds_of(impls, clock, 9, calls_per_batch(impls, clock))
    x = ratios_to(per)
    print(f"{dt} B{B} H{H} Sq{Sq} D{D} Sk{Sk}: torch {sorted(per['torch'])[4]*1e6:6.0f} us transposed {x['transposed']:.2f}x plain {x['plain']:.2f}x", flush=True)
