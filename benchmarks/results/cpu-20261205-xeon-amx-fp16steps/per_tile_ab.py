# fp16 steps at 2048 keys, D=128, MHA 8 and GQA 8/4, with and without a key-padding mask: python per_tile_ab.py THREADS
import sys, time, torch, statistics
torch.set_num_threads(int(sys.argv[1]))
import fastattn
F=torch.nn.functional.scaled_dot_product_attention
for (H,Hk,D) in [(8,4,128),(8,8,128)]:
 for Sq in (5,8,16,32):
  Sk=2048
  g=torch.Generator().manual_seed(0)
  q=torch.randn(1,H,Sq,D,generator=g).half(); k,v=(torch.randn(1,Hk,Sk,D,generator=g).half() for _ in range(2))
  m=torch.ones(1,1,1,Sk,dtype=torch.bool); m[...,:Sk//8]=False
  m0=torch.ones(1,1,1,Sk,dtype=torch.bool)
  gqa=H!=Hk
  cols={"torch":lambda: F(q,k,v,enable_gqa=gqa),"torch_m":lambda: F(q,k,v,attn_mask=m,enable_gqa=gqa),
        "cpu":lambda: fastattn.scaled_dot_product_attention(q,k,v,enable_gqa=gqa,backend="cpu"),
        "cpu_m":lambda: fastattn.scaled_dot_product_attention(q,k,v,attn_mask=m,enable_gqa=gqa,backend="cpu"),
        "cpu_m0":lambda: fastattn.scaled_dot_product_attention(q,k,v,attn_mask=m0,enable_gqa=gqa,backend="cpu")}
  res={c:[] for c in cols}
  with torch.no_grad():
    for r in range(7):
      for c,f in cols.items():
        f(); t=time.perf_counter()
        for _ in range(10): f()
        res[c].append((time.perf_counter()-t)/10)
  md={c:statistics.median(res[c])*1e3 for c in cols}
  print(f"H{H}/{Hk} Sq{Sq}: "+"  ".join(f"{c} {v:.3f}" for c,v in md.items()), flush=True)
