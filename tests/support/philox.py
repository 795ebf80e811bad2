"""A pure-Python Philox4x32-10 (written from the algorithm in Salmon et al. 2011, validated on Random123's
known-answer vectors in tests/test_philox.py) and the dropout keep mask csrc/philox.h documents on top of it, with
the query/key positions of block coordinates (q_pos = q_start + i, k_pos = k_start + j)."""
import torch

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def philox4x32_10(ctr, key):
    """Philox4x32 with 10 rounds: counter (4 words), key (2 words) -> 4 words."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def philox_key(seed, offset):
    """splitmix64 of (seed, offset) -> (k0, k1), as in csrc/philox.h (int64 arguments wrap to uint64)."""
    z = (seed + 0x9E3779B97F4A7C15 * (offset + 1)) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z & M32, z >> 32


def keep_mask(seed, offset, p, n, h, sq, sk, q0=0, k0=0):
    """bool (sq, sk): kept elements of sequence n, query head h, whose first query/key sit at positions q0/k0."""
    key = philox_key(seed % (1 << 64), offset % (1 << 64))
    thr = int(float(torch.tensor(p, dtype=torch.float32)) * 2.0 ** 32)  # the kernels' float p
    m = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        draws = {}
        for j in range(sk):
            g = (k0 + j) >> 2
            if g not in draws:
                draws[g] = philox4x32_10((g, q0 + i, h, n), key)
            m[i, j] = draws[g][(k0 + j) & 3] >= thr
    return m


def keep_mask_at(seed, offset, p, n, h, q_pos, k_pos):
    """bool (len(q_pos), len(k_pos)): the kept elements of sequence n, query head h at these global positions (any
    positions, e.g. near 2**31 or not contiguous)."""
    key = philox_key(seed % (1 << 64), offset % (1 << 64))
    thr = int(float(torch.tensor(p, dtype=torch.float32)) * 2.0 ** 32)  # the kernels' float p
    draws = {}
    m = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    for a, qp in enumerate(q_pos):
        for b, kp in enumerate(k_pos):
            ctr = (kp >> 2, qp, h, n)
            if ctr not in draws:
                draws[ctr] = philox4x32_10(ctr, key)
            m[a, b] = draws[ctr][kp & 3] >= thr
    return m
