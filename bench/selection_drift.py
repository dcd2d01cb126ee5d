"""How fast tokenbutler's selection drifts from step to step, and what a reused selection misses.

Interval N predicts at one step and reuses that selection for the next N-1 steps. This report
measures, on the embedded model and the shipped predictor at interval 1 (a fresh selection every
step), what such reuse would lose: at every decode step t it compares the selection of each
selecting (layer, KV head) with the selections made 1, 2 and 3 steps earlier, which interval 4
would still be attending at steps t+1..t+3. Two measures, per sample, then a mean over samples with
a 95% Student t interval:

- *kept*: the share of step t's selected tokens that the selection of step t - lag already held;
- *needle coverage* at the steps that emit an answer digit: the share of the needle's digit tokens
  (their positions in the prompt) that the selection of step t - lag holds, averaged over the
  selecting layers and KV heads. Lag 0 is what interval 1 attends; the mean of lags 0-3 is what
  interval 4 would attend on average if its prediction steps fell uniformly.

    python -m tbrun_bench.selection_drift --context 4k --samples 20 --out bench/reports/selection_drift
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import Progress

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.config import parse_context
from offload_engine.evaluation.harness import predictor_record
from offload_engine.evaluation.scoring import score_generation, t_interval
from offload_engine.evaluation.tasks import make_samples
from offload_engine.models import load_model
from offload_engine.policies.tokenbutler import shipped_predictor_for
from offload_engine.selection.planner import SelectionPlanner

from .report import fmt, machine_header, markdown_header, markdown_table, predictor_label, provenance, write_reports

SINKS, WINDOW = 4, 32
LAGS = (0, 1, 2, 3)


@contextmanager
def recorded_selections(log: list[dict[int, list[set[int]]]]):
    """Append, at the start of every decode step, the selection each selecting layer attended at the
    previous step: ``{layer: [set of positions per KV head]}`` (read from the residency maps)."""
    original = SelectionPlanner.begin_step

    def begin_step(planner: SelectionPlanner, position: int):
        if planner.candidates is not None:  # a selecting step ran before this one
            log.append(selections(planner))
        return original(planner, position)

    SelectionPlanner.begin_step = begin_step
    try:
        yield
    finally:
        SelectionPlanner.begin_step = original


def selections(planner: SelectionPlanner) -> dict[int, list[set[int]]]:
    """Active positions of every selecting layer: ``{layer: [positions of KV head h]}``."""
    out = {}
    for bank in planner.ws.banks:
        active = bank.residency.active_positions()  # [layers * KvH, slots + 1]
        for i, layer in enumerate(bank.layers):
            if layer in planner.dense or layer in planner.local:
                continue
            rows = active[i * bank.kv_heads : (i + 1) * bank.kv_heads]
            out[layer] = [set(row[row >= 0].tolist()) for row in rows]
    return out


def needle_positions(prompt: list[int], answers: tuple[str, ...], tokenizer) -> set[int]:
    """Prompt positions of the answers' tokens (each answer encoded alone and found as a run)."""
    found: set[int] = set()
    for answer in answers:
        pattern = tokenizer.encode(answer, add_special_tokens=False)
        for start in range(len(prompt) - len(pattern) + 1):
            if prompt[start : start + len(pattern)] == pattern:
                found.update(range(start, start + len(pattern)))
    return found


def kept_share(now: dict, before: dict) -> float:
    """Mean over selecting (layer, head) of |now & before| / |now|."""
    shares = [len(cur & before[layer][h]) / len(cur) for layer, heads in now.items()
              for h, cur in enumerate(heads) if cur]
    return statistics.fmean(shares)


def coverage(selection: dict, needle: set[int]) -> float:
    """Mean over selecting (layer, head) of the share of ``needle`` positions selected."""
    return statistics.fmean(layer_coverage(selection, needle).values())


