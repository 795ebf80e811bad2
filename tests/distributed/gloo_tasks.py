"""Per-rank task functions of the tier-1 tests: run inside the gloo pool's worker processes (conftest.GlooPool),
every rank the same function; the test process compares the returned results."""
import torch

from tests.support.cp_cases import Case, run_cp_rank
from fastattn.distributed import CountingComm, CPConfig, TorchComm, cp_attention


def cp_case(case: Case):
    return run_cp_rank(TorchComm(), case)


def fp32_engine():
    """The worker's fp32 engine and the FASTATTN_CPU_FP32_GEMM it was started with."""
    import os

    from fastattn import ops
    return ops.cpu_matmul_report().get("fp32"), os.environ.get("FASTATTN_CPU_FP32_GEMM")


def comm_counts(case: Case):
    from tests.support.cp_cases import make_inputs
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


def compiled_vs_eager(strategy: str):
    """torch.compile(fullgraph=True) of a function calling cp_attention: one opaque custom op, same bits as eager."""
    import torch._dynamo
    torch._dynamo.reset()
    cp = CPConfig(TorchComm(), strategy=strategy, balance="zigzag")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, h, 8, generator=g).requires_grad_() for h in (4, 2, 2))

    def f(q, k, v):
        return cp_attention(q, k, v, cp=cp, causal=True, window_size=(5, -1)) * 2

    eager = f(q, k, v)
    eager.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    counts = {}
    compiled = torch.compile(f, fullgraph=True, backend=_counting_backend(counts))(q, k, v)
    compiled.sum().backward()
    same = torch.equal(eager, compiled) and all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))
    return same, counts


def _counting_backend(counts):
    from torch._dynamo.backends.common import aot_autograd

    def compiler(key):
        def count(gm, example_inputs):
            counts[key] = [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("fastattn.cp_")]
            return gm
        return count
    return aot_autograd(fw_compiler=compiler("fwd"), bw_compiler=compiler("bwd"))


def mesh_cp(case: Case):
    """CP over the "cp" dim of a 2-D (dp, cp) DeviceMesh: each cp group is a subgroup, so P2P peers must be mapped
    to global ranks. Returns (dp index, cp rank, this rank's results)."""
    from torch.distributed.device_mesh import init_device_mesh
    W = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (W // case.W, case.W), mesh_dim_names=("dp", "cp"))
    comm = TorchComm.from_mesh(mesh, "cp")
    return mesh.get_local_rank("dp"), comm.rank, run_cp_rank(comm, case)


def hf_gpt2_cp(config_kwargs: dict, state_dict: dict, ids, balance: str):
    """attn_implementation="fastattn_cp" on a real process group: this rank's logits and loss (cp_cross_entropy) and
    its parameter gradients (summed over ranks by the test)."""
    import transformers
    import fastattn.integrations.transformers  # noqa: F401  (registers fastattn_cp)
    from fastattn.distributed import context_parallel, cp_cross_entropy, shard_batch
    model = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**config_kwargs),
                                                      attn_implementation="fastattn_cp")
    model.load_state_dict(state_dict)
    cp = CPConfig(TorchComm(), strategy="ring", balance=balance)
    local = shard_batch({"input_ids": ids, "labels": ids}, cp, shift_labels=True)
    with context_parallel(cp):
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    loss = cp_cross_entropy(logits, local["labels"], cp)
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}



def bert_classifier_cp(cfg_kwargs: dict, state_dict: dict, ids, mask, labels, balance: str):
    """fastattn.models.BertForSequenceClassification on a real process group (test_cp_bert_pooler.py): every rank's
    logits and its parameter gradients of cp_replicated_loss(cross entropy) (summed over ranks by the test)."""
    import torch.nn.functional as F
    from fastattn.distributed import shard_batch
    from fastattn.distributed.loss import cp_replicated_loss
    from fastattn.models import BertForSequenceClassification
    from fastattn.models.bert import BertConfig
    model = BertForSequenceClassification(BertConfig(**cfg_kwargs))
    model.load_state_dict(state_dict)
    cp = CPConfig(TorchComm(), strategy="ring", balance=balance)
    local = shard_batch({"input_ids": ids, "attention_mask": mask}, cp)
    logits = model(local["input_ids"], local["attention_mask"], position_ids=local["position_ids"], cp=cp)
    cp_replicated_loss(F.cross_entropy(logits, labels), cp).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

