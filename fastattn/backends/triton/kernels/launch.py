"""What op.py and decode.py share about Triton itself: whether the interpreter runs the kernels, how an op is
registered, and how a kernel is handed to Triton (`launcher(kernel)[grid](*args)`).

Registration: a `torch.library.triton_op` on GPUs, so torch.compile traces into the launcher; under
TRITON_INTERPRET=1 the kernels are Python objects that fake tensors cannot run, so an opaque `custom_op` (the
modules give it a fake function).

Launching: while torch.compile traces a triton_op, the launch must go through `torch.library.wrap_triton` so that
inductor sees the kernel. Called eagerly, a triton_op switches that wrapping off and the wrapper only calls
`kernel[grid]` itself, after its own bookkeeping: per launch ~8 us for a jit function and ~65 us for an Autotuner (it
re-reads Autotuner.__init__'s signature; torch 2.11, measured on CPU), which every eager prefill paid once per
kernel. So the wrapper is taken only when torch would use it. Under the interpreter: no wrapper."""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def define(name: str, mutates=()):
    """The decorator that registers a launcher as the torch op `name` (see above)."""
    register = torch.library.custom_op if INTERPRET else torch.library.triton_op
    return register(name, mutates_args=mutates)


if INTERPRET:
    def launcher(kernel):
        return kernel
else:
    from torch.library import wrap_triton

    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # a torch without the switch: always the wrapper, as before
        def is_wrap_triton_enabled() -> bool:
            return True

    def launcher(kernel):
        return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel
