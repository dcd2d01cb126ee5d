"""Held-out quality report of a TokenButler predictor: recall of oracle top-k attention mass.

    python -m tbrun_bench.predictor_report --predictor predictors/smollm2-135m-instruct \\
        --corpus stdlib:pydoc_data/topics.py --corpus 'torch:nn/modules/*.py' --corpus 'stdlib:*.py' \\
        --lengths 1024:16,4096:6,8192:3 [--baseline OLD_PREDICTOR] --out bench/reports/predictor_smollm2

Reads only the held-out files of the training text (``--corpus`` / ``--data``, the same name-hash
split training used), and writes ``OUT.json`` and ``OUT.md``: per context length, recall at budgets
5/10/25/50% for tokenbutler (and its engine, int8, group-max and per-query-head variants) against the
oracle's shared set, streaming and random, each sequence evaluated on its own so that every mean has a
95% interval over sequences; optionally the same for a ``--baseline`` predictor on the same text, with
the difference paired by sequence (each sequence's recall is kept in the JSON);
layer 0's concentration; the interval/neighbour study; and the parameter and memory overhead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from offload_engine.config import MIN_WINDOW
from offload_engine.evaluation.scoring import t_interval
from offload_engine.machine import portable_path
from offload_engine.models import load_model
from offload_engine.predictor import evaluation
from offload_engine.predictor.checkpoint import load_checkpoint
from offload_engine.predictor.corpus import resolve_corpus
from offload_engine.predictor.data import load_held_out
from offload_engine.predictor.evaluation import evaluate_many
from offload_engine.predictor.interval_eval import interval_recall
from offload_engine.predictor.recall import RecallSpans, add_recall_spans

from .report import machine_header, markdown_header, markdown_table, provenance, write_reports

HEADLINE_BUDGET = "10%"
HEADLINE_METHODS = ("tokenbutler", "tokenbutler_engine", "oracle_group", "streaming", "random")


def mean_interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval of ``values`` (None bounds for one value)."""
    interval = t_interval(values)  # the evaluation's t quantiles (exact to 30 degrees of freedom); None for one
    mean, low, high = interval if interval is not None else (values[0], None, None)
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def per_sequence_recall(predictors: dict, adapter, sequences: torch.Tensor, rows: int, seed: int,
                        row_pool: torch.Tensor | None = None) -> dict[str, dict]:
    """``evaluate_many`` on each sequence alone (one teacher pass for every predictor), merged per
    predictor: the usual report (means over sequences, which are the means over all rows since every
    sequence has as many) plus ``interval[method][budget]`` over sequences. ``row_pool`` ``[M, T]``:
    query rows only where it is True; a sequence with none there is left out (every predictor alike, so
    pairs stay aligned) and counted in ``sequences_without_rows``."""
    judged = [i for i in range(len(sequences)) if row_pool is None or bool(row_pool[i].any())]
    if not judged:
        raise SystemExit("no held-out sequence has a query row in the pool (--lookups wrote no copies): "
                         "raise --lookups or use longer --lengths.")
    per_sequence = [evaluate_many(predictors, adapter, sequences[i].unsqueeze(0), rows=rows, seed=seed + i,
                                  row_pool=None if row_pool is None else row_pool[i : i + 1])
                    for i in judged]
    merged = {name: _merge([results[name] for results in per_sequence]) for name in predictors}
    for report in merged.values():
        report["sequences_without_rows"] = len(sequences) - len(judged)
    return merged


def _merge(results: list[dict]) -> dict:
    merged = dict(results[0])
    merged["sequences"] = len(results)
    merged["loss"] = sum(r["loss"] for r in results) / len(results)
    budgets = merged["budgets"]
    merged["recall"] = {m: {b: sum(r["recall"][m][b] for r in results) / len(results) for b in budgets}
                        for m in results[0]["recall"]}
    merged["oracle_mass"] = {b: sum(r["oracle_mass"][b] for r in results) / len(results) for b in budgets}
    merged["layer0"] = {m: {b: sum(r["layer0"][m][b] for r in results) / len(results) for b in budgets}
                        for m in results[0]["layer0"]}  # every sequence's, not the first's
    merged["interval"] = {m: {b: mean_interval([r["recall"][m][b] for r in results]) for b in budgets}
                          for m in results[0]["recall"]}
    # each sequence's recall, in the order evaluated: a baseline's on the same text pairs with it
    merged["per_sequence"] = {m: {b: [r["recall"][m][b] for r in results] for b in budgets}
                              for m in results[0]["recall"]}
    merged.pop("per_layer_recall", None)
    return merged