# --- packed varlen documents (test_cp_varlen.py) ------------------------------------------------------------------

def varlen_case(case, rng=None, dropout_p: float = 0.0, plant: str = ""):
    """This rank's (out, lse, dq, dk, dv) of the packed-documents case, with dropout when dropout_p > 0 (rng: the
    (seed, offset) every rank passes). plant="no_head_start": Ulysses block calls without this rank's head offset
    (test_varlen_dropout_gloo.py's planted bug), restored after the call (the pool's workers live on)."""
    from tests.support.cp_cases import run_varlen_rank
    from fastattn.distributed import varlen_ulysses as VU
    real = VU._head_kw
    if plant == "no_head_start":
        VU._head_kw = lambda spec, h: dict(real(spec, h), head_start=0)
    elif plant:
        raise ValueError(f"varlen_case: unknown plant {plant!r}")
    try:
        return run_varlen_rank(TorchComm(), case, rng=rng, dropout_p=dropout_p)
    finally:
        VU._head_kw = real


def varlen_bad_rank(check: bool):
    """Rank 1 holds more tokens than cu_seqlens says. With check_shapes every rank raises at once (returns the
    messages); without, rank 1 raises and rank 0's ring hop fails on the process-group timeout (not run here)."""
    from fastattn.distributed import cp_varlen_attention
    comm = TorchComm()
    q = torch.randn(8 + 4 * comm.rank, 2, 8)
    try:
        cp_varlen_attention(q, q, q, torch.tensor([0, 8, 16], dtype=torch.int32),
                            cp=CPConfig(comm, strategy="ring", check_shapes=check))
    except ValueError as e:
        return str(e)
    return None


def varlen_compiled_vs_eager(api: str):
    """torch.compile(fullgraph=True) of cp_varlen_attention / llama3 on a real process group: one opaque op, same
    bits as eager."""
    import torch._dynamo
    from fastattn.distributed import cp_varlen_attention, llama3_flash_attn_prepare_cu_seqlens
    from fastattn.distributed import llama3_flash_attn_varlen_func, shard_varlen
    torch._dynamo.reset()
    comm = TorchComm()
    W, r = comm.world_size, comm.rank
    cu = torch.tensor([0, 12, 40, 48], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(48, h, 8, generator=g) for h in (4, 2, 2)]
    if api == "cp":
        cp = CPConfig(comm, strategy="ring", balance="zigzag")
        q, k, v = (shard_varlen(t, cu, 0, W, r, "zigzag").requires_grad_() for t in full)

        def f(q, k, v):
            return cp_varlen_attention(q, k, v, cu, cp=cp, causal=True, window_size=(5, -1)) * 2
    else:
        args = llama3_flash_attn_prepare_cu_seqlens(cu, True, r, W)
        q, k, v = (t[r * 48 // W:(r + 1) * 48 // W].clone().requires_grad_() for t in full)

        def f(q, k, v):
            return llama3_flash_attn_varlen_func(q, k, v, *args[:4], 1, args[4], causal=True, group=comm) * 2
    eager = f(q, k, v)
    eager.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    counts = {}
    compiled = torch.compile(f, fullgraph=True, backend=_counting_backend(counts))(q, k, v)
    compiled.sum().backward()
    same = torch.equal(eager, compiled) and all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))
    return same, counts


# --- the hybrid strategy (test_cp_hybrid.py) and FSDP2 (test_cp_fsdp.py) -----------------------------------------

