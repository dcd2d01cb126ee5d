"""Typed configuration, validated at construction.

``EngineConfig`` says where the KV cache lives (``mode``), which policy selects tokens for
attention, and with what budget. Everything is checked in ``__post_init__`` so a bad value fails
before a model is loaded or memory is allocated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

from .errors import ConfigError

_CONTEXT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_SUFFIX = {"": 1, "k": 1024, "m": 1024 * 1024}


class KVMode(str, Enum):
    """Where the KV cache lives during decode."""

    DENSE_DEVICE = "dense-device"  # whole KV resident on the compute device (baseline)
    DENSE_OFFLOAD = "dense-offload"  # KV on host; every layer's whole KV copied each step
    SPARSE_OFFLOAD = "sparse-offload"  # KV on host; only the selected tokens copied


def parse_context(text: str | int) -> int:
    """Parse a context length: ``4096``, ``32k`` (32768), ``7.5k`` (7680), ``1m`` (1048576)."""
    if isinstance(text, int):
        value = text
    else:
        match = _CONTEXT_RE.match(str(text))
        if not match:
            raise ConfigError(
                f"--context {text!r} is not a length: use a token count such as 4096, 32k, 128k or 1m."
            )
        value = int(float(match.group(1)) * _SUFFIX[match.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"--context must be positive, got {text!r}: use for example 4096 or 32k.")
    return value


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens attended per (layer, KV head), sinks and local window included.

    Either a fixed count (``tokens``) or a fraction of the current sequence length (``fraction``).
    """

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.fraction is None):
            raise ConfigError("a budget is either a token count or a fraction, not both or neither")
        if self.tokens is not None and self.tokens <= 0:
            raise ConfigError(f"--budget must be at least 1 token, got {self.tokens}.")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"--budget {self.fraction * 100:g}% is outside (0, 100%]: use for example 10% or 2048."
            )

    @classmethod
    def parse(cls, text: str | int | float) -> "Budget":
        """``2048`` -> 2048 tokens; ``10%`` -> a tenth of the sequence."""
        raw = str(text).strip()
        percent = raw.endswith("%")
        try:
            number = float(raw[:-1] if percent else raw)
        except ValueError:
            raise ConfigError(f"--budget {text!r} is neither a token count (2048) nor a percentage (10%).") from None
        if not math.isfinite(number):
            raise ConfigError(f"--budget {text!r} is not a finite number: give a token count (2048) or a percentage (10%).")
        if percent:
            return cls(fraction=number / 100.0)
        if number != int(number):
            raise ConfigError(f"--budget {text!r}: a token count must be whole; write 10% for a fraction.")
        return cls(tokens=int(number))

    def tokens_for(self, length: int) -> int:
        """The budget in tokens for a sequence of ``length`` tokens."""
        if self.tokens is not None:
            return self.tokens
        return max(1, math.ceil(self.fraction * length))

    def __str__(self) -> str:
        return f"{self.tokens}" if self.tokens is not None else f"{self.fraction * 100:g}%"


_LAYERS_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(text: str) -> frozenset[int]:
    """Layer numbers from ``"14-23"``, ``"3,7,20-23"`` or ``"3+7+20-23"`` (ranges inclusive); ``""``: none."""
    layers: set[int] = set()
    for item in filter(None, (part.strip() for part in re.split(r"[,+]", text))):
        match = _LAYERS_RE.match(item)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise ConfigError(f"--refresh-layers {text!r}: {item!r} is not a layer N or a range A-B with A <= B.")
        first = int(match.group(1))
        layers.update(range(first, int(match.group(2) or first) + 1))
    return frozenset(layers)


def check_refresh_layers(layers: frozenset[int], num_layers: int) -> None:
    """Refuse refresh layers past a model of ``num_layers`` layers."""
    beyond = sorted(layer for layer in layers if layer >= num_layers)
    if beyond:
        raise ConfigError(f"--refresh-layers {beyond} past the model's last layer {num_layers - 1}: "
                          "name layers 0 to that.")


MIN_WINDOW = 16  # the local window never shrinks below this many tokens (nor below --window)
DEFAULT_WINDOW = 128  # the widest local window (bench/reports/predictor_window.md)
WINDOW_SHARE = 0.5  # of the budget after the sinks (bench/reports/predictor_window_share.md: level with 0.4)
WINDOW_RULE = "budget"  # results.json: the window follows the budget (``local_window``); runs without it: fixed


