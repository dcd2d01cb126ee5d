"""Selection: which tokens each (layer, KV head) attends, and what must cross the bus for it.

``Selector`` (budget, candidates, top-k, neighbour rules), ``ResidencyMap`` (which positions sit in
which device slots; delta fetch), ``SelectionPlanner`` (the per-step, per-layer decision). Policies
only score; backends only write, copy and wait.
"""

from .planner import DeferredRows, LayerFetch, Orders, SelectionPlanner
from .ranking import expand_neighbors, extend_runs, sort_with_padding_last, sorted_unique, topk_positions
from .residency import FetchPlan, ResidencyMap
from .scores import GroupScores
from .selector import Candidates, Selector

__all__ = [
    "Candidates", "DeferredRows", "FetchPlan", "LayerFetch", "GroupScores", "Orders", "ResidencyMap",
    "SelectionPlanner", "Selector",
    "expand_neighbors", "extend_runs", "sort_with_padding_last", "sorted_unique", "topk_positions",
]