PAIRED_METHODS = ("tokenbutler", "tokenbutler_engine")


def paired_differences(results: dict, baseline: dict) -> dict:
    """Per method of ``PAIRED_METHODS`` and budget: the mean and 95% interval of predictor minus baseline over
    the sequences both were judged on (the same text, query rows and teacher pass: ``per_sequence_recall``), so
    that a difference smaller than either interval can still be told from noise."""
    return {m: {b: mean_interval([x - y for x, y in zip(results["per_sequence"][m][b], baseline["per_sequence"][m][b],
                                                        strict=True)])
                for b in results["budgets"]}
            for m in PAIRED_METHODS if m in results["per_sequence"] and m in baseline.get("per_sequence", {})}


def overhead(predictor, adapter) -> dict:
    """Parameters in % of the model; compact-cache bytes per token in % of the KV bytes."""
    model_parameters = sum(p.numel() for p in adapter.model.parameters())
    c, dims = predictor.config, adapter.dims
    compact = (c.num_layers - 1) * c.num_kv_heads * c.dim  # entries per token
    kv = 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim
    return {
        "predictor_parameters": predictor.num_parameters(),
        "model_parameters": model_parameters,
        "parameters_percent_of_model": round(100 * predictor.num_parameters() / model_parameters, 3),
        "compact_cache_percent_of_kv_bytes_same_dtype": round(100 * compact / kv, 3),
        "compact_cache_percent_of_kv_bytes_int8": round(100 * compact * (1 + 2 / c.dim) / (2 * kv), 3),
    }


def parse_lengths(text: str) -> list[tuple[int, int]]:
    """``"1024:16,4096:4"`` -> ``[(1024, 16), (4096, 4)]`` (context length, held-out sequences)."""
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise SystemExit(f"--lengths {text!r}: write LENGTH:SEQUENCES[,LENGTH:SEQUENCES...], e.g. 1024:16,4096:4")
    return pairs


def build_report(args) -> dict:
    adapter = load_model(args.model)
    predictor, config = load_checkpoint(args.predictor, adapter.dims)
    baseline, baseline_config = load_checkpoint(args.baseline, adapter.dims) if args.baseline else (None, {})
    corpus = resolve_corpus(args.corpus, args.seed) if args.corpus else None
    report = {"provenance": provenance("python -m tbrun_bench.predictor_report"),
              "machine": machine_header(torch.device("cpu")),
              "predictor": {"path": portable_path(args.predictor),
                            **{k: config.get(k) for k in ("weights_sha256", "predictor", "steps", "command", "commit",
                                                          "data", "train")}},
              "baseline": portable_path(args.baseline) if args.baseline else None,
              "baseline_sha256": baseline_config.get("weights_sha256"),
              "overhead": overhead(predictor, adapter), "recall": {}, "baseline_recall": {}, "lookups": args.lookups,
              "engine_rule": engine_rule()}
    lengths = [(seq_len, count) for seq_len, count in parse_lengths(args.lengths) if seq_len <= adapter.dims.max_positions]
    if not lengths:
        raise SystemExit(f"every --lengths is past the model's {adapter.dims.max_positions} trained positions: "
                         "give shorter ones.")
    for seq_len, count in lengths:
        sequences = load_held_out(args.data or [], adapter.tokenizer, seq_len, count, args.seed, corpus=corpus,
                                  mix=args.mix)
        label = str(seq_len)
        predictors = {"predictor": predictor, **({"baseline": baseline} if baseline is not None else {})}
        results = per_sequence_recall(predictors, adapter, sequences, args.rows, args.seed)
        report["recall"][label] = results["predictor"]
        if baseline is not None:
            report["baseline_recall"][label] = results["baseline"]
            report.setdefault("paired", {})[label] = paired_differences(results["predictor"], results["baseline"])
        if args.lookups > 0:
            copied_text, copied = add_recall_spans(sequences, RecallSpans(fraction=args.lookups), seed=args.seed + 1)
            lookups = per_sequence_recall(predictors, adapter, copied_text, args.rows, args.seed, row_pool=copied)
            report.setdefault("lookup_recall", {})[label] = lookups["predictor"]
            if baseline is not None:
                report.setdefault("baseline_lookup_recall", {})[label] = lookups["baseline"]
                report.setdefault("paired_lookup", {})[label] = paired_differences(lookups["predictor"],
                                                                                   lookups["baseline"])
        print(f"recall at {label} done", flush=True)
    if args.interval > 1:
        seq_len, count = lengths[0]  # the first length the model reaches
        sequences = load_held_out(args.data or [], adapter.tokenizer, seq_len, count, args.seed, corpus=corpus,
                                  mix=args.mix)
        report["interval"] = interval_recall(predictor, adapter, sequences, interval=args.interval, seed=args.seed)
    return report


