import os, sys, time, torch, statistics
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 1)
import fastattn
from fastattn import ops
cases=[(B,H,Hk,Sq,Sk,D) for (B,H,Hk) in [(1,8,8),(1,16,4)] for Sq in (8,16,32,64,128) for Sk in (512,2048) for D in (64,128)] + [(8,12,12,32,32,64),(8,12,12,16,16,64),(1,12,12,64,64,64),(4,8,8,128,128,64)]
for B,H,Hk,Sq,Sk,D in cases:
    g=torch.Generator().manual_seed(0)
    q=torch.randn(B,H,Sq,D,generator=g).half(); k,v=(torch.randn(B,Hk,Sk,D,generator=g).half() for _ in range(2))
    gqa=H!=Hk
    def ours(): return fastattn.scaled_dot_product_attention(q,k,v,enable_gqa=gqa,backend="cpu")
    def fp32t():
        ops._C.cpu_matmul_force_fp32(True)
        try: return fastattn.scaled_dot_product_attention(q,k,v,enable_gqa=gqa,backend="cpu")
        finally: ops._C.cpu_matmul_force_fp32(False)
    cols={"fp32tiles":fp32t,"pairs":ours}
    res={c:[] for c in cols}
    n=max(1,int(1e7/(B*H*Sq*Sk*D)))
    with torch.no_grad():
      for r in range(9):
        for c,f in cols.items():
          f(); t=time.perf_counter()
          for _ in range(n): f()
          res[c].append((time.perf_counter()-t)*1e3/n)
    med={c:statistics.median(res[c]) for c in cols}
    print(f"B{B} H{H}/{Hk} Sq{Sq} Sk{Sk} D{D}: fp32tiles {med['fp32tiles']:.3f} pairs {med['pairs']:.3f} ms; pairs/fp32tiles {med['fp32tiles']/med['pairs']:.2f}x  rows/kvhead {Sq*H//Hk}")
