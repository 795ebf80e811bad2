"""Each example runs offline with its defaults and reports what it promises.

Subprocesses with OMP_NUM_THREADS=1: the default models are tiny, and OpenMP threads only add overhead there."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    print(r.stdout[-3000:])
    assert r.returncode == 0, f"{name} failed:\n{r.stderr[-3000:]}"
    return r.stdout


def need(*modules):
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (pip install 'fastattn[transformers]' accelerate)")


def test_swap_into_model():
    out = run_example("swap_into_model.py")
    assert "patched 2 modules: layers.0.self_attn, layers.1.self_attn" in out
    assert re.search(r"error against the float64 model on real tokens: .*: agree \(within", out)
    assert re.search(r"speedup [0-9.]+x over torch SDPA", out)
    assert re.search(r"median of \d+ rounds after 2 warm-up runs, .*\d+ CPU thread", out), "interleaved timing"
    assert "attention (QK^T and PV) is" in out and "of this model's matmul FLOPs" in out


def test_swap_into_model_loads_a_sequence_first_patched_model(tmp_path):
    """--model PATH with batch_first=False (it crashed on the (B, S, E) input) saved after patch() (it timed fastattn
    against itself as "torch"): the input follows the model's layout and the baseline runs unpatched."""
    import torch
    import fastattn
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=False)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    fastattn.patch(model)
    torch.save(model, tmp_path / "enc.pt")
    out = run_example("swap_into_model.py", "--model", str(tmp_path / "enc.pt"), "--seq", "32", "--iters", "2")
    assert "held 2 fastattn modules: the baseline runs them unpatched" in out
    assert "sequence first (batch_first=False)" in out and ": agree (within" in out


def test_bert_finetune():
    need("transformers", "accelerate")
    out = run_example("bert_finetune.py")
    assert "attn_implementation=fastattn" in out
    acc = float(re.search(r"held-out accuracy: ([0-9.]+)", out).group(1))
    assert acc >= 0.9, f"fine-tuning did not learn the built-in task (accuracy {acc})"
    assert "mean train loss over all steps" in out and "last logged loss" in out, "Trainer's loss is a mean"


def test_gpt2_generate():
    need("transformers", "tokenizers")
    out = run_example("gpt2_generate.py")
    for name in ("fastattn", "fastattn.models.GPT2"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + ":"))
        assert "same tokens as eager" in line and "tokens/s" in line, line
    assert re.search(r"median of \d+ generate\(\) calls after 2 warm-up calls .*, \d+ CPU thread", out)
    assert "tiny model" in out and "overhead" in out, "the default model is overhead-bound and must say so"
