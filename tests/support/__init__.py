"""Helpers the test modules share: the float64 oracle and the tolerance rule (oracle.py), the generated case matrix
(cases.py), the CUDA toolchain and SASS readers (toolchain.py). Test modules import from here, never from each
other."""
import contextlib
import math

import torch


def torch_older_than(major: int, minor: int) -> bool:
    """The installed torch's release is below major.minor (for skips that name a torch version's own bug)."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) < (major, minor)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on n threads inside the block (auto's rules for inference steps differ on one thread and on more)."""
    was = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


def fwd_args(q, k, v, bias=None, wl=-1, wr=-1, br=False, softcap=0.0, alibi=None, dropout_p=0.0, seed=0, off=0):
    """torch.ops.fastattn.fwd's arguments for a dense call on q, k, v (B, H, S, D) at scale 1/sqrt(D)."""
    return (q, k, v, bias, None, None, 0, 0, 1.0 / math.sqrt(q.shape[-1]), wl, wr, br, softcap, alibi, dropout_p,
            seed, off, False)
