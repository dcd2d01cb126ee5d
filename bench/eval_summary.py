"""One summary of every ``tbrun eval`` run under a folder: ``summary.md`` and ``summary.png``.

    python -m tbrun_bench.eval_summary bench/reports/eval

Reads ``FOLDER/*/results.json`` (one run per subfolder, as ``tbrun eval --out`` writes them; hidden
folders, such as a run still being written, are skipped), groups the runs by task and context and
merges their (policy, budget) points into one table per group (cells with their 95% intervals when
the runs recorded them), after one table of every group side by side: dense first, then the other policies in run order
(oldest run first). A point given by two runs is shown once, from the run with the most samples
(the older one of equals); when two runs of the same samples disagree (dense appears in every run),
the summary says so. The paired differences pool every sample of every run giving a point (runs
with another seed or sample count draw other samples). Both files go into FOLDER, with the command,
commit and date that made them.
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
from offload_engine.evaluation.report import (RESULTS_FILE, budget_percent, draw_budget_plot, metric_cell,
                                              metric_heading, plot_title, policy_table, provenance, table_lines)
from offload_engine.evaluation.scoring import paired_difference, sample_value
from offload_engine.evaluation.tasks import TASKS
from offload_engine.machine import cpu_model

PROGRAM = "python -m tbrun_bench.eval_summary"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
REQUIRED_KEYS = ("task", "provenance", "machine", "config", "model", "seconds", "summary")
PER_RUN_KEYS = ("task", "policies", "budgets", "predictor", "shared_prefill")  # config keys that may differ between merged runs
FREE_MEMORY = re.compile(r"\s*\([^()]*available\)")  # the part of a machine header that changes run to run


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
    def group(self) -> tuple[str, int]:
        """Runs are merged per task and context."""
        return self.report["config"]["task"], int(self.report["config"]["context"])


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


def group_by_task(runs: list[Run]) -> dict[tuple[str, int], list[Run]]:
    """Runs per (task, context), tasks in the registry's order (unknown tasks last), then by context;
    runs in the given order."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    known = list(TASKS)
    return dict(sorted(groups.items(), key=lambda item: (known.index(item[0][0]) if item[0][0] in known
                                                          else len(known), item[0][0], item[0][1])))


# ---------------------------------------------------------------------------------------------
# Merging the runs of one task


def same_value(x: float | None, y: float | None) -> bool:
    """Two metric values agree: equal to rounding, or both missing (null)."""
    if x is None or y is None:
        return x is None and y is None
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def same_metrics(a: dict, b: dict) -> bool:
    """Two metric dicts agree: the same names, and each value agrees."""
    return a.keys() == b.keys() and all(same_value(a[name], b[name]) for name in a)


def describe_point(row: dict, primary: str) -> str:
    """A point's primary metric and sample count, e.g. ``accuracy 100.0 (2 samples)``."""
    metrics = row["metrics"]
    return f"{primary} {metric_cell(metrics.get(primary), primary)} ({metrics.get('samples', '?')} samples)"


def point_predictor(run: Run, policy: str, budget: str) -> str | None:
    """The sha256 of the predictor a point ran with (None for policies without one, or old runs)."""
    for point in run.report.get("points", []):
        if point.get("policy") == policy and point.get("budget") == budget:
            return (point.get("predictor") or {}).get("sha256")
    return None


def predictor_names(runs: list[Run]) -> dict[str, str]:
    """sha256 -> a short name for each predictor of the runs, when they used more than one (else empty):
    ``@`` and the hash's first 8 digits."""
    hashes = dict.fromkeys(sha for run in runs for row in run.report["summary"]
                           if (sha := point_predictor(run, row["policy"], row["budget"])) is not None)
    return {sha: f"@{sha[:8]}" for sha in hashes} if len(hashes) > 1 else {}


def point_name(run: Run, policy: str, budget: str, names: dict[str, str]) -> str:
    """A point's policy as the summary names it: with its predictor's short name when the runs of a task
    used several predictors (so two predictors' tokenbutler rows stand side by side, not merged)."""
    sha = point_predictor(run, policy, budget)
    return f"{policy} {names[sha]}" if sha in names else policy


def sample_set(run: Run) -> tuple[int, int]:
    """Which samples a run drew: (seed, samples); runs with the same pair ran the same samples."""
    config = run.report["config"]
    return config["seed"], config["samples"]


def merge_points(runs: list[Run], primary: str) -> tuple[list[dict], list[str]]:
    """One summary row per (policy, budget), from the run giving it with the most samples (the oldest
    of equals); dense first, then the other policies in the order they first appear. Also a line per
    point that a later run of the same samples gives with different metrics. Points of different
    predictors are different points (``point_name``)."""
    kept: dict[tuple[str, str], tuple[dict, Run]] = {}
    disagreements = []
    names = predictor_names(runs)
    for run in runs:
        for row in run.report["summary"]:
            row = {**row, "policy": point_name(run, row["policy"], row["budget"], names)}
            key = (row["policy"], row["budget"])
            if key not in kept:
                kept[key] = (row, run)
                continue
            first, owner = kept[key]
            if sample_set(owner) == sample_set(run):
                if not same_metrics(first["metrics"], row["metrics"]):
                    disagreements.append(f"{row['policy']} @ {row['budget']}: `{owner.name}` has "
                                         f"{describe_point(first, primary)}, `{run.name}` has "
                                         f"{describe_point(row, primary)}; the table shows `{owner.name}`'s")
            elif row["metrics"].get("samples", 0) > first["metrics"].get("samples", 0):
                kept[key] = (row, run)
    rows = [row for row, _ in kept.values()]
    return sorted(rows, key=lambda row: row["policy"] != "dense"), disagreements


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
    """The merged runs of one task."""

    task: dict  # the ``task`` entry of a results.json: name, summary, primary, higher_is_better
    context: int
    runs: list[Run]
    rows: list[dict]
    budgets: list[str]
    disagreements: list[str]
    differences: list[str]


