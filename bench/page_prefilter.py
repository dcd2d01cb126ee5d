"""Pages before tokens: what scoring page bounds first would cost TokenButler's selection in recall.

At 32k the selection's scores are bound by their multiply-adds (bench/README.md), and scoring fewer tokens
is the lever left. Quest's bound applied to the compact keys would do that: for a page of ``P`` tokens with
per-dimension minima and maxima ``lo``, ``hi`` of its projected keys, no token of it scores above
``q+ . hi + q- . lo`` (``q+``, ``q-`` the query's positive and negative parts), one product of ``2 d'`` per page
instead of ``P`` of ``d'``. The engine would score the tokens of only the best pages by that bound,
``factor`` times the budget of them, and select among those as it does now.

This measures, on the embedded model's own attention over held-out text, the recall of oracle top-k mass of
that selection against the engine's (sinks + window + the predictor's top tokens, ``tokenbutler_engine`` of
``bench/predictor_report.py``), on the same query rows of the second half of each sequence (where a
prefilter would act), paired by sequence. Pages are ranked by the group's mean over its query heads of the
softmax of their bounds (the selection's rule, each token standing at its page's bound); the candidates'
tokens are then ranked by the predictor's probabilities, each head's softmax running over the candidates, the
sinks and the window only (the rule as built: ``selection/pages.py``, ``tbrun generate --page-prefilter 16``;
reports before 2026-12-07 ranked them by the softmax over every token, ``"rule"`` absent from their JSON).
``--budget`` sets the share selected (10% by default). The work it saves is measured by
``bench/page_prefilter_speed.py``; the arithmetic here is the scores' products only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from offload_engine.machine import portable_path
from offload_engine.models import load_model
from offload_engine.predictor.checkpoint import load_checkpoint
from offload_engine.predictor.corpus import resolve_corpus
from offload_engine.predictor.data import load_held_out
from offload_engine.predictor.evaluation import budget_counts, engine_fixed_mask, group_mean_probs, select_top
from offload_engine.predictor.teacher import causal_mask, layer_states, sample_rows, teacher_probs

from .predictor_report import mean_interval, parse_lengths, signed_cell
from .report import machine_header, markdown_header, markdown_table, provenance, write_reports

BUDGET = 0.10  # the share selected, unless --budget says otherwise
RULE = "candidates' softmax over the candidates, sinks and window (as built)"


def page_bounds(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys ``[KvH, T, d']`` -> (maxima, minima) ``[KvH, T, d']``: each token's page's per-dimension extremes."""
    kvh, length, dim = keys.shape
    padded = torch.nn.functional.pad(keys, (0, 0, 0, (-length) % page)).view(kvh, -1, page, dim)
    spread = lambda pages: pages.repeat_interleave(page, dim=1)[:, :length]  # noqa: E731
    return spread(padded.amax(2)), spread(padded.amin(2))


def bound_logits(predictor, queries: torch.Tensor, keys: torch.Tensor, page: int) -> torch.Tensor:
    """Each token's page bound per model head, ``[H, R, T]``: ``q+ . max + q- . min`` (the predictor's scale)."""
    maxima, minima = page_bounds(keys, page)
    bound = predictor.head_scores(queries.clamp(min=0), maxima) + predictor.head_scores(queries.clamp(max=0), minima)
    return predictor.expand_heads(bound).float()


def selections(logits, bounds: dict, rows, length: int, group: int, factors, budget: float = BUDGET
               ) -> dict[str, torch.Tensor]:
    """Per KV head ``[KvH, R, T]`` masks at ``budget``: ``engine`` and, per (page, factor), the engine's rule
    restricted to the tokens of the ``factor * k / page`` best pages (sinks and window always in, each head's
    softmax over those and the candidates), plus their shares."""
    future = causal_mask(rows, length)
    counts = budget_counts(rows, budget)
    always = engine_fixed_mask(rows, counts, length)
    shared = group_mean_probs(logits.masked_fill(future, float("-inf")), group, future)
    out = {"engine": select_top(shared.masked_fill(always, 2.0), counts)}
    for page, page_logits in bounds.items():
        by_page = group_mean_probs(page_logits.masked_fill(future, float("-inf")), group, future).masked_fill(always, 2.0)
        for factor in factors:
            kept = torch.clamp(torch.ceil(factor * counts / page).long() * page, max=length)
            candidates = (select_top(by_page, kept) & ~future) | always
            visible = candidates.repeat_interleave(group, 0)  # [H, R, T]: what each head's softmax runs over
            restricted = group_mean_probs(logits.masked_fill(~visible, float("-inf")), group, ~candidates)
            out[f"P{page} x{factor:g}"] = select_top(restricted.masked_fill(always, 2.0), counts)
            visible = (~future).sum(-1).float()
            out[f"P{page} x{factor:g} share"] = (candidates.sum(-1).float() / visible).mean()
    return out


