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
