"""The evaluation report: ``results.json`` (every sample), ``report.md`` (tables), ``plot.png``.

Each report records the command line, the commit, the machine and the resolved config. A report
directory holds one run only: it is written in a sibling staging directory and renamed into
place, and a directory that holds a different run (or other files) is refused unless the caller
asked to overwrite it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError
from ..files import replace_directory
from ..machine import REPO_ROOT, commit_at_start, describe_machine, portable_word
from .scoring import METRIC_LABELS, summarize_points
from .tasks import get_task

RESULTS_FILE = "results.json"
MARKDOWN_FILE = "report.md"
PLOT_FILE = "plot.png"
PROGRESS_FILE = "progress.jsonl"  # an unfinished run's samples (offload_engine.evaluation.harness)
BREAKDOWN_KEYS = ("variant", "haystack")
commit_at_start(str(REPO_ROOT))  # the commit the report names: the one checked out when the run began


# ---------------------------------------------------------------------------------------------
# The output directory


def previous_config(out_dir: Path) -> dict | None:
    """The config of the run already in ``out_dir``, or None if it holds no readable report."""
    try:
        return json.loads((out_dir / RESULTS_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def progress_config(out_dir: Path) -> dict | None:
    """The config of an unfinished run in ``out_dir`` (its progress file's header), or None."""
    try:
        with open(out_dir / PROGRESS_FILE) as handle:
            return json.loads(handle.readline())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_dir(out_dir: Path, config: dict, overwrite: bool) -> None:
    """Refuse an ``out_dir`` holding another run or other files, unless ``overwrite``.

    A directory holding a report or an unfinished run of the very same config may be rewritten
    (it is the same run; an unfinished one is resumed).
    """
    blocking = next((parent for parent in (out_dir, *out_dir.parents) if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:  # --out itself, or a folder on its way, is a file: nothing could be written there
        raise ConfigError(f"--out {out_dir}: {blocking} is a file, not a directory: choose a directory.")
    if overwrite or not out_dir.exists():
        return
    if not any(out_dir.iterdir()):
        return
    previous = previous_config(out_dir)
    if previous == config or progress_config(out_dir) == config:
        return
    what = "the results of a different run" if previous is not None else "files that are not an eval report"
    raise ConfigError(
        f"--out {out_dir} already holds {what}; choose another directory, or pass --overwrite to replace it."
    )


def write_report(out_dir: Path, report: dict, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Write the three files into a staging directory, then move it into place.

    ``keep``: files of ``out_dir`` carried over (the progress file of a partial run)."""
    check_output_dir(out_dir, report["config"], overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for name in keep:
            if (out_dir / name).is_file():
                shutil.copy2(out_dir / name, staging / name)
        (staging / RESULTS_FILE).write_text(json.dumps(_finite(report), indent=1) + "\n")
        (staging / MARKDOWN_FILE).write_text(to_markdown(report))
        plot(report, staging / PLOT_FILE)
        replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finite(value):
    """NaN and infinities as null, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------
# Content


def run_commit() -> str:
    """The commit this run measures at (the one checked out when it began; ``uncommitted`` outside a repository
    with commits)."""
    commit = commit_at_start(str(REPO_ROOT))
    return "uncommitted" if commit == "unknown" else commit


def provenance(command: str) -> dict:
    """Command line, commit (``run_commit``) and date."""
    return {"command": command, "commit": run_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def build_report(config, adapter, points, results: list[dict], command: str, seconds: float,
                 settings: list[dict] | None = None, partial: dict | None = None, resumed: dict | None = None) -> dict:
    """Everything the three files show, as one JSON-ready dict.

    ``settings``: per point, every setting that changes its selection (sinks, window, interval,
    neighbours and their rule, tokenbutler's GQA rule and predictor with the sha256 of its weights).
    ``resumed``: ``{"samples": n, "commits": [...]}`` when n samples came from an interrupted run (measured at
    those commits; the wall time is this session's).
    """
    task = get_task(config.task)
    breakdown = {key: summarize_points(points, results, key) for key in BREAKDOWN_KEYS
                 if len({str(r.get(key)) for r in results if key in r}) > 1}
    return {
        "task": {"name": task.name, "summary": task.summary, "primary": task.primary,
                 "higher_is_better": task.higher_is_better},
        **({"partial": partial} if partial else {}),
        "provenance": provenance(command) | ({"resumed": resumed} if resumed else {}),
        "machine": describe_machine(),
        "config": config.to_dict(),
        "model": {"name": model_name(adapter), "dtype": str(adapter.dtype),
                  "dims": asdict(adapter.dims)},
        "seconds": round(seconds, 1),
        "points": settings or [],
        "timing": timing(results),
        "summary": summarize_points(points, results),
        "breakdown": breakdown,
        "samples": results,
    }


def timing(results: list[dict]) -> dict:
    """Mean seconds per sample: the shared prefill, each point's own work, and their sum (all points)."""
    samples = {r["index"]: r.get("prefill_seconds", 0.0) for r in results}
    if not samples:
        return {}
    prefill = sum(samples.values()) / len(samples)
    points = sum(r["seconds"] for r in results) / len(samples)
    return {"shared_prefill_seconds": round(prefill, 2), "points_seconds": round(points, 2),
            "sample_seconds": round(prefill + points, 2)}


def model_name(adapter) -> str:
    """The model's hub id, or the folder name of a local model (reports name no local path)."""
    name = str(getattr(adapter.config, "_name_or_path", ""))
    return portable_word(name)


def budget_percent(budget: str, context: int) -> float:
    """A budget label as a percentage of the context (``10%`` -> 10; ``2048`` of 8192 -> 25)."""
    return float(budget[:-1]) if budget.endswith("%") else 100.0 * float(budget) / context


def metric_cell(value: float | None, primary: str, interval: list | None = None) -> str:
    """One table cell of metric ``primary``: two decimals for perplexity, one otherwise, ``-`` if missing;
    with its 95% ``interval``: ``60.0 [38.7, 78.1]``."""
    if value is None or not math.isfinite(value):
        return "-"
    digits = 2 if primary == "ppl" else 1
    cell = f"{value:.{digits}f}"
    if interval and all(x is not None and math.isfinite(x) for x in interval):
        cell += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return cell


def table_lines(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, one line per list item."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def metric_heading(task: dict) -> str:
    """The primary metric's label and its direction, e.g. ``accuracy (%) (higher is better)``."""
    better = "higher is better" if task["higher_is_better"] else "lower is better"
    return f"{METRIC_LABELS[task['primary']]} ({better})"


def policy_table(summary: list[dict], budgets: list[str], primary: str) -> list[str]:
    """Metric ``primary`` of summary rows: one row per policy in the rows' order, one column per budget
    (``budgets``, then ``100%``)."""
    columns = list(dict.fromkeys([*budgets, "100%"]))
    values: dict[str, dict[str, tuple]] = {}
    for row in summary:
        values.setdefault(row["policy"], {})[row["budget"]] = (row["metrics"].get(primary),
                                                               row.get("intervals", {}).get(primary))
    missing = (None, None)
    rows = [[policy] + [metric_cell(cells.get(b, missing)[0], primary, cells.get(b, missing)[1]) for b in columns]
            for policy, cells in values.items()]
    return table_lines(["policy"] + columns, rows)


def main_table(report: dict) -> list[str]:
    """Primary metric: one row per policy (dense first), one column per budget."""
    return policy_table(report["summary"], report["config"]["budgets"], report["task"]["primary"])


def metrics_table(rows: list[dict], extra: str | None = None) -> list[str]:
    """Every aggregated metric per (policy, budget[, extra])."""
    names = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    headers = ["policy", "budget"] + ([extra] if extra else []) + [METRIC_LABELS.get(n, n) for n in names]
    body = [[r["policy"], r["budget"]] + ([str(r[extra])] if extra else [])
            + [metric_cell(r["metrics"].get(n), n, r.get("intervals", {}).get(n)) if n != "samples"
               else str(r["metrics"][n]) for n in names]
            for r in rows]
    return table_lines(headers + ["seconds"], [b + [f"{r['seconds']:.0f}"] for b, r in zip(body, rows)])


INTERVAL_NOTE = ("Cells: value [95% interval]; Wilson score intervals for accuracies, a t interval over the "
                 "passages for perplexity.")
SETTING_KEYS = ("sinks", "window", "window_rule", "interval", "neighbors", "neighbor_rule", "group_reduction",
                "key_dtype")


# settings a point records only where it has them: a column where any point of the run does (with what a selecting
# point without one means)
OPTIONAL_SETTING_KEYS = {"refresh_layers": "-", "keep_bonus": "0"}


def settings_table(points: list[dict]) -> list[str]:
    """One row per point: what changes its selection (``-`` where a setting does not apply)."""
    optional = [key for key in OPTIONAL_SETTING_KEYS if any(key in p for p in points)]
    rows = []
    for p in points:
        predictor = p.get("predictor") or {}
        sha = (predictor.get("sha256") or "")[:12]
        absent = {key: "-" if p.get("mode") == "dense" else OPTIONAL_SETTING_KEYS[key] for key in optional}
        rows.append([p["policy"], p["budget"], *(str(p.get(k, "-")) for k in SETTING_KEYS),
                     *(_setting_cell(p.get(k, absent[k])) for k in optional),
                     f"{predictor['path']} ({sha})" if predictor else "-"])
    return table_lines(["policy", "budget", *SETTING_KEYS, *optional, "predictor (sha256)"], rows)


def _setting_cell(value) -> str:
    """A list of layers as ``1 4 7``, anything else as it prints."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _resumed_text(resumed: dict | None) -> str:
    """What the commit line adds for a run that finished an interrupted one."""
    if not resumed:
        return ""
    earlier, count = resumed.get("commits", []), resumed["samples"]
    at = f" at {', '.join(f'`{commit}`' for commit in earlier)}" if earlier else " (commit not recorded)"
    return f" ({count} sample{'s' * (count != 1)} resumed from an interrupted run{at}; the wall time is this session's)"


def to_markdown(report: dict) -> str:
    task, prov, config = report["task"], report["provenance"], report["config"]
    lines = [f"# tbrun eval: {task['name']}", "", task["summary"] + ".", "",
             f"- command: `{prov['command']}`", f"- commit: `{prov['commit']}`{_resumed_text(prov.get('resumed'))}",
             f"- date: {prov['date']}",
             f"- model: {report['model']['name']} ({report['model']['dtype']})",
             f"- context: {config['context']} tokens, {config['samples']} samples, seed {config['seed']}, "
             f"sinks {config['sinks']}, window {config['window']}",
             f"- wall time: {report['seconds']:.0f} s"]
    if report.get("partial"):
        done, total = report["partial"]["samples_done"], config["samples"]
        lines[2:2] = [f"**Partial run: {done} of {total} samples** (spread over the task's sweep; run the command "
                      f"again to finish it: `{PROGRESS_FILE}` holds the samples done).", ""]
    lines += [f"- {key}: {value}" for key, value in report["machine"].items()]
    timing_ = report.get("timing") or {}
    if timing_:
        lines += [f"- per sample: {timing_['sample_seconds']:.1f} s for every point "
                  f"(shared prefill {timing_['shared_prefill_seconds']:.1f} s)"]
    lines += ["", f"## {metric_heading(task)}", "", INTERVAL_NOTE, "", *main_table(report),
              "", f"![{task['primary']} vs budget]({PLOT_FILE})", "", "## All metrics", "",
              *metrics_table(report["summary"])]
    for key, rows in report["breakdown"].items():
        lines += ["", f"## By {key}", "", *metrics_table(rows, key)]
    if report.get("points"):
        lines += ["", "## Selection settings per point", "", *settings_table(report["points"])]
    lines += ["", "## Resolved config", "", "```json", json.dumps(config, indent=1), "```"]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> float:
    """A metric for plotting: NaN where it is missing."""
    return math.nan if value is None else float(value)


def plot_title(report: dict) -> str:
    """Task, model, context and samples of one run, as a plot title."""
    return (f"{report['task']['name']}: {Path(report['model']['name']).name}, "
            f"{report['config']['context']} tokens, {report['config']['samples']} samples")


def draw_budget_plot(ax, summary: list[dict], primary: str, context: int) -> None:
    """Onto ``ax``: metric ``primary`` vs budget (% of ``context``, log scale), one line per policy in the
    rows' order; dense as a dashed horizontal line. Missing values (null in a results.json) are gaps."""
    ticks = {100.0}
    for policy in dict.fromkeys(row["policy"] for row in summary):
        points = sorted((budget_percent(r["budget"], context), _number(r["metrics"].get(primary)))
                        for r in summary if r["policy"] == policy)
        ticks.update(x for x, _ in points)
        if policy == "dense":
            if math.isfinite(points[0][1]):
                ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="dense (100%)")
        else:
            ax.plot(*zip(*points), marker="o", label=policy)
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{x:g}%" for x in sorted(ticks)])
    ax.minorticks_off()
    if primary != "ppl":
        ax.set_ylim(-3, 103)
    ax.set_xlabel("budget (% of context)")
    ax.set_ylabel(METRIC_LABELS[primary])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> None:
    """Primary metric vs budget (% of context), one line per policy; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    draw_budget_plot(ax, report["summary"], report["task"]["primary"], report["config"]["context"])
    ax.set_title(plot_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
