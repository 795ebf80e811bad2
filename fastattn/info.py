"""`python -m fastattn.info`: versions, devices, what was built, and each backend's availability."""
from __future__ import annotations

import platform
import sys

import torch

import fastattn
from fastattn import lean, ops
from fastattn.backends import BACKENDS, FEATURES
from fastattn.backends.cpu import environment_notes

_DECODE_ORDER = ("triton", "cpu", "cuda")  # the order the decode kernels have always been listed in


def collect() -> dict:

    info = {
        "fastattn": fastattn.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": [],
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"not importable ({type(e).__name__})"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["cuda_devices"].append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    info["cpp_ops"] = "loaded" if ops.loaded() else f"not loaded: {ops.LOAD_ERROR}"
    info["cpp_kernels"] = {k: ops.has_kernel(k) for k in ("CPU", "CUDA")}
    info["cuda_compiled"] = ops.cuda_built()
    info["cpu_matmul"] = ops.cpu_matmul()
    info["lean_path"] = lean.describe()
    info["environment"] = environment_notes()
    info["backends"] = {}
    for name, b in BACKENDS.items():
        why = b.unavailable()
        info["backends"][name] = {
            "available": not why,
            "why_not": why,
            "devices": sorted(b.devices),
            "dtypes": sorted(str(d)[6:] for d in b.dtypes),
            "head_dims": list(b.head_dims),
            "features": sorted(b.features),
        }
    info["decode_kernels"] = {}
    with_decode = sorted((n for n, b in BACKENDS.items() if b.decode is not None),
                         key=lambda n: _DECODE_ORDER.index(n) if n in _DECODE_ORDER else len(_DECODE_ORDER))
    for name in with_decode:
        k = BACKENDS[name].decode  # a backend's split-KV kernel: its own declarations, the backend's devices
        why = k.unavailable()
        info["decode_kernels"][k.name] = {
            "backend": name, "available": not why, "why_not": why, "devices": sorted(BACKENDS[name].devices),
            "dtypes": sorted(str(d)[6:] for d in k.dtypes), "head_dims": list(k.head_dims),
            "max_rows_per_kv_head": k.max_rows, "takes_mask": k.takes_bias,
        }
    return info


def feature_table() -> str:
    """Markdown feature-by-backend table drawn from the backends' declarations (README uses this)."""

    names = list(BACKENDS)
    rows = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows.append("| devices | " + " | ".join(", ".join(sorted(BACKENDS[n].devices - {"meta"})) for n in names) + " |")
    rows.append("| dtypes | " + " | ".join(", ".join(sorted(str(d)[6:].replace("float", "fp").replace("bfp16", "bf16")
                                                         for d in BACKENDS[n].dtypes)) for n in names) + " |")
    rows.append("| head dims | " + " | ".join("{}–{}".format(*BACKENDS[n].head_dims) for n in names) + " |")
    for f in sorted(FEATURES):
        rows.append(f"| {f.replace('_', ' ')} | " + " | ".join("✓" if f in BACKENDS[n].features else "—"
                                                              for n in names) + " |")
    return "\n".join(rows)


def main() -> None:
    if "--markdown" in sys.argv:
        print(feature_table())
        return
    info = collect()
    w = 14
    for key in ("fastattn", "python", "platform", "torch", "torch_cuda", "cudnn", "triton", "cpu_threads"):
        print(f"{key:<{w}} {info[key]}")
    print(f"{'cuda devices':<{w}} {', '.join(info['cuda_devices']) or 'none'}")
    print(f"{'C++ ops':<{w}} {info['cpp_ops']}")
    print(f"{'C++ kernels':<{w}} " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["cpp_kernels"].items())
          + f"; CUDA compiled into _C: {'yes' if info['cuda_compiled'] else 'no'}")
    print(f"{'CPU kernels':<{w}} " + f"\n{'':<{w}} ".join(info["cpu_matmul"].split("; ")))
    print(f"{'lean path':<{w}} {info['lean_path']}")
    for note in info["environment"]:
        print(f"{'WARNING':<{w}} {note}")
    print("\nbackends:")
    for name, b in info["backends"].items():
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["why_not"])
        print(f"  {name:<10} {state}")
        print(f"  {'':<10} devices={','.join(b['devices'])} dtypes={','.join(b['dtypes'])} "
              f"head_dims={b['head_dims'][0]}..{b['head_dims'][1]}")
        print(f"  {'':<10} features={','.join(b['features']) or '-'}")
    print("\nsplit-KV decode kernels (flash_attn_with_kvcache and short dense queries):")
    for name, k in info["decode_kernels"].items():
        state = "available" if k["available"] else "unavailable: " + "; ".join(k["why_not"])
        print(f"  {name:<20} {state}")
        print(f"  {'':<20} devices={','.join(k['devices'])} dtypes={','.join(k['dtypes'])} "
              f"head_dims={k['head_dims'][0]}..{k['head_dims'][1]} query rows per kv head <= "
              f"{k['max_rows_per_kv_head']}" + (", takes a dense call's mask" if k["takes_mask"] else ""))


if __name__ == "__main__":
    main()
