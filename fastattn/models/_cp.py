"""Context parallelism for the reference models when this torch has it: fastattn.distributed builds on
torch.distributed, which a torch build may lack. fastattn.distributed itself imports on such a build (simulated ranks
only); should it not import at all, the models still import and run without context parallelism."""
try:
    from ..distributed import active_cp, cp_attention
except ImportError as _e:
    _WHY = f"{type(_e).__name__}: {_e}"

    def active_cp():
        return None  # no context_parallel block can be active: it lives in fastattn.distributed

    def cp_attention(*args, **kwargs):
        raise RuntimeError(f"fastattn.models: context parallelism (cp=) needs fastattn.distributed, which cannot be "
                           f"imported with this torch ({_WHY})")

__all__ = ["active_cp", "cp_attention"]
