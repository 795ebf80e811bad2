# fp16 inference steps with a mask: transformers' bottom-right causal float mask (B,1,Sq,Sk) and a key-padding bool
# mask (B,1,1,Sk); the cpu kernels and auto against torch's SDPA, median of 7 interleaved rounds.
import sys, time, torch, statistics
torch.set_num_threads(int(sys.argv[1]))
import fastattn
F=torch.nn.functional.scaled_dot_product_attention
for (H,Hk,D) in [(12,12,64),(8,8,128),(8,4,128),(16,4,128)]:
  for Sk in (512,2048):
    for Sq in (5,8,16,32):
      for kind in ("causal","pad"):
        g=torch.Generator().manual_seed(0)
        q=torch.randn(1,H,Sq,D,generator=g).half(); k,v=(torch.randn(1,Hk,Sk,D,generator=g).half() for _ in range(2))
        if kind=="causal":
          keep=torch.ones(Sq,Sk,dtype=torch.bool).tril(Sk-Sq)
          m=torch.zeros(1,1,Sq,Sk).masked_fill(~keep,float("-inf")).half()
        else:
          m=torch.ones(1,1,1,Sk,dtype=torch.bool); m[...,:Sk//8]=False
        gqa=H!=Hk
        cols={"torch":lambda: F(q,k,v,attn_mask=m,enable_gqa=gqa),
              "cpu":lambda: fastattn.scaled_dot_product_attention(q,k,v,attn_mask=m,enable_gqa=gqa,backend="cpu"),
              "auto":lambda: fastattn.scaled_dot_product_attention(q,k,v,attn_mask=m,enable_gqa=gqa)}
        res={c:[] for c in cols}
        n=max(2,int(3e6/(H*Sq*Sk*D)*10))
        with torch.no_grad():
          for r in range(7):
            for c,f in cols.items():
              f(); t=time.perf_counter()
              for _ in range(n): f()
              res[c].append((time.perf_counter()-t)/n)
        md={c:statistics.median(res[c]) for c in cols}
        print(f"H{H}/{Hk} D{D} Sk{Sk} Sq{Sq} {kind}: cpu {md['torch']/md['cpu']:.2f}x auto {md['torch']/md['auto']:.2f}x  (torch {md['torch']*1e3:.3f} ms)", flush=True)