def summarize_task(runs: list[Run]) -> TaskSummary:
    """Merge the runs of one task (oldest first)."""
    task = runs[0].report["task"]
    rows, disagreements = merge_points(runs, task["primary"])
    return TaskSummary(task, runs[0].group[1], runs, rows, merged_budgets(runs), disagreements,
                       setting_differences(runs))


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


def sample_values(runs: list[Run], primary: str) -> dict[tuple[str, str], dict[tuple, float]]:
    """Per (policy, budget), each sample's value of metric ``primary`` by sample identity (seed, samples
    of the run, index: a seeded task draws the same samples then), pooled over every run giving the
    point; of two runs of the same samples, the older gives them."""
    values: dict[tuple[str, str], dict[tuple, float]] = {}
    names = predictor_names(runs)
    for run in runs:
        seed, samples = sample_set(run)
        for record in run.report.get("samples", []):
            sample = (seed, samples, record["index"])
            policy = point_name(run, record["policy"], record["budget"], names)
            values.setdefault((policy, record["budget"]), {}).setdefault(sample, sample_value(record, primary))
    return values


def difference_cell(difference: tuple[float, float, float] | None, primary: str, pairs: int) -> str:
    """``-30.0 [-45.1, -14.9] (20)``: points of the metric (perplexity: % change), in bold when the
    interval excludes 0; ``-`` with fewer than two pairs."""
    if difference is None:
        return "-"
    if primary == "ppl":  # differences of mean log-loss -> perplexity ratio
        mean, low, high = (100 * (math.exp(x) - 1) for x in difference)
        text = f"{mean:+.1f}% [{low:+.1f}%, {high:+.1f}%] ({pairs})"
    else:
        mean, low, high = difference
        text = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] ({pairs})"
    return f"**{text}**" if low > 0 or high < 0 else text


def reference_name(summary: TaskSummary, reference: str) -> str:
    """The row a "minus ``reference``" column compares with: the reference itself, or with several
    predictors, the reference of the oldest run's predictor (the first such row)."""
    for row in summary.rows:
        if row["policy"] == reference or row["policy"].startswith(f"{reference} @"):
            return row["policy"]
    return reference


def paired_table(summary: TaskSummary, versus: tuple[str, ...] = ()) -> list[str]:
    """Each sparse point minus dense, the oracle, tokenbutler and each point named in ``versus`` (e.g.
    ``"tokenbutler @b539d0fa"``) at the same budget, over the samples both ran (paired), with 95% t
    intervals; a ``versus`` column no point pairs with is left out; nothing when no pair exists."""
    primary = summary.task["primary"]
    values = sample_values(summary.runs, primary)
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
            common = sorted(values[point].keys() & values.get(other, {}).keys()) if other != point else []
            difference = paired_difference([values[point][k] for k in common], [values[other][k] for k in common])
            cells.append(difference_cell(difference, primary, len(common)))
        rows.append([row["policy"], row["budget"], *cells])
    if all(cell == "-" for row in rows for cell in row[2:]):
        return []
    # the usual three always; a ``versus`` point only where some point pairs with it
    paired = [j for j in range(len(references)) if j < len(REFERENCES) or any(r[2 + j] != "-" for r in rows)]
    rows = [[*r[:2], *(r[2 + j] for j in paired)] for r in rows]
    unit = "% change of perplexity" if primary == "ppl" else "points"
    return ["Paired differences: the point minus the reference over the samples both ran (their number in "
            f"parentheses), in {unit}, with a 95% Student t interval over the per-sample differences; bold "
            "where the interval excludes 0. Pairing removes what the samples share (a sample the model "
            "itself fails counts against both), so it separates policies whose own intervals overlap.", "",
            *table_lines(["policy", "budget", *(f"minus {reference_name(summary, references[j])}" for j in paired)], rows),
            ""]


def task_section(summary: TaskSummary, versus: tuple[str, ...] = ()) -> list[str]:
    """Heading, what the task measures, the runs merged, notes, and the table of the primary metric."""
    task = summary.task
    lines = [f"## {task['name']}, {summary.context} tokens", "",
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
    if summary.disagreements:
        lines += ["**Runs disagree** on points they both measured:", "",
                  *(f"- {line}" for line in summary.disagreements), ""]
    return lines + [*policy_table(summary.rows, summary.budgets, task["primary"]), "", *paired_table(summary, versus)]


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


def glance_table(summaries: list[TaskSummary]) -> list[str]:
    """Every group side by side: one column per (task, context, sparse budget), one row per policy; the
    dense row shows each group's dense value. Each column is its task's main metric."""
    columns = [(s, b) for s in summaries for b in s.budgets if b != "100%"] or [(s, "100%") for s in summaries]
    cells: dict[str, dict[int, str]] = {}
    for index, (summary, budget) in enumerate(columns):
        primary = summary.task["primary"]
        for row in summary.rows:
            if row["budget"] == budget or (row["policy"] == "dense" and row["budget"] == "100%"):
                value = metric_cell(row["metrics"].get(primary), primary, row.get("intervals", {}).get(primary))
                cells.setdefault(row["policy"], {})[index] = value
    headers = ["policy"] + [f"{s.task['name']} {short_context(s.context)} @ {b}" for s, b in columns]
    rows = [[policy] + [by_column.get(i, "-") for i in range(len(columns))] for policy, by_column in cells.items()]
    rows.sort(key=lambda row: row[0] != "dense")
    return table_lines(headers, rows)


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
    summaries = [summarize_task(task_runs) for task_runs in group_by_task(runs).values()]
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
