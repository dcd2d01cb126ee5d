"""One summary of every ``tbrun eval`` run under a folder: ``summary.md`` and ``summary.png``.

    python -m tbrun_bench.eval_summary bench/reports/eval

Reads ``FOLDER/*/results.json`` (one run per subfolder, as ``tbrun eval --out`` writes them; hidden
folders, such as a run still being written, are skipped), groups the runs by task, context and model
and merges their (policy, budget) points into one table per group (cells with their 95% intervals when
the runs recorded them, and the sample set each row is on), after one table of every group side by
side: dense first, then the other policies in run order (oldest run first).

A point is its policy, its predictor (named by its hash when the group's runs used several) and the
run-wide selection settings (sinks, window, interval, neighbours and their rule, the GQA reduction):
points of one name whose settings differ within a group are told apart by those settings. A point
given by two runs is shown once, from the run with the most samples done (the older one of equals);
two runs of the same samples disagree when their per-sample values of the main metric differ (to
float32 rounding) on the samples both ran, and the summary says so.

The paired differences compare two points sample by sample. A sample is (seed, sample count, index,
and for perplexity the prefix length); the tasks seed each sample by its seed and index only, so runs
of one seed and other sample counts draw near-duplicate samples: a pair pools at most one sample set
per seed (the one where both points share the most samples). Significance (bold) is an exact paired
sign-flip test (``scoring.sign_flip_p``); the t interval is shown beside it. Both files go into
FOLDER, with the command, commit and date that made them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from offload_engine.errors import ConfigError
from offload_engine.evaluation.report import (RESULTS_FILE, SETTING_KEYS, budget_percent, draw_budget_plot,
                                              metric_cell, metric_heading, plot_title, provenance, table_lines)
from offload_engine.evaluation.scoring import (EXACT_SIGN_FLIPS, SIGN_FLIP_DRAWS, PairedComparison,
                                               compare_paired, sample_value)
from offload_engine.evaluation.tasks import TASKS
from offload_engine.machine import cpu_model

PROGRAM = "python -m tbrun_bench.eval_summary"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
REQUIRED_KEYS = ("task", "provenance", "machine", "config", "model", "seconds", "summary")
# config keys that may differ between merged runs (the sample set, seed and samples, is shown per row and cell)
PER_RUN_KEYS = ("task", "policies", "budgets", "predictor", "shared_prefill", "seed", "samples")
FREE_MEMORY = re.compile(r"\s*\([^()]*available\)")  # the part of a machine header that changes run to run
# Run-wide selection settings: a point's identity (``point_names``). A point's own record in ``points``
# gives its effective values (a policy variant's overrides included; only the settings it uses).
RUN_SETTINGS = SETTING_KEYS  # the same settings a run's report shows per point
UNRECORDED_KEYS = "unrecorded"  # tokenbutler's compact key dtype in runs from before points recorded it
AGREEMENT_TOLERANCE = 1e-4  # relative: two runs' values agree to float32 rounding (sums over many tokens)


# ---------------------------------------------------------------------------------------------
# Reading the runs


@dataclass(frozen=True)
class Run:
    """One ``tbrun eval`` run: its folder's name and its ``results.json``."""

    name: str
    report: dict

    @property
    def task(self) -> str:
        return self.report["config"]["task"]

    @property
    def group(self) -> tuple[str, int, str]:
        """Runs are merged per task, context and model (its name and dtype)."""
        return self.report["config"]["task"], int(self.report["config"]["context"]), self.model

    @property
    def model(self) -> str:
        """The model's name and dtype, e.g. ``SmolLM2-135M-Instruct (torch.float32)``."""
        model = self.report["model"]
        return f"{model.get('name')} ({model.get('dtype')})"


def read_run(path: Path) -> Run:
    """The run in ``path`` (a ``results.json``); ValueError if it is not an eval report."""
    report = json.loads(path.read_text())
    missing = [key for key in REQUIRED_KEYS if not isinstance(report, dict) or key not in report]
    if missing:
        raise ValueError(f"not a tbrun eval report (no {', '.join(missing)})")
    return Run(path.parent.name, report)


def run_date(run: Run) -> datetime | None:
    """When the run was made (its provenance date), or None if unreadable."""
    try:
        return datetime.strptime(run.report["provenance"]["date"], "%Y-%m-%d %H:%M:%S %z")
    except (KeyError, TypeError, ValueError):
        return None


def run_order(run: Run) -> tuple:
    """Sort key: oldest first (undated runs last), then by folder name."""
    date = run_date(run)
    return (date is None, date.timestamp() if date else 0.0, run.name)


