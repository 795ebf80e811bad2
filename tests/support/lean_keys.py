"""The lean paths' key checks (tests/test_lean.py, tests/test_lean_cache.py): two calls whose keys differ in one
field keep their own outcomes whichever runs first, and blanking any one key field lets some pair mix them up."""
import torch

from fastattn import dispatch


def key_mismatches(pairs, outcome, same):
    """The fields of (field, call a, call b) pairs where a call run after the other did not give its cold outcome
    (outcome(call) runs one call; same(x, y) compares two outcomes)."""
    def cold(call):
        dispatch._CHOICES.clear()
        return outcome(call)
    bad = []
    with torch.no_grad():
        for field, a, b in pairs:
            cold_a, cold_b = cold(a), cold(b)
            assert not same(cold_a, cold_b), f"pair {field!r} does not change the outcome"
            for first, then, want in ((a, b, cold_b), (b, a, cold_a)):
                dispatch._CHOICES.clear()
                outcome(first)
                if not same(outcome(then), want):
                    bad.append(field)
    return bad


def unnoticed_fields(monkeypatch, module, name: str, n: int, first: int, mismatches):
    """The fields first..n-1 of the key function module.name that, blanked in turn (planted), no pair notices
    (mismatches() returns the pairs that noticed)."""
    real = getattr(module, name)
    missed = []
    for i in range(first, n):
        def planted(*a, i=i):
            k = real(*a)
            return None if k is None else k[:i] + ("?",) + k[i + 1:]
        monkeypatch.setattr(module, name, planted)
        if not mismatches():
            missed.append(i)
    monkeypatch.setattr(module, name, real)
    return missed