def layer_coverage(selection: dict, needle: set[int]) -> dict[int, float]:
    """Per selecting layer, the mean over its KV heads of the share of ``needle`` positions selected."""
    return {layer: statistics.fmean(len(needle & cur) / len(needle) for cur in heads)
            for layer, heads in selection.items()}


def measure_sample(engine: Engine, sample, tokenizer) -> dict:
    """Run one sample at interval 1 (greedy, the eval's answer length); its per-lag kept shares and
    needle coverages (mean over answer steps; per layer too)."""
    log: list[dict] = []
    with recorded_selections(log):
        result = engine.generate(list(sample.prompt_ids),
                                 SamplingConfig(temperature=0.0, max_new_tokens=sample.max_new_tokens))
    generated = result.token_ids
    # log[j] is the selection of decode step j + 1, which produced generated[j + 1]
    needle = needle_positions(list(sample.prompt_ids), sample.answers, tokenizer)
    answer_tokens = {t for a in sample.answers for t in tokenizer.encode(a, add_special_tokens=False)}
    kept = {lag: [kept_share(log[j], log[j - lag]) for j in range(lag, len(log))] for lag in LAGS[1:]}
    answer_steps = [j for j in range(len(log)) if j + 1 < len(generated) and generated[j + 1] in answer_tokens]
    cover = {lag: [coverage(log[j - lag], needle) for j in answer_steps if j >= lag] for lag in LAGS} if needle else {}
    by_layer = {}
    if needle and answer_steps and min(answer_steps) >= LAGS[-1]:
        for lag in (LAGS[0], LAGS[-1]):
            per_step = [layer_coverage(log[j - lag], needle) for j in answer_steps]
            by_layer[str(lag)] = {str(layer): statistics.fmean(step[layer] for step in per_step) for layer in per_step[0]}
    return {"index": sample.index, "variant": sample.meta.get("variant"), "output": result.text,
            **score_generation(result.text, sample.answers), "needle_tokens": len(needle),
            "answer_steps": len(answer_steps),
            "kept": {str(lag): statistics.fmean(v) for lag, v in kept.items() if v},
            "needle_coverage": {str(lag): statistics.fmean(v) for lag, v in cover.items() if v},
            "needle_coverage_by_layer": by_layer}


def summarize(rows: list[dict]) -> dict:
    """Mean [95% interval] over samples of every per-lag measure."""
    out: dict = {"kept": {}, "needle_coverage": {}, "needle_coverage_interval4": None, "needle_coverage_loss": {}}
    for measure in ("kept", "needle_coverage"):
        for lag in LAGS:
            values = [r[measure][str(lag)] for r in rows if str(lag) in r[measure]]
            if values:
                out[measure][str(lag)] = interval_entry(values)
    complete = [r["needle_coverage"] for r in rows if all(str(lag) in r["needle_coverage"] for lag in LAGS)]
    if complete:
        out["needle_coverage_interval4"] = interval_entry([statistics.fmean(c[str(lag)] for lag in LAGS) for c in complete])
        out["needle_coverage_loss"] = {str(lag): interval_entry([c["0"] - c[str(lag)] for c in complete])
                                       for lag in LAGS[1:]}
    layered = [r["needle_coverage_by_layer"] for r in rows if r.get("needle_coverage_by_layer")]
    if layered:
        layers = layered[0]["0"]
        out["needle_coverage_by_layer"] = {
            layer: {lag: statistics.fmean(r[lag][layer] for r in layered) for lag in ("0", str(LAGS[-1]))}
            for layer in layers}
        out["needle_coverage_by_layer_samples"] = len(layered)
    return out