def local_window(budget_tokens, sinks: int, window: int, share: float = WINDOW_SHARE):
    """The local window ``w`` under a budget of ``k = budget_tokens`` tokens: ``floor(share * (k - S))``
    (``(k - S) // 2``) clamped to ``[min(MIN_WINDOW, W), W]``. An int, or a long tensor of budgets
    (elementwise; exact below 2**24 tokens). ``share``: other than the engine's only in bench/window_study.py."""
    least = min(MIN_WINDOW, window)
    part = (budget_tokens - sinks) * share
    if hasattr(part, "clamp"):  # a tensor (this module does not import torch)
        return part.floor().long().clamp(min=least, max=window)
    return min(window, max(least, math.floor(part)))


def budget_floor(sinks: int, window: int) -> int:
    """The fewest tokens a budget attends: the sinks and the narrowest local window (nothing selected)."""
    return sinks + min(MIN_WINDOW, window)


MAX_KEEP_BONUS = 100.0  # beyond it a held token would practically never leave


@dataclass(slots=True)
class SelectionConfig:
    """How the sparse mode picks tokens: sinks and window always, the policy for the rest.

    ``window`` is the widest local window: under a budget of ``k`` tokens the window is
    ``(k - sinks) // 2`` clamped to ``[min(MIN_WINDOW, window), window]`` (``local_window``).
    """

    policy: str = "dense"
    budget: Budget | None = None  # None: every token (the dense reference)
    sinks: int = 4
    window: int = DEFAULT_WINDOW
    interval: int = 1  # run the (predictive) policy every N steps, reuse between
    neighbors: int = 0  # "radius" rule: also fetch this many positions after each selected one
    neighbor_rule: str = "radius"  # "radius", or "runs": after each run of c selected, the next c
    # layers selected afresh at every step whatever the interval (those whose selection drifts
    # fastest: bench/reports/selection_drift.md); given as layer numbers or a ``parse_layers`` string
    # ("14-23", "3,7+20-23"), always a frozenset after construction
    refresh_layers: frozenset[int] | str = frozenset()
    # hysteresis of the top-k: a token held in a device slot keeps it unless a newcomer's score beats its own by
    # this share (its score times 1 + b where scores are attention masses, plus log(1 + b) where they are
    # logits: ``selection.ranking.held_terms``); 0 ranks every token alike. Fewer renewed tokens a step, so
    # fewer copies, at the cost of keeping a token whose score a newcomer beats by less than the share.
    keep_bonus: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.refresh_layers, str):
            self.refresh_layers = parse_layers(self.refresh_layers)
        self.refresh_layers = frozenset(self.refresh_layers)
        if any(layer < 0 for layer in self.refresh_layers):
            raise ConfigError(f"--refresh-layers must be layer numbers >= 0, got {sorted(self.refresh_layers)}.")
        if self.sinks < 0 or self.window < 1:
            raise ConfigError(f"--sinks must be >= 0 and --window >= 1 (got {self.sinks}, {self.window}).")
        if self.interval < 1:
            raise ConfigError(f"--interval must be >= 1, got {self.interval}.")
        if self.refresh_layers and self.interval == 1:
            raise ConfigError("--refresh-layers names the layers that select at every step despite --interval N > 1; "
                              "at --interval 1 every layer does: add --interval N or drop --refresh-layers.")
        if self.neighbors < 0:
            raise ConfigError(f"--neighbors must be >= 0, got {self.neighbors}.")
        if not (math.isfinite(self.keep_bonus) and 0 <= self.keep_bonus <= MAX_KEEP_BONUS):
            raise ConfigError(f"--keep-bonus must be a share in [0, {MAX_KEEP_BONUS:g}] (0.25: a held token stays unless "
                              f"a newcomer scores 25% more), got {self.keep_bonus}.")
        if self.neighbor_rule not in ("radius", "runs"):
            raise ConfigError(f"--neighbor-rule {self.neighbor_rule!r} is not 'radius' or 'runs'.")
        if self.budget is not None and self.budget.tokens is not None and self.floor > self.budget.tokens:
            raise ConfigError(
                f"--sinks {self.sinks} + the narrowest window {self.floor - self.sinks} = {self.floor} tokens "
                f"exceed the budget of {self.budget.tokens}: lower --sinks or --window, or raise --budget."
            )

    @property
    def floor(self) -> int:
        """The fewest tokens attended per (layer, KV head): the sinks and the narrowest local window."""
        return budget_floor(self.sinks, self.window)

    @property
    def neighbor_growth(self) -> int:
        """How many times the selected area neighbour fetching can grow it to."""
        return 2 if self.neighbor_rule == "runs" else self.neighbors + 1

    def check_fraction_budget(self, length: int) -> None:
        """A fractional budget must leave room for the sinks and the narrowest window at this sequence length."""
        if self.budget is None or self.budget.fraction is None:
            return
        tokens = self.budget.tokens_for(length)
        if self.floor > tokens:
            raise ConfigError(
                f"--budget {self.budget} of {length} tokens is {tokens} tokens, fewer than --sinks "
                f"{self.sinks} + the narrowest window {self.floor - self.sinks}: lower --sinks or --window, "
                "or raise --budget."
            )


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs besides the model."""

    context: int = 4096
    mode: KVMode = KVMode.DENSE_DEVICE
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    device: str = "cpu"
    prefill_chunk: int = 4096  # tokens per chunk of projections / MLP / attention queries in prefill
    allow_rope_scaling: bool = False  # allow a context past the model's trained positions
    profile: bool = False  # time the phases of each decode step (stats.breakdown); off costs nothing
    # Timing only: fill the KV cache with random keys and values instead of running the prefill
    # (a decode step's time does not depend on the values); the generated text means nothing.
    synthetic_kv: bool = False
    # With synthetic_kv, N > 0: prefill the prompt's first N tokens for real and repeat their keys, values
    # (and attention inputs) along the positions up to the prompt's length instead of random ones, each
    # copy's queries and keys turned by the RoPE of the positions it fills (layer 0's, exactly, of the
    # prefix repeated: no two copies score alike, and each sits at its own distance from the decode). Random
    # keys give a sparse policy nothing to hold on to, so most of its selection is new at every step (~60%
    # of the budget fetched again per step at 32k, against ~13% on real text at 8k): the copy and
    # selection times of random KV bound the real ones from above, a repeated real prefix measures them
    # with real text's step-to-step churn. 0: random keys and values.
    synthetic_kv_tile: int = 0
    # Count the tokens each decode step attends (sparse offload: one device-side sum per layer, read
    # once per call) for the attended share in stats and ContinuationScore; off costs nothing.
    count_attended: bool = False
    # Offload modes on the CPU: copies (and tokenbutler's selections, made ahead of them) run on one more
    # thread while the model goes on with earlier layers, as a GPU's copy engine does: for a machine with
    # a core the model's own threads (--threads) leave free. On CUDA the copies have their own stream.
    copy_thread: bool = False

    def __post_init__(self) -> None:
        self.context = parse_context(self.context)
        self.mode = KVMode(self.mode)
        if self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r} is not cpu, cuda or cuda:N.")
        budget = self.selection.budget
        if budget is not None and budget.tokens is not None and budget.tokens > self.context:
            raise ConfigError(
                f"--budget {budget.tokens} is larger than --context {self.context}: lower the budget."
            )
        if self.copy_thread and self.device != "cpu":
            raise ConfigError(f"--copy-thread is for --device cpu; on {self.device} the copies run on a CUDA stream "
                              "of their own: drop --copy-thread.")
        if self.copy_thread and self.mode is KVMode.DENSE_DEVICE:
            raise ConfigError("--copy-thread runs the copies of an offloaded KV cache, and dense-device copies "
                              "nothing: add --offload or drop --copy-thread.")
        if self.synthetic_kv_tile < 0 or (self.synthetic_kv_tile and not self.synthetic_kv):
            raise ConfigError(f"synthetic_kv_tile {self.synthetic_kv_tile}: a count of tokens >= 1 that repeats a "
                              "real prefix in a synthetic KV cache; it needs synthetic_kv (0: random keys).")
        sparse = self.mode is KVMode.SPARSE_OFFLOAD
        if sparse and self.selection.floor > self.context:
            raise ConfigError(f"--sinks + the narrowest window ({self.selection.floor} tokens) exceed --context "
                              f"{self.context}: lower --sinks or --window.")

    @property
    def offload(self) -> bool:
        return self.mode is not KVMode.DENSE_DEVICE


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Decoding: greedy when ``temperature == 0``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature must be a finite number >= 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")
