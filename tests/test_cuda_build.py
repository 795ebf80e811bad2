"""CI check of the CUDA kernels' machine code, no GPU needed.

Compiles representative kernel instantiations (csrc/cuda/instantiations) to cubin for sm_80 and sm_90 with
nvcc and inspects them: ptxas must report no spills and no stack frame, and the SASS main loop of every
attention kernel (the backward branch's body) must issue tensor-core MMAs (HMMA) fed by ldmatrix (LDSM) and
cp.async copies (LDGSTS), with no local-memory traffic (LDL/STL) anywhere in the kernel. The dropout variants
(separate instantiations, *_dropout.cu) get the same checks, plus: they run Philox, the plain kernels do not."""
import filecmp
import importlib.util
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.toolchain import (CSRC, INST, _compile, _loop_bodies, _ptxas_reports, _sass_functions, _short_name,
                               needs_toolchain)

ARCHS = ("sm_80", "sm_90")
# The largest register footprints (fwd 256 and both backward kernels at 128/256), both dtypes covered, without
# and with dropout.
TUS = ("fwd_hdim128_fp16", "fwd_hdim256_bf16", "bwd_hdim128_bf16", "bwd_hdim256_fp16",
       "fwd_hdim128_fp16_dropout", "fwd_hdim256_bf16_dropout", "bwd_hdim128_bf16_dropout", "bwd_hdim256_fp16_dropout")
KERNELS = {"fwd": ("fwd_kernel",), "bwd": ("bwd_dkdv_kernel", "bwd_dq_kernel")}
# Philox4x32's first multiplier 0xD2511F53 (SASS prints the immediate signed: -0x2daee0ad).
PHILOX_MUL = re.compile(r"IMAD\.WIDE\.U32\b.*(-0x2daee0ad|0xd2511f53)\b", re.I)


def _expected_kernels(tu):
    """Short names (see _short_name) of the attention kernels a TU must contain."""
    suffix = "+dropout" if tu.endswith("_dropout") else ""
    return [k + suffix for k in KERNELS[tu[:3]]]


def test_instantiations_match_generator(tmp_path):
    """The committed instantiations/*.cu are exactly what generate_instantiations.py writes."""
    spec = importlib.util.spec_from_file_location("gen", os.path.join(CSRC, "cuda", "generate_instantiations.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.main(str(tmp_path))
    want = sorted(os.listdir(tmp_path))
    assert sorted(f for f in os.listdir(INST) if f.endswith(".cu")) == want
    _, mismatch, errors = filecmp.cmpfiles(str(tmp_path), INST, want, shallow=False)
    assert not mismatch and not errors, f"stale instantiations (rerun the generator): {mismatch + errors}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cubin"))
    jobs = [(tu, arch) for tu in TUS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(lambda j: _compile(*j, out), jobs))
    return dict(zip(jobs, results))


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_no_spills(compiled, tu, arch):
    log, _ = compiled[(tu, arch)]
    reports = _ptxas_reports(log)
    for name in _expected_kernels(tu):
        assert name in reports, f"{name} missing from ptxas output for {tu} {arch}:\n{log[-2000:]}"
    print(f"{tu} {arch}: " + ", ".join(f"{k} {v[0]} regs" for k, v in reports.items()))
    for name, (regs, sst, sld, stack) in reports.items():
        assert sst == 0 and sld == 0 and stack == 0, (
            f"{tu} {arch} {name}: {regs} registers, {sst} B spill stores, {sld} B spill loads, {stack} B stack")


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_main_loop_uses_tensor_cores(compiled, tu, arch):
    _, sass = compiled[(tu, arch)]
    funcs = _sass_functions(sass)
    dtype = "BF16" if "_bf16" in tu else "F16"
    for name in _expected_kernels(tu):
        assert name in funcs, f"{name} not in the SASS of {tu} {arch} (have {sorted(funcs)})"
        instrs = [i for _, i in funcs[name]]
        assert not [i for i in instrs if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", i)], f"{name}: local memory"
        hmma = [i for i in instrs if "HMMA.16816.F32" in i]
        assert hmma, f"{name} ({tu} {arch}) has no HMMA.16816.F32"
        if dtype == "BF16":
            assert all(".BF16" in i for i in hmma), f"{name}: bf16 kernel with non-bf16 MMAs"
        else:
            assert not any(".BF16" in i for i in hmma), f"{name}: fp16 kernel with bf16 MMAs"
        loops = _loop_bodies(funcs[name])
        main = [b for b in loops if any("HMMA" in i for i in b)]
        assert main, f"{name} ({tu} {arch}): no loop contains HMMA (loops: {len(loops)})"
        body = max(main, key=len)
        n_hmma = sum("HMMA" in i for i in body)
        n_ldsm = sum(i.split()[0].startswith("LDSM") or " LDSM" in i for i in body)
        n_ldgsts = sum("LDGSTS" in i for i in body)
        print(f"{tu} {arch} {name}: main loop {len(body)} instrs, {n_hmma} HMMA, {n_ldsm} LDSM, {n_ldgsts} LDGSTS")
        assert n_ldsm > 0, f"{name}: main loop loads no fragments with ldmatrix (LDSM)"
        assert any("LDSM" in i and ".MT88" in i for i in body), f"{name}: no transposed ldmatrix in the main loop"
        assert any("LDGSTS" in i for i in instrs), f"{name}: no cp.async (LDGSTS)"


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tu", TUS)
def test_philox_only_in_dropout_kernels(compiled, tu, arch):
    """The dropout variants draw Philox numbers; the plain kernels compile it away (if constexpr)."""
    funcs = _sass_functions(compiled[(tu, arch)][1])
    for name in _expected_kernels(tu):
        n_mul = sum(bool(PHILOX_MUL.search(i)) for _, i in funcs[name])
        if name.endswith("+dropout"):
            assert n_mul >= 10, f"{name} ({tu} {arch}): {n_mul} Philox multiplies, expected 10 per draw loop"
        else:
            assert n_mul == 0, f"{name} ({tu} {arch}): {n_mul} Philox multiplies in a kernel without dropout"
