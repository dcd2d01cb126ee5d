"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): attend the first S sink tokens and a window of the most recent W tokens.

Sinks and window are kept by the selector for every policy; this policy scores nothing else
(every candidate is ``-inf``), so the selected region stays empty and nothing is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NEVER, Candidates, Policy


@dataclass
class StreamingPolicy(Policy):
    """Sinks + local window only."""

    name = "streaming"

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        return torch.full((self.ctx.dims.num_kv_heads, candidates.count), NEVER, device=q.device)
