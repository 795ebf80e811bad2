"""The CUDA split-KV decode kernels (csrc/cuda/decode_kernel.cuh), compiled to cubin for sm_80 and sm_90 without a
GPU and read back: every instantiation free of spills and local memory, and the key loop reading the cache with
16-byte loads (LDG.E.128) — the property the kernel's bandwidth rests on. Runs in CI; a GPU runs the kernels
themselves in tests/test_decode.py."""
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.toolchain import _compile, _loop_bodies, _ptxas_reports, _sass_functions, needs_toolchain

ARCHS = ("sm_80", "sm_90")
TUS = ("decode_fp16", "decode_fp32")  # bf16 is the f16 code with another unpack; f32 has the other lane layout
HEAD_DIMS, ROWS = (32, 64, 128, 256), (1, 2, 4, 8)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("decode_cubin"))
    jobs = [(tu, arch) for tu in TUS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as ex:
        return dict(zip(jobs, ex.map(lambda j: _compile(*j, out), jobs)))


def _instances(log):
    """ptxas reports of every decode_split_kernel instantiation, keyed by mangled name."""
    res = {}
    for m in re.finditer(r"Compiling entry function '(_ZN8fastattn4cuda19decode_split_kernel\w+?)'(.*?)Used (\d+) "
                         r"registers", log, re.S):
        st = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", m.group(2))
        res[m.group(1)] = (int(m.group(3)),) + (tuple(int(x) for x in st.groups()) if st else (0, 0, 0))
    return res


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_decode_kernels_do_not_spill(compiled, tu, arch):
    log, _ = compiled[(tu, arch)]
    inst = _instances(log)
    assert len(inst) == len(HEAD_DIMS) * len(ROWS), f"expected {len(HEAD_DIMS) * len(ROWS)} split kernels, " \
                                                    f"ptxas reported {len(inst)}:\n{log[-2000:]}"
    assert "decode_combine_kernel" in _ptxas_reports(log)
    print(f"{tu} {arch} registers: " + " ".join(str(v[0]) for v in inst.values()))
    bad = {k: v for k, v in inst.items() if v[1:] != (0, 0, 0)}
    assert not bad, f"{tu} {arch}: stack/spills (regs, stack, spill st, spill ld): {bad}"


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_decode_key_loop_uses_16_byte_loads(compiled, tu, arch):
    _, sass = compiled[(tu, arch)]
    funcs = {name: ins for name, ins in _sass_functions(sass, key=str).items() if "decode_split_kernel" in name}
    assert len(funcs) == len(HEAD_DIMS) * len(ROWS), sorted(funcs)
    for name, instrs in funcs.items():
        flat = [i for _, i in instrs]
        assert not [i for i in flat if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", i)], f"{name}: local memory"
        loops = [b for b in _loop_bodies(instrs) if any(re.search(r"\bLDG\.E\.128", i) for i in b)]
        assert loops, f"{name} ({tu} {arch}): no loop issues 16-byte global loads (LDG.E.128)"
