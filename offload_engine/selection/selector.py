"""The policy-independent half of selection: candidates, budget arithmetic, top-k, neighbours.

A policy only scores; ``Selector`` decides how many tokens each (layer, KV head) keeps at a
step, turns scores into sorted positions and grows them by the neighbour rule.

Positions at the decode step of the token at position ``t`` (its K/V already written):
sinks ``[0, S)``, window ``[t - w + 1, t]`` (never below ``S``), candidates ``[S, t - w + 1)``.
The budget ``k`` counts every attended token per (layer, KV head), sinks and window included.

The local window follows the budget: half of what the budget leaves after the sinks, at least
``MIN_WINDOW`` and at most ``--window`` (``local_window``), so a budget of a few hundred tokens is
not spent on recency alone and a large one keeps a window of ``--window`` (bench/reports/
predictor_window.md: 128 recent tokens hold the most recall at 4k and 8k). Under a share budget
``w`` grows with the sequence, at most one token for every two, so the window's first position never
moves back: a token that left the window never re-enters it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SelectionConfig, local_window
from .ranking import expand_neighbors, extend_runs, topk_positions


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

    @property
    def fits(self) -> bool:
        """Every candidate is kept: nothing to choose, so nothing needs scoring."""
        return self.keep >= self.count


class Selector:
    """Budget arithmetic and top-k for one sequence (all positions are absolute)."""

    def __init__(self, config: SelectionConfig, capacity: int, dense_layers: frozenset[int],
                 local_layers: frozenset[int] = frozenset()):
        self.config = config
        self.capacity = capacity
        self.dense_layers = dense_layers
        self.local_layers = local_layers  # sliding-window layers: no selection, no slots

    @property
    def floor(self) -> int:
        """Sinks plus the narrowest window: attended whatever the budget."""
        return self.config.floor

    def _budget(self, length: int) -> int:
        """The budget in tokens at ``length``, raised to the floor (not capped by the length)."""
        budget = self.config.budget
        return max(budget.tokens_for(length), self.floor)

    def window(self, length: int) -> int:
        """The local window ``w`` when the sequence is ``length`` tokens long (its newest token included)."""
        if self.config.budget is None:
            return self.config.window
        return local_window(self._budget(length), self.config.sinks, self.config.window)

    def fixed(self, length: int) -> int:
        """Sinks plus window at ``length``: attended whatever the scores."""
        return self.config.sinks + self.window(length)

    def budget_tokens(self, length: int) -> int:
        """Tokens attended per (layer, KV head) at sequence ``length``, sinks and window included.

        A share that comes out below the floor (sinks and the narrowest window) leaves nothing to
        select yet: the sinks and that window are attended (all of a sequence shorter than them).
        """
        if self.config.budget is None:
            return length
        return min(length, self._budget(length))

    def below_floor(self, length: int) -> bool:
        """Whether a share budget is smaller than the floor at ``length`` tokens."""
        budget = self.config.budget
        return budget is not None and budget.fraction is not None and budget.tokens_for(length) < self.floor

    def candidates(self, layer: int, position: int) -> Candidates:
        """Candidates of ``layer`` when decoding ``position`` (its K/V already written)."""
        lo, window = self.config.sinks, self.window(position + 1)
        hi = max(lo, position + 1 - window)
        if layer in self.dense_layers:
            keep = hi - lo
        else:
            keep = max(0, self.budget_tokens(position + 1) - lo - window)
        return Candidates(lo=lo, hi=hi, keep=min(keep, hi - lo), position=position)

    def slots_for(self, layer: int) -> int:
        """Selected-token slots the working set of ``layer`` needs at full capacity (the candidates and the
        kept ones only grow with the sequence: the window grows at most one token every two)."""
        most = max(0, self.capacity - self.fixed(self.capacity))
        if layer in self.local_layers:
            return 0
        if layer in self.dense_layers or self.config.budget is None:
            return most
        keep = max(0, self.budget_tokens(self.capacity) - self.fixed(self.capacity))
        return min(most, keep * self.config.neighbor_growth)

    @property
    def plain_topk(self) -> bool:
        """The selection is the top ``keep`` as it is: no neighbour rule grows it (nor needs it ordered)."""
        return self.config.neighbor_rule != "runs" and self.config.neighbors <= 0

    def select(self, scores: torch.Tensor, candidates: Candidates, slots: int) -> torch.Tensor:
        """scores ``[..., KvH, n]`` -> selected positions ``[..., KvH, <= slots]``, ``-1`` padding.

        In no particular order unless a neighbour rule grows the selection (then sorted).
        """
        chosen = topk_positions(scores, candidates.keep, candidates.lo, ordered=not self.plain_topk)
        if self.config.neighbor_rule == "runs":
            chosen = extend_runs(chosen, candidates.lo, candidates.hi)
        elif self.config.neighbors > 0:
            chosen = expand_neighbors(chosen, self.config.neighbors, candidates.lo, candidates.hi)
        return chosen[..., :slots]
