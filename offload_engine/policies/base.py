"""The selection-policy contract.

A policy scores candidate tokens per KV head; ``Selector`` (the base machinery, shared by all
policies) applies the budget, keeps the sinks and the local window, takes the top-k, expands
neighbours and reuses a selection between predictions. Policies never touch the KV store layout,
the working set or the prefetcher: the engine hands them what they need through the hooks below.

Positions and candidates at a decode step for the token at position ``t`` (sequence length
``t + 1`` once its K/V is written):

- sinks: positions ``[0, S)``; always attended, resident on the device;
- local window: positions ``[t - W + 1, t]`` (never below ``S``); always attended, resident;
- candidates: positions ``[S, t - W + 1)``; the policy scores them, the selector keeps
  ``budget - S - W`` of them per (layer, KV head).

Shapes (batch 1): ``H`` query heads, ``KvH`` KV heads, ``D`` head dim, ``E`` hidden size,
``n = hi - lo`` candidates. Scores are float32; ``-inf`` means "never select".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..cpu_cache.host_store import HostKVStore
    from ..models import ModelAdapter, ModelDims

NEVER = float("-inf")


@dataclass(slots=True)
class PolicyContext:
    """What a policy may use, handed over once per generation by ``Policy.bind``."""

    dims: "ModelDims"
    capacity: int  # the most tokens a sequence can hold
    device: torch.device
    dtype: torch.dtype
    adapter: "ModelAdapter"
    host_store: "HostKVStore | None"  # the full KV (evaluation-only policies may read it)
    sinks: int
    window: int


@dataclass(frozen=True, slots=True)
class Candidates:
    """The candidate positions ``[lo, hi)`` of one layer at one step, and how many to keep."""

    lo: int
    hi: int
    keep: int  # tokens the selector will keep per KV head (before neighbour expansion)
    position: int  # the position of the token being decoded

    @property
    def count(self) -> int:
        return max(0, self.hi - self.lo)


class Policy:
    """Base class of every selection policy. Subclasses are dataclasses holding their settings.

    Override ``score`` (query-aware, called at the layer's attention time) or ``plan``
    (predictive, called at producer layers to select for later layers ahead of time).
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

    def plan(self, layer: int, x: torch.Tensor, candidates_of) -> dict[int, torch.Tensor]:
        """Predictive policies: at producer ``layer``, x ``[E]`` -> scores for later layers.

        ``candidates_of(l)`` gives the ``Candidates`` of layer ``l``. Returns
        ``{l: scores [KvH, candidates_of(l).count]}``; layers left out are scored by ``score``.
        """
        return {}

    def is_producer(self, layer: int) -> bool:
        return False


def topk_positions(scores: torch.Tensor, keep: int, lo: int) -> torch.Tensor:
    """Top-``keep`` candidates per KV head, as sorted absolute positions.

    scores ``[KvH, n]`` -> positions ``[KvH, min(keep, n)]`` long, ascending, ``-1`` where the
    score was ``-inf`` (never selected).
    """
    keep = min(keep, scores.shape[-1])
    if keep <= 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    values, index = torch.topk(scores, keep, dim=-1, sorted=False)
    positions = torch.where(torch.isneginf(values), torch.full_like(index, -1), index + lo)
    return sort_with_padding_last(positions)


def sort_with_padding_last(positions: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending with ``-1`` padding at the end. positions ``[KvH, k]`` long."""
    big = torch.iinfo(positions.dtype).max
    keyed = torch.where(positions < 0, torch.full_like(positions, big), positions)
    keyed, _ = torch.sort(keyed, dim=-1)
    return torch.where(keyed == big, torch.full_like(keyed, -1), keyed)


def sorted_unique(positions: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending, drop repeats, ``-1`` padding last. positions ``[KvH, k]`` long."""
    ordered = sort_with_padding_last(positions)
    duplicate = torch.zeros_like(ordered, dtype=torch.bool)
    duplicate[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    return sort_with_padding_last(torch.where(duplicate, torch.full_like(ordered, -1), ordered))


def expand_neighbors(positions: torch.Tensor, radius: int, lo: int, hi: int) -> torch.Tensor:
    """Add the ``radius`` positions after each selected position, within ``[lo, hi)``.

    positions ``[KvH, k]`` sorted with ``-1`` padding -> ``[KvH, k * (radius + 1)]`` sorted,
    deduplicated, ``-1`` padding. Absorbs drift of importance between predictions.
    """
    if radius <= 0 or positions.shape[-1] == 0:
        return positions
    offsets = torch.arange(radius + 1, device=positions.device)
    grown = positions.unsqueeze(-1) + offsets  # [KvH, k, r+1]
    valid = (positions.unsqueeze(-1) >= 0) & (grown < hi) & (grown >= lo)
    return sorted_unique(torch.where(valid, grown, torch.full_like(grown, -1)).flatten(1))


def extend_runs(positions: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The TokenButler reference's neighbour rule: after each run of ``c`` consecutive selected
    positions, add the ``c`` positions that follow it (within ``[lo, hi)``), doubling the area.

    positions ``[KvH, k]`` sorted with ``-1`` padding -> ``[KvH, 2k]`` sorted, deduplicated, ``-1``
    padding. Example: ``[3, 4, 9]`` -> ``[3, 4, 5, 6, 9, 10]``.
    """
    if positions.shape[-1] == 0:
        return positions
    valid = positions >= 0
    starts = torch.ones_like(valid)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1  # a run starts where the step is not +1
    run_id = torch.cumsum(starts.long(), dim=-1) - 1  # [KvH, k]
    lengths = torch.zeros_like(positions).scatter_add_(-1, run_id, valid.long())
    grown = positions + torch.gather(lengths, -1, run_id)  # p + c covers the c positions after the run
    grown = torch.where(valid & (grown < hi) & (grown >= lo), grown, torch.full_like(grown, -1))
    return sorted_unique(torch.cat([positions, grown], dim=-1))
