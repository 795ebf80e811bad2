"""Helpers the test modules share: the float64 oracle and the tolerance rule (oracle.py), the generated case matrix
(cases.py), the CUDA toolchain and SASS readers (toolchain.py). Test modules import from here, never from each
other."""
import torch


def torch_older_than(major: int, minor: int) -> bool:
    """The installed torch's release is below major.minor (for skips that name a torch version's own bug)."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) < (major, minor)
