"""What the CUDA tests share: whether a gather method can run on this machine."""

from __future__ import annotations

import functools

import pytest

from offload_engine.cpu_cache.gather import WRONG_VALUES, available_gather_methods, self_check_failure


@functools.lru_cache(maxsize=None)
def _cannot_run(method: str) -> str | None:
    """Why ``method`` cannot run here, or None: its library is missing, or its self-check raised (a cupy
    wheel for another CUDA than the driver's, no NVRTC, ...). A self-check that ran and got wrong values
    is no reason: that is a bug, which the tests must show."""
    if method not in available_gather_methods("cuda"):
        return "needs a library this machine lacks"
    reason = self_check_failure(method, "cuda")
    if reason is None or reason == WRONG_VALUES:
        return None
    return f"imports but cannot run here ({reason})"


def require_gather_method(method: str) -> None:
    """Skip the calling test, with the reason, where ``method`` cannot run on this machine."""
    reason = _cannot_run(method)
    if reason is not None:
        pytest.skip(f"gather method {method!r} {reason}")
