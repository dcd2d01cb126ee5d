"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): attend the first S sink tokens and the most recent tokens.

The selector always keeps the sinks and the local window; this policy fills the rest of the
budget with the most recent candidates (scores grow with position), so ``streaming`` under a
budget B is StreamingLLM with S sinks and a recent window of ``B - S`` tokens. Each step only
the token that just left the recent region is new, so the delta fetch moves one token per
(layer, KV head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Candidates, Policy


@dataclass
class StreamingPolicy(Policy):
    """Sinks + the most recent tokens, within the budget."""

    name = "streaming"
    prefill_reads: ClassVar[frozenset[str]] = frozenset()  # neither x nor q at prefill
    supports_rewind: ClassVar[bool] = True  # no state

    def fixed_selection(self, candidates: Candidates) -> torch.Tensor:
        """The ``keep`` most recent candidates: what ``score``'s top-k picks, with no top-k."""
        return torch.arange(candidates.hi - candidates.keep, candidates.hi, device=self.ctx.device)

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        recency = torch.arange(candidates.lo, candidates.hi, device=q.device, dtype=torch.float32)
        return recency.expand(self.ctx.dims.num_kv_heads, -1)
