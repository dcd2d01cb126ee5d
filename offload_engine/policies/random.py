"""Random selection: the lower bound every selection policy must beat.

Uniform random scores, drawn afresh for each (layer, decode step); used as the floor in sparse
attention evaluations such as TokenButler (Akhauri et al., arXiv 2503.07518) and Quest
(Tang et al., arXiv 2406.10774).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Candidates, Policy

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant spreading (seed, layer, position) over the seed space


@dataclass
class RandomPolicy(Policy):
    """Scores ``U[0, 1)`` ``[KvH, n]``, a pure function of (seed, layer, decoded position).

    The same seed gives the same selections in every run, whatever order layers are scored in;
    a different step or layer draws a fresh, independent selection.
    """

    seed: int = 0

    name: ClassVar[str] = "random"
    prefill_reads: ClassVar[frozenset[str]] = frozenset()  # neither x nor q at prefill
    score_kind: ClassVar[str] = "mass"
    supports_rewind: ClassVar[bool] = True  # no state: draws depend on (seed, layer, position)

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        generator = torch.Generator(device=q.device)
        generator.manual_seed(draw_seed(self.seed, layer, candidates.position))
        shape = (self.ctx.dims.num_kv_heads, candidates.count)
        return torch.rand(shape, generator=generator, device=q.device, dtype=torch.float32)


def draw_seed(seed: int, layer: int, position: int) -> int:
    """A 63-bit seed for one (layer, step), deterministic across runs and processes."""
    mixed = seed
    for part in (layer, position):
        mixed = ((mixed ^ part) * _MIX + part) % (1 << 63)
    return mixed