def _short_hash(sha256: str | None) -> str:
    """``, weights sha256 1234abcd...`` or nothing when the report predates recording it."""
    return f", weights sha256 `{sha256[:8]}...`" if sha256 else ""


def _cell(interval: dict) -> str:
    if interval["low"] is None:
        return f"{interval['mean']:.3f}"
    return f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def headline(report: dict, key: str = "recall", rows_are: str = "") -> list[str]:
    """One table: recall at 10% with its 95% interval, per context length and method, from
    ``report[key]`` (and the baseline's ``report["baseline_" + key]``)."""
    lengths = list(report[key])
    rows = []
    for method in HEADLINE_METHODS:
        rows.append([method, *(_cell(report[key][n]["interval"][method][HEADLINE_BUDGET]) for n in lengths)])
    baseline = report.get(f"baseline_{key}")
    for n_label, source in (("baseline tokenbutler", "tokenbutler"), ("baseline tokenbutler_engine", "tokenbutler_engine")):
        if baseline:
            rows.append([f"{n_label} (`{report['baseline']}`{_short_hash(report.get('baseline_sha256'))})",
                         *(_cell(baseline[n]["interval"][source][HEADLINE_BUDGET]) if n in baseline else "-"
                           for n in lengths)])
    counts = ", ".join(f"{report[key][n]['sequences']} at {n}" for n in lengths)
    return [f"## Recall at {HEADLINE_BUDGET}{rows_are}, mean [95% interval over held-out sequences: {counts}]", "",
            markdown_table(["method", *(f"{n} tokens" for n in lengths)], rows), ""]


def paired_table(report: dict, key: str = "paired", rows_are: str = "") -> list[str]:
    """Predictor minus baseline at 10%, paired over the same held-out sequences, per method and length."""
    paired = report.get(key)
    if not paired:
        return []
    lengths = list(paired)
    rows = [[method, *(signed_cell(paired[n][method][HEADLINE_BUDGET]) if method in paired[n] else "-" for n in lengths)]
            for method in PAIRED_METHODS]
    counts = ", ".join(f"{next(iter(paired[n].values()))[HEADLINE_BUDGET]['n']} at {n}" for n in lengths if paired[n])
    baseline = f"`{report['baseline']}`{_short_hash(report.get('baseline_sha256'))}"
    return [f"## Predictor minus baseline ({baseline}) at {HEADLINE_BUDGET}{rows_are}, paired by sequence "
            f"(mean [95% interval]; sequences: {counts})", "",
            markdown_table(["method", *(f"{n} tokens" for n in lengths)], rows), "",
            "An interval that excludes 0 tells the two apart on this text; one that includes it does not (one "
            "sequence gives no interval).", ""]


def signed_cell(interval: dict) -> str:
    if interval["low"] is None:
        return f"{interval['mean']:+.3f}"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def engine_rule() -> dict:
    """What ``tokenbutler_engine`` keeps whatever the scores: the engine's sinks and window rule (``local_window``)."""
    return {"sinks": evaluation.SINKS, "window": evaluation.ENGINE_WINDOW, "least_window": MIN_WINDOW}


def engine_rule_text(rule: dict | None) -> list[str]:
    """The Markdown line that says which window ``tokenbutler_engine`` kept (reports before the rule was recorded
    kept ``min(64, (k - 4) // 2)``)."""
    if not rule:
        return []
    least = min(rule["least_window"], rule["window"])
    return [f"`tokenbutler_engine`: what the engine attends at the same budget k: the first {rule['sinks']} tokens, a "
            f"window of (k - {rule['sinks']}) // 2 recent tokens clamped to [{least}, {rule['window']}] (the engine's "
            "rule), the rest of k by the predictor's scores.", ""]


