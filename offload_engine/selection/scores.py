"""Scores a policy can describe instead of computing, so that the selection computes them where it selects.

TokenButler scores each (layer, KV head) row from its query heads' logits against the compact keys,
reduced over the group: by the mean over the heads of each head's softmax over every cached token
("mean"), or by the largest logit ("max"; with one query head per KV head the logits themselves, which
rank as its softmax does). ``GroupScores`` holds the queries, the compact keys and the rule that define
those scores; ``compute`` gives them as a tensor (the native kernel on the CPU, else torch), and on the
CPU ``ResidencyMap.select`` takes a producer's rows through scoring, top-k and residency update in one
native call, without the ``[Lg, KvH, m]`` scores ever leaving the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import native
from .pages import PageRows, PageScoring, page_rows, prefiltered_scores

REDUCTIONS = native.REDUCTIONS  # "mean", "max"


@dataclass(frozen=True, slots=True)
class GroupScores:
    """Scores ``[Lg, KvH, hi - lo]`` at the candidates ``[lo, hi)`` of the first ``m`` tokens of ``keys``: for
    each row, ``mean_h softmax_t(queries[.., h, :] . keys[.., :, t])`` (``reduction`` "mean", the softmax over
    all ``m`` tokens) or ``max_h queries[.., h, :] . keys[.., :, t]`` ("max").

    queries ``[Lg, KvH, g, d']`` float32 (any scale already folded in); keys ``[Lg, KvH, d', capacity]``, the
    compact cache's columns from position 0 (tokens contiguous), float32 or bfloat16, or int8 codes with
    ``scales`` ``[Lg, KvH, capacity]`` float16, each token's factor (the key is its codes times its scale);
    ``tokens``: ``m``, how many of them the step has (None: all ``capacity``). Keys of the whole capacity
    keep one layout from step to step, so a residency map binds its one-call selection to them once.
    ``pages``: the page prefilter's bounds, setting and the step's keep (``pages.py``), or None.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    lo: int
    hi: int
    reduction: str = "mean"
    scales: torch.Tensor | None = None
    tokens: int | None = None
    pages: PageScoring | None = None

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if (self.keys.dtype == torch.int8) != (self.scales is not None):
            raise ValueError("int8 keys need their scales, and only int8 keys have scales")
        if self.tokens is not None and not 0 <= self.tokens <= self.keys.shape[-1]:
            raise ValueError(f"tokens {self.tokens} not in [0, {self.keys.shape[-1]}] (the keys' capacity)")

    @property
    def m(self) -> int:
        """The tokens scored: the softmax of the mean rule runs over them."""
        return self.keys.shape[-1] if self.tokens is None else self.tokens

    def layers(self, first: int, count: int) -> "GroupScores":
        """The scores of ``count`` layers from the ``first``-th (views)."""
        scales = None if self.scales is None else self.scales[first : first + count]
        pages = None if self.pages is None else self.pages.layers(first, count)
        return GroupScores(self.queries[first : first + count], self.keys[first : first + count], self.lo, self.hi,
                           self.reduction, scales, self.tokens, pages)

    def native_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The scores' rows as the native kernels read them: (queries ``[Lg * KvH, g, d']`` float32, keys
        ``[Lg * KvH, d', capacity]``, a view, and int8 keys' scales ``[Lg * KvH, capacity]`` or None), or None
        where they cannot (see ``native_rows``)."""
        return native_rows(self.queries, self.keys, self.scales)

    def page_rows(self) -> PageRows | None:
        """The prefilter's bounds as the native selection's rows (``pages.page_rows``), or None."""
        return None if self.pages is None else page_rows(self.pages.pages, self.pages.prefilter)

    def compute(self) -> torch.Tensor:
        """The scores as a float32 tensor ``[Lg, KvH, hi - lo]`` (with ``pages``, where the prefilter applies,
        ``-inf`` at the candidates it did not score: ``pages.prefiltered_scores``)."""
        m = self.m
        if self.pages is not None:
            scores = prefiltered_scores(self.queries, self._logits, m, self.lo, self.hi, self.reduction, self.pages)
            if scores is not None:
                return scores
        scales = None if self.scales is None else self.scales[..., :m]
        fused = fused_group_scores(self.queries, self.keys[..., :m], self.reduction, scales)
        if fused is not None:
            return fused[..., self.lo : self.hi]
        if self.reduction == "max":
            return self._logits(slice(self.lo, self.hi)).amax(dim=-2)
        return group_mean_probabilities(self._logits(slice(0, m)))[..., self.lo : self.hi]

    def _logits(self, span: slice) -> torch.Tensor:
        """The query heads' logits of the tokens of ``span``: ``[Lg, KvH, g, len(span)]`` float32."""
        keys = self.keys[..., span]
        if keys.dtype == torch.int8 or (keys.device.type == "cpu" and keys.dtype == torch.bfloat16):
            # int8: torch has no int8 x float matmul; bfloat16 on the CPU: its matmul is slower than float32's
            keys = keys.float()
        logits = torch.matmul(self.queries.to(keys.dtype), keys).float()
        if self.scales is not None:  # each token's factor, shared by the group's heads
            logits.mul_(self.scales[..., span].float().unsqueeze(-2))
        return logits


