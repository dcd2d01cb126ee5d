"""Quest: query-aware page selection from per-channel key bounds.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024 (arXiv 2406.10774). Each page of ``page_size`` tokens keeps the per-channel minimum and
maximum of its keys; ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` is an upper bound of ``q . k`` for
every key of the page, and the pages with the highest bounds are attended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import Candidates, Policy, PolicyContext


@dataclass
class QuestPolicy(Policy):
    """Every candidate token gets its page's bound, so the selector's top-k takes whole pages.

    Pages are aligned to absolute positions (page ``p`` holds ``[p * page_size, (p+1) * page_size)``);
    pages cut by the candidate range's ends are scored like any other (their bound covers the
    tokens outside the range too, which only makes it looser). The bound is scaled by the
    attention's ``scaling``, so it bounds the attention logit (a logit-like score).
    Device state per layer: ``kmin``, ``kmax`` ``[KvH, pages, D]`` in the model dtype.
    """

    page_size: int = 16

    name: ClassVar[str] = "quest"
    prefill_reads: ClassVar[frozenset[str]] = frozenset()  # neither x nor q at prefill
    score_kind: ClassVar[str] = "logit"
    supports_rewind: ClassVar[bool] = True  # page bounds are a function of the stored keys

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ConfigError(f"quest page_size must be >= 1, got {self.page_size}")

    def _summary_shape(self, ctx: PolicyContext) -> tuple[int, int, int]:
        """``[KvH, pages, D]``: one layer's ``kmin`` (and ``kmax``)."""
        return ctx.dims.num_kv_heads, -(-ctx.capacity // self.page_size), ctx.dims.head_dim

    def state_bytes(self) -> int:
        return 2 * self.ctx.dims.num_layers * math.prod(self._summary_shape(self.ctx)) * self.ctx.dtype.itemsize

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        shape = self._summary_shape(ctx)
        layers = range(ctx.dims.num_layers)
        self.kmin = [torch.full(shape, float("inf"), dtype=ctx.dtype, device=ctx.device) for _ in layers]
        self.kmax = [torch.full(shape, float("-inf"), dtype=ctx.dtype, device=ctx.device) for _ in layers]

    def release(self) -> None:
        self.kmin, self.kmax = [], []

    def observe_prefill(self, layer, x, q, k, v) -> None:
        self.absorb(layer, 0, k)

    def observe_extend(self, layer, start, x, q, k, v) -> None:
        self.absorb(layer, start, k)

    def rewind(self, length: int) -> None:
        """Empty the pages from the one holding ``length`` on; a page cut by ``length`` gets its
        bounds again from the keys of ``[page start, length)`` in the host store."""
        if self.ctx.local_layers:
            raise RuntimeError("quest cannot rewind a model with sliding-window layers (their keys are not stored)")
        page = length // self.page_size
        first = page * self.page_size
        for layer in range(self.ctx.dims.num_layers):
            self.kmin[layer][:, page:] = float("inf")
            self.kmax[layer][:, page:] = float("-inf")
            if first < length:
                stored = self.ctx.host_store.token_keys[layer][first:length]  # [n, KvH, D], one contiguous range
                self.absorb(layer, first, stored.to(self.ctx.device).transpose(0, 1))

    def observe_decode(self, layer, position, x, q, k, v) -> None:
        self.absorb(layer, position, k.unsqueeze(1))

    def absorb(self, layer: int, start: int, k: torch.Tensor) -> None:
        """Fold keys k ``[KvH, T, D]`` at positions ``start..start+T-1`` into the page bounds."""
        first = start // self.page_size
        low, high = page_bounds(k, start - first * self.page_size, self.page_size)  # [KvH, P, D]
        pages = slice(first, first + low.shape[1])
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        kmin[:, pages] = torch.minimum(kmin[:, pages], low.to(kmin.dtype))
        kmax[:, pages] = torch.maximum(kmax[:, pages], high.to(kmax.dtype))

    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """q ``[H, D]`` -> each candidate's page bound ``[KvH, n]`` float32."""
        lo, hi = candidates.lo, candidates.hi
        if hi <= lo:
            return torch.empty(self.ctx.dims.num_kv_heads, 0, device=q.device)
        first, last = lo // self.page_size, (hi - 1) // self.page_size + 1
        kmin = self.kmin[layer][:, first:last].to(torch.float32)
        kmax = self.kmax[layer][:, first:last].to(torch.float32)
        pages = page_scores(q, kmin, kmax) * self.ctx.adapter.scaling  # [KvH, P]
        page_of = torch.arange(lo, hi, device=q.device) // self.page_size - first
        return pages[:, page_of]


def page_bounds(k: torch.Tensor, offset: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel minimum and maximum of keys k ``[KvH, T, D]`` placed ``offset`` into a page.

    Returns (min, max), each ``[KvH, ceil((offset + T) / page_size), D]``; padding slots are
    neutral (``+inf`` for the minimum, ``-inf`` for the maximum).
    """
    kv_heads, length, dim = k.shape
    pages = -(-(offset + length) // page_size)
    padded = k.new_full((2, kv_heads, pages * page_size, dim), float("inf"))
    padded[1].fill_(float("-inf"))
    padded[:, :, offset : offset + length] = k
    padded = padded.view(2, kv_heads, pages, page_size, dim)
    return padded[0].amin(dim=2), padded[1].amax(dim=2)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound, max over the group: q ``[H, D]``, kmin/kmax ``[KvH, P, D]`` -> ``[KvH, P]``.

    ``max(q_d * kmin_d, q_d * kmax_d)`` is ``q_d * kmax_d`` where ``q_d >= 0`` and ``q_d * kmin_d``
    elsewhere, so the bound is two matrix products over the positive and negative parts of q.
    """
    kv_heads = kmin.shape[0]
    grouped = q.to(torch.float32).view(kv_heads, -1, q.shape[-1])  # [KvH, G, D]
    bound = torch.einsum("kgd,kpd->kgp", grouped.clamp(min=0), kmax)
    bound = bound + torch.einsum("kgd,kpd->kgp", grouped.clamp(max=0), kmin)
    return bound.amax(dim=1)
