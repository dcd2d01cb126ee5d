"""A sweep of predictor sizes on one teacher cache, judged on held-out recall at several lengths.

    # train each size (resumable; run two at once on two cores)
    python -m tbrun_bench.predictor_sweep train --teacher-cache runs/cache-2k --size 256x16 --epochs 4 --runs runs/sweep
    # judge them all (and the shipped predictor) from one teacher pass per held-out sequence
    python -m tbrun_bench.predictor_sweep report --runs runs/sweep --corpus stdlib:pydoc_data/topics.py ... \\
        --lengths 1024:8,4096:3,8192:2 --baseline predictors/smollm2-135m-instruct --out bench/reports/predictor_sweep

A size is ``HIDDENxDIM`` (the query MLP's inner width I and d'); every other setting is the training
default or the flags given. Each run lands in ``RUNS/I{hidden}-d{dim}-e{epochs}`` with the usual
checkpoints, so an interrupted run resumes. The report gives, per predictor, its share of the model's
parameters (the product's budget: under 2%), the held-out loss, and recall at 10% per length with a
95% interval over sequences (the same sequences for every predictor, so differences are paired).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from offload_engine.machine import portable_word
from offload_engine.models import EMBEDDED_MODEL_NAME, load_model
from offload_engine.predictor import checkpoint as ckpt
from offload_engine.predictor.corpus import resolve_corpus
from offload_engine.predictor.data import TokenSequences, load_held_out
from offload_engine.predictor.teacher_cache import TeacherCache, cache_identity
from offload_engine.predictor.training import TrainConfig, train

from .predictor_report import HEADLINE_BUDGET, _cell, overhead, parse_lengths, per_sequence_recall
from .report import machine_header, markdown_header, markdown_table, provenance, write_reports

PARAMETER_BUDGET_PERCENT = 2.0


def parse_size(text: str) -> tuple[int, int]:
    """``"256x16"`` -> ``(256, 16)``: the query MLP's inner width and d'."""
    try:
        hidden, dim = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: write HIDDENxDIM, e.g. 256x16") from None
    return hidden, dim


def run_dir(runs: Path, hidden: int, dim: int, epochs: int) -> Path:
    return runs / f"I{hidden}-d{dim}-e{epochs}"


def train_size(args) -> Path:
    """Train one size on the cache (resuming a run that was cut), publish it in its run folder."""
    hidden, dim = parse_size(args.size)
    adapter = load_model(args.model)
    cache = TeacherCache.open(args.teacher_cache)
    shape = {k: getattr(adapter.dims, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")}
    model_name = _model_name(args.model)
    cache.check_model(model_name, shape)
    config = TrainConfig(seq_len=cache.spec.seq_len, steps=len(cache) * args.epochs, dim=dim, hidden=hidden,
                         rows=args.rows, lr=args.lr, checkpoint_every=args.checkpoint_every,
                         position_offsets=cache.spec.position_offsets, seed=cache.spec.seed,
                         teacher_cache=cache_identity(cache))
    out = run_dir(args.runs, hidden, dim, args.epochs)
    empty = torch.empty(0, cache.spec.seq_len, dtype=torch.long)
    meta = {"model_name": model_name, "model": model_name if args.model else "embedded",
            "data": cache.manifest.get("data", {}),
            "teacher_cache": {"spec": cache.manifest["spec"], "sequences": len(cache), "id": config.teacher_cache},
            "command": f"python -m tbrun_bench.predictor_sweep train --size {args.size} --epochs {args.epochs} "
                       f"--rows {args.rows} --lr {args.lr} (teacher cache {config.teacher_cache})"}

    def log(stats):
        if stats.step % 10 == 0 or stats.step == stats.steps:
            print(f"{out.name}: step {stats.step}/{stats.steps} loss {stats.loss:.4f}", flush=True)
    resume = bool(ckpt.checkpoint_dirs(out))
    train(adapter, TokenSequences(empty, empty, 0, 0), config, out, resume=resume, meta=meta, on_step=log, cache=cache)
    return out


def _model_name(model: str | None) -> str:
    """The model's name as ``tbrun train-predictor`` records it (an absolute path by its last part)."""
    if model is None:
        return EMBEDDED_MODEL_NAME
    return portable_word(model)


