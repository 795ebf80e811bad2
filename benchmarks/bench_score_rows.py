"""The CPU fp32 score tiles' two forms on the brgemm engine against each other and against PyTorch's SDPA, side by
side in one process.

On the brgemm engine a score tile S = Q K^T multiplies a transposed copy of the key tile (csrc/cpu/blas.cpp,
pack_kt), which pays when many query rows share it. A sequence of few query rows takes sgemm on K's rows as given
instead where scores_on_rows says so (CPUs without AVX-512: up to 32 query rows, 256 keys or more, head dim <= 64),
in the forward and the backward alike. Each column forces one form (ops._C.cpu_scores_on_rows_force: `transposed`
never on rows, `rows` always); `cpu` is this CPU's own rule. Shapes are query steps against a longer key cache
(B x H x Sq x Sk x D); `--backward` times forward and backward together, with a random dO. Interleaved rounds (each
round one batch of calls per path, orders rotating), median of each round's ratio torch / path. One thread: CPU time.

    python benchmarks/bench_score_rows.py
    python benchmarks/bench_score_rows.py --backward --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

import fastattn
from fastattn import ops
from interleave import calls_per_batch, ratios_to, rounds_of, switched  # (benchmarks/, the script's folder)

FORMS = {"transposed": 1, "rows": 2, "cpu": 0}


def _call(sdpa, q, k, v, backward, g):
    if not backward:
        return lambda: sdpa(q, k, v)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g)
    return lambda: torch.autograd.grad(sdpa(q, k, v), (q, k, v), dout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=["1x12x8x512x64", "1x12x16x512x64", "1x12x32x512x64",
                                                    "1x12x16x2048x64", "1x12x16x256x64", "1x12x16x128x64",
                                                    "1x12x64x512x64", "1x8x16x512x128"], help="BxHxSqxSkxD")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops._C.cpu_fp32_gemm_force(2)
    if ops.cpu_matmul_report().get("fp32") != "brgemm":
        raise SystemExit(f"this torch has no fp32 brgemm, so the score tiles have one form only ({ops.cpu_matmul()})")
    clock = time.process_time if a.threads == 1 else time.perf_counter
    print(f"{ops.cpu_matmul()}; torch {torch.__version__}, {a.threads} thread(s), fp32 "
          f"{'forward+backward' if a.backward else 'forward'}, {'CPU' if a.threads == 1 else 'wall'} time, median "
          f"of {a.rounds} interleaved rounds; x torch")
    print(f"{'B':>2} {'H':>3} {'Sq':>4} {'Sk':>5} {'D':>4} {'rule':>5} {'torch ms':>9} "
          + " ".join(f"{n:>10}" for n in FORMS))
    g = torch.Generator().manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode(not a.backward):
        for shape in a.shapes:
            B, H, Sq, Sk, D = (int(x) for x in shape.split("x"))
            q = torch.randn(B, H, Sq, D, generator=g)
            k, v = (torch.randn(B, H, Sk, D, generator=g) for _ in range(2))
            impls = {"torch": _call(sdpa, q, k, v, a.backward, g)}
            ours = _call(lambda *t: fastattn.scaled_dot_product_attention(*t, backend="cpu"), q, k, v, a.backward, g)
            impls.update({name: switched(ops._C.cpu_scores_on_rows_force, mode, ours) for name, mode in FORMS.items()})
            per = rounds_of(impls, clock, a.rounds, calls_per_batch(impls, clock, batch_s=0.1))
            x = ratios_to(per)
            torch_ms = sorted(per["torch"])[len(per["torch"]) // 2] * 1e3
            rule = "rows" if ops._C.cpu_scores_on_rows(Sq, Sk, D) else "tr"
            print(f"{B:>2} {H:>3} {Sq:>4} {Sk:>5} {D:>4} {rule:>5} {torch_ms:>9.3f} "
                  + " ".join(f"{x[n]:>9.3f}x" for n in FORMS), flush=True)
    ops._C.cpu_fp32_gemm_force(0)


if __name__ == "__main__":
    main()
