"""Selection policies, one file each, all behind the contract in ``base.py``.

``build_policy("quest")`` or ``build_policy("critical(snapkv)")`` makes a policy from its name;
``critical(...)`` wraps any other policy.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from .base import Policy
from .critical import CriticalPolicy
from .dense import DensePolicy
from .h2o import H2OPolicy
from .oracle import OraclePolicy
from .quest import QuestPolicy
from .random import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tokenbutler import TokenButlerPolicy

# name -> class; each policy file adds its line here
POLICIES: dict[str, type[Policy]] = {
    "dense": DensePolicy,
    "streaming": StreamingPolicy,
    "oracle": OraclePolicy,
    "quest": QuestPolicy,
    "h2o": H2OPolicy,
    "snapkv": SnapKVPolicy,
    "random": RandomPolicy,
    "critical": CriticalPolicy,
    "tokenbutler": TokenButlerPolicy,
}

_WRAPPED = re.compile(r"^\s*([a-z0-9_]+)\s*\(\s*(.+?)\s*\)\s*$")


def available_policies() -> list[str]:
    """Every policy name, wrappers written with their argument (``critical(<base>)``)."""
    names = sorted(name for name, cls in POLICIES.items() if not getattr(cls, "wraps", False))
    wrappers = sorted(f"{name}(<base>)" for name, cls in POLICIES.items() if getattr(cls, "wraps", False))
    return names + wrappers


def build_policy(spec: str, **options) -> Policy:
    """A policy from its name; ``options`` go to the innermost policy's constructor."""
    match = _WRAPPED.match(spec)
    if match:
        wrapper = POLICIES.get(match.group(1))
        if wrapper is None or not getattr(wrapper, "wraps", False):
            raise ConfigError(f"{match.group(1)!r} does not wrap a policy; valid: {', '.join(available_policies())}.")
        base = build_policy(match.group(2), **options)
        if isinstance(base, DensePolicy):  # it keeps every token of every layer: nothing to re-weight
            raise ConfigError(f"{spec.strip()!r} attends every token, as dense does: {match.group(1)} re-weights a "
                              "sparse policy's scores; use --policy dense, or wrap a sparse policy, e.g. "
                              f"{match.group(1)}(tokenbutler).")
        return wrapper(base=base)
    cls = POLICIES.get(spec.strip())
    if cls is None or getattr(cls, "wraps", False):
        raise ConfigError(f"unknown policy {spec!r}; valid: {', '.join(available_policies())}.")
    return cls(**options)