@dataclass(frozen=True, slots=True)
class NetworkStep:
    """A producer's query network as its native selection can run it in the same call (``NativeScoring.network``):
    ``current()`` the binding of the weights the predictor holds now (a new one once a parameter was replaced),
    ``scale`` folded into the queries, ``before(position, raw)`` what the policy does at each step before the
    selection reads its state, handed the network's output buffer ``raw`` ``[O]`` (its latest queries)."""

    current: Callable[[], "native.BoundQueryMLP | None"]
    scale: float
    before: Callable[[int, torch.Tensor], None]


@dataclass(frozen=True, slots=True)
class NativeScoring:
    """A producer's ``GroupScores`` as the native selection takes them at every step, bound once.

    ``queries(x, position)``: from the producer's input x ``[E]``, the queries ``[Lg * KvH, g, d']`` float32,
    contiguous, any scale folded in (the policy keeps what ``score`` needs, as ``plan`` does); ``keys``
    ``[Lg * KvH, d', capacity]``: the compact keys of the ``layers`` it serves, all of their capacity (a
    step scores the first ``position`` tokens, as ``GroupScores`` with ``tokens=position``); int8 keys
    with ``scales`` ``[Lg * KvH, capacity]``; ``pages``: their page bounds as rows, refreshed by ``queries``
    (None: no prefilter); ``network``: the query network the selection may run itself (``NetworkStep``; None:
    ``queries`` only). The same scores as ``plan(..., describe=True)`` gives. ``reweight``: a wrapper's selection
    over those scores (``native.Reweight``: critical(...)'s two stages; None: their top-k).
    """

    layers: range
    queries: Callable[[torch.Tensor, int], torch.Tensor]
    keys: torch.Tensor
    reduction: str = "mean"
    scales: torch.Tensor | None = None
    pages: PageRows | None = None
    network: NetworkStep | None = None
    reweight: "native.Reweight | None" = None


def fused_group_scores(grouped: torch.Tensor, keys: torch.Tensor, reduction: str = "mean",
                       scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """``GroupScores``' scores over all ``m`` tokens by the native CPU kernel, in one pass over the keys:
    grouped ``[Lg, KvH, g, d']``, keys ``[Lg, KvH, d', m]`` -> ``[Lg, KvH, m]`` float32. None where the
    kernel does not apply (a device other than the CPU, keys neither float32, bfloat16 nor int8 with
    ``scales`` ``[Lg, KvH, m]``, no compiler: ``native.status()``); the caller then takes the torch path. The
    same scores up to float rounding (tests/test_native.py)."""
    kernels = native.kernels()
    rows = native_rows(grouped, keys, scales) if kernels is not None else None
    if rows is None or keys.shape[-1] == 0:
        return None
    lg, kvh, _, m = keys.shape
    queries, row_keys, row_scales = rows
    return kernels.group_scores(queries, row_keys, reduction, row_scales).view(lg, kvh, m)


def native_rows(grouped: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """grouped ``[Lg, KvH, g, d']``, keys ``[Lg, KvH, d', m]`` (and int8 keys' scales ``[Lg, KvH, m]``) as the
    native kernels' rows: (queries ``[Lg * KvH, g, d']`` float32, keys ``[Lg * KvH, d', m]`` and scales
    ``[Lg * KvH, m]`` or None, views of the same memory), or None where the keys are not float32, bfloat16
    or int8 CPU columns with tokens contiguous and layers (and scales' layers) at a uniform stride."""
    if keys.device.type != "cpu" or keys.dtype not in (torch.float32, torch.bfloat16, torch.int8) or keys.stride(-1) != 1:
        return None
    lg, kvh, d, m = keys.shape
    if lg > 1 and keys.stride(0) != kvh * keys.stride(1):
        return None
    row_scales = None
    if keys.dtype == torch.int8:
        if (scales is None or scales.device.type != "cpu" or scales.dtype != torch.float16
                or tuple(scales.shape) != (lg, kvh, m) or (m > 1 and scales.stride(-1) != 1)
                or (lg > 1 and scales.stride(0) != kvh * scales.stride(1))):
            return None
        row_scales = scales.reshape(lg * kvh, m)
    return grouped.reshape(lg * kvh, -1, d).float(), keys.reshape(lg * kvh, d, m), row_scales


def group_mean_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The mean over query heads of each head's softmax: logits ``[..., g, m]`` -> ``[..., m]``.

    ATen's fused softmax works row by row (max, exponentials and sum, scaling), so a head's row is
    read from memory once and its passes run in the cache; then one mean over the ``g`` heads. Half
    the time of exponentiating in place and accumulating the weighted heads (7.7k-131k tokens, one
    CPU thread, measured 2026-12-04 on an AMD EPYC). ``logits`` is not modified.
    """
    return torch.softmax(logits, dim=-1).mean(dim=-2)