def build_report(args) -> dict:
    adapter = load_model(args.model)
    runs = sorted(p for p in args.runs.iterdir() if (p / ckpt.WEIGHTS_NAME).exists())
    if not runs:
        raise SystemExit(f"{args.runs} holds no finished run: train some sizes first.")
    predictors, configs = {}, {}
    for path in runs:
        predictors[path.name], configs[path.name] = ckpt.load_checkpoint(path, adapter.dims)
    if args.baseline:
        predictors["shipped"], configs["shipped"] = ckpt.load_checkpoint(args.baseline, adapter.dims)
    corpus = resolve_corpus(args.corpus, 0) if args.corpus else None
    report = {"provenance": provenance("python -m tbrun_bench.predictor_sweep"), "machine": machine_header(torch.device("cpu")),
              "predictors": {}, "recall": {}}
    for name, predictor in predictors.items():
        config = configs[name]
        report["predictors"][name] = {"size": config["predictor"], "steps": config.get("steps"),
                                      "train": config.get("train"), "command": config.get("command"),
                                      **overhead(predictor, adapter)}
    for seq_len, count in parse_lengths(args.lengths):
        sequences = load_held_out(args.data, adapter.tokenizer, seq_len, count, 0, corpus=corpus, mix=args.mix)
        report["recall"][str(seq_len)] = per_sequence_recall(predictors, adapter, sequences, args.rows, 0)
        print(f"recall at {seq_len} done", flush=True)
    return report


def to_markdown(report: dict) -> str:
    lengths = list(report["recall"])
    rows = []
    for name, facts in report["predictors"].items():
        size = facts["size"]
        share = facts["parameters_percent_of_model"]
        losses = [f"{report['recall'][n][name]['loss']:.3f}" for n in lengths]
        cells = [_cell(report["recall"][n][name]["interval"]["tokenbutler_engine"][HEADLINE_BUDGET]) for n in lengths]
        over = "" if share < PARAMETER_BUDGET_PERCENT else " (over the 2% budget)"
        rows.append([name, f"{size['hidden']}", f"{size['dim']}", f"{facts['steps']}", f"{share:.2f}%{over}",
                     " / ".join(losses), *cells])
    first = next(iter(report["predictors"]))
    baselines = [[method, "", "", "", "", "", *(_cell(report["recall"][n][first]["interval"][method][HEADLINE_BUDGET])
                                                   for n in lengths)] for method in ("oracle_group", "streaming")]
    counts = ", ".join(f"{report['recall'][n][first]['sequences']} at {n}" for n in lengths)
    return "\n".join([
        markdown_header("TokenButler predictor sweep: held-out recall by size", report), "",
        f"Recall at {HEADLINE_BUDGET} of what the engine attends (sinks + window + the predictor's top tokens, "
        "`tokenbutler_engine`), mean [95% interval over held-out sequences: " + counts + "], the same sequences "
        "for every row. Loss: held-out distillation cross-entropy per length.", "",
        markdown_table(["predictor", "I", "d'", "steps", "parameters", "loss " + " / ".join(lengths),
                        *(f"{n} tokens" for n in lengths)], rows + baselines),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    trainer = sub.add_parser("train", help="train one size on a teacher cache")
    trainer.add_argument("--teacher-cache", required=True, type=Path)
    trainer.add_argument("--size", required=True, help="HIDDENxDIM, e.g. 256x16")
    trainer.add_argument("--epochs", type=int, default=4)
    trainer.add_argument("--rows", type=int, default=256)
    trainer.add_argument("--lr", type=float, default=1e-3)
    trainer.add_argument("--checkpoint-every", type=int, default=24)
    reporter = sub.add_parser("report", help="judge every finished run in --runs")
    reporter.add_argument("--corpus", action="append", default=[])
    reporter.add_argument("--mix", default="sequences", choices=("sequences", "files"))
    reporter.add_argument("--data", action="append", default=[])
    reporter.add_argument("--lengths", default="1024:8,4096:3,8192:2")
    reporter.add_argument("--rows", type=int, default=64)
    reporter.add_argument("--baseline", type=Path, default=None, help="the shipped predictor, judged alongside")
    reporter.add_argument("--out", required=True, type=Path, help="report path without extension")
    for command in (trainer, reporter):
        command.add_argument("--runs", required=True, type=Path, help="folder of the sweep's runs")
        command.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args(argv)
    if args.command == "train":
        print(f"published {train_size(args)}")
        return
    if not args.corpus and not args.data:
        parser.error("give the training text: --corpus PACKAGE:GLOB and/or --data PATH")
    report = build_report(args)
    write_reports(args.out, report, to_markdown(report))


if __name__ == "__main__":
    main()
