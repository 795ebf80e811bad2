import sys, time, torch, statistics
torch.set_num_threads(int(sys.argv[1]))
import fastattn
F=torch.nn.functional.scaled_dot_product_attention
rows=[]
for (H,Hk,D) in [(8,4,128),(12,6,64)]:
  for Sk in (512,2048):
    for Sq in (5,8,12,16,24,32):
      g=torch.Generator().manual_seed(0)
      q=torch.randn(1,H,Sq,D,generator=g).half(); k,v=(torch.randn(1,Hk,Sk,D,generator=g).half() for _ in range(2))
      gqa=H!=Hk
      cols={"torch":lambda: F(q,k,v,enable_gqa=gqa),"cpu":lambda: fastattn.scaled_dot_product_attention(q,k,v,enable_gqa=gqa,backend="cpu"),
            "sdpa":lambda: fastattn.scaled_dot_product_attention(q,k,v,enable_gqa=gqa,backend="sdpa")}
      res={c:[] for c in cols}
      n=max(2,int(3e6/(H*Sq*Sk*D)*10))
      with torch.no_grad():
        for r in range(7):
          for c,f in cols.items():
            f(); t=time.perf_counter()
            for _ in range(n): f()
            res[c].append((time.perf_counter()-t)/n)
      m={c:statistics.median(res[c]) for c in cols}
      print(f"H{H}/{Hk} D{D} Sk{Sk} Sq{Sq}: cpu {m['torch']/m['cpu']:.2f}x sdpa {m['torch']/m['sdpa']:.2f}x  (torch {m['torch']*1e3:.3f} ms)", flush=True)
