"""The sweeps behind auto's 2026-12-05 rule changes (fp32 grouped-query steps with a mask that differs by query; small
fp32 training calls): PyTorch's SDPA, the cpu kernels and the hand-over to sdpa, each through the SDPA surface, timed by
benchmarks/test_auto_rule.py's _ratios (torch's time over each one's, median of 15 interleaved rounds). From the
repository root:

    PYTHONPATH=. python benchmarks/results/cpu-1thread-20261205-xeon-amx-memo/sweep.py masked 1   # or grad; threads
"""
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

import fastattn

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
_spec = importlib.util.spec_from_file_location("auto_rule", os.path.join(BENCH, "test_auto_rule.py"))
auto_rule = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_rule)


def surface(backend):
    return lambda *a, **kw: fastattn.scaled_dot_product_attention(*a, backend=backend, **kw)


def masked_steps():
    """B1 grouped-query fp32 steps, 2-16 tokens, 300-2048 keys, a bottom-right causal or a random (tree) bool mask."""
    for Hq, Hkv, D in ((16, 4, 128), (12, 4, 64), (32, 8, 128)):
        for Sk in (300, 512, 1024, 2048):
            for Sq in (2, 3, 4, 8, 16):
                for kind in ("causal", "tree"):
                    g = torch.Generator().manual_seed(Sq * 7 + Sk)
                    if kind == "causal":
                        mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)[None, None]  # -> (1, 1, Sq, Sk)
                    else:
                        mask = torch.rand(1, 1, Sq, Sk, generator=g) > 0.2
                    q = torch.randn(1, Hq, Sq, D, generator=g)
                    k, v = (torch.randn(1, Hkv, Sk, D, generator=g) for _ in range(2))
                    kw = dict(attn_mask=mask, enable_gqa=True)
                    impls = {name: (lambda f=f: f(q, k, v, **kw)) for name, f in
                             (("torch", F.scaled_dot_product_attention), ("cpu", surface("cpu")),
                              ("sdpa", surface("sdpa")))}
                    with torch.no_grad():
                        x = auto_rule._ratios(impls)
                    yield (f"{kind:6} Hq={Hq:2} Hkv={Hkv} D={D:3} Sk={Sk:4} Sq={Sq:2}: cpu {x['cpu']:.2f}x "
                           f"hand-over {x['sdpa']:.2f}x")


def small_training():
    """fp32 forward+backward, B1-2 H2-12 S64-256, D=64/128, causal or not."""
    for D in (64, 128):
        for causal in (False, True):
            for B, H in ((1, 2), (1, 4), (1, 12), (2, 12)):
                for S in (64, 96, 128, 192, 256):
                    g = torch.Generator().manual_seed(S)
                    q, k, v = (torch.randn(B, H, S, D, generator=g).requires_grad_() for _ in range(3))
                    do = torch.randn(B, H, S, D, generator=g)
                    impls = {name: auto_rule._call(f, q, k, v, causal, True, do) for name, f in
                             (("torch", F.scaled_dot_product_attention), ("cpu", surface("cpu")),
                              ("sdpa", surface("sdpa")))}
                    x = auto_rule._ratios(impls)
                    W = B * H * S * S * D
                    yield (f"D={D:3} causal={int(causal)} B={B} H={H:2} S={S:3} W=2^{W.bit_length() - 1}+: "
                           f"cpu {x['cpu']:.2f}x hand-over {x['sdpa']:.2f}x")


if __name__ == "__main__":
    which, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    print(f"{fastattn.ops.cpu_matmul()}; torch {torch.__version__}, {threads} thread(s)", flush=True)
    for line in (masked_steps() if which == "masked" else small_training()):
        print(line, flush=True)
