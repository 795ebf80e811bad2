"""fastattn's Triton kernels: forward (fwd.py), backward preprocess / dK-dV / dQ (bwd_*.py), shared jit helpers
(common.py), block-size configs (configs.py), the launchers + torch op registration (op.py; decode.py for
split-KV decode) and what both share about Triton: the interpreter switch, op registration, launching (launch.py).
Importing this package imports triton and registers torch.ops.fastattn.triton_fwd / triton_bwd / triton_bwd_acc."""
from .op import launch_bwd, launch_fwd, triton_bwd, triton_bwd_acc, triton_fwd  # noqa: F401
