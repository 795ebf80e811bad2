"""A pure-Python Philox4x32-10 dropout mask keyed on global positions, as csrc/philox.h defines it for block calls
(q_start/k_start): element (n, h, q_pos, k_pos) draws counter (k_pos >> 2, q_pos, h, n) with the key
splitmix64(seed, offset) and is kept iff draw[k_pos & 3] >= threshold(p). Independent of the kernels (the same
algorithm as tests/test_philox.py, which checks it against Random123's known answers); tiny shapes only."""
import torch

M32, M64 = (1 << 32) - 1, (1 << 64) - 1


def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def philox_key(seed, offset):
    z = (seed % (1 << 64) + 0x9E3779B97F4A7C15 * (offset % (1 << 64) + 1)) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z & M32, z >> 32


def keep_mask_at(seed, offset, p, n, h, q_pos, k_pos):
    """bool (len(q_pos), len(k_pos)): the kept elements of sequence n, query head h at these global positions."""
    key = philox_key(seed, offset)
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
