"""SnapKV: a selection fixed after prefill by the prompt's observation window.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv 2404.14469). The last ``window`` prompt queries (the observation window, typically the
question) vote on the earlier prompt tokens: their attention is summed over the window and pooled
along tokens so that neighbours of important tokens are kept too. The window itself is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Candidates, Policy, PolicyContext, shared_prefill
from .prompt_attention import causal_probs


@dataclass
class SnapKVPolicy(Policy):
    """Per (layer, KV head) scores set once in ``observe_prefill`` and never changed.

    - prompt tokens before the observation window: the window's attention summed over its queries,
      average-pooled (``kernel``, stride 1, zero padding at the ends) per query head, then averaged
      over the query heads of the KV group (as SnapKV's GQA form does); each value is at most
      ``window`` (a sum of ``window`` probabilities);
    - the observation window and every token generated after prefill: a protected tier scored above
      any prompt score (``window + 1`` and more). SnapKV compresses the prompt once and then keeps all
      it generates; here those tokens stay selected as long as the budget allows. When the budget
      forces a choice inside the tier, the observation window is kept first (``window + 2``), then
      generated tokens, newest first (``window + 1 + position / capacity``), so the oldest
      generated tokens are the first to be dropped.

    The table is filled for every position at ``bind``/prefill time, so decode only reads it.
    Device state per layer: ``[KvH, capacity]`` float32.

    No prefix reuse (``supports_rewind`` False): the observation window is the end of the whole
    prompt, so a longer prompt votes again over every earlier token.
    """

    window: int = 32
    kernel: int = 7
    chunk_elements: int = 1 << 24  # logits materialised at once in the prefill vote

    name: ClassVar[str] = "snapkv"
    prefill_reads: ClassVar[frozenset[str]] = frozenset({"q"})  # the prompt's attention
    score_kind: ClassVar[str] = "mass"

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"snapkv needs window >= 1 and an odd kernel >= 1, got {self.window}, {self.kernel}")

    def state_bytes(self) -> int:
        return self.ctx.dims.num_layers * self.ctx.dims.num_kv_heads * self.ctx.capacity * 4  # float32 scores

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        positions = torch.arange(ctx.capacity, dtype=torch.float32, device=ctx.device)
        protected = (self.window + 1) + positions / ctx.capacity  # newer generated tokens first
        self.scores = [protected.expand(ctx.dims.num_kv_heads, -1).clone() for _ in range(ctx.dims.num_layers)]

    def release(self) -> None:
        self.scores = []

    def observe_prefill(self, layer, x, q, k, v) -> None:
        length = k.shape[1]
        start = max(0, length - self.window)
        table = self.scores[layer]
        table[:, start:length] = float(self.window + 2)  # the observation window: the top tier
        if start > 0:
            key = ("snapkv", layer, self.window, self.kernel, self.chunk_elements)
            table[:, :start] = shared_prefill(key, lambda: self.vote(q[:, start:], k, start))

    def vote(self, window_q: torch.Tensor, k: torch.Tensor, start: int) -> torch.Tensor:
        """window_q ``[H, w, D]`` at positions ``start..``, k ``[KvH, T, D]`` -> ``[KvH, start]``."""
        kv_heads = k.shape[0]
        group = window_q.shape[0] // kv_heads
        rows = max(1, self.chunk_elements // max(1, group * window_q.shape[1] * k.shape[1]))
        parts = []
        for h0 in range(0, kv_heads, rows):  # a few KV heads at a time bounds the logits' memory
            heads = slice(h0 * group, min(kv_heads, h0 + rows) * group)
            probs = causal_probs(window_q[heads], k[h0 : h0 + rows], start, self.ctx.adapter.scaling)
            parts.append(self.pool(probs[..., :start].sum(dim=2)).mean(dim=1))  # [kv, start]
        return torch.cat(parts, dim=0)

    def pool(self, votes: torch.Tensor) -> torch.Tensor:
        """Average pooling along tokens: ``[KvH, G, n]`` -> ``[KvH, G, n]``."""
        flat = votes.flatten(0, 1).unsqueeze(1)  # [KvH*G, 1, n]
        pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view_as(votes)

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """The fixed scores of the candidates ``[KvH, n]`` float32 (q is not used)."""
        return self.scores[layer][:, candidates.lo : candidates.hi].clone()
