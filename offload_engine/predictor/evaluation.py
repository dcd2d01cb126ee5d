"""Held-out report: how much of the oracle's top-k attention mass each selection captures.

For a query row at position ``i`` and a budget fraction ``b``, every method selects
``k = ceil(b * (i + 1))`` of the ``i + 1`` visible tokens. For query head ``h`` with attention
``A_h``, the recall of a selection ``S`` is ``A_h(S) / A_h(O_h)`` where ``O_h`` is the top-k of
``A_h`` itself (the oracle), so 1.0 means as good as the oracle. Methods:

- ``tokenbutler``: top-k per KV head of the mean over the group's query heads of the predicted
  attention probabilities (the policy's default ``group_reduction="mean"``);
- ``tokenbutler_engine``: what the engine attends at the same ``k``: the first ``sinks`` tokens and the
  engine's local window under budget ``k`` (``config.local_window``: ``(k - sinks) // 2`` clamped to
  ``[16, ENGINE_WINDOW]``) always, the rest of ``k`` by ``tokenbutler``: exactly the engine's rule with
  its defaults (sinks 4, ``--window`` 128) wherever ``k`` is at least the floor ``sinks + 16`` (every
  sampled row from 200 tokens on at 10%); below it the engine attends the floor, this keeps ``k``. The
  predictor's softmax here includes the row's own token, the engine's excludes it (it is in the window
  either way); the engine's compact keys on the CPU are int8 where it has AVX512-VNNI
  (``tokenbutler_int8``), else bfloat16 (``tokenbutler_bf16``);
- ``tokenbutler_int8``: ``tokenbutler`` with the projected keys quantised to int8 (``quantize_keys``) and
  the importance queries too (``quantize_query``): the CPU engine's int8 compact key cache, the default
  where the CPU has AVX512-VNNI, whose integer kernel takes the query in int8;
- ``tokenbutler_bf16``: ``tokenbutler`` with the projected keys and the importance queries rounded to
  bfloat16 (the CPU engine's compact key cache, scored with AVX512-BF16 pair products: ``compact_key_dtype``
  in policies/tokenbutler.py; where the CPU widens the keys instead, only the keys are rounded);
- ``tokenbutler_group_max``: top-k per KV head of the largest query-head logit (the reference's rule);
- ``tokenbutler_per_head``: top-k per query head (each head its own set: up to G x the bytes);
- ``oracle_group``: top-k per KV head of the group's mean true attention (the best shared set);
- ``streaming``: the first ``sinks`` tokens and the most recent ones;
- ``random``: k random visible tokens per KV head.

Main figures average over consumer layers ``1 .. L-1``; layer 0 (kept dense by the policy) is
reported apart: its ``oracle_mass`` (share of attention the best k tokens hold) shows how
concentrated it is.
"""

from __future__ import annotations

import math

import torch

from ..config import DEFAULT_WINDOW, WINDOW_SHARE, local_window
from ..models import ModelAdapter
from .network import TokenButlerPredictor, dequantize_keys, quantize_keys, quantize_query
from .teacher import causal_mask, distillation_loss, layer_states, sample_rows, teacher_probs

BUDGETS = (0.05, 0.10, 0.25, 0.50)
SINKS = 4
ENGINE_WINDOW = DEFAULT_WINDOW  # the engine's widest window (its rule: ``local_window``)
METHODS = ("tokenbutler", "tokenbutler_engine", "tokenbutler_int8", "tokenbutler_bf16", "tokenbutler_group_max",
           "tokenbutler_per_head", "oracle_group", "streaming", "random")


