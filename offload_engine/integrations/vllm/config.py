"""``TBRUN_VLLM``: the one environment variable that turns tbrun's selection on inside vLLM.

Pure parsing, no vLLM import, so it is tested everywhere. Grammar: comma-separated ``key=value``
pairs, for example ``policy=tokenbutler,budget=10%`` or
``policy=critical(quest),budget=2048,interval=4``. Keys: ``policy`` (required), ``budget``
(tokens or a percentage; omitted = every token), ``sinks``, ``window``, ``interval``,
``predictor`` (a TokenButler checkpoint directory; default: the one shipped for the model).
Unset or empty: the plugin does nothing and vLLM runs untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ...config import DEFAULT_WINDOW, Budget, SelectionConfig
from ...errors import ConfigError

ENV_VAR = "TBRUN_VLLM"

# Policies the plugin runs over vLLM's paged KV. The others need the attention weights of every
# step (h2o, snapkv), read the full KV as an oracle (oracle) or mean nothing (random).
SUPPORTED_BASES = ("dense", "streaming", "quest", "tokenbutler")
SUPPORTED_WRAPPERS = ("critical",)
KEYS = ("policy", "budget", "sinks", "window", "interval", "predictor")
_WRAPPED = re.compile(r"^([a-z0-9_]+)\(([a-z0-9_]+)\)$")


@dataclass(frozen=True, slots=True)
class VllmPluginConfig:
    """What ``TBRUN_VLLM`` asked for, validated at construction.

    ``base`` is the scoring policy (``quest``), ``critical`` whether CriticalKV re-weights it.
    """

    base: str
    critical: bool = False
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    predictor: str | None = None

    def __post_init__(self) -> None:
        if self.base not in SUPPORTED_BASES:
            raise ConfigError(
                f"{ENV_VAR}: policy {self.policy!r} is not supported in vLLM; use one of "
                f"{', '.join(supported_policies())}."
            )
        if self.predictor is not None and self.base != "tokenbutler":
            raise ConfigError(f"{ENV_VAR}: predictor= is only used by policy=tokenbutler, not {self.policy!r}.")
        if self.predictor is not None and not Path(self.predictor).expanduser().is_dir():
            raise ConfigError(f"{ENV_VAR}: predictor={self.predictor!r} is not a directory (a `tbrun train-predictor` checkpoint).")
        if self.selection.interval > 1 and self.base != "tokenbutler":
            raise ConfigError(f"{ENV_VAR}: interval= applies to the predictive policy tokenbutler only, not {self.policy!r}.")

    @property
    def policy(self) -> str:
        return f"critical({self.base})" if self.critical else self.base

    @property
    def needs_hidden_states(self) -> bool:
        """TokenButler's producers read each layer's attention input (not visible inside attention)."""
        return self.base == "tokenbutler"

    def describe(self) -> str:
        budget = self.selection.budget or "all"
        text = f"policy={self.policy} budget={budget} sinks={self.selection.sinks} window={self.selection.window}"
        if self.selection.interval > 1:
            text += f" interval={self.selection.interval}"
        return text + (f" predictor={self.predictor}" if self.predictor else "")


def supported_policies() -> list[str]:
    return list(SUPPORTED_BASES) + [f"{w}({b})" for w in SUPPORTED_WRAPPERS for b in SUPPORTED_BASES if b != "dense"]


def parse_config(text: str | None) -> VllmPluginConfig | None:
    """``TBRUN_VLLM``'s value -> a validated config, or None when unset/empty (plugin off).

    Raises ``ConfigError`` with one message naming the bad part and what to write instead.
    """
    if text is None or not text.strip():
        return None
    pairs = _pairs(text)
    if "policy" not in pairs:
        raise ConfigError(f"{ENV_VAR}={text!r} names no policy: write for example policy=tokenbutler,budget=10%.")
    base, critical = _policy(pairs["policy"])
    try:
        selection = _selection(pairs)
    except ConfigError as exc:  # the shared checks speak of --options; say where the value came from
        raise ConfigError(f"{ENV_VAR}: {str(exc).replace('--', '')}") from None
    return VllmPluginConfig(base=base, critical=critical, selection=selection, predictor=pairs.get("predictor"))


def _selection(pairs: dict[str, str]) -> SelectionConfig:
    return SelectionConfig(
        policy=pairs["policy"],
        budget=Budget.parse(pairs["budget"]) if "budget" in pairs else None,
        sinks=_integer(pairs, "sinks", 4),
        window=_integer(pairs, "window", DEFAULT_WINDOW),
        interval=_integer(pairs, "interval", 1),
    )


def _pairs(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise ConfigError(f"{ENV_VAR}: {part.strip()!r} is not key=value; write for example policy=quest,budget=2048.")
        if key not in KEYS:
            raise ConfigError(f"{ENV_VAR}: unknown key {key!r}; valid keys: {', '.join(KEYS)}.")
        if key in pairs:
            raise ConfigError(f"{ENV_VAR}: {key!r} is given twice.")
        pairs[key] = value
    return pairs


def _policy(spec: str) -> tuple[str, bool]:
    name = spec.replace(" ", "").lower()
    match = _WRAPPED.match(name)
    if match:
        if match.group(1) not in SUPPORTED_WRAPPERS or match.group(2) == "dense":
            raise ConfigError(f"{ENV_VAR}: policy {spec!r} is not supported in vLLM; use one of {', '.join(supported_policies())}.")
        return match.group(2), True
    return name, False


def _integer(pairs: dict[str, str], key: str, default: int) -> int:
    if key not in pairs:
        return default
    try:
        return int(pairs[key])
    except ValueError:
        raise ConfigError(f"{ENV_VAR}: {key}={pairs[key]!r} is not a whole number.") from None
