"""The policy-independent half of selection: candidates, budget, top-k, neighbours.

A policy only scores; ``Selector`` decides how many tokens each (layer, KV head) keeps at a
step, turns scores into sorted positions, and grows them by the neighbour rule.
"""

from __future__ import annotations

import torch

from .config import SelectionConfig
from .policies.base import Candidates, expand_neighbors, extend_runs, topk_positions


class Selector:
    """Budget arithmetic and top-k for one sequence (all positions are absolute)."""

    def __init__(self, config: SelectionConfig, capacity: int, dense_layers: frozenset[int]):
        self.config = config
        self.capacity = capacity
        self.dense_layers = dense_layers

    def budget_tokens(self, length: int) -> int:
        """Tokens attended per (layer, KV head) at sequence ``length``, sinks and window included."""
        budget = self.config.budget
        return length if budget is None else min(length, budget.tokens_for(length))

    def candidates(self, layer: int, position: int) -> Candidates:
        """Candidates of ``layer`` when decoding ``position`` (its K/V already written)."""
        sinks, window = self.config.sinks, self.config.window
        lo = sinks
        hi = max(lo, position - window + 1)
        if layer in self.dense_layers:
            keep = hi - lo
        else:
            keep = max(0, self.budget_tokens(position + 1) - sinks - window)
        return Candidates(lo=lo, hi=hi, keep=min(keep, hi - lo), position=position)

    def slots_for(self, layer: int) -> int:
        """Selected-token slots the working set of ``layer`` needs at full capacity."""
        most = max(0, self.capacity - self.config.sinks - self.config.window)
        if layer in self.dense_layers or self.config.budget is None:
            return most
        keep = max(0, self.budget_tokens(self.capacity) - self.config.sinks - self.config.window)
        return min(most, keep * self.config.neighbor_growth)

    def select(self, scores: torch.Tensor, candidates: Candidates, slots: int) -> torch.Tensor:
        """scores ``[KvH, n]`` -> selected positions ``[KvH, <= slots]`` sorted, ``-1`` padding."""
        chosen = topk_positions(scores, candidates.keep, candidates.lo)
        if self.config.neighbor_rule == "runs":
            chosen = extend_runs(chosen, candidates.lo, candidates.hi)
        else:
            chosen = expand_neighbors(chosen, self.config.neighbors, candidates.lo, candidates.hi)
        return chosen[:, :slots]

    @staticmethod
    def select_all(kv_heads: int, candidates: Candidates, device: torch.device) -> torch.Tensor:
        """Every candidate, for dense layers: ``[KvH, n]``."""
        return torch.arange(candidates.lo, candidates.hi, device=device).expand(kv_heads, -1)