def load_runs(folder: Path) -> tuple[list[Run], list[str]]:
    """Every run under ``folder``, oldest first, and a line per ``results.json`` that could not be read."""
    runs, skipped = [], []
    for path in sorted(folder.glob(f"*/{RESULTS_FILE}")):
        if path.parent.name.startswith("."):
            continue
        try:
            runs.append(read_run(path))
        except (OSError, ValueError) as exc:
            skipped.append(f"{path.parent.name}/{RESULTS_FILE}: {exc}")
    return sorted(runs, key=run_order), skipped


def group_by_task(runs: list[Run]) -> dict[tuple[str, int, str], list[Run]]:
    """Runs per (task, context, model), tasks in the registry's order (unknown tasks last), then by
    context, then by model; runs in the given order."""
    groups: dict[tuple[str, int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    known = list(TASKS)
    return dict(sorted(groups.items(), key=lambda item: (known.index(item[0][0]) if item[0][0] in known
                                                          else len(known), *item[0])))


# ---------------------------------------------------------------------------------------------
# Merging the runs of one task


def same_value(x: float | None, y: float | None) -> bool:
    """Two metric values agree: equal to float32 rounding (relative ``AGREEMENT_TOLERANCE``), or both
    missing (null)."""
    if x is None or y is None:
        return x is None and y is None
    return math.isclose(x, y, rel_tol=AGREEMENT_TOLERANCE, abs_tol=1e-9)


def describe_point(row: dict, primary: str) -> str:
    """A point's primary metric and sample count, e.g. ``accuracy 100.0 (2 samples)``."""
    metrics = row["metrics"]
    return f"{primary} {metric_cell(metrics.get(primary), primary)} ({metrics.get('samples', '?')} samples)"


def point_record(run: Run, policy: str, budget: str) -> dict:
    """The point's entry in the run's ``points`` (empty for old runs without one)."""
    for point in run.report.get("points", []):
        if point.get("policy") == policy and point.get("budget") == budget:
            return point
    return {}


def point_predictor(run: Run, policy: str, budget: str) -> str | None:
    """The sha256 of the predictor a point ran with (None for policies without one, or old runs)."""
    return (point_record(run, policy, budget).get("predictor") or {}).get("sha256")


def predictor_names(runs: list[Run]) -> dict[str, str]:
    """sha256 -> a short name for each predictor of the runs, when they used more than one (else empty):
    ``@`` and the hash's first 8 digits."""
    hashes = dict.fromkeys(sha for run in runs for row in run.report["summary"]
                           if (sha := point_predictor(run, row["policy"], row["budget"])) is not None)
    return {sha: f"@{sha[:8]}" for sha in hashes} if len(hashes) > 1 else {}


def point_name(run: Run, policy: str, budget: str, names: dict[str, str]) -> str:
    """A point's policy with its predictor's short name when the runs of a task used several predictors
    (so two predictors' tokenbutler rows stand side by side, not merged)."""
    sha = point_predictor(run, policy, budget)
    return f"{policy} {names[sha]}" if sha in names else policy


def point_settings(run: Run, policy: str, budget: str) -> dict:
    """The run-wide selection settings a point ran with: its own record's (effective values, only those it
    uses), else (old runs) the run's config; none for dense."""
    if policy == "dense":
        return {}
    record = point_record(run, policy, budget)
    source = record if any(key in record for key in RUN_SETTINGS) else run.report["config"]
    settings = {key: source[key] for key in RUN_SETTINGS if source.get(key) is not None}
    if "window" in settings and "window_rule" not in settings:  # a run from before the window followed the budget
        settings["window_rule"] = "fixed"  # never pooled with one whose window did
    if "group_reduction" in settings and "key_dtype" not in settings:  # a tokenbutler point of an older run:
        settings["key_dtype"] = UNRECORDED_KEYS  # never pooled with one whose keys were int8 or another dtype
    return settings


def setting_flags(settings: dict) -> str:
    """``--window 64 --neighbor-rule runs``."""
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())


def point_names(runs: list[Run]) -> dict[tuple[str, str, str], str]:
    """(run folder, policy, budget) -> the point's name in the summary: its policy, its predictor's short
    name (``point_name``) and, where points of that name ran with other run-wide selection settings in
    these runs, the settings that differ as flags, e.g. ``tokenbutler @b539d0fa (--window 64)``: points
    of other settings are other points, never merged or pooled."""
    predictors = predictor_names(runs)
    base, settings = {}, {}
    for run in runs:
        for row in run.report["summary"]:
            key = (run.name, row["policy"], row["budget"])
            base[key] = point_name(run, row["policy"], row["budget"], predictors)
            settings[key] = point_settings(run, row["policy"], row["budget"])
    seen: dict[str, dict[str, set]] = {}
    for key, name in base.items():
        for setting, value in settings[key].items():
            seen.setdefault(name, {}).setdefault(setting, set()).add(json.dumps(value))
    names = {}
    for key, name in base.items():
        differing = {k: v for k, v in settings[key].items() if len(seen[name][k]) > 1}
        names[key] = f"{name} ({setting_flags(differing)})" if differing else name
    return names


def record_prefix(record: dict) -> int | None:
    """A perplexity sample's prefix length (it depends on the run's budgets), else None."""
    return record.get("prefix", (record.get("meta") or {}).get("prefix"))


def record_set(run: Run, record: dict) -> tuple:
    """The sample set a per-sample record belongs to: (seed, samples of the run, prefix). A sample is its
    set and its index: a seeded task draws the same samples then."""
    config = run.report["config"]
    return config["seed"], config["samples"], record_prefix(record)


PointKey = tuple[str, str]  # a point's (name, budget) in the summary
SetValues = dict[tuple, dict[int, float]]  # sample set -> index -> a point's value of the metric


@dataclass(frozen=True)
class Point:
    """One (policy, budget) point of one run, under its summary name."""

    run: Run
    row: dict  # the run's summary row, its policy renamed
    records: tuple  # the run's per-sample records of the point

    @property
    def key(self) -> PointKey:
        return self.row["policy"], self.row["budget"]

    @property
    def done(self) -> int:
        """Samples the point ran (fewer than the run's sample count when the run stopped early)."""
        return int(self.row["metrics"].get("samples", len(self.records)))

    @property
    def sets(self) -> list[tuple]:
        """The sample sets of its samples (one, but for perplexity runs whose records lack a prefix)."""
        config = self.run.report["config"]
        sets = dict.fromkeys(record_set(self.run, record) for record in self.records)
        return list(sets) or [(config["seed"], config["samples"], None)]

    def values(self, primary: str) -> dict[tuple, float]:
        """(sample set, index) -> the sample's value of metric ``primary`` (``sample_value``)."""
        out = {}
        for record in self.records:
            try:
                out[(record_set(self.run, record), record["index"])] = sample_value(record, primary)
            except KeyError:
                continue
        return out


def group_points(runs: list[Run], names: dict[tuple[str, str, str], str]) -> dict[PointKey, list[Point]]:
    """(name, budget) -> every run's point of that name, oldest run first (first appearances in order)."""
    points: dict[PointKey, list[Point]] = {}
    for run in runs:
        records: dict[tuple[str, str], list[dict]] = {}
        for record in run.report.get("samples", []):
            records.setdefault((record["policy"], record["budget"]), []).append(record)
        for row in run.report["summary"]:
            name = names[(run.name, row["policy"], row["budget"])]
            point = Point(run, {**row, "policy": name}, tuple(records.get((row["policy"], row["budget"]), ())))
            points.setdefault(point.key, []).append(point)
    return points


def disagreement(kept: Point, other: Point, primary: str) -> str | None:
    """A line when two runs' points on the same samples disagree: per-sample values of ``primary`` that
    differ (past float32 rounding) on the samples both ran; when one has no per-sample records (old runs),
    the primary metric, when both ran as many samples. None when they agree."""
    mine, theirs = kept.values(primary), other.values(primary)
    common = mine.keys() & theirs.keys()
    if common:
        differ = sum(not same_value(mine[k], theirs[k]) for k in common)
        if not differ:
            return None
        detail = f"they differ on {differ} of the {len(common)} samples both ran"
    elif (mine and theirs) or kept.done != other.done:
        return None  # no sample in common, or summaries of other samples: nothing to compare
    else:
        a, b = kept.row["metrics"].get(primary), other.row["metrics"].get(primary)
        if a is None or b is None or same_value(a, b):
            return None
        detail = "no per-sample values to compare"
    name, budget = kept.key
    return (f"{name} @ {budget}: `{kept.run.name}` has {describe_point(kept.row, primary)}, `{other.run.name}` has "
            f"{describe_point(other.row, primary)} ({detail}); the table shows `{kept.run.name}`'s")


def same_samples(a: Point, b: Point) -> bool:
    """Two points ran (some of) the same samples: a sample set in common (a prefix that a run without
    per-sample records leaves unknown matches any)."""
    return any(x[:2] == y[:2] and (x[2] == y[2] or None in (x[2], y[2])) for x in a.sets for y in b.sets)


def merge_points(points: dict[PointKey, list[Point]], primary: str) -> tuple[dict[PointKey, Point], list[str]]:
    """The point each summary row shows, per (name, budget): from the run with the most samples done (the
    oldest of equals), dense first, then the others in the order they first appear. Also a line per
    other run of the same samples whose per-sample values disagree (``disagreement``)."""
    kept, disagreements = {}, []
    for key, candidates in points.items():
        best = max(candidates, key=lambda point: point.done)  # the first (oldest) of equals
        kept[key] = best
        for other in candidates:
            if other is not best and same_samples(other, best):
                note = disagreement(best, other, primary)
                if note:
                    disagreements.append(note)
    order = sorted(kept, key=lambda key: key[0] != "dense")
    return {key: kept[key] for key in order}, disagreements


def pooled_values(points: dict[PointKey, list[Point]], primary: str) -> dict[PointKey, SetValues]:
    """(name, budget) -> sample set -> index -> value of ``primary``. Per sample set, the run with the most
    samples of it gives them (the oldest of equals), others only add the samples it lacks."""
    values: dict[PointKey, SetValues] = {}
    for key, candidates in points.items():
        by_point = [point.values(primary) for point in candidates]
        sets = dict.fromkeys(s for point in candidates for s in point.sets)
        for sample_set in sets:
            counts = [sum(1 for s, _ in v if s == sample_set) for v in by_point]
            for i in sorted(range(len(candidates)), key=lambda i: -counts[i]):
                for (s, index), value in by_point[i].items():
                    if s == sample_set:
                        values.setdefault(key, {}).setdefault(sample_set, {}).setdefault(index, value)
    return values


def paired_samples(a: SetValues, b: SetValues) -> tuple[list[float], list[float], list[tuple]]:
    """The values of two points over the samples both ran, pooling at most one sample set per seed (the
    one where they share the most samples, then the larger set): runs of one seed and other sample counts
    draw near-duplicate samples, so pooling them would count one sample twice. Also the sets used."""
    shared = {s: sorted(a[s].keys() & b[s].keys()) for s in a.keys() & b.keys()}
    chosen: dict[int, tuple] = {}
    for sample_set, indices in sorted(shared.items(), key=lambda item: (-len(item[1]), -item[0][1], str(item[0]))):
        if indices:
            chosen.setdefault(sample_set[0], sample_set)
    sets = sorted(chosen.values(), key=str)
    pairs = [(a[s][i], b[s][i]) for s in sets for i in shared[s]]
    return [x for x, _ in pairs], [y for _, y in pairs], sets


def merged_budgets(runs: list[Run]) -> list[str]:
    """Every budget of the runs, by size (as a share of the first run's context)."""
    context = runs[0].report["config"]["context"]
    budgets = dict.fromkeys(b for run in runs for b in run.report["config"]["budgets"])
    return sorted(budgets, key=lambda b: budget_percent(b, context))


def setting(run: Run) -> dict:
    """What must match for runs to be comparable: the config less its per-run keys, and the model."""
    config = {k: v for k, v in run.report["config"].items() if k not in PER_RUN_KEYS}
    return {**config, "model name": run.report["model"]["name"], "model dtype": run.report["model"]["dtype"]}


def setting_differences(runs: list[Run]) -> list[str]:
    """A line per setting on which the runs differ, with each run's value."""
    settings = [setting(run) for run in runs]
    keys = dict.fromkeys(k for s in settings for k in s)
    return [f"{key}: " + ", ".join(f"{s.get(key)} (`{run.name}`)" for s, run in zip(settings, runs))
            for key in keys if len({json.dumps(s.get(key)) for s in settings}) > 1]


@dataclass(frozen=True)
class TaskSummary:
    """The merged runs of one task, context and model."""

    task: dict  # the ``task`` entry of a results.json: name, summary, primary, higher_is_better
    context: int
    runs: list[Run]
    rows: list[dict]
    budgets: list[str]
    disagreements: list[str]
    differences: list[str]
    sources: dict  # (name, budget) -> the Point each row's cell shows
    values: dict  # ``pooled_values``
    model: str | None = None  # the model, when the task and context were run with several

    @property
    def sample_sets(self) -> list[tuple]:
        """Every sample set of the group's points, sorted."""
        return sorted({s for by_set in self.values.values() for s in by_set}
                      | {s for point in self.sources.values() for s in point.sets}, key=str)

    @property
    def main_set(self) -> tuple | None:
        """The sample set most of the shown points are on (the first of equals); the paired cells name
        their set only when it is another."""
        counts: dict[tuple, int] = {}
        for point in self.sources.values():
            for s in point.sets:
                counts[s] = counts.get(s, 0) + 1
        return max(sorted(counts, key=str), key=lambda s: counts[s]) if counts else None

    def set_label(self, sample_set: tuple) -> str:
        """``seed 0 x20`` (the prefix too, for perplexity sets that differ in it)."""
        seed, samples, prefix = sample_set
        prefixes = {s[2] for s in self.sample_sets}
        return f"seed {seed} x{samples}" + (f" prefix {prefix}" if len(prefixes) > 1 and prefix is not None else "")

    def point_label(self, point: Point) -> str:
        """The sample set(s) of a shown point, and how many it ran when fewer: ``seed 0 x20 (16 done)``."""
        sets = point.sets
        label = " + ".join(self.set_label(s) for s in sets)
        return label if point.done >= sum(s[1] for s in sets) else f"{label} ({point.done} done)"


def summarize_task(runs: list[Run], model: str | None = None) -> TaskSummary:
    """Merge the runs of one task, context and model (oldest first); ``model`` to name it in headings."""
    task = runs[0].report["task"]
    points = group_points(runs, point_names(runs))
    sources, disagreements = merge_points(points, task["primary"])
    rows = [point.row for point in sources.values()]
    return TaskSummary(task, runs[0].group[1], runs, rows, merged_budgets(runs), disagreements,
                       setting_differences(runs), sources, pooled_values(points, task["primary"]), model)


# ---------------------------------------------------------------------------------------------
# Markdown


def count(n: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_line(run: Run) -> str:
    """One merged run: folder, command, commit, date, wall time, samples per point."""
    prov, config = run.report["provenance"], run.report["config"]
    return (f"- `{run.name}`: `{prov['command']}`; commit `{prov['commit']}`, {prov['date']}, "
            f"{run.report['seconds']:.0f} s, {samples_text(run.report)} per point at {config['context']} tokens")


def samples_text(report: dict) -> str:
    """``20 samples``, or ``8 of 20 samples (partial)`` for a run stopped early."""
    total = report["config"]["samples"]
    partial = report.get("partial")
    return f"{partial['samples_done']} of {total} samples (partial)" if partial else f"{total} samples"


REFERENCES = ("dense", "oracle", "tokenbutler")  # each point is compared with these, at its own budget


def p_text(p: float) -> str:
    """``p 0.13``, ``p 0.0078``, ``p<0.001``."""
    return "p<0.001" if p < 0.001 else f"p {p:.2g}"


def difference_cell(comparison: PairedComparison | None, primary: str, sets: str = "") -> str:
    """One paired difference: ``+5.0 [+0.2, +9.8] (20; 4 differ; p 0.13)``: the mean and its 95% t
    interval in points of the metric (perplexity: % change), the pairs (``sets``: which sample sets,
    e.g. `` of seed 0 x40``), how many pairs differ when not all, and the p of the exact sign-flip test,
    in bold when p < 0.05. Every pair equal: ``+0.0 (identical on all 20)``; every pair differing by the
    same amount: ``+25.0 (all 20 differ by +25.0; p<0.001)``. ``-`` with fewer than two pairs."""
    if comparison is None:
        return "-"
    if primary == "ppl":  # differences of mean log-loss -> perplexity ratio
        def show(x: float) -> str:
            return f"{100 * (math.exp(x) - 1):+.1f}%"
    else:
        def show(x: float) -> str:
            return f"{x:+.1f}"
    n = comparison.pairs
    if comparison.differing == 0:
        return f"{show(0.0)} (identical on all {n}{sets})"
    if comparison.constant:
        text = f"{show(comparison.mean)} (all {n}{sets} differ by {show(comparison.mean)}; {p_text(comparison.p)})"
    else:
        tied = f"; {comparison.differing} differ" if comparison.differing < n else ""
        text = (f"{show(comparison.mean)} [{show(comparison.low)}, {show(comparison.high)}] "
                f"({n}{sets}{tied}; {p_text(comparison.p)})")
    return f"**{text}**" if comparison.significant else text


def reference_name(summary: TaskSummary, reference: str) -> str:
    """The row a "minus ``reference``" column compares with: the reference itself, or with several
    predictors or settings, the first row of that name with a suffix (the oldest run's)."""
    for row in summary.rows:
        if row["policy"] == reference or row["policy"].startswith(f"{reference} "):
            return row["policy"]
    return reference


def paired_legend(summary: TaskSummary) -> list[str]:
    """What a paired cell says, and (several sample sets) how they were pooled."""
    unit = "% change of perplexity" if summary.task["primary"] == "ppl" else "points"
    lines = [f"Paired differences: the point minus the reference over the samples both ran, in {unit}: mean [95% "
             "Student t interval over the per-sample differences] (pairs; how many of them differ, when not all; p). "
             "**Bold** where p < 0.05, p being the two-sided p of an exact paired sign-flip test: were the two "
             "points alike, each differing pair would be as likely to differ either way, and p is the share of "
             "those sign patterns whose sum is as far from 0 as the one observed (ties carry no sign; exact over "
             f"every pattern up to {EXACT_SIGN_FLIPS} differing pairs or on a grid such as multiples of 25 points, "
             f"else {SIGN_FLIP_DRAWS} random patterns with a fixed seed). So a few differing samples are never "
             "significant however tight the t interval (5 differing pairs: p >= 0.0625). `identical on all n`: "
             "every pair equal; `all n differ by x`: every pair differs by the same x (no interval). Pairing "
             "removes what the samples share (a sample the model itself fails counts against both), so it "
             "separates policies whose own intervals overlap.", ""]
    sets = summary.sample_sets
    if len(sets) > 1:
        listed = ", ".join(f"`{summary.set_label(s)}`" for s in sets)
        lines += [f"The points here ran on {len(sets)} sample sets ({listed}); a cell on other samples than "
                  f"`{summary.set_label(summary.main_set)}` names its set(s). A task seeds each sample by its seed and "
                  "index only, so runs of one seed and another sample count draw near-duplicate samples (the "
                  "same needles and haystacks, or passages, at other depths or prefixes): a cell pools at most "
                  "one set per seed, the one where both points share the most samples.", ""]
    return lines


def paired_table(summary: TaskSummary, versus: tuple[str, ...] = ()) -> list[str]:
    """Each sparse point minus dense, the oracle, tokenbutler and each point named in ``versus`` (e.g.
    ``"tokenbutler @b539d0fa"``) at the same budget, over the samples both ran (paired; one sample set
    per seed, ``paired_samples``), with 95% t intervals and the sign-flip test's p (``difference_cell``);
    a ``versus`` column no point pairs with is left out; nothing when no pair exists."""
    primary = summary.task["primary"]
    values = summary.values
    several = len(summary.sample_sets) > 1
    references = []  # a ``versus`` point the usual tokenbutler column already names is not repeated
    for name in (*REFERENCES, *versus):
        if all(reference_name(summary, name) != reference_name(summary, seen) for seen in references):
            references.append(name)
    rows = []
    for row in summary.rows:
        point = (row["policy"], row["budget"])
        if row["policy"] == "dense" or point not in values:
            continue
        cells = []
        for reference in references:
            other = ("dense", "100%") if reference == "dense" else (reference_name(summary, reference), row["budget"])
            if other == point or other not in values:
                cells.append("-")
                continue
            a, b, sets = paired_samples(values[point], values[other])
            named = several and sets and sets != [summary.main_set]
            label = f" of {' + '.join(summary.set_label(s) for s in sets)}" if named else ""
            cells.append(difference_cell(compare_paired(a, b), primary, label))
        rows.append([row["policy"], row["budget"], *cells])
    if all(cell == "-" for row in rows for cell in row[2:]):
        return []
    # the usual three always; a ``versus`` point only where some point pairs with it
    paired = [j for j in range(len(references)) if j < len(REFERENCES) or any(r[2 + j] != "-" for r in rows)]
    rows = [[*r[:2], *(r[2 + j] for j in paired)] for r in rows]
    headers = ["policy", "budget", *(f"minus {reference_name(summary, references[j])}" for j in paired)]
    return [*paired_legend(summary), *table_lines(headers, rows), ""]


def points_table(summary: TaskSummary) -> list[str]:
    """The primary metric: one row per point name, one column per budget (then ``100%``), and the sample
    set(s) the row's cells are on (per budget when they differ)."""
    primary = summary.task["primary"]
    columns = list(dict.fromkeys([*summary.budgets, "100%"]))
    by_name: dict[str, dict[str, Point]] = {}
    for (name, budget), point in summary.sources.items():
        by_name.setdefault(name, {})[budget] = point
    rows = []
    for name, cells in by_name.items():
        shown = [cells.get(b) for b in columns]
        values = [metric_cell(p.row["metrics"].get(primary), primary, p.row.get("intervals", {}).get(primary))
                  if p else "-" for p in shown]
        labels = {b: summary.point_label(p) for b, p in zip(columns, shown) if p}
        samples = (next(iter(labels.values())) if len(set(labels.values())) == 1
                   else "; ".join(f"{b}: {label}" for b, label in labels.items()))
        rows.append([name, *values, samples])
    return table_lines(["policy", *columns, "samples"], rows)


def task_section(summary: TaskSummary, versus: tuple[str, ...] = ()) -> list[str]:
    """Heading, what the task measures, the runs merged, notes, and the table of the primary metric."""
    task = summary.task
    model = f", {summary.model}" if summary.model else ""
    lines = [f"## {task['name']}, {summary.context} tokens{model}", "",
             f"{task['summary']}. Main metric: {metric_heading(task)}.", "",
             f"Runs merged ({len(summary.runs)}):", "", *map(run_line, summary.runs), ""]
    if summary.differences:
        lines += ["**The runs differ in settings**, so their points may not be comparable:", "",
                  *(f"- {line}" for line in summary.differences), ""]
    names = predictor_names(summary.runs)
    if names:
        lines += ["Points are named by their predictor (`@` and its sha256's first 8 digits), since the runs used "
                  "several: " + "; ".join(f"`{name}` = {predictor_paths(summary.runs, sha)}" for sha, name in names.items()),
                  ""]
    if any(" (--" in row["policy"] for row in summary.rows):
        lines += ["Points of one name that ran with other run-wide selection settings are other points: their "
                  "names end with the settings that differ, as `tbrun eval` flags, e.g. `(--window 64)`.", ""]
    if summary.disagreements:
        lines += ["**Runs disagree** on points they both measured:", "",
                  *(f"- {line}" for line in summary.disagreements), ""]
    return lines + ["`samples`: the sample set a row is on (`seed S xN`: the N samples a run of seed S and N "
                    "samples draws; `(k done)`: a run stopped early).", "", *points_table(summary), "",
                    *paired_table(summary, versus)]


def predictor_paths(runs: list[Run], sha: str) -> str:
    """Where the runs found the predictor of hash ``sha``, and which runs: ``path (run, run)``."""
    found: dict[str, list[str]] = {}
    for run in runs:
        for point in run.report.get("points", []):
            predictor = point.get("predictor") or {}
            if predictor.get("sha256") == sha and run.name not in found.setdefault(predictor.get("path", "?"), []):
                found[predictor.get("path", "?")].append(run.name)
    return ", ".join(f"`{path}` ({', '.join(names)})" for path, names in found.items())


def short_context(tokens: int) -> str:
    """``2048`` -> ``2k``; other lengths as they are."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def group_title(summary: TaskSummary) -> str:
    """``niah 4k`` (and the model, when the task and context were run with several)."""
    return f"{summary.task['name']} {short_context(summary.context)}" + (f" {summary.model}" if summary.model else "")


def glance_table(summaries: list[TaskSummary]) -> list[str]:
    """Every group side by side: one column per (task, context, sparse budget), one row per policy; the
    dense row shows each group's dense value. Each column is its task's main metric. Then a line per
    column whose rows are on different sample sets."""
    columns = [(s, b) for s in summaries for b in s.budgets if b != "100%"] or [(s, "100%") for s in summaries]
    cells: dict[str, dict[int, str]] = {}
    notes = []
    for index, (summary, budget) in enumerate(columns):
        primary = summary.task["primary"]
        on: dict[str, list[str]] = {}
        for (name, point_budget), point in summary.sources.items():
            if point_budget == budget or (name == "dense" and point_budget == "100%"):
                row = point.row
                value = metric_cell(row["metrics"].get(primary), primary, row.get("intervals", {}).get(primary))
                cells.setdefault(name, {})[index] = value
                on.setdefault(summary.point_label(point), []).append(name)
        if len(on) > 1:
            ordered = sorted(on.items(), key=lambda item: len(item[1]))
            *fewer, (most, _) = ordered
            notes.append(f"- {group_title(summary)} @ {budget}: " + "; ".join(
                f"{', '.join(names)} on `{label}`" for label, names in fewer) + f"; the other rows on `{most}`")
    headers = ["policy"] + [f"{group_title(s)} @ {b}" for s, b in columns]
    rows = [[policy] + [by_column.get(i, "-") for i in range(len(columns))] for policy, by_column in cells.items()]
    rows.sort(key=lambda row: row[0] != "dense")
    lines = table_lines(headers, rows)
    if notes:
        lines += ["", "Columns whose rows are on different sample sets (see each task's table):", "", *notes]
    return lines


def machine_identity(machine: dict) -> dict:
    """A machine header without what changes from run to run (free memory)."""
    return {key: FREE_MEMORY.sub("", str(value)) for key, value in machine.items()}


def machine_section(runs: list[Run]) -> list[str]:
    """The machine header once if every run shares it, else once per machine with its runs."""
    machines: dict[str, tuple[dict, list[str]]] = {}
    for run in runs:
        identity = machine_identity(run.report["machine"])
        machines.setdefault(json.dumps(identity, sort_keys=True), (identity, []))[1].append(run.name)
    if len(machines) == 1:
        identity, _ = next(iter(machines.values()))
        return ["## Machine", "", f"Every run ({count(len(runs), 'run')}) ran on the same machine:", "",
                *(f"- {key}: {value}" for key, value in identity.items()), ""]
    lines = ["## Machines", "", f"The runs ran on {len(machines)} different machines.", ""]
    for identity, names in machines.values():
        lines += [f"### {', '.join(f'`{n}`' for n in names)}", "",
                  *(f"- {key}: {value}" for key, value in identity.items()), ""]
    return lines


def summary_machine() -> str:
    """The machine this summary was written on, in one line: CPU, cores, RAM, Python."""
    memory = psutil.virtual_memory()
    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory.total / 2**30:.1f} GiB RAM, "
            f"Python {platform.python_version()}")


def to_markdown(summaries: list[TaskSummary], runs: list[Run], skipped: list[str], prov: dict,
                versus: tuple[str, ...] = ()) -> str:
    """The whole ``summary.md``; ``versus``: points to pair every point with, besides the usual three."""
    lines = [f"# tbrun eval: summary of {count(len(runs), 'run')}, {count(len(summaries), 'task')}", "",
             f"- command: `{prov['command']}`", f"- commit: `{prov['commit']}`", f"- date: {prov['date']}",
             f"- merged on: {summary_machine()} (merging computes nothing: the machines the runs were measured on "
             "are listed at the end)", "",
             f"![main metric vs budget, one panel per task]({SUMMARY_PNG})", ""]
    if skipped:
        lines += ["Skipped (unreadable):", "", *(f"- {line}" for line in skipped), ""]
    lines += ["## At a glance", "", "Main metric of each task (see its section); cells: value [95% interval] "
              "where the run recorded intervals (Wilson for accuracies, t over passages for perplexity).", "",
              *glance_table(summaries), ""]
    for summary in summaries:
        lines += task_section(summary, versus)
    return "\n".join(lines + machine_section(runs)).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Plot


def plot_summaries(summaries: list[TaskSummary], path: Path) -> None:
    """One panel per task: the primary metric vs budget, one line per policy, dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(summaries))
    rows = math.ceil(len(summaries) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    for ax, summary in zip(axes.flat, summaries):
        first = summary.runs[0].report
        draw_budget_plot(ax, summary.rows, summary.task["primary"], first["config"]["context"])
        ax.set_title(f"{plot_title(first)}, {count(len(summary.runs), 'run')}", fontsize=10)
    for ax in list(axes.flat)[len(summaries):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def write_summary(folder: Path, command: str, versus: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Read, merge and write ``summary.md`` and ``summary.png`` into ``folder``; their paths."""
    runs, skipped = load_runs(folder)
    if not runs:
        raise ConfigError(f"no tbrun eval run under {folder} (looked for */{RESULTS_FILE}): give the folder "
                          "that holds the runs' --out folders.")
    groups = group_by_task(runs)
    models: dict[tuple[str, int], int] = {}
    for task, context, _ in groups:
        models[(task, context)] = models.get((task, context), 0) + 1
    summaries = [summarize_task(task_runs, model if models[(task, context)] > 1 else None)
                 for (task, context, model), task_runs in groups.items()]
    markdown, png = folder / SUMMARY_MD, folder / SUMMARY_PNG
    markdown.write_text(to_markdown(summaries, runs, skipped, provenance(command), versus))
    plot_summaries(summaries, png)
    return markdown, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder holding one tbrun eval run per subfolder")
    parser.add_argument("--versus", action="append", default=[], metavar="POINT",
                        help="also pair every point with this one at its budget, named as in the tables "
                             "(e.g. 'tokenbutler @b539d0fa'); repeatable")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        markdown, png = write_summary(args.folder, " ".join([PROGRAM, *map(shlex.quote, argv)]), tuple(args.versus))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {markdown} and {png}")


if __name__ == "__main__":
    main()
