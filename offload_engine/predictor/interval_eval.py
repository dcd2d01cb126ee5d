"""How a selection ages between predictions (interval N), and what neighbour fetching buys back.

Engine-like setting on held-out text: at an anchor row ``a`` the predictor selects, per consumer
layer and KV head, ``k`` of the candidates ``[S, a - W + 1)`` (the selector's own functions);
the selection is then reused for the rows ``a .. a+N-1``. For a row ``r`` and query head ``h`` the
recall is ``A_h,r(selection) / A_h,r(top-k of the same candidates)``. Variants fetch at most ``k``
tokens each:

- ``fresh``: re-predicted at every row (interval 1, the reference);
- ``reuse``: the anchor's top-k reused;
- ``reuse_radius1``: the anchor's top-``k/2``, each with the position after it (``expand_neighbors``);
- ``reuse_runs``: the anchor's top-``k/2`` with the reference's run extension (``extend_runs``);
- ``reuse_radius1_2x`` and ``reuse_runs_2x``: the same rules on the anchor's full top-k (up to 2k
  tokens fetched, as the reference does).
"""

from __future__ import annotations

import math

import torch

from ..models import ModelAdapter
from ..selection.ranking import expand_neighbors, extend_runs, topk_positions
from .network import TokenButlerPredictor
from .teacher import causal_mask, layer_states, teacher_probs

VARIANTS = ("fresh", "reuse", "reuse_radius1", "reuse_runs", "reuse_radius1_2x", "reuse_runs_2x")


def _positions_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """positions ``[KvH, k]`` (``-1`` padding) -> bool ``[KvH, length]``."""
    mask = torch.zeros(positions.shape[0], length + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(positions < 0, length, positions), True)
    return mask[:, :length]


def _variant_masks(anchor_scores: torch.Tensor, lo: int, hi: int, keep: int, length: int) -> dict[str, torch.Tensor]:
    """Masks ``[KvH, length]`` of the reuse variants from the anchor's scores ``[KvH, hi-lo]``."""
    half = max(1, keep // 2)
    top = topk_positions(anchor_scores, keep, lo)
    top_half = topk_positions(anchor_scores, half, lo)
    return {
        "reuse": _positions_mask(top, length),
        "reuse_radius1": _positions_mask(expand_neighbors(top_half, 1, lo, hi)[:, :keep], length),
        "reuse_runs": _positions_mask(extend_runs(top_half, lo, hi)[:, :keep], length),
        "reuse_radius1_2x": _positions_mask(expand_neighbors(top, 1, lo, hi), length),
        "reuse_runs_2x": _positions_mask(extend_runs(top, lo, hi), length),
    }


def _row_recall(probs: torch.Tensor, mask: torch.Tensor, lo: int, hi: int, keep: int, group: int) -> float:
    """probs ``[H, T]`` of one row, mask ``[KvH, T]`` -> mean recall over query heads."""
    inside = probs[:, lo:hi]
    best = inside.topk(keep, dim=-1).values.sum(-1).clamp_min(1e-12)  # [H]
    got = (probs * mask.repeat_interleave(group, 0)).sum(-1)
    return float((got / best).mean())


@torch.no_grad()
def interval_recall(
    predictor: TokenButlerPredictor,
    adapter: ModelAdapter,
    sequences: torch.Tensor,
    interval: int = 8,
    fraction: float = 0.10,
    sinks: int = 4,
    window: int = 32,
    anchors: int = 6,
    seed: int = 0,
) -> dict:
    """Recall of each variant by rows since the prediction. sequences ``[M, T]`` -> JSON-able dict:
    ``{"by_offset": {variant: [recall at offset 0 .. N-1]}, ...}``."""
    generator = torch.Generator().manual_seed(seed)
    sums = {v: torch.zeros(interval, dtype=torch.float64) for v in VARIANTS}
    count = 0
    for ids in sequences:
        length = ids.shape[0]
        starts = torch.randint(length // 2, length - interval + 1, (anchors,), generator=generator)
        rows = (starts.unsqueeze(1) + torch.arange(interval)).flatten()  # [A*N]
        for layer, probs, scores in _layer_rows(predictor, adapter, ids, rows):
            for i, anchor in enumerate(starts.tolist()):
                lo, hi = sinks, anchor - window + 1
                keep = max(1, round(fraction * (hi - lo)))
                masks = _variant_masks(scores[:, i * interval, lo:hi], lo, hi, keep, length)
                for j in range(interval):
                    r = i * interval + j
                    fresh = _positions_mask(topk_positions(scores[:, r, lo:hi], keep, lo), length)
                    for variant, mask in {"fresh": fresh, **masks}.items():
                        sums[variant][j] += _row_recall(probs[:, r], mask, lo, hi, keep, adapter.dims.group_size)
                count += 1
    by_offset = {v: [round(float(x) / count, 4) for x in sums[v]] for v in VARIANTS}
    return {
        "interval": interval, "budget": f"{fraction * 100:g}% of the candidates", "sinks": sinks, "window": window,
        "by_offset": by_offset,
        "mean": {v: round(sum(values) / interval, 4) for v, values in by_offset.items()},
    }


def _group_mean_log_probs(logits: torch.Tensor, rows: torch.Tensor, group: int) -> torch.Tensor:
    """``[H, R, T]`` -> ``[KvH, R, T]``: log of the group-mean causal softmax."""
    log_probs = torch.log_softmax(logits.masked_fill(causal_mask(rows, logits.shape[-1]), float("-inf")), -1)
    return torch.logsumexp(log_probs.view(-1, group, *log_probs.shape[1:]), dim=1) - math.log(group)


def _layer_rows(predictor: TokenButlerPredictor, adapter: ModelAdapter, ids: torch.Tensor, rows: torch.Tensor):
    """Per consumer layer: (layer, teacher probs ``[H, R, T]``, scores ``[KvH, R, T]``): the log of the
    group's mean predicted attention, as the policy ranks tokens."""
    queries = {}
    for state in layer_states(adapter, ids.unsqueeze(0)):
        layer = state.layer
        if layer >= 1:
            producer = predictor.config.producer_of(layer)
            keys = predictor.project_keys(layer, state.k, 0)
            logits = predictor.head_scores(queries[producer][:, layer - producer - 1], keys)
            probs = teacher_probs(state.q[:, rows], state.k, rows, adapter.scaling).cpu()
            yield layer, probs, _group_mean_log_probs(logits.float().cpu(), rows, predictor.config.query_group)
        if predictor.is_producer(layer):
            on_device = rows.to(state.x.device)
            queries[layer] = predictor.importance_queries(layer, state.x[on_device], on_device)