def interval_entry(values: list[float]) -> dict:
    """``{samples, mean, low, high}``: the mean with its 95% t interval (bounds None under two values)."""
    mean, low, high = t_interval(values) or (statistics.fmean(values), None, None)
    return {"samples": len(values), "mean": mean, "low": low, "high": high}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", default="4k")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/reports/selection_drift"))
    args = parser.parse_args(argv)
    context, budget = parse_context(args.context), Budget.parse(args.budget)
    adapter = load_model(None)
    selection = SelectionConfig(policy="tokenbutler", budget=budget, sinks=SINKS, window=WINDOW, interval=1)
    engine = Engine(adapter, EngineConfig(context=context, mode=KVMode.SPARSE_OFFLOAD, selection=selection))
    samples = make_samples("niah", adapter.tokenizer, args.samples, context, args.seed)
    rows = []
    with Progress() as progress:
        task = progress.add_task("selection drift (niah samples)", total=len(samples))
        for sample in samples:
            rows.append(measure_sample(engine, sample, adapter.tokenizer))
            progress.advance(task)
    report = {"benchmark": "selection_drift", "provenance": provenance("python -m tbrun_bench.selection_drift"),
              "machine": machine_header(torch.device("cpu")),
              "settings": {"task": "niah", "context": context, "budget": str(budget), "sinks": SINKS, "window": WINDOW,
                           "interval": 1, "samples": args.samples, "seed": args.seed,
                           "predictor": predictor_record(shipped_predictor_for(adapter, 1, context))},
              "summary": summarize(rows), "samples": rows}
    write_reports(args.out, report, to_markdown(report))
    return report


def cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    if entry["low"] is None:
        return f"{fmt(100 * entry['mean'])} ({entry['samples']})"
    return f"{fmt(100 * entry['mean'])} [{fmt(100 * entry['low'])}, {fmt(100 * entry['high'])}] ({entry['samples']})"


def to_markdown(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    correct = sum(r["correct"] for r in report["samples"])
    lines = [markdown_header("Selection drift: what a reused tokenbutler selection misses", report), "",
             f"Embedded SmolLM2-135M-Instruct (fp32), the shipped predictor, {predictor_label(s['predictor'])}, niah "
             f"at {s['context']} tokens "
             f"(the four variants in turn), {s['samples']} samples, budget {s['budget']}, sinks {s['sinks']}, window "
             f"{s['window']}, interval 1, greedy, the eval's answer length (32 tokens, 64 for lists); interval 1 "
             f"answered {correct} of "
             f"{len(report['samples'])} fully. Cells: mean over samples in % [95% t interval] (samples).", "",
             "Lag L compares step t with the selection made L steps earlier (the one interval L+1 could still be "
             "attending at t). *Kept*: share of step t's selected tokens already in that earlier selection. *Needle "
             "coverage*: at the steps that emit an answer digit, the share of the needle's digit tokens in that "
             "selection, averaged over selecting layers and KV heads.", "",
             markdown_table(["measure", "lag 0 (interval 1)", "lag 1", "lag 2", "lag 3"],
                            [["kept", "100 (by definition)"] + [cell(summary["kept"].get(str(lag))) for lag in LAGS[1:]],
                             ["needle coverage"] + [cell(summary["needle_coverage"].get(str(lag))) for lag in LAGS]]),
             "", "Needle coverage lost against interval 1 (lag 0 minus lag L, paired per sample): "
             + ", ".join(f"lag {lag} {cell(summary['needle_coverage_loss'].get(str(lag)))}" for lag in LAGS[1:]) + ".",
             "", f"Needle coverage averaged over lags 0-3 (interval 4 with uniformly placed prediction steps, no "
             f"neighbours): {cell(summary['needle_coverage_interval4'])}."]
    layered = summary.get("needle_coverage_by_layer")
    if layered:
        top = sorted(layered, key=lambda layer: -layered[layer]["0"])[:8]
        lines += ["", f"The {len(top)} layers that select the most of the needle at interval 1 (means over "
                  f"{summary['needle_coverage_by_layer_samples']} samples whose answer starts at least 3 steps in):", "",
                  markdown_table(["layer", "needle coverage, lag 0 (%)", f"lag {LAGS[-1]} (%)"],
                                 [[layer, fmt(100 * layered[layer]["0"]), fmt(100 * layered[layer][str(LAGS[-1])])]
                                  for layer in top])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
