"""How op.py and decode.py hand a kernel to Triton: `launcher(kernel)[grid](*args)`.

While torch.compile traces a triton_op, the launch must go through `torch.library.wrap_triton` so that inductor sees
the kernel. Called eagerly, a triton_op switches that wrapping off and the wrapper only calls `kernel[grid]` itself,
after its own bookkeeping: per launch ~8 us for a jit function and ~65 us for an Autotuner (it re-reads
Autotuner.__init__'s signature; torch 2.11, measured on CPU), which every eager prefill paid once per kernel. So the
wrapper is taken only when torch would use it. Under TRITON_INTERPRET=1 the ops are plain custom ops: no wrapper."""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
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
