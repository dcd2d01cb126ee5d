"""CriticalKV: value-aware two-stage re-weighting of any base policy's scores.

Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective"
(arXiv 2502.03805). One head's output is ``sum_i A_i v_i W_O^h``: a token's contribution scales with
its attention ``A_i`` and with its projected value norm ``||v_i W_O^h||_1``. Under a budget, keep
the top ``alpha * keep`` tokens by the base score, then fill the rest by ``(A_i + eps) * ||v_i W_O^h||_1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch

from .. import native
from ..errors import ConfigError
from ..selection.ranking import HeldTerms, favour_held, held_terms, topk_unsorted
from ..selection.scores import NativeScoring
from .base import NEVER, Candidates, HeldOf, Policy, PolicyContext

NORM_CHUNK = 256  # tokens whose projected values are materialised at once ([H, chunk, E])


@dataclass
class CriticalPolicy(Policy):
    """Wraps ``base`` (any policy, predictive ones included) and re-weights its scores.

    Value norms ``||v W_O^h||_1`` (L1 over the hidden width, averaged over the query heads of the
    KV group) are computed once when a token's K/V is written and kept on the device
    (``[KvH, capacity]`` per layer, bfloat16 unless the model runs in float32).

    ``A``, the attention-like distribution over the candidates, depends on the base's
    ``score_kind``: ``"logit"`` scores (logits, log-probabilities, bounds of logits; the default for
    a policy that does not say) go through a softmax; ``"mass"`` scores (accumulated attention,
    pooled votes, uniform draws: non-negative, additive) are divided by their sum. ``-inf`` base
    scores stay ``-inf``.

    The two stages become one score vector for the selector: the first-stage tokens (the base's
    top ``floor(alpha * keep)``) score ``top + 1 + A`` with ``top`` the largest second-stage score,
    above every other token, whose score is ``(A + eps) * norm``. With ``alpha = 1`` the first
    stage is the base's own top-``keep``, so the selection is exactly the base's.

    The top-k's hysteresis (``--keep-bonus``) enters each stage on its own scale (``keeps_held``): the
    first stage ranks the base's scores with the held positions raised as the base's ``score_kind``
    takes it, the second stage's held scores are multiplied by ``1 + bonus`` before ``top`` is taken,
    so a held second-stage token never passes a first-stage one. ``A`` stays the base's own.
    """

    base: Policy
    alpha: float = 0.5
    eps: float = 1e-4
    _held: HeldOf | None = field(default=None, init=False, repr=False)
    _terms: tuple[HeldTerms, HeldTerms] | None = field(default=None, init=False, repr=False)  # (first, second stage)

    name: ClassVar[str] = "critical"
    wraps: ClassVar[bool] = True  # built as ``critical(<base>)``
    score_kind: ClassVar[str] = "mass"  # its scores are non-negative (wrapping it again is refused: parse_policy_spec)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"critical alpha must be in [0, 1], got {self.alpha}")
        if self.eps < 0:
            raise ConfigError(f"critical eps must be >= 0, got {self.eps}")

    # -- what the engine asks of the wrapped policy --------------------------------------------
    @property
    def label(self) -> str:
        return f"critical({getattr(self.base, 'label', self.base.name)})"

    @property
    def evaluation_only(self) -> bool:  # type: ignore[override]
        return self.base.evaluation_only

    @property
    def plans_ahead(self) -> bool:  # type: ignore[override]
        return self.base.plans_ahead

    @property
    def wants_attention(self) -> bool:  # type: ignore[override]
        return self.base.wants_attention

    @property
    def prefill_reads(self) -> frozenset[str]:  # type: ignore[override]
        return self.base.prefill_reads  # its own prefill hook reads v only

    @property
    def supports_rewind(self) -> bool:  # type: ignore[override]
        return self.base.supports_rewind  # value norms are per token

    def dense_layers(self) -> frozenset[int]:
        return self.base.dense_layers()

    def is_producer(self, layer: int) -> bool:
        return self.base.is_producer(layer)

    def native_scoring(self, producer: int) -> NativeScoring | None:
        """The base's bound scores with the two stages added (``native.Reweight``: the producer's rows of value
        norms, ``alpha``, ``eps``, each stage's keep bonus), so that the native selection scores, re-weights,
        selects and places in one call; None where the base has none or ranks pages first (then ``plan``)."""
        scoring = self.base.native_scoring(producer)
        if scoring is None or scoring.pages is not None or getattr(self, "norms", None) is None:
            return None
        layers = scoring.layers
        norms = self.norms[layers.start : layers.stop].flatten(0, 1)  # [Lg * KvH, capacity], a view
        first, second = self._terms if self._terms is not None else (None, None)
        reweight = native.Reweight(norms, self.alpha, float(np.float32(self.eps)),
                                   getattr(self.base, "score_kind", "logit"), first, second)
        return replace(scoring, reweight=reweight)

    def keeps_held(self, held: HeldOf | None, bonus: float) -> bool:
        """The bonus on each stage's own scale (class docstring); ``held = None`` or ``bonus = 0``: none."""
        on = held is not None and bonus > 0
        self._held = held if on else None
        self._terms = (held_terms(bonus, getattr(self.base, "score_kind", "logit")), held_terms(bonus, "mass")) \
            if on else None
        return True

    def served_by(self, producer: int) -> range:
        return self.base.served_by(producer)

    # -- state ---------------------------------------------------------------------------------
    def prepare(self, ctx: PolicyContext) -> None:
        super().prepare(ctx)
        self.base.prepare(ctx)

    @staticmethod
    def _norms_layout(ctx: PolicyContext) -> tuple[tuple[int, int, int], torch.dtype]:
        """``[L, KvH, capacity]`` and the dtype of the value norms."""
        dtype = torch.float32 if ctx.dtype == torch.float32 else torch.bfloat16
        return (ctx.dims.num_layers, ctx.dims.num_kv_heads, ctx.capacity), dtype

    def state_bytes(self) -> int:
        shape, dtype = self._norms_layout(self.ctx)
        return self.base.state_bytes() + math.prod(shape) * dtype.itemsize

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.base.bind(ctx)
        shape, dtype = self._norms_layout(ctx)
        self.norms = torch.zeros(shape, dtype=dtype, device=ctx.device)  # one tensor: groups slice it
        self._writers: dict[int, native.BoundValueNorms | None] = {}  # per layer, bound at its first decode token

    def release(self) -> None:
        self.base.release()
        self.norms, self._writers = None, {}
        self._held, self._terms = None, None  # (the planner's: its working set is not kept alive by the policy)

    def observe_prefill(self, layer, x, q, k, v) -> None:
        self.base.observe_prefill(layer, x, q, k, v)
        self._write_norms(layer, 0, v)

    def rewind(self, length: int) -> None:
        self.base.rewind(length)  # norms past ``length`` are rewritten before they are read

    def observe_extend(self, layer, start, x, q, k, v) -> None:
        self.base.observe_extend(layer, start, x, q, k, v)
        self._write_norms(layer, start, v)

    def _write_norms(self, layer: int, start: int, v: torch.Tensor) -> None:
        """Value norms of v ``[KvH, T, D]`` at positions ``start..start+T-1``, ``NORM_CHUNK`` tokens at a time."""
        w_o = self.ctx.adapter.output_projection(layer)
        for offset in range(0, v.shape[1], NORM_CHUNK):
            chunk = v[:, offset : offset + NORM_CHUNK]
            self.norms[layer][:, start + offset : start + offset + chunk.shape[1]] = value_norms(chunk, w_o)

    def observe_decode(self, layer, position, x, q, k, v) -> None:
        self.base.observe_decode(layer, position, x, q, k, v)
        writer = self._norm_writer(layer)
        if writer is None or not native.enabled() or not writer(v, position):
            w_o = self.ctx.adapter.output_projection(layer)
            self.norms[layer][:, position] = value_norms(v.unsqueeze(1), w_o)[:, 0]

    def _norm_writer(self, layer: int) -> "native.BoundValueNorms | None":
        """The native kernel that writes a decode token's value norms into ``layer``'s row (bound at the layer's
        first decode token), or None where it does not apply: off the CPU, bfloat16 norms, no kernels."""
        if layer not in self._writers:
            kernels = native.kernels() if self.norms.is_cpu else None
            self._writers[layer] = None if kernels is None else kernels.bind_value_norms(
                self.ctx.adapter.output_projection(layer), self.norms[layer])
        return self._writers[layer]

    def observe_attention(self, layer, positions, weights) -> None:
        self.base.observe_attention(layer, positions, weights)

    # -- scoring -------------------------------------------------------------------------------
    def score(self, layer: int, q: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        scores = self.base.score(layer, q, candidates)
        return self.reweight(range(layer, layer + 1), scores.unsqueeze(0), candidates)[0]

    def plan(self, layer: int, x: torch.Tensor, candidates: Candidates, only: range | None = None,
             describe: bool = False) -> tuple[range, torch.Tensor]:
        layers, scores = self.base.plan(layer, x, candidates, only)  # a tensor: the value norms re-weight it
        return layers, self.reweight(layers, scores, candidates)

    def reweight(self, layers: range, scores: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """Base scores ``[Lg, KvH, n]`` of consecutive ``layers`` -> two-stage scores ``[Lg, KvH, n]`` float32.

        One batched pass for a whole producer group: the value norms enter as one slice.
        """
        scores = scores.to(torch.float32)
        if scores.shape[-1] == 0:
            return scores
        kind = getattr(self.base, "score_kind", "logit")
        attention = attention_like(scores, kind)
        norms = self.norms[layers.start : layers.stop, :, candidates.lo : candidates.hi].to(torch.float32)
        second = (attention + self.eps) * norms
        ranked = scores
        if self._held is not None:  # --keep-bonus: each stage raises its held positions on its own scale
            held = self._held(layers, candidates).view(scores.shape)
            ranked = favour_held(scores, held, self._terms[0])
            second = favour_held(second, held, self._terms[1])
        first = first_stage_mask(ranked, int(self.alpha * candidates.keep))
        top = second.amax(dim=-1, keepdim=True)
        combined = torch.where(first, top + 1.0 + attention, second)
        return combined.masked_fill(torch.isneginf(scores), NEVER)


def value_norms(v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """``||v W_O^h||_1`` averaged over each KV group: v ``[KvH, T, D]``, w_o ``[H, D, E]`` -> ``[KvH, T]``.

    Projected in the weights' dtype (the model's) by one batched matmul over heads (a strided
    ``w_o`` view is used as it is), reduced in float32.
    """
    kv_heads, _, _ = v.shape
    per_head = v.to(w_o.dtype).repeat_interleave(w_o.shape[0] // kv_heads, dim=0)  # [H, T, D]
    projected = torch.matmul(per_head, w_o)  # [H, T, E]
    l1 = projected.to(torch.float32).abs().sum(dim=-1)  # [H, T]
    return l1.view(kv_heads, -1, l1.shape[-1]).mean(dim=1)


def attention_like(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Base scores ``[..., n]`` -> a distribution over the candidates ``[..., n]`` (0 at ``-inf``).

    ``"logit"``: softmax. ``"mass"``: non-negative part divided by its sum. A head whose scores
    are all ``-inf`` (or all zero mass) gets all zeros.
    """
    finite = ~torch.isneginf(scores)
    if kind == "mass":
        mass = torch.where(finite, scores.clamp(min=0.0), 0.0)
        return mass / mass.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    if kind != "logit":
        raise ValueError(f"unknown score kind {kind!r}: expected 'logit' or 'mass'")
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isneginf(peak), 0.0, peak)  # a row of only -inf: avoid -inf - -inf
    weights = torch.where(finite, torch.exp(scores - peak), 0.0)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def first_stage_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The top-``count`` base scores per row: ``[..., n]`` -> bool ``[..., n]``."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    count = min(count, scores.shape[-1])
    if count > 0:
        mask.scatter_(-1, topk_unsorted(scores, count)[1], True)  # the selector's own top-k, ties alike
    return mask
