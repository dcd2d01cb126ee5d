"""Held-out quality report of a TokenButler predictor: recall of oracle top-k attention mass.

    python -m tbrun_bench.predictor_report --predictor predictors/smollm2-135m-instruct \\
        --data DIR [--data DIR ...] --out bench/reports/predictor_smollm2

Reads only the held-out files of ``--data`` (the same path-hash split training used), and writes
``OUT.json`` and ``OUT.md``: recall at budgets 5/10/25/50% for tokenbutler (and its int8,
group-mean and per-query-head variants) against the oracle's shared set, streaming and random;
layer 0's concentration; the interval/neighbour study; and the parameter and memory overhead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from offload_engine.models import load_model
from offload_engine.predictor.checkpoint import load_checkpoint
from offload_engine.predictor.data import load_held_out
from offload_engine.predictor.evaluation import evaluate
from offload_engine.predictor.interval_eval import interval_recall

from .report import machine_header, markdown_header, markdown_table, provenance, write_json


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


def build_report(args) -> dict:
    adapter = load_model(args.model)
    predictor, config = load_checkpoint(args.predictor, adapter.dims)
    report = {"provenance": provenance(), "machine": machine_header(torch.device("cpu")),
              "predictor": {"path": str(args.predictor), **{k: config.get(k) for k in ("predictor", "steps", "command", "commit", "data")}},
              "overhead": overhead(predictor, adapter), "recall": {}}
    runs = [(args.seq_len, args.sequences, 0), (args.seq_len, args.long_sequences, args.shift),
            (args.long_seq_len, args.long_sequences, 0)]
    for seq_len, count, offset in runs:
        if count <= 0 or seq_len <= 0 or (offset and offset + seq_len > adapter.dims.max_positions):
            continue
        sequences = load_held_out(args.data, adapter.tokenizer, seq_len, count, args.seed)
        label = f"{seq_len}" + (f" at positions +{offset}" if offset else "")
        result = evaluate(predictor, adapter, sequences, rows=args.rows, seed=args.seed, offset=offset)
        report["recall"][label] = {**result, "offset": offset}
        print(f"recall at {label} done", flush=True)
    if args.interval > 1:
        sequences = load_held_out(args.data, adapter.tokenizer, args.seq_len, args.sequences, args.seed)
        report["interval"] = interval_recall(predictor, adapter, sequences, interval=args.interval, seed=args.seed)
    return report


def to_markdown(report: dict) -> str:
    parts = [markdown_header("TokenButler predictor: held-out recall of oracle top-k attention mass", report), ""]
    o = report["overhead"]
    parts += [f"Predictor `{report['predictor']['path']}`: {o['predictor_parameters']:,} parameters = "
              f"**{o['parameters_percent_of_model']}% of the model** ({o['model_parameters']:,}); compact key "
              f"cache = {o['compact_cache_percent_of_kv_bytes_same_dtype']}% of the KV bytes "
              f"({o['compact_cache_percent_of_kv_bytes_int8']}% with int8 keys). Trained with "
              f"`{report['predictor'].get('command')}`.", ""]
    for label, result in report["recall"].items():
        budgets = result["budgets"]
        shifted = (" (the same kind of text, positions shifted: the model's attention is unchanged, the keys' "
                   "RoPE phases are not)") if result.get("offset") else ""
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
    parser.add_argument("--data", required=True, action="append", help="the --data paths training used")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--long-seq-len", type=int, default=4096, help="a second, longer context (0: skip)")
    parser.add_argument("--long-sequences", type=int, default=4)
    parser.add_argument("--shift", type=int, default=6144,
                        help="also evaluate --long-sequences of --seq-len tokens placed at this position (0: skip)")
    parser.add_argument("--rows", type=int, default=64, help="query rows per sequence")
    parser.add_argument("--interval", type=int, default=8, help="interval study length (1: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="report path without extension")
    args = parser.parse_args(argv)
    report = build_report(args)
    write_json(args.out.with_suffix(".json"), report)
    args.out.with_suffix(".md").write_text(to_markdown(report) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
