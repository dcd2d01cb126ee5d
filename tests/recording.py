"""Test helper: record whether each call of a method returned something."""

from __future__ import annotations


def record_results(monkeypatch, owner, name: str) -> list[bool]:
    """Wrap ``owner.name`` (a class's method) for the test: every call appends whether it returned
    something other than None (a kernel that ran, a fast path that took the step) to the list returned."""
    calls: list[bool] = []
    original = getattr(owner, name)

    def recorded(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(owner, name, recorded)
    return calls


def record_attended(engine, batched: bool = True) -> list[dict]:
    """Make ``engine``'s next backends record, per decode step and layer, each KV head's attended selected
    positions (sorted lists) into the list returned; ``batched=False`` selects layer by layer (the reference
    path)."""
    seen: list[dict] = []
    original = engine._new_backend

    def new_backend(*args):
        backend = original(*args)
        backend.planner.batched = batched
        decode = backend.decode_layer

        def recording(layer, position, *tensors):
            kv = decode(layer, position, *tensors)
            if layer == 0:
                seen.append({})
            bank = backend.working_set.bank_of[layer]
            active = bank.residency.active_positions(bank.rows([layer]))
            seen[-1][layer] = [sorted(row[row >= 0].tolist()) for row in active]
            return kv

        backend.decode_layer = recording
        return backend

    engine._new_backend = new_backend
    return seen
