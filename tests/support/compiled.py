"""torch.compile(fullgraph=True) through aot_autograd with the custom ops of each graph recorded: the CP tests check
that the whole context-parallel attention is one opaque op in the forward graph and one in the backward graph."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd


def compile_counting_ops(f: Callable, prefix: str = "fastattn.", dynamic: Optional[bool] = None
                         ) -> Tuple[Callable, Dict[str, List[str]]]:
    """(f compiled, seen): after a forward and a backward, seen["fwd"] / seen["bwd"] list the targets of the graphs'
    nodes whose name starts with prefix, in graph order."""
    seen: Dict[str, List[str]] = {}

    def compiler(key):
        def keep(gm, example_inputs):
            seen[key] = [str(n.target) for n in gm.graph.nodes if str(n.target).startswith(prefix)]
            return make_boxed_func(gm)
        return keep
    backend = aot_autograd(fw_compiler=compiler("fwd"), bw_compiler=compiler("bwd"))
    return torch.compile(f, fullgraph=True, dynamic=dynamic, backend=backend), seen


def eager_and_compiled(f: Callable, inputs: Tuple[torch.Tensor, ...], dout: torch.Tensor, **kw):
    """f run eagerly, then through compile_counting_ops(f, **kw), each followed by backward(dout) into the inputs
    (leaves that require grad). -> (eager out, eager grads, compiled out, compiled grads, seen)."""
    eager = f(*inputs)
    eager.backward(dout)
    grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    fn, seen = compile_counting_ops(f, **kw)
    compiled = fn(*inputs)
    compiled.backward(dout)
    return eager, grads, compiled, [t.grad for t in inputs], seen
