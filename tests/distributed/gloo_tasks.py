"""Per-rank task functions of the tier-1 tests: run inside the gloo pool's worker processes (conftest.GlooPool),
every rank the same function; the test process compares the returned results."""
import torch

from cp_cases import Case, run_cp_rank
from fastattn.distributed import CountingComm, CPConfig, TorchComm, cp_attention


def cp_case(case: Case):
    return run_cp_rank(TorchComm(), case)


def comm_counts(case: Case):
    from cp_cases import make_inputs
    comm = CountingComm(TorchComm())
    q, k, v, dout, _ = make_inputs(case)
    cp = CPConfig(comm, strategy=case.strategy, balance=case.balance)
    ql, kl, vl = (cp.shard(t, 1).requires_grad_() for t in (q, k, v))
    out = cp_attention(ql, kl, vl, cp=cp, causal=case.causal)
    fwd = dict(comm.calls)
    comm.reset()
    out.backward(cp.shard(dout, 1))
    return fwd, dict(comm.calls)


def shape_mismatch(check: bool):
    """Rank 1 passes a longer shard. With check_shapes every rank raises the same clear error."""
    comm = TorchComm()
    cp = CPConfig(comm, strategy="ring", check_shapes=check)
    S = 4 + 2 * (comm.rank == 1)
    q = torch.randn(1, S, 2, 8)
    try:
        cp_attention(q, q, q, cp=cp)
    except ValueError as e:
        return str(e)
    return None


def train_example(steps: int):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "context_parallel.py")
    spec = importlib.util.spec_from_file_location("cp_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.train(TorchComm(), steps=steps, reference=torch.distributed.get_rank() == 0)
