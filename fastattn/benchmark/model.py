"""Model-level benchmark: the same random-weight model with only its attention swapped.

  BERT-base-shaped training step (forward, loss, backward, AdamW step), padded batch (key padding mask): tokens/s
  GPT-2-shaped greedy generation with a KV cache (prefill + new tokens): new tokens/s

Both use fastattn.models (reference BERT / GPT-2 whose attention calls fastattn's functional API), so "attention =
X" means every attention call runs on fastattn backend X via fastattn.use_backend: `auto` (what a user gets without
choosing), each available fastattn kernel backend, `sdpa` (PyTorch SDPA, its own kernel choice: the baseline a
drop-in must not fall behind) and `reference` (eager: naive softmax(QK^T)V). Dropout is 0
so every backend can take the calls. On CPU the models are cut to fewer layers (see SHAPES) to fit the quick
preset; the shapes are recorded with the numbers."""
from __future__ import annotations

import time
from typing import Dict, List

import torch

import fastattn

from .timing import bench

# device -> preset -> shape knobs
SHAPES: Dict[str, Dict[str, dict]] = {
    "cpu": {
        "quick": dict(bert_layers=2, bert_batch=2, bert_seq=256, gpt_layers=4, gpt_batch=1, gpt_prompt=128,
                      gpt_new=16, dtype="fp32"),
        "full": dict(bert_layers=4, bert_batch=2, bert_seq=512, gpt_layers=12, gpt_batch=1, gpt_prompt=256,
                     gpt_new=32, dtype="fp32"),
        "tiny": dict(bert_layers=1, bert_batch=1, bert_seq=32, gpt_layers=1, gpt_batch=1, gpt_prompt=16,
                     gpt_new=2, dtype="fp32"),
    },
    "cuda": {
        "quick": dict(bert_layers=12, bert_batch=32, bert_seq=512, gpt_layers=12, gpt_batch=8, gpt_prompt=512,
                      gpt_new=128, dtype="bf16"),
        "full": dict(bert_layers=12, bert_batch=64, bert_seq=512, gpt_layers=12, gpt_batch=32, gpt_prompt=512,
                     gpt_new=256, dtype="bf16"),
        "tiny": dict(bert_layers=1, bert_batch=1, bert_seq=32, gpt_layers=1, gpt_batch=1, gpt_prompt=16,
                     gpt_new=2, dtype="bf16"),
    },
}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_backends(device: str) -> List[str]:
    """auto, fastattn's kernel backends available here, then sdpa, then reference (eager)."""
    kinds = [n for n in fastattn.available_backends(device) if n not in ("sdpa", "reference")]
    return ["auto"] + kinds + ["sdpa", "reference"]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bert_train(device: str, s: dict, backend: str, target_s: float) -> dict:
    from fastattn.models.bert import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=s["bert_layers"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).to(device=device, dtype=DT[s["dtype"]]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B, S = s["bert_batch"], s["bert_seq"]
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=device)
    lens = torch.linspace(S // 2, S, B, device=device).long()  # ~25% padding, like the op-level cases
    amask = (torch.arange(S, device=device).view(1, S) < lens.view(B, 1)).long()
    labels = torch.randint(0, cfg.num_labels, (B,), device=device)

    def step():
        with fastattn.use_backend(backend):
            loss = torch.nn.functional.cross_entropy(model(ids, amask).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = bench(step, device, target_s)
    return {"model": "bert_train", "attention": backend, "time_ms": t.median_ms, "tokens": B * S,
            "tokens_per_s": B * S / (t.median_ms / 1e3), "shape": f"layers={cfg.num_hidden_layers} B={B} S={S} "
                                                                  f"{s['dtype']}"}


def gpt2_generate(device: str, s: dict, backend: str, target_s: float) -> dict:
    from fastattn.models.gpt2 import GPT2, GPT2Config
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=s["gpt_layers"], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2(cfg).to(device=device, dtype=DT[s["dtype"]]).eval()
    B, T, N = s["gpt_batch"], s["gpt_prompt"], s["gpt_new"]
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def gen():
        with fastattn.use_backend(backend):
            return model.generate(idx, max_new_tokens=N)

    gen()  # warm-up
    reps, times = 0, []
    while reps < 2 or (sum(times) < target_s and reps < 10):
        _sync(device)
        t0 = time.perf_counter()
        gen()
        _sync(device)
        times.append(time.perf_counter() - t0)
        reps += 1
    med = sorted(times)[len(times) // 2]
    return {"model": "gpt2_generate", "attention": backend, "time_ms": med * 1e3, "tokens": B * N,
            "tokens_per_s": B * N / med, "shape": f"layers={cfg.n_layer} B={B} prompt={T} new={N} {s['dtype']}"}


def run(device: str, preset: str, target_s: float = 0.5, backends: List[str] = None,
        dtypes: List[str] = None) -> List[dict]:
    """Both models with attention on each backend (default: attention_backends; sdpa and reference, the baselines
    of x sdpa and x eager, are always added), in each dtype (default: the preset's)."""
    base = SHAPES["cuda" if device.startswith("cuda") else "cpu"].get(preset) or SHAPES["cpu"]["quick"]
    backends = list(dict.fromkeys((backends or attention_backends(device.split(":")[0])) + ["sdpa", "reference"]))
    rows = []
    for dtype in dtypes or [base["dtype"]]:
        s = dict(base, dtype=dtype)
        for fn in (bert_train, gpt2_generate):
            for b in backends:
                try:
                    rows.append(fn(device, s, b, target_s))
                except Exception as e:  # noqa: BLE001 - listed with the reason, not dropped
                    rows.append({"model": fn.__name__, "attention": b, "status": "error", "shape": dtype,
                                 "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"})

    def key(r):  # the model and its dtype (the shape string's last word)
        words = (r.get("shape") or "").split()
        return r["model"], words[-1] if words else None

    for model in set(map(key, rows)):
        def same(r):
            return key(r) == model

        def rate(backend):
            return next((r.get("tokens_per_s") for r in rows if same(r) and r["attention"] == backend), None)
        eager, sdpa = rate("reference"), rate("sdpa")
        for r in rows:
            if same(r) and r.get("tokens_per_s"):
                r["speedup_vs_eager"] = r["tokens_per_s"] / eager if eager else None
                r["speedup_vs_sdpa"] = r["tokens_per_s"] / sdpa if sdpa else None
    return rows
