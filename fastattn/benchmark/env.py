"""The environment a benchmark ran in, stored next to its numbers so runs can be compared honestly."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

from .. import ops


def _run(cmd, cwd=None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - optional information
        return ""


def _cpu_model() -> str:
    """The model name with cpuid's family and model where /proc/cpuinfo has them ("AMD EPYC" names Zen 1 and Zen 4
    alike; "family 25 model 17" tells them apart)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def collect(device: str) -> dict:
    import fastattn
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)) if commit else False
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", *[os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)]]),
        "device": device,
        "fastattn": fastattn.__version__,
        "git_commit": (commit + ("+dirty" if dirty else "")) if commit else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_model": _cpu_model(),
        # CPU model, ISA found (AMX, AVX512-BF16, AVX512-FP16, AVX2) and how the cpu kernels multiply each dtype.
        "cpu_matmul": ops.cpu_matmul(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # CPU timings are only as good as the machine is idle: the 1-minute load average at the start.
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "available_backends": fastattn.available_backends(device.split(":")[0]),
        # Settings that change which CPU paths run (oneDNN's and MKL's ISA caps, the forced tile path), when set.
        "cpu_isa_env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                   "FASTATTN_CPU_MATMUL", "FASTATTN_CPU_FP16_PAIRS")
                        if k in os.environ},
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not importable ({type(e).__name__})"
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = p.name
        env["gpu_capability"] = f"{p.major}.{p.minor}"
        env["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
        env["gpu_sms"] = p.multi_processor_count
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0] \
            or None
    return env
