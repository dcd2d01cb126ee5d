"""The dense policy: every token, the exactness reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Candidates, Policy


@dataclass
class DensePolicy(Policy):
    """Attend every token of every layer; a budget does not apply to it. In the sparse mode it
    goes through the whole selection path (all candidates selected, delta fetch of the one
    token that leaves the window per step), which is what the exactness tests exercise."""

    name = "dense"
    prefill_reads: ClassVar[frozenset[str]] = frozenset()  # neither x nor q at prefill
    supports_rewind: ClassVar[bool] = True  # no state

    def dense_layers(self) -> frozenset[int]:
        return frozenset(range(self.ctx.dims.num_layers))

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        return torch.zeros(self.ctx.dims.num_kv_heads, candidates.count, device=q.device)
