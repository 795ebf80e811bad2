import os, sys, time, statistics, torch, fastattn
sys.path.insert(0, "benchmarks")  # run from the repository root, on a build whose pack_keys reads FA_TMP_AB
from bench_steps import step_mask
torch.set_num_threads(int(sys.argv[1]))
clock = time.process_time if sys.argv[1] == "1" else time.perf_counter
for (H, D) in [(12, 64), (8, 128)]:
    for Sk in (512, 2048):
        for Sq in (5, 8, 16):
            for kind in ("causal", "pad"):
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, H, Sq, D, generator=g).half(); k = torch.randn(1, H, Sk, D, generator=g).half(); v = torch.randn(1, H, Sk, D, generator=g).half()
                m = step_mask(kind, Sq, Sk, torch.float16)
                f = lambda: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="cpu")
                t = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
                calls = max(2, int(3e7 / (H * Sq * Sk * D)))
                per = {"0": [], "1": [], "t": []}
                for r in range(21):
                    for which in (("0", "1", "t") if r % 2 else ("1", "0", "t")):
                        if which != "t": os.environ["FA_TMP_AB"] = which
                        fn = t if which == "t" else f
                        fn()
                        t0 = clock()
                        for _ in range(calls): fn()
                        per[which].append((clock() - t0) / calls)
                a, b, tt = (statistics.median(per[x]) for x in ("0", "1", "t"))
                print(f"H{H} D{D} Sk{Sk} Sq{Sq} {kind}: off {tt / a:.2f}x on {tt / b:.2f}x torch, on/off speed {a / b:.3f}", flush=True)