def hybrid_mesh_case(case, how: str):
    """The hybrid strategy on a 2-D DeviceMesh with dims ("ring", "ulysses"): CPConfig(group=mesh) (how="mesh") or
    CPConfig(ulysses_group=mesh["ulysses"], ring_group=mesh["ring"]) (how="groups"); each dim's group wrapped in a
    CountingComm. Returns (flattened CP rank, (Ulysses calls, ring calls) of forward + backward, the rank's results)."""
    from torch.distributed.device_mesh import init_device_mesh
    from fastattn.distributed import HybridComm
    mesh = init_device_mesh("cpu", (case.R, case.U), mesh_dim_names=("ring", "ulysses"))
    cp = (CPConfig(group=mesh, strategy="hybrid") if how == "mesh" else
          CPConfig(ulysses_group=mesh["ulysses"], ring_group=mesh["ring"]))
    comm = HybridComm(CountingComm(cp.comm.ulysses), CountingComm(cp.comm.ring))
    res = run_cp_rank(comm, case)
    return cp.rank, (comm.ulysses.calls, comm.ring.calls), res


def fsdp_gpt2_cp(config_kwargs: dict, state_dict: dict, ids, grad_average_world: bool):
    """The reference GPT-2 under FSDP2 (fully_shard per block and at the root) on the flattened ("dp", "cp") mesh of
    4 processes (dp2 x cp2), ring CP attention over "cp". Each dp rank reads its half of the batch (its cp ranks the
    same rows), shards it, and trains one step's backward with cp_cross_entropy; grad_average_world=False omits the
    factor that undoes FSDP's average over the cp ranks (the planted bug). Returns (dp index, cp rank, this rank's
    logits, the dp group's logged loss, every parameter's full gradient)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from fastattn.distributed import cp_cross_entropy, global_loss, shard_batch
    from fastattn.models import GPT2, GPT2Config
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp_cp = mesh["dp", "cp"]._flatten("dp_cp")  # parameters sharded over dp x cp, gradients averaged over it
    cp = CPConfig(group=mesh["cp"], strategy="ring")
    model = GPT2(GPT2Config(**config_kwargs))
    model.load_state_dict(state_dict)
    for block in model.transformer.h:
        fully_shard(block, mesh=dp_cp)
    fully_shard(model, mesh=dp_cp)
    d = mesh.get_local_rank("dp")
    rows = ids.chunk(2)[d]  # (B/2, S): this dp group's sequences
    local = shard_batch({"input_ids": rows, "labels": rows}, cp, shift_labels=True)
    logits = model(local["input_ids"], position_ids=local["position_ids"], cp=cp)
    avg = cp.world_size if grad_average_world else 1
    loss = cp_cross_entropy(logits, local["labels"], cp, grad_average_world=avg)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # all-gathers the FSDP shards
    return d, cp.rank, logits.detach(), global_loss(loss, cp, grad_average_world=avg), grads


# --- DTensor inputs and the FastattnContextParallel ParallelStyle (test_cp_dtensor.py) ----------------------------

def _cp_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("cp",))


def dtensor_case(case: Case, how: str, plant: str = "", submesh: bool = False):
    """cp_attention on DTensors q, k, v placed Shard(seq) on a 1-D "cp" mesh, forward + backward. how: "auto"
    (cp=None: contiguous, strategy chosen), "contiguous" (a ring CPConfig over the mesh, balance="contiguous"),
    "zigzag" (balance="zigzag", the DTensors made from the head-tail permuted sequence of torch's
    _HeadTailLoadBalancer). plant: "zigzag_config" (a zigzag config on naturally ordered DTensors), "lse_placement"
    (lse wrapped Shard(1) instead of Shard(2)). submesh: the "cp" dim of a (dp, cp) mesh of all the processes.
    Returns (placements of out, lse, q.grad, k.grad, v.grad and of out without return_lse, as strings, the global
    tensors (out, lse, dq, dk, dv) in the DTensors' token order, BSHD / (B, H, S), and whether out without
    return_lse has the same bits)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    import fastattn.distributed.dtensor as fd
    from tests.support.cp_cases import from_layout, make_inputs, to_layout
    if submesh:
        from torch.distributed.device_mesh import init_device_mesh
        W = torch.distributed.get_world_size()
        mesh = init_device_mesh("cpu", (W // case.W, case.W), mesh_dim_names=("dp", "cp"))["cp"]
    else:
        mesh = _cp_mesh()
    sd = 1 if case.layout == "bshd" else 2
    q, k, v, dout, _ = make_inputs(case)
    if how == "zigzag":  # torch's head-tail order: what _context_parallel_shard(load_balancer=...) leaves
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
        idx = _HeadTailLoadBalancer(case.S, case.W, "cpu")._generate_indices()[0].long()  # (S,)
        q, k, v, dout = (t.index_select(1, idx) for t in (q, k, v, dout))
    q, k, v, dout = (distribute_tensor(to_layout(t.to(case.dtype), case.layout), mesh, [Shard(sd)])
                     for t in (q, k, v, dout))
    for t in (q, k, v):
        t.requires_grad_()
    cp = None if how == "auto" else CPConfig(group=mesh, strategy="ring", balance=case.balance)
    if plant == "zigzag_config":
        cp = CPConfig(group=mesh, strategy="ring", balance="zigzag")
    if plant == "lse_placement":
        real = fd.local_map
        fd.local_map = lambda f, out_placements, **kw: real(f, out_placements=(out_placements[0], (Shard(1),)), **kw)
    try:
        out, lse = cp_attention(q, k, v, cp=cp, causal=case.causal, return_lse=True, layout=case.layout)
    finally:
        if plant == "lse_placement":
            fd.local_map = real
    with torch.no_grad():
        alone = cp_attention(q, k, v, cp=cp, causal=case.causal, layout=case.layout)  # the default return_lse=False
    out.backward(dout)
    res = (out, lse, q.grad, k.grad, v.grad, alone)
    placements = [str(tuple(x.placements)) if hasattr(x, "placements") else type(x).__name__ for x in res]
    full = [x.full_tensor().detach() for x in res[:5]]  # every rank gets the whole tensors
    same = isinstance(alone, type(out)) and torch.equal(alone.to_local(), out.to_local())
    return placements, [from_layout(x, case.layout) if x.dim() == 4 else x for x in full], same


def dtensor_errors():
    """The clear errors of DTensor inputs on a 2-process "cp" mesh: {what: message or None}."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from fastattn.distributed import FastattnContextParallel, LocalComm
    mesh = _cp_mesh()
    x = torch.randn(1, 8, 2, 8)
    got = {}

    def err(what, fn):
        try:
            fn()
            got[what] = None
        except (ValueError, TypeError) as e:
            got[what] = str(e)
    rep = distribute_tensor(x, mesh, [Replicate()])
    sh = distribute_tensor(x, mesh, [Shard(1)])
    err("replicate", lambda: cp_attention(rep, rep, rep))
    err("wrong_seq_dim", lambda: cp_attention(sh, sh, sh, layout="bhsd"))
    err("mixed", lambda: cp_attention(sh, sh.to_local(), sh))
    odd = distribute_tensor(torch.randn(1, 6, 2, 8), mesh, [Shard(1)])  # 6 tokens: zigzag needs 2W = 4 | S
    err("zigzag_length", lambda: cp_attention(odd, odd, odd, cp=CPConfig(group=mesh, balance="zigzag")))
    other = CPConfig(LocalComm.world(1)[0])  # a 1-rank communicator: not the mesh's
    err("other_comm", lambda: cp_attention(sh, sh, sh, cp=other))
    err("local_without_cp", lambda: cp_attention(x, x, x))
    from fastattn.distributed import active_cp

    class Probe(torch.nn.Module):  # returns its input and records the config active in its forward
        def forward(self, x):
            self.seen = active_cp()
            if x.dim() == 1:
                raise ValueError("Probe: a failing forward")
            return x
    module = Probe()
    torch.distributed.tensor.parallel.parallelize_module(module, mesh, FastattnContextParallel(seq_dim=1))
    err("style_replicate", lambda: module(rep))
    err("forward_raises", lambda: module(torch.zeros(3)))
    # the failed calls left no active config behind (a bool: a CPConfig does not pickle back to the test)
    got["after_error"] = active_cp() is None
    y = module(sh)  # use_local_output=True (the default): this rank's shard, a plain tensor
    got["local_output"] = (type(y).__name__, torch.equal(y, sh.to_local()))
    got["inside"] = (module.seen.world_size, module.seen.balance) if module.seen is not None else None
    got["after"] = active_cp() is None
    return got


def dtensor_mesh_mismatch():
    """4 processes, a (dp 2, cp 2) mesh: DTensors on mesh["cp"] with a CPConfig over mesh["dp"] (same size, other
    ranks), and DTensors on the 2-D mesh. Returns the two messages (None where no error)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    x = torch.randn(1, 8, 2, 8)
    got = []
    for fn in (lambda: (lambda t: cp_attention(t, t, t, cp=CPConfig(group=mesh["dp"])))(
                   distribute_tensor(x, mesh["cp"], [Shard(1)])),
               lambda: (lambda t: cp_attention(t, t, t))(distribute_tensor(x, mesh, [Replicate(), Shard(1)]))):
        try:
            fn()
            got.append(None)
        except ValueError as e:
            got.append(str(e))
    return got


def dtensor_style_gpt2(config_kwargs: dict, state_dict: dict, ids, dlogits, balance: str, plant: str = ""):
    """The reference GPT-2 under parallelize_module(model, mesh, FastattnContextParallel(cp, use_local_output=False))
    on a 1-D "cp" mesh: ids a DTensor Shard(1) (head-tail permuted for balance="zigzag", natural order with cp=None
    for "contiguous"), forward + backward with dlogits. plant="no_context": the style's context_parallel replaced by
    a no-op (attention over each rank's shard only). Returns (logits placements, the logits' global tensor in the
    DTensor's token order, every parameter's gradient summed over the ranks)."""
    import contextlib
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    import fastattn.distributed.dtensor as fd
    from fastattn.distributed import FastattnContextParallel
    from fastattn.models import GPT2, GPT2Config
    mesh = _cp_mesh()
    model = GPT2(GPT2Config(**config_kwargs))
    model.load_state_dict(state_dict)
    cp = None if balance == "contiguous" else CPConfig(group=mesh, strategy="ring", balance=balance)
    real = fd.context_parallel
    if plant == "no_context":
        fd.context_parallel = lambda cp: contextlib.nullcontext()
    try:
        parallelize_module(model, mesh, FastattnContextParallel(cp, use_local_output=False))
        logits = model(distribute_tensor(ids, mesh, [Shard(1)]))
    finally:
        fd.context_parallel = real
    logits.backward(distribute_tensor(dlogits, mesh, [Shard(1)]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        torch.distributed.all_reduce(g)  # each rank's tokens' share: the full gradient is the sum
    return str(tuple(logits.placements)), logits.full_tensor().detach(), grads


def dtensor_mask_alibi():
    """key_padding_mask (a bool DTensor Shard(1), or this rank's local shard) and alibi_slopes (a Replicate DTensor)
    through the DTensor path: (same bits as the local-tensor call with the same config, for the DTensor mask and the
    local mask; whether the mask changed the output)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _cp_mesh()
    cp = CPConfig(group=mesh, strategy="ring", balance="contiguous")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 16, generator=g) > 0.3
    slopes = torch.rand(4, generator=g)
    qd, kd, vd = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q, k, v))
    md, sd = distribute_tensor(mask, mesh, [Shard(1)]), distribute_tensor(slopes, mesh, [Replicate()])
    kw = dict(cp=cp, causal=True)
    want = cp_attention(qd.to_local(), kd.to_local(), vd.to_local(), key_padding_mask=md.to_local(),
                        alibi_slopes=slopes, **kw)
    got = cp_attention(qd, kd, vd, key_padding_mask=md, alibi_slopes=sd, **kw).to_local()
    got_local_mask = cp_attention(qd, kd, vd, key_padding_mask=md.to_local(), alibi_slopes=slopes, **kw).to_local()
    unmasked = cp_attention(qd, kd, vd, alibi_slopes=sd, **kw).to_local()
    return torch.equal(got, want), torch.equal(got_local_mask, want), not torch.equal(unmasked, want)