def to_markdown(report: dict) -> str:
    parts = [markdown_header("TokenButler predictor: held-out recall of oracle top-k attention mass", report), ""]
    o = report["overhead"]
    parts += [f"Predictor `{report['predictor']['path']}`{_short_hash(report['predictor'].get('weights_sha256'))}: "
              f"{o['predictor_parameters']:,} parameters = "
              f"**{o['parameters_percent_of_model']}% of the model** ({o['model_parameters']:,}); compact key "
              f"cache = {o['compact_cache_percent_of_kv_bytes_same_dtype']}% of the KV bytes "
              f"({o['compact_cache_percent_of_kv_bytes_int8']}% with int8 keys). Trained with "
              f"`{report['predictor'].get('command')}`.", ""]
    parts += engine_rule_text(report.get("engine_rule"))
    parts += headline(report)
    parts += paired_table(report)
    if report.get("lookup_recall"):
        parts += headline(report, "lookup_recall", ", lookup rows only")
        parts += paired_table(report, "paired_lookup", ", lookup rows only")
        parts += [f"Lookup rows: the held-out text with {report['lookups']:.0%} of each sequence overwritten by copies of earlier "
                  "spans (train-predictor --recall's rule, other spans), query rows drawn only from the copies: "
                  "rows whose model looks far back for one earlier passage, as an answer to a needle does. "
                  "Ordinary rows put most attention near the query, where the window keeps it anyway.", ""]
    for label, result in report["recall"].items():
        budgets = result["budgets"]
        shifted = ""
        parts += [f"## {result['sequences']} held-out sequences of {label} tokens{shifted}, {result['rows_per_sequence']} "
                  f"query rows each (held-out loss {result['loss']:.4f})", "",
                  "Recall = attention mass on the selection / mass on the head's own top-k (1.0 = oracle), mean over "
                  "query heads, rows and consumer layers 1..L-1.", ""]
        rows = [[m, *(f"{v[b]:.3f}" for b in budgets)] for m, v in result["recall"].items()]
        rows.append(["(oracle top-k share of all attention)", *(f"{result['oracle_mass'][b]:.3f}" for b in budgets)])
        parts += [markdown_table(["method", *budgets], rows), ""]
        layer0 = result["layer0"]
        names = {"oracle_mass": "oracle top-k share of all attention", "streaming": "streaming recall",
                 "random": "random recall"}
        parts += ["Layer 0 (kept dense by the policy):", "",
                  markdown_table(["layer 0", *budgets], [[names[m], *(f"{v[b]:.3f}" for b in budgets)]
                                                         for m, v in layer0.items()]), ""]
    if "interval" in report:
        study = report["interval"]
        headers = ["variant", *(f"+{j}" for j in range(study["interval"])), "mean"]
        rows = [[v, *(f"{x:.3f}" for x in xs), f"{study['mean'][v]:.3f}"] for v, xs in study["by_offset"].items()]
        parts += [f"## Interval {study['interval']}: recall by rows since the prediction ({study['budget']}, sinks "
                  f"{study['sinks']}, window {study['window']}; the `_2x` variants fetch up to 2k, the others at most k)", "",
                  markdown_table(headers, rows), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictor", required=True, type=Path)
    parser.add_argument("--corpus", action="append", default=[], help="PACKAGE:GLOB sources training used")
    parser.add_argument("--data", action="append", default=[], help="the --data paths training used")
    parser.add_argument("--mix", default="sequences", choices=("sequences", "files"),
                        help="how training's sources took turns (its config's data.mix; 'files' for the first predictors)")
    parser.add_argument("--baseline", type=Path, default=None, help="another predictor to evaluate on the same text")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--lengths", default="1024:16,4096:4,8192:2", help="LENGTH:SEQUENCES,... held-out contexts")
    parser.add_argument("--rows", type=int, default=64, help="query rows per sequence")
    parser.add_argument("--interval", type=int, default=8, help="interval study length (1: skip)")
    parser.add_argument("--lookups", type=float, default=0.25, help="also judge lookups: copy this fraction of each "
                        "held-out sequence to later places (train-predictor --recall's rule, other spans) and draw "
                        "rows only from the copies; 0: skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (beside other jobs on a small machine, "
                        "two made it crawl)")
    parser.add_argument("--out", required=True, type=Path, help="report path without extension")
    args = parser.parse_args(argv)
    if not args.corpus and not args.data:
        parser.error("give the training text: --corpus PACKAGE:GLOB and/or --data PATH")
    if args.threads < 1:
        parser.error(f"--threads must be 1 or more, got {args.threads}")
    torch.set_num_threads(args.threads)
    report = build_report(args)
    write_reports(args.out, report, to_markdown(report))


if __name__ == "__main__":
    main()
