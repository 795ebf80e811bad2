# fp16 backward alone (autograd.grad on a kept graph), B H/Hkv Sq Sk D: python bwd_rows.py THREADS [line]
import sys, time, torch, statistics
torch.set_num_threads(int(sys.argv[1]))
import fastattn
cases=[]
if len(sys.argv) > 2 and sys.argv[2] == "line":  # around the line: 128-256 rows a KV head
  for D in (64,128):
    for Sq in (128,160,192):
      for Sk in (128,512,2048):
        cases.append((1,8,8,Sq,Sk,D,False))
    cases += [(1,8,8,128,128,D,True), (1,8,8,192,192,D,True), (1,8,8,256,256,D,True), (1,16,4,48,2048,D,False)]
else:
  for D in (64,128):
    for S in (16,32,48,64,96,128,256,512):
      cases.append((1,8,8,S,S,D,False))
    cases.append((4,8,8,128,128,D,True))
    cases.append((8,12,12,32,32,D,False))
    for Sq in (8,16,32): cases.append((1,16,4,Sq,512,D,False))
    for Sq in (16,32,64): cases.append((1,8,8,Sq,2048,D,False))
for (B,H,Hk,Sq,Sk,D,causal) in cases:
  g=torch.Generator().manual_seed(0)
  q=torch.randn(B,H,Sq,D,generator=g).half().requires_grad_(); k,v=(torch.randn(B,Hk,Sk,D,generator=g).half().requires_grad_() for _ in range(2))
  o=fastattn.scaled_dot_product_attention(q,k,v,is_causal=causal,enable_gqa=H!=Hk,backend="cpu")
  do=torch.randn_like(o)
  f=lambda: torch.autograd.grad(o,(q,k,v),do,retain_graph=True)
  n=max(2,int(2e7/(B*H*Sq*Sk*D)))
  res=[]
  for r in range(9):
    f(); t=time.perf_counter()
    for _ in range(n): f()
    res.append((time.perf_counter()-t)/n)
  print(f"B{B} H{H}/{Hk} Sq{Sq} Sk{Sk} D{D} {'causal' if causal else 'full'} rows/kvhead {Sq*H//Hk}: {statistics.median(res)*1e3:.4f}",flush=True)
