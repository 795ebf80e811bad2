"""The CPU fp32 backward's two forms on the brgemm engine against each other and against PyTorch's SDPA, side by side
in one process.

On the brgemm engine every key block of the backward is packed (csrc/cpu/bwd.cpp). CPUs with AVX-512 then take the
transposed form (dV^T += dO^T Pd, dK^T += Q^T dS', all five products on brgemm); CPUs without it take the plain form
(S and dP on the packed tiles, dV, dK and dQ on sgemm). Each column forces one form (ops._C.cpu_bwd_form_force);
`cpu` is this CPU's own choice. Forward and backward are timed together, with a random dO. bf16 and fp16 inputs take
these forms too where their tiles widen to fp32 (CPUs without AVX512-BF16 / AVX512-FP16: `python -m fastattn.info`).
Interleaved rounds (each round one batch of calls per path, orders rotating), median of each round's ratio
torch / path. One thread: CPU time.

    python benchmarks/bench_bwd_form.py
    python benchmarks/bench_bwd_form.py --causal --shapes 1x8x2048x128 --rounds 21
    python benchmarks/bench_bwd_form.py --dtype bf16
"""
from __future__ import annotations

import argparse
import time

import torch

import fastattn
from fastattn import ops
from interleave import calls_per_batch, ratios_to, rounds_of, switched  # (benchmarks/, the script's folder)

FORMS = {"plain": 1, "transposed": 2, "cpu": 0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _training_call(sdpa, q, k, v, causal, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g).to(q.dtype)
    return lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=causal), (q, k, v), dout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=["1x8x1024x64", "2x8x512x96", "1x8x1024x128", "1x4x1024x256"],
                    help="BxHxSxD")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops._C.cpu_fp32_gemm_force(2)
    if ops.cpu_matmul_report().get("fp32") != "brgemm":
        raise SystemExit(f"this torch has no fp32 brgemm, so the backward has one form only ({ops.cpu_matmul()})")
    clock = time.process_time if a.threads == 1 else time.perf_counter
    print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {a.threads} thread(s), {a.dtype} forward+backward"
          f"{' causal' if a.causal else ''}, {'CPU' if a.threads == 1 else 'wall'} time, median of {a.rounds} "
          "interleaved rounds; x torch")
    print(f"{'B':>2} {'H':>3} {'S':>5} {'D':>4} {'torch ms':>9} " + " ".join(f"{n:>10}" for n in FORMS))
    g = torch.Generator().manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for shape in a.shapes:
        B, H, S, D = (int(x) for x in shape.split("x"))
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(DTYPES[a.dtype]) for _ in range(3))
        impls = {"torch": _training_call(sdpa, q, k, v, a.causal, g)}
        ours = _training_call(lambda *t, **kw: fastattn.scaled_dot_product_attention(*t, backend="cpu", **kw),
                              q, k, v, a.causal, g)
        impls.update({name: switched(ops._C.cpu_bwd_form_force, form, ours) for name, form in FORMS.items()})
        per = rounds_of(impls, clock, a.rounds, calls_per_batch(impls, clock, batch_s=0.2))
        x = ratios_to(per)
        torch_ms = sorted(per["torch"])[len(per["torch"]) // 2] * 1e3
        print(f"{B:>2} {H:>3} {S:>5} {D:>4} {torch_ms:>9.1f} " + " ".join(f"{x[n]:>9.3f}x" for n in FORMS),
              flush=True)


if __name__ == "__main__":
    main()
