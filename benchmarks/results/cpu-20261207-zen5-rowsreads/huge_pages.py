"""Fresh outputs advised to huge pages (csrc/cpu/workspace.h, advise_huge_pages) or not (FASTATTN_CPU_HUGE_PAGES=0),
against torch's SDPA, forward+backward through the SDPA function, 6 rounds in alternating order, medians; one thread
CPU time, two wall time. bf16 B4 H16 S2048 D64: 16 MB tensors, below the size (no advice either way: a control).

    PYTHONPATH=. python benchmarks/results/cpu-20261207-zen5-rowsreads/huge_pages.py 1   (or 2)
"""
import os, sys, time, torch, statistics, fastattn
torch.set_num_threads(int(sys.argv[1]))
clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
def case_b8():
    B, Hq, Hkv, Sq, Sk, D = 8, 24, 12, 4, 998, 160
    q = torch.randn(B, Sq, Hq, D).transpose(1, 2).requires_grad_(); k = torch.randn(B, Sk, Hkv, D).transpose(1, 2).requires_grad_(); v = torch.randn(B, Sk, Hkv, D).transpose(1, 2).requires_grad_()
    bias = torch.randn(B, 1, Sq, Sk)
    do = torch.randn(B, Hq, Sq, D)
    def ours():
        o = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, backend="cpu"); torch.autograd.grad(o, (q, k, v), do)
    def theirs():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True); torch.autograd.grad(o, (q, k, v), do)
    return "B8 GQA24/12 Sq4 Sk998 D160 fp32 float mask bshd, fwd+bwd", ours, theirs
def case_big(dt):
    B, H, S, D = 4, 16, 2048, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, S, D, dtype=dt)
    def ours():
        o = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu"); torch.autograd.grad(o, (q, k, v), do)
    def theirs():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True); torch.autograd.grad(o, (q, k, v), do)
    return f"B4 H16 S2048 D64 causal {dt}, fwd+bwd", ours, theirs
for name, ours, theirs in (case_b8(), case_big(torch.float32), case_big(torch.bfloat16)):
    ours(); theirs()
    t = {"on": [], "off": [], "torch": []}
    for r in range(6):
        order = ["on", "off", "torch"] if r % 2 == 0 else ["torch", "off", "on"]
        for m in order:
            os.environ["FASTATTN_CPU_HUGE_PAGES"] = "0" if m == "off" else "1"
            f = theirs if m == "torch" else ours
            t0 = clock(); f(); t[m].append(clock() - t0)
    m = {n: statistics.median(x) for n, x in t.items()}
    print(f"{name}: ours huge {m['on']*1e3:.1f} ms, ours 4 KB {m['off']*1e3:.1f} ms, torch {m['torch']*1e3:.1f} ms; "
          f"x torch {m['torch']/m['on']:.2f} / {m['torch']/m['off']:.2f}", flush=True)