def sequence_recall(predictor, adapter, ids: torch.Tensor, rows: torch.Tensor, pages, factors,
                    budget: float = BUDGET) -> dict[str, float]:
    """Mean recall over consumer layers, query heads and rows of each selection (and each candidate share)."""
    group, sums, layers, queries = adapter.dims.group_size, {}, 0, {}
    for state in layer_states(adapter, ids.unsqueeze(0)):
        layer = state.layer
        if layer >= 1:
            probs = teacher_probs(state.q[:, rows], state.k, rows, adapter.scaling).cpu()  # [H, R, T]
            producer = predictor.config.producer_of(layer)
            layer_queries = queries[producer][:, layer - producer - 1]
            keys = predictor.project_keys(layer, state.k, 0)
            logits = predictor.expand_heads(predictor.head_scores(layer_queries, keys)).float()
            bounds = {page: bound_logits(predictor, layer_queries, keys, page) for page in pages}
            masks = selections(logits, bounds, rows, probs.shape[-1], group, factors, budget)
            best = (probs * select_top(probs.masked_fill(causal_mask(rows, probs.shape[-1]), -1.0),
                                       budget_counts(rows, budget))).sum(-1).clamp_min(1e-12)
            for name, mask in masks.items():
                value = mask if name.endswith("share") else \
                    ((probs * mask.repeat_interleave(group, 0)).sum(-1) / best).mean()
                sums[name] = sums.get(name, 0.0) + float(value)
            layers += 1
        if predictor.is_producer(layer):
            queries[layer] = predictor.importance_queries(layer, state.x[rows], rows)
    return {name: total / layers for name, total in sums.items()}


def build_report(args) -> dict:
    adapter = load_model(args.model)
    predictor, config = load_checkpoint(args.predictor, adapter.dims)
    corpus = resolve_corpus(args.corpus, args.seed)
    report = {"provenance": provenance("python -m tbrun_bench.page_prefilter"),
              "machine": machine_header(torch.device("cpu")),
              "predictor": {"path": portable_path(args.predictor), "weights_sha256": config.get("weights_sha256")},
              "budget": args.budget, "rule": RULE, "pages": args.pages, "factors": args.factors, "rows": args.rows,
              "lengths": {}}
    for length, count in parse_lengths(args.lengths):
        sequences = load_held_out([], adapter.tokenizer, length, count, args.seed, corpus=corpus)
        per_sequence: dict[str, list[float]] = {}
        for index, ids in enumerate(sequences):
            rows = sample_rows(length, args.rows, torch.Generator().manual_seed(args.seed + index))
            rows = rows[rows >= length // 2]
            with torch.no_grad():
                values = sequence_recall(predictor, adapter, ids, rows, args.pages, args.factors, args.budget)
            for name, value in values.items():
                per_sequence.setdefault(name, []).append(value)
            print(f"{length} tokens, sequence {index + 1}/{count}: engine {values['engine']:.4f}", flush=True)
        engine = per_sequence["engine"]
        report["lengths"][str(length)] = {
            "sequences": count, "per_sequence": per_sequence,
            "recall": {name: mean_interval(values) for name, values in per_sequence.items()},
            "minus_engine": {name: mean_interval([a - b for a, b in zip(values, engine, strict=True)])
                             for name, values in per_sequence.items()
                             if name != "engine" and not name.endswith("share")}}
    return report


def to_markdown(report: dict) -> str:
    lengths = report["lengths"]
    rows = []
    for page in report["pages"]:
        for factor in report["factors"]:
            name = f"P{page} x{factor:g}"
            scored = f"{2 / page:.1%}"
            cells = []
            for result in lengths.values():
                d = result["minus_engine"][name]
                cells.append(f"{result['recall'][name + ' share']['mean']:.0%} / {result['recall'][name]['mean']:.3f} / "
                             f"{signed_cell(d)}")
            rows.append([f"pages of {page}, {factor:g} x the budget", scored, *cells])
    rows.append(["engine (every token scored)", "100%",
                 *(f"100% / {r['recall']['engine']['mean']:.3f}" for r in lengths.values())])
    counts = ", ".join(f"{r['sequences']} at {n}" for n, r in lengths.items())
    return "\n".join([
        markdown_header("Pages before tokens: recall of a page-bound prefilter on TokenButler's selection", report), "",
        f"Predictor `{report['predictor']['path']}` (weights `{(report['predictor']['weights_sha256'] or '')[:8]}...`), "
        f"budget {report['budget']:.0%}, up to {report['rows']} query rows per sequence drawn from its second half; "
        f"held-out sequences: {counts}. Candidates ranked by: {report.get('rule', 'the softmax over every token')}. "
        "See the module docstring of `bench/page_prefilter.py` for the rule.", "",
        markdown_table(["prefilter", "bounds' products, of scoring every token (arithmetic)",
                        *(f"{n} tokens: candidates / recall / minus engine, paired [95%]" for n in lengths)], rows), "",
        "Work of the scores with a prefilter, as a share of scoring every token: the bounds' (one product of 2d' "
        "per page of P tokens: 2/P) plus the candidates' share (their tokens are scored as now); the top-k then "
        "runs over the candidates only.", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictor", required=True, type=Path)
    parser.add_argument("--corpus", action="append", required=True, help="PACKAGE:GLOB sources training used")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--lengths", default="4096:5,8192:3", help="LENGTH:SEQUENCES,... held-out contexts")
    parser.add_argument("--pages", default="8,16,32", help="page sizes in tokens")
    parser.add_argument("--factors", default="2,4", help="candidate tokens, in multiples of the budget")
    parser.add_argument("--rows", type=int, default=64, help="query rows drawn per sequence (the second half's kept)")
    parser.add_argument("--budget", type=float, default=BUDGET, help="share of the tokens selected (0.1: 10%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="report path without extension")
    args = parser.parse_args(argv)
    try:
        args.pages = [int(x) for x in args.pages.split(",")]
        args.factors = [float(x) for x in args.factors.split(",")]
    except ValueError:
        parser.error("--pages takes integers and --factors numbers, comma-separated: --pages 8,32 --factors 2,4")
    if min(args.pages) < 1 or min(args.factors) <= 0 or not 0 < args.budget <= 1:
        parser.error("--pages must be >= 1, --factors > 0 and --budget a share in (0, 1]")
    torch.set_num_threads(1)
    report = build_report(args)
    write_reports(args.out, report, to_markdown(report))


if __name__ == "__main__":
    main()
