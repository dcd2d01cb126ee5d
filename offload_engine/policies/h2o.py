"""H2O: heavy-hitter tokens by accumulated attention, with permanent eviction.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023 (arXiv 2306.14048). Each token's score is the attention it has received so
far (summed over queries); under a budget the lowest-scored tokens are evicted, and an evicted
token never comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import NEVER, Candidates, Policy, PolicyContext, shared_prefill
from .prompt_attention import causal_column_sums, group_mean


@dataclass
class H2OPolicy(Policy):
    """Accumulated attention per (layer, KV head, token); ``-inf`` marks an evicted token.

    Prefill: the column sums of the prompt's causal attention, averaged over the query heads of each
    KV group (the same reduction the engine applies to decode weights), computed ``chunk_elements``
    logits at a time. Decode: ``observe_attention`` adds the step's weights. Evicted tokens hold
    ``-inf``, and ``-inf + w == -inf``, so accumulation can never resurrect them.

    What "evicted" means here: at a step where ``score`` was called with candidates ``[lo, hi)``,
    every candidate the current query did not attend (it is absent from ``observe_attention``'s
    positions) was dropped by the selector and is evicted for good. While the budget covers every
    candidate nothing is evicted; once it does not, exactly ``count - keep`` live candidates fall
    out per step, so the live set stays at ``keep`` tokens, like H2O's fixed-size cache. A growing
    (fractional) budget gives its new room to tokens that leave the local window, never to evicted
    ones. Sinks and window tokens are attended, so they are never evicted while protected.

    No prefix reuse (``supports_rewind`` False): the prompt's column sums cover every later query of
    the prompt, which a continuation's queries would have to add to tokens already evicted or not.
    """

    chunk_elements: int = 1 << 24  # logits materialised at once in the prefill column sums

    name: ClassVar[str] = "h2o"
    prefill_reads: ClassVar[frozenset[str]] = frozenset({"q"})  # the prompt's attention
    wants_attention: ClassVar[bool] = True
    score_kind: ClassVar[str] = "mass"
    scored: dict[int, tuple[int, int]] = field(default_factory=dict, init=False, repr=False)

    def state_bytes(self) -> int:
        return self.ctx.dims.num_layers * self.ctx.dims.num_kv_heads * self.ctx.capacity * 4  # float32

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        shape = (ctx.dims.num_kv_heads, ctx.capacity)
        layers = range(ctx.dims.num_layers)
        self.accumulated = [torch.zeros(shape, dtype=torch.float32, device=ctx.device) for _ in layers]
        self.scored = {}

    def release(self) -> None:
        self.accumulated, self.scored = [], {}

    def observe_prefill(self, layer, x, q, k, v) -> None:
        prompt_mass = shared_prefill(  # [KvH, T], the same for every H2O replaying one recorded prefill
            ("h2o", layer, self.chunk_elements),
            lambda: group_mean(causal_column_sums(q, k, self.ctx.adapter.scaling, self.chunk_elements), k.shape[0]))
        self.accumulated[layer][:, : k.shape[1]] += prompt_mass

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """The accumulated attention of the candidates ``[KvH, n]`` float32 (``-inf``: evicted)."""
        self.scored[layer] = (candidates.lo, candidates.hi)
        return self.accumulated[layer][:, candidates.lo : candidates.hi].clone()

    def observe_attention(self, layer: int, positions: torch.Tensor, weights: torch.Tensor) -> None:
        """positions ``[KvH, N]`` long (-1 padding), weights ``[KvH, N]`` float32."""
        accumulated = self.accumulated[layer]
        valid = positions >= 0
        index = positions.clamp(min=0)
        accumulated.scatter_add_(1, index, torch.where(valid, weights.to(torch.float32), 0.0))
        if layer in self.scored:
            self.evict_unattended(accumulated, index, valid, *self.scored.pop(layer))

    @staticmethod
    def evict_unattended(accumulated: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                         lo: int, hi: int) -> None:
        """Set to ``-inf`` the candidates in ``[lo, hi)`` absent from the attended ``index`` ``[KvH, N]``."""
        inside = valid & (index >= lo) & (index < hi)
        kept = torch.zeros(accumulated.shape[0], hi - lo + 1, dtype=torch.bool, device=accumulated.device)
        kept.scatter_(1, torch.where(inside, index - lo, hi - lo), True)  # column hi-lo: a sink for the rest
        span = accumulated[:, lo:hi]
        span.masked_fill_(~kept[:, : hi - lo], NEVER)

