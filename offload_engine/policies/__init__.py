"""Selection policies, one file each, all behind the contract in ``base.py``.

``build_policy("quest")`` or ``build_policy("critical(snapkv)")`` makes a policy from its name;
``critical(...)`` wraps any one sparse policy (not dense, not another ``critical(...)``).
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
    wrapper, name = parse_policy_spec(spec)
    base = POLICIES[name](**options)
    return base if wrapper is None else POLICIES[wrapper](base=base)


def parse_policy_spec(spec: str) -> tuple[str | None, str]:
    """``spec`` -> (its wrapper or None, the policy it names): ``"quest"`` -> ``(None, "quest")``,
    ``"critical(quest)"`` -> ``("critical", "quest")``. Builds nothing (no predictor is loaded).

    Accepted: a policy, or a wrapper around one sparse policy. Refused: an unknown name, a wrapper alone, a
    policy that wraps nothing (``quest(h2o)``), a wrapper around dense (every token is kept: nothing to
    re-weight) or around a wrapper (``critical(critical(quest))``: critical weighs its base's scores by the
    tokens' value norms, and weighing them twice is not a policy).
    """
    match = _WRAPPED.match(spec)
    if match is None:
        name = spec.strip()
        cls = POLICIES.get(name)
        if cls is not None and getattr(cls, "wraps", False):
            raise ConfigError(f"{name!r} wraps a policy: write {name}(<base>) with <base> one of "
                              f"{', '.join(_sparse_policies())}.")
        if cls is None:
            raise ConfigError(f"unknown policy {spec!r}; valid: {', '.join(available_policies())}.")
        return None, name
    wrapper = match.group(1)
    if not getattr(POLICIES.get(wrapper), "wraps", False):
        raise ConfigError(f"{wrapper!r} does not wrap a policy; valid: {', '.join(available_policies())}.")
    inner = match.group(2)
    inner_head = inner.split("(")[0].strip()
    if getattr(POLICIES.get(inner_head), "wraps", False):
        raise ConfigError(f"{spec.strip()!r} wraps {inner_head} in {wrapper}: {wrapper} weighs one sparse policy's "
                          "scores by the tokens' value norms, and weighing them twice is not a policy. Wrap one "
                          f"base once: {wrapper}(<base>) with <base> one of {', '.join(_sparse_policies())}.")
    _, name = parse_policy_spec(inner)  # an unknown name, or a policy that wraps nothing, is refused there
    if issubclass(POLICIES[name], DensePolicy):  # it keeps every token of every layer: nothing to re-weight
        raise ConfigError(f"{spec.strip()!r} attends every token, as dense does: {wrapper} re-weights a "
                          "sparse policy's scores; use --policy dense, or wrap a sparse policy, e.g. "
                          f"{wrapper}(tokenbutler).")
    return wrapper, name


def _sparse_policies() -> list[str]:
    """The policies a wrapper may wrap: every one but dense and the wrappers."""
    return [name for name in available_policies() if "(" not in name and not issubclass(POLICIES[name], DensePolicy)]
