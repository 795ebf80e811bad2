"""The CPU forward's unwindowed tiles take 128 query rows and 512 keys, halved down to 128 keys while a tile's fp32
K and V rows and scores outgrow the core's L2 (csrc/cpu/fwd.cpp, fwd_full_keys): an AMD EPYC Zen 3 with 512 KB runs
128 x 512 at D = 64, 128 x 256 at D = 96-128 and 128 x 128 at D = 256, an Intel Xeon with 2 MB 128 x 512 throughout. So that every
machine tests each shape, these cells run with the L2 forced small and large (ops._C.cpu_fwd_l2_force)."""
import pytest
import torch

import fastattn
from fastattn import ops
from support.cases import Case, run_case

pytestmark = pytest.mark.skipif(not ops.loaded(), reason="C++ extension not built")

# Sized L2 -> keys per tile at D = 64 / 96 / 128 / 256 (fwd_full_keys): 512 KB -> 512 / 256 / 256 / 128; 4 MB -> 512.
L2 = {"l2_512k": 1 << 19, "l2_4m": 1 << 22}
# Keys past one and two tiles of either width, partial last tiles, grouped-query heads, a float key-padding mask
# (unwindowed: its -inf edges only trail), Dv != D and strided inputs.
CASES = [Case("tiles_d128", B=1, Hq=2, Hkv=2, Sq=600, Sk=600, D=128),
         Case("tiles_d256_gqa", B=1, Hq=4, Hkv=2, Sq=300, Sk=700, D=256),
         Case("tiles_d64_kpad", B=2, Hq=2, Hkv=1, Sq=530, Sk=530, D=64, mask="float_kpad"),
         Case("tiles_d96_dv_noncontig", surface="flash", B=1, Hq=2, Hkv=2, Sq=260, Sk=1100, D=96, Dv=40,
              noncontig=True)]


@pytest.fixture(params=sorted(L2))
def l2(request):
    ops._C.cpu_fwd_l2_force(L2[request.param])
    try:
        yield request.param
    finally:
        ops._C.cpu_fwd_l2_force(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_tiles_on_each_l2_size(case, dtype, l2):
    bad = [m for ok, m in run_case("cpu", case, dtype, "cpu") if not ok]
    assert not bad, f"{l2}: " + " | ".join(bad)


def test_forced_l2_changes_the_tiles():
    """The switch takes effect: 256-key tiles round the fp32 online softmax differently from 512-key ones (a check
    that cannot tell the two shapes apart would pass with the switch ignored)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 600, 128, generator=g) for _ in range(3))
    outs = []
    for bytes_ in (L2["l2_512k"], L2["l2_4m"], L2["l2_512k"]):
        ops._C.cpu_fwd_l2_force(bytes_)
        try:
            outs.append(fastattn.scaled_dot_product_attention(q, k, v, backend="cpu"))
        finally:
            ops._C.cpu_fwd_l2_force(0)
    assert torch.equal(outs[0], outs[2]), "the same tiles gave different bits"
    assert not torch.equal(outs[0], outs[1]), "forcing the L2 size left the tiles as they were"
