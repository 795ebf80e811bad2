import torch, fastattn, time, statistics, sys
torch.set_num_threads(1)
Sq, H, D, Sk = [int(x) for x in sys.argv[1:5]]
n = int(sys.argv[5]) if len(sys.argv) > 5 else 0
q = torch.randn(1, H, Sq, D, dtype=torch.float16); k = torch.randn(1, H, Sk, D, dtype=torch.float16); v = torch.randn(1, H, Sk, D, dtype=torch.float16)
t = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
f = lambda: fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
if n:
    for _ in range(n): f()
    sys.exit()
for _ in range(20): t(); f()
rt, rf = [], []
for r in range(15):
    for fn, acc in ((t, rt), (f, rf)) if r % 2 else ((f, rf), (t, rt)):
        t0 = time.process_time()
        for _ in range(50): fn()
        acc.append((time.process_time() - t0) / 50 * 1e6)
print(f"fp16 Sq={Sq} H={H} D={D} Sk={Sk}: torch {statistics.median(rt):.1f} us, cpu {statistics.median(rf):.1f} us, ratio {statistics.median(rt)/statistics.median(rf):.2f}")
