import sys, time, torch, statistics, os
torch.set_num_threads(int(sys.argv[1]))
import fastattn
dts={"fp16":torch.half,"bf16":torch.bfloat16,"fp32":torch.float}
for dn in sys.argv[2].split(","):
 dt=dts[dn]
 for (H,Hk,D) in [(16,4,128),(12,4,64),(8,2,128)]:
  for Sk in (512,2048):
    for Sq in (17,24,32,48,63):
      g=torch.Generator().manual_seed(0)
      q=torch.randn(1,H,Sq,D,generator=g).to(dt); k,v=(torch.randn(1,Hk,Sk,D,generator=g).to(dt) for _ in range(2))
      f=lambda: fastattn.scaled_dot_product_attention(q,k,v,enable_gqa=True,backend="cpu")
      res=[]
      n=max(2,int(3e6/(H*Sq*Sk*D)*10))
      with torch.no_grad():
        for r in range(7):
          f(); t=time.perf_counter()
          for _ in range(n): f()
          res.append((time.perf_counter()-t)/n)
      print(f"{dn} H{H}/{Hk} D{D} Sk{Sk} Sq{Sq}: {statistics.median(res)*1e3:.3f}", flush=True)
