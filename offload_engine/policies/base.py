"""The selection-policy contract.

A policy only scores candidate tokens per KV head. ``offload_engine.selection`` (shared by all
policies) applies the budget, keeps the sinks and the local window, takes the top-k, expands
neighbours, reuses a selection between predictions and decides residency. Policies never touch
the KV store layout, the working set or the prefetcher: the engine hands them what they need
through the hooks below.

Positions and candidates at a decode step for the token at position ``t`` (sequence length
``t + 1`` once its K/V is written):

- sinks: positions ``[0, S)``; always attended, resident on the device;
- local window: positions ``[t - w + 1, t]`` (never below ``S``); always attended, resident; ``w``
  follows the budget, up to ``W`` (``config.local_window``);
- candidates: positions ``[S, t - w + 1)``; the policy scores them, the selector keeps
  ``budget - S - w`` of them per (layer, KV head).

Shapes (batch 1): ``H`` query heads, ``KvH`` KV heads, ``D`` head dim, ``E`` hidden size,
``n = hi - lo`` candidates. Scores are float32; ``-inf`` means "never select".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..selection.selector import Candidates

if TYPE_CHECKING:  # pragma: no cover
    from ..cpu_cache.host_store import HostKVStore
    from ..models import ModelAdapter, ModelDims
    from ..selection.scores import GroupScores, NativeScoring

NEVER = float("-inf")

# which candidates of consecutive layers are held in a device slot: (layers, candidates) -> bool [Lg, KvH, n]
HeldOf = Callable[[range, Candidates], torch.Tensor]

_SHARED_OBSERVATIONS: ContextVar[dict | None] = ContextVar("shared_prefill_observations", default=None)


@contextmanager
def shared_prefill_observations(store: dict) -> Iterator[None]:
    """While a recorded prefill is replayed, ``shared_prefill`` keeps derived observations in ``store``
    (the record's), so each is computed once per prompt however many policies replay it."""
    token = _SHARED_OBSERVATIONS.set(store)
    try:
        yield
    finally:
        _SHARED_OBSERVATIONS.reset(token)


def shared_prefill(key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or its value from an earlier replay of the same recorded prefill.

    ``key`` must name everything the value depends on besides the prompt (policy, layer, settings).
    Outside a replay this is just ``compute()``. The value is shared: never modify it in place.
    """
    store = _SHARED_OBSERVATIONS.get()
    if store is None:
        return compute()
    if key not in store:
        store[key] = compute()
    return store[key]


@dataclass(slots=True)
class PolicyContext:
    """What a policy may use, handed over once per generation by ``Policy.bind``."""

    dims: "ModelDims"
    capacity: int  # the most tokens a sequence can hold
    device: torch.device
    dtype: torch.dtype
    adapter: "ModelAdapter | None"  # None only while sizing before the weights load (prepare, state_bytes)
    host_store: "HostKVStore | None"  # the full KV (evaluation-only policies may read it)
    sinks: int
    window: int  # the widest local window (a step's window follows the budget, up to this)
    # sliding-window layers: never selected for (no host KV); their tokens are still observed
    local_layers: frozenset[int] = frozenset()
    interval: int = 1  # prediction interval (a predictive policy may have a predictor trained for it)
    # the model's hub id or directory, where no adapter says it (a shipped predictor is named by it)
    model_source: str = ""


class Policy:
    """Base class of every selection policy. Subclasses are dataclasses holding their settings.

    Override ``score`` (query-aware, called at the layer's attention time), and ``plan`` too for a
    predictive policy (called at producer layers to select for later layers ahead of time).
    The ``observe_*`` hooks let a policy keep device-side metadata (page summaries, projected
    keys, value norms, accumulated attention) as tokens are written.
    """

    name: ClassVar[str] = "base"
    evaluation_only: ClassVar[bool] = False  # reads the full KV: not a deployable policy
    plans_ahead: ClassVar[bool] = False  # selects for later layers from a producer layer
    wants_attention: ClassVar[bool] = False  # needs the attention weights of each decode step
    # What scores mean, for wrappers that turn them into an attention-like distribution:
    # "logit" (softmax of them is attention-like) or "mass" (non-negative, proportional to it).
    score_kind: ClassVar[str] = "logit"
    # Prefix reuse (``tbrun serve``): the state is a function of the stored K/V (and x, q) of each
    # position alone, so ``rewind`` and ``observe_extend`` rebuild exactly what a prefill of the
    # whole sequence gives. False for state made from the prompt's attention (H2O, SnapKV): a
    # continuation cannot reproduce it, and the session prefills the whole prompt again.
    supports_rewind: ClassVar[bool] = False
    # Which of the attention input ``x`` and the queries ``q`` ``observe_prefill`` / ``observe_extend`` read
    # (k and v always count). A tiled timing fill (``EngineConfig.synthetic_kv_tile``) builds only these and
    # hands zeros, with no memory behind them, for the rest (a random fill, ``synthetic_kv`` alone, hands zeros
    # for both). Undeclared: both.
    prefill_reads: ClassVar[frozenset[str]] = frozenset({"x", "q"})

    def prepare(self, ctx: PolicyContext) -> None:
        """Before anything of a sequence is allocated (its ``ctx.host_store`` not made yet): take its context and
        resolve what sizes the state (a predictor's shape); allocate nothing. Then ``state_bytes`` and
        ``dense_layers`` may be asked, and ``bind`` follows with the same context and the store."""
        self.ctx = ctx

    def state_bytes(self) -> int:
        """Bytes of per-sequence state ``bind`` allocates on ``ctx.device`` (after ``prepare``): what the sparse
        backend checks with the KV before allocating any of it. None by default."""
        return 0

    def bind(self, ctx: PolicyContext) -> None:
        """Called once before prefill: allocate per-sequence state sized by ``ctx.capacity``."""
        self.ctx = ctx

    def release(self) -> None:
        """Drop per-sequence state (called when the engine's sequence ends)."""

    def dense_layers(self) -> frozenset[int]:
        """Layers that attend every token (the selector keeps all their candidates)."""
        return frozenset()

    def observe_prefill(
        self, layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """The prompt's tensors for one layer, positions ``0..T-1``.

        x ``[T, E]`` attention input; q ``[H, T, D]``; k, v ``[KvH, T, D]`` (q and k post-RoPE).
        """

    def rewind(self, length: int) -> None:
        """Forget positions ``length`` and after (only called when ``supports_rewind``): the next
        tokens arrive through ``observe_extend`` at ``length``. Stateless policies keep the default."""
        if not self.supports_rewind:
            raise NotImplementedError(f"policy {self.name!r} cannot rewind (its state comes from prefill attention)")

    def observe_extend(
        self, layer: int, start: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """More prompt tokens after a ``rewind(start)``: positions ``start..start+T-1``, the shapes of
        ``observe_prefill``. Must leave the state a prefill of positions ``0..start+T-1`` leaves.
        The default serves policies with no per-position state."""
        if not self.supports_rewind:
            raise NotImplementedError(f"policy {self.name!r} cannot extend a rewound sequence")

    def observe_decode(
        self, layer: int, position: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """One decoded token: x ``[E]``; q ``[H, D]``; k, v ``[KvH, D]``, at ``position``."""

    def observe_attention(
        self, layer: int, positions: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """Attention of the current query over what it attended (only if ``wants_attention``).

        positions ``[KvH, N]`` long (-1 for padding); weights ``[KvH, N]`` float32, the softmax
        probabilities averaged over the query heads of each KV group (0 at padding).
        """

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """q ``[H, D]`` (current query, post-RoPE) -> scores ``[KvH, candidates.count]``."""
        raise NotImplementedError(f"policy {self.name!r} does not score at attention time")

    def plan(self, layer: int, x: torch.Tensor, candidates: Candidates, only: range | None = None,
             describe: bool = False) -> tuple[range, torch.Tensor | GroupScores]:
        """Predictive policies: at producer ``layer``, x ``[E]`` -> the layers it serves and their scores.

        Returns ``(layers, scores [Lg, KvH, n])``, ``layers`` a range of consecutive layers (``only``,
        a sub-range of ``served_by(layer)``, when given: the rest need no scores this step) and
        ``n = candidates.count`` (the candidates are the same for every selecting layer of a step),
        scored in one batched call. Afterwards ``score(l, None, candidates)`` must give row ``l`` of it
        for every layer the producer serves (the per-layer reference path). ``describe``: the policy
        may return ``selection.scores.GroupScores`` in place of the tensor (scores of that form,
        not yet computed); a policy that does not is always right to return the tensor.
        """
        raise NotImplementedError(f"policy {self.name!r} does not plan ahead")

    def native_scoring(self, producer: int) -> "NativeScoring | None":
        """Predictive policies whose ``plan`` describes ``GroupScores`` on the CPU: the same scores bound once
        for producer ``producer`` (``selection.scores.NativeScoring``), so that the selection takes a
        step's queries, top-k and residency update in two native calls; None (the default) where not."""
        return None

    def is_producer(self, layer: int) -> bool:
        return False

    def served_by(self, producer: int) -> range:
        """The layers ``plan(producer, ...)`` scores (empty for a layer that is no producer); a
        policy that plans ahead must say."""
        if self.plans_ahead:
            raise NotImplementedError(f"policy {self.name!r} plans ahead but does not say which layers a producer serves")
        return range(0)

    def keeps_held(self, held: "HeldOf | None", bonus: float) -> bool:
        """The top-k's hysteresis (``SelectionConfig.keep_bonus``) applied by the policy itself, for scores that
        are not one scale (two stages): it keeps ``held`` and ``bonus`` (``held = None`` and 0: none) and says
        True; then the selection leaves its scores as they are. False (the default): the selection raises the
        held positions' scores by the bonus on the policy's ``score_kind`` (``selection.ranking.held_terms``)."""
        return False

    def fixed_selection(self, candidates: Candidates) -> torch.Tensor | None:
        """A selection that needs no scores and is the same for every layer, or None.

        Returns positions ``[k]`` (``k = candidates.keep``), taken by every selecting layer and KV
        head at once. Only for policies whose top-k is known without scoring (recency).
        """
        return None
