"""Oracle: the top-k of the current query's true attention (evaluation only).

The upper reference every token-selection paper compares against, e.g. TokenButler
(Akhauri et al., arXiv 2503.07518, "oracle" rows) and Quest (Tang et al., arXiv 2406.10774).
It reads the full keys from the host store at every step, so it moves as many bytes as dense
offload: it measures what a perfect selector would achieve, never a speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Candidates, Policy
from .prompt_attention import grouped_logits


@dataclass
class OraclePolicy(Policy):
    """Scores = the log-probabilities of the current query's attention, max over the KV group.

    Why probabilities and not logits: with grouped-query attention one KV head serves ``G`` query
    heads, and each query head normalises its softmax separately. A raw logit of one head is not
    comparable with a raw logit of another (their partition functions differ), so the max over
    the group of logits would favour heads with flat distributions. The max over the group of
    probabilities asks the right question: "does some query head of this group attend the token
    strongly?". The score is ``log p`` (monotone in ``p``, and still logit-like for wrappers that
    apply a softmax over the candidates).

    The normaliser covers every position ``[0, position]`` (sinks, candidates, window and the
    current token, whose K/V the engine writes before scoring), so ``p`` is the real attention
    weight. On CUDA the new keys reach the host store on a write-back stream: the oracle waits for
    the device to be idle before reading (a host sync per layer and step; acceptable for an
    evaluation-only policy, which moves the whole key cache every step anyway).
    """

    name: ClassVar[str] = "oracle"
    prefill_reads: ClassVar[frozenset[str]] = frozenset()  # neither x nor q at prefill
    evaluation_only: ClassVar[bool] = True
    score_kind: ClassVar[str] = "logit"
    supports_rewind: ClassVar[bool] = True  # no state: it reads the host store

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """q ``[H, D]`` -> log-probabilities ``[KvH, n]`` float32, max over the group's heads."""
        if candidates.count == 0:
            return torch.empty(self.ctx.dims.num_kv_heads, 0, device=q.device)
        if self.ctx.host_store is None:
            raise RuntimeError("the oracle policy needs the host KV store (it reads the full keys)")
        store = self.ctx.host_store
        if store.pinned and q.device.type == "cuda":
            torch.cuda.synchronize(q.device)  # the write-back of this step's keys must have landed
        end = max(candidates.position + 1, candidates.hi)
        keys = store.keys[layer][:, :end].to(device=q.device, dtype=torch.float32)
        logits = grouped_logits(q.unsqueeze(1), keys, self.ctx.adapter.scaling).squeeze(2)  # [KvH, G, end]
        log_probs = logits[..., candidates.lo : candidates.hi] - torch.logsumexp(logits, -1, keepdim=True)
        return log_probs.amax(dim=1)