def budget_counts(rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """Tokens kept per row: ``ceil(fraction * (row + 1))``, at least 1. rows ``[R]`` -> ``[R]``."""
    return torch.clamp(torch.ceil(fraction * (rows + 1).double()).long(), min=1)


def select_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """scores ``[X, R, T]`` (future ``-inf``), counts ``[R]`` -> bool ``[X, R, T]``: the top counts[r]."""
    order = scores.argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < counts.view(1, -1, 1)


def streaming_mask(rows: torch.Tensor, counts: torch.Tensor, length: int, sinks: int = SINKS) -> torch.Tensor:
    """The first ``min(sinks, k)`` tokens and the most recent rest: bool ``[1, R, T]``."""
    t = torch.arange(length).view(1, -1)
    first = torch.clamp(counts, max=sinks).view(-1, 1)
    recent = (counts.view(-1, 1) - first)
    row = rows.view(-1, 1)
    return ((t < first) | ((t > row - recent) & (t <= row))).unsqueeze(0)


def _expand(mask: torch.Tensor, group: int) -> torch.Tensor:
    """Per-KV-head ``[KvH, R, T]`` -> per-query-head ``[H, R, T]``."""
    return mask.repeat_interleave(group, dim=0)


def _selections(probs, logits, rows, fraction, group, generator, stored_logits=None):
    """Masks ``{method: bool [H or 1, R, T]}`` for one layer and budget; logits None at layer 0;
    ``stored_logits``: ``{method: [H, R, T]}``, the logits from keys stored another way (int8, bfloat16)."""
    future = causal_mask(rows, probs.shape[-1])
    counts = budget_counts(rows, fraction)
    kvh = probs.shape[0] // group
    noise = torch.rand(kvh, *probs.shape[1:], generator=generator).masked_fill(future, -1.0)
    masks = {
        "oracle_head": select_top(probs.masked_fill(future, -1.0), counts),
        "oracle_group": _expand(select_top(probs.view(kvh, group, *probs.shape[1:]).mean(1).masked_fill(future, -1.0), counts), group),
        "streaming": streaming_mask(rows, counts, probs.shape[-1]),
        "random": _expand(select_top(noise, counts), group),
    }
    if logits is not None:
        masked = logits.masked_fill(future, float("-inf"))
        shared = group_mean_probs(masked, group, future)
        always = engine_fixed_mask(rows, counts, probs.shape[-1])  # sinks + window, kept first
        masks["tokenbutler"] = _expand(select_top(shared, counts), group)
        masks["tokenbutler_engine"] = _expand(select_top(shared.masked_fill(always, 2.0), counts), group)
        masks["tokenbutler_group_max"] = _expand(select_top(masked.view(kvh, group, *masked.shape[1:]).amax(1), counts), group)
        masks["tokenbutler_per_head"] = select_top(masked, counts)
    for method, variant in (stored_logits or {}).items():
        shared_variant = group_mean_probs(variant.masked_fill(future, float("-inf")), group, future)
        masks[method] = _expand(select_top(shared_variant, counts), group)
    return masks


def engine_fixed_mask(rows: torch.Tensor, counts: torch.Tensor, length: int,
                      window: int = ENGINE_WINDOW, share: float = WINDOW_SHARE) -> torch.Tensor:
    """What the engine attends whatever the scores, bool ``[1, R, T]``, for ``counts`` ``[R]`` = k per row: the
    first ``SINKS`` tokens and the engine's window under budget k with widest window ``window``
    (``local_window``: ``(k - SINKS) // 2`` clamped to ``[min(16, window), window]``; ``share`` other than a
    half: bench/window_study.py), at most k in all."""
    fixed = torch.minimum(counts, SINKS + local_window(counts, SINKS, window, share))
    return streaming_mask(rows, fixed, length)


def group_mean_probs(masked_logits: torch.Tensor, group: int, future: torch.Tensor) -> torch.Tensor:
    """``[H, R, T]`` logits (future ``-inf``) -> ``[KvH, R, T]`` mean softmax over each group (future -1)."""
    probs = torch.softmax(masked_logits, -1)
    return probs.view(-1, group, *probs.shape[1:]).mean(1).masked_fill(future, -1.0)


def _recalls(probs: torch.Tensor, masks: dict) -> tuple[dict[str, float], float]:
    """Mean recall per method (over heads and rows) and the oracle's captured mass."""
    best = (probs * masks["oracle_head"]).sum(-1).clamp_min(1e-12)  # [H, R]
    out = {m: float(((probs * mask).sum(-1) / best).mean()) for m, mask in masks.items() if m != "oracle_head"}
    return out, float(best.mean())


class _Tally:
    """Running means keyed by (section, method, budget)."""

    def __init__(self):
        self.sums: dict[tuple, float] = {}
        self.counts: dict[tuple, int] = {}

    def add(self, key: tuple, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: tuple) -> float:
        return self.sums[key] / self.counts[key]


def _label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


@torch.no_grad()
def evaluate(
    predictor: TokenButlerPredictor | None,
    adapter: ModelAdapter,
    sequences: torch.Tensor,
    rows: int = 64,
    budgets: tuple[float, ...] = BUDGETS,
    seed: int = 0,
    offset: int = 0,
) -> dict:
    """Held-out loss and recall of oracle top-k mass. sequences ``[M, T]`` long -> a JSON-able dict.

    ``predictor=None`` reports only the baselines (streaming, random, oracle_group). ``offset``
    shifts the positions (see ``teacher.layer_states``).
    """
    return evaluate_many({"": predictor}, adapter, sequences, rows, budgets, seed, offset)[""]


@torch.no_grad()
def evaluate_many(
    predictors: dict[str, TokenButlerPredictor | None],
    adapter: ModelAdapter,
    sequences: torch.Tensor,
    rows: int = 64,
    budgets: tuple[float, ...] = BUDGETS,
    seed: int = 0,
    offset: int = 0,
    row_pool: torch.Tensor | None = None,
) -> dict[str, dict]:
    """``evaluate`` for several predictors from one teacher pass per sequence: ``{name: report}``,
    each report the same as ``evaluate`` of that predictor alone (every predictor draws its rows and
    random baseline from its own generator, seeded alike).

    ``row_pool`` ``[M, T]`` bool: draw each sequence's query rows only where it is True (for example
    the copies ``recall.add_recall_spans`` wrote, to measure lookups apart from ordinary rows).
    """
    generators = {name: torch.Generator().manual_seed(seed) for name in predictors}
    tallies = {name: _Tally() for name in predictors}
    for index, ids in enumerate(sequences):
        draw = (lambda g: sample_rows(ids.shape[0], rows, g)) if row_pool is None else \
            (lambda g: sample_rows_from(row_pool[index], rows, g))
        row_index = [draw(generators[name]) for name in predictors][0]
        if row_index.numel() == 0:
            continue
        _evaluate_sequence(predictors, adapter, ids.unsqueeze(0), row_index, budgets, generators, tallies, offset)
    drawn = rows + 1 if row_pool is None else rows  # sample_rows adds the last row
    return {name: _report(tallies[name], predictor, sequences, drawn, budgets, adapter.dims.num_layers)
            for name, predictor in predictors.items()}


def sample_rows_from(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``count`` of the positions where ``pool`` ``[T]`` bool is True, sorted ``[R]`` long."""
    positions = pool.nonzero().flatten()
    if count < positions.numel():
        positions = positions[torch.randperm(positions.numel(), generator=generator)[:count]]
    return positions.sort().values


def _evaluate_sequence(predictors, adapter, ids, rows, budgets, generators, tallies, offset=0) -> None:
    queries = {name: {} for name in predictors}
    group = adapter.dims.group_size
    for state in layer_states(adapter, ids, offset):
        layer = state.layer
        probs = teacher_probs(state.q[:, rows], state.k, rows, adapter.scaling).cpu()
        for name, predictor in predictors.items():
            tally = tallies[name]
            logits, stored = None, {}
            if predictor is not None and layer >= 1:
                producer = predictor.config.producer_of(layer)
                layer_queries = queries[name][producer][:, layer - producer - 1]
                keys = predictor.project_keys(layer, state.k, offset)
                # per model head (a predictor with fewer query heads: each of its heads' logits for the
                # heads it stands for), so the group reductions below are the policy's over its query heads
                logits = predictor.expand_heads(predictor.head_scores(layer_queries, keys)).float().cpu()
                stored = {method: predictor.expand_heads(predictor.head_scores(q, k)).float().cpu() for method, q, k in (
                    ("tokenbutler_int8", quantize_query(layer_queries), dequantize_keys(*quantize_keys(keys))),
                    ("tokenbutler_bf16", layer_queries.bfloat16().float(), keys.bfloat16().float()))}
                tally.add(("loss",), float(distillation_loss(probs, logits, rows)))
            if predictor is not None and predictor.is_producer(layer):
                on_device = rows.to(state.x.device)
                queries[name][layer] = predictor.importance_queries(layer, state.x[on_device], on_device + offset)
            section = "layer0" if layer == 0 else "consumers"
            for fraction in budgets:
                masks = _selections(probs, logits, rows, fraction, group, generators[name], stored)
                recalls, mass = _recalls(probs, masks)
                tally.add((section, "oracle_mass", fraction), mass)
                for method, value in recalls.items():
                    tally.add((section, method, fraction), value)
                    tally.add(("per_layer", method, fraction, layer), value)


def _report(tally: _Tally, predictor, sequences, rows_per_sequence, budgets, num_layers) -> dict:
    methods = [m for m in METHODS if ("consumers", m, budgets[0]) in tally.sums]
    table = {m: {_label(b): tally.mean(("consumers", m, b)) for b in budgets} for m in methods}
    layer0 = {m: {_label(b): tally.mean(("layer0", m, b)) for b in budgets} for m in ("oracle_mass", "streaming", "random")}
    mid = min(budgets, key=lambda b: abs(b - 0.10))
    per_layer = {
        m: [round(tally.mean(("per_layer", m, mid, l)), 4) for l in range(num_layers) if ("per_layer", m, mid, l) in tally.sums]
        for m in ("tokenbutler", "streaming", "random")
        if ("per_layer", m, mid, num_layers - 1) in tally.sums
    }
    return {
        "sequences": int(sequences.shape[0]),
        "seq_len": int(sequences.shape[1]),
        "rows_per_sequence": rows_per_sequence,
        "budgets": [_label(b) for b in budgets],
        "loss": tally.mean(("loss",)) if ("loss",) in tally.sums else math.nan,
        "recall": table,
        "oracle_mass": {_label(b): tally.mean(("consumers", "oracle_mass", b)) for b in budgets},
        "layer0": layer0,
        "per_layer_recall_at": _label(mid),
        "per_layer_recall": per_layer,
        "note": "recall = attention mass on the selection / mass on the per-head oracle top-k; "
        "mean over query heads, sampled rows and consumer layers 1..L-1",
    }
