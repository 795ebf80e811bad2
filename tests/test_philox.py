"""The dropout keep mask is Philox4x32-10 exactly as csrc/philox.h documents it, checked against an independent
pure-Python Philox (written from the algorithm in Salmon et al. 2011, validated on Random123's known-answer
vectors). CPU and CUDA share that generator, so this pins both: tests/test_cuda_gpu.py compares the CUDA mask
with the CPU one on a GPU."""
import pytest
import torch

import fastattn  # noqa: F401  (registers torch.ops.fastattn)
from fastattn import ops

from support.philox import M32, keep_mask, philox4x32_10


def test_python_philox_known_answers():
    # Random123 kat_vectors, philox4x32_10: (counter, key) -> output.
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        assert philox4x32_10(ctr, key) == want


def cpu_mask(q, k, p, seed, offset, cu=None, max_s=(0, 0)):
    """The CPU kernel's keep mask, read off out = dropout(P) @ I (every P > 0 here)."""
    sk = k.shape[2]
    v = torch.eye(sk).expand(k.shape[0], k.shape[1], sk, sk).contiguous()
    out, _ = torch.ops.fastattn.fwd(q, k, v, None, cu, cu, max_s[0], max_s[1], q.shape[-1] ** -0.5, -1, -1, False,
                                    0.0, None, p, seed, offset, False)
    return out != 0


needs_cpp = pytest.mark.skipif(not ops.loaded(), reason=f"C++ extension not loaded ({ops.LOAD_ERROR})")


@needs_cpp
@pytest.mark.parametrize("seed,offset,p", [(0, 0, 0.3), (2**62 - 7, 12345, 0.5), (-3, -1, 0.1)])
def test_cpu_mask_is_the_documented_philox(seed, offset, p):
    torch.manual_seed(0)
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 7, 37  # GQA: the counter uses the query head; Sk not a multiple of 4
    q, k = torch.randn(B, Hq, Sq, 16), torch.randn(B, Hkv, Sk, 16)
    got = cpu_mask(q, k, p, seed, offset)
    for n in range(B):
        for h in range(Hq):
            want = keep_mask(seed, offset, p, n, h, Sq, Sk)
            assert torch.equal(got[n, h], want), f"mask differs at n={n} h={h}: {(got[n, h] != want).sum()} elements"


@needs_cpp
def test_cpu_mask_varlen_counts_sequences_and_local_rows():
    # Varlen: n is the sequence index and (i, j) are positions within the sequence, not packed rows.
    torch.manual_seed(1)
    seq = [(5, 9), (3, 3), (6, 11)]
    cu_q = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 23], dtype=torch.int32)
    assert cu_q.tolist()[-1] == sum(s for s, _ in seq) and cu_k.tolist()[-1] == sum(s for _, s in seq)
    H = 2
    q, k = torch.randn(1, H, 14, 8), torch.randn(1, H, 23, 8)
    v = torch.eye(23).expand(1, H, 23, 23).contiguous()  # key row r -> column r
    out, _ = torch.ops.fastattn.fwd(q, k, v, None, cu_q, cu_k, 6, 11, 8 ** -0.5, -1, -1, False, 0.0, None, 0.4,
                                    99, 7, False)
    for n, (sq, sk) in enumerate(seq):
        q0, k0 = cu_q[n].item(), cu_k[n].item()
        for h in range(H):
            got = out[0, h, q0:q0 + sq, k0:k0 + sk] != 0
            assert torch.equal(got, keep_mask(99, 7, 0.4, n, h, sq, sk)), f"sequence {n} head {h}"
