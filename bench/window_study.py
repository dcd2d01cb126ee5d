"""How much of the oracle's attention mass the engine's selection holds, by the width of its window.

    python -m tbrun_bench.window_study --predictor predictors/smollm2-135m-instruct \\
        --corpus stdlib:pydoc_data/topics.py --corpus gensim:test/test_data/lee_background.cor \\
        --corpus 'torch:nn/modules/*.py' --corpus 'stdlib:*.py' --lengths 4096:8,8192:3 --interval 1 \\
        --lookups 0.25 --out bench/reports/predictor_window

``predictor_report`` (the same arguments, the same held-out text and rows) with one more method per
window ``W`` in ``WINDOWS``: ``engine_wW``, the first 4 tokens and the engine's window under budget ``k`` with
widest window ``W`` (``(k - 4) // 2`` clamped to ``[min(16, W), W]``, ``evaluation.engine_fixed_mask``) always, the
rest of ``k`` by tokenbutler's scores, as ``tokenbutler_engine`` does with ``ENGINE_WINDOW`` (the engine's
default, 128; the committed ``reports/predictor_window`` ran when it was 64, so its default row is
W = 64). The budget ``k`` is the same for every method, so
a wider window leaves fewer tokens to the predictor. Writes ``OUT.json`` and ``OUT.md`` as the report does,
and a table of every window at 10% with its difference from the default paired by sequence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from offload_engine.predictor import evaluation

from . import predictor_report
from .predictor_report import _cell, mean_interval, signed_cell
from .report import markdown_table

WINDOWS = (0, 16, 32, 64, 256)  # and ENGINE_WINDOW, as ``tokenbutler_engine``
OLD_ENGINE_WINDOW = 64  # tokenbutler_engine's window in reports that do not record their ``engine_rule``
BUDGET = "10%"


def window_method(window: int) -> str:
    return f"engine_w{window}"


def _selections_with_windows(selections):
    """``evaluation._selections`` plus an ``engine_wW`` mask per window in ``WINDOWS``."""
    def wrapped(probs, logits, rows, fraction, group, generator, stored_logits=None):
        masks = selections(probs, logits, rows, fraction, group, generator, stored_logits)
        if logits is None:
            return masks
        future = evaluation.causal_mask(rows, probs.shape[-1])
        counts = evaluation.budget_counts(rows, fraction)
        shared = evaluation.group_mean_probs(logits.masked_fill(future, float("-inf")), group, future)
        for window in WINDOWS:
            always = evaluation.engine_fixed_mask(rows, counts, probs.shape[-1], window)
            masks[window_method(window)] = evaluation._expand(
                evaluation.select_top(shared.masked_fill(always, 2.0), counts), group)
        return masks
    return wrapped


def window_table(report: dict) -> str:
    """Markdown: recall at ``BUDGET`` per window and length (every row and lookup rows), each with its 95%
    interval over sequences and its difference from the default window paired by sequence."""
    default = (report.get("engine_rule") or {}).get("window", OLD_ENGINE_WINDOW)
    lines = [f"## The engine's recall at {BUDGET} by window (sinks {evaluation.SINKS}; the window is "
             f"(k - {evaluation.SINKS}) // 2 clamped to [min(16, W), W], the rest of k by the predictor; W = {default} "
             "is `tokenbutler_engine`, the engine's default)", "",
             "Each cell: mean [95% interval over sequences]; difference from W = "
             f"{default}: mean [95% t interval of the per-sequence differences] (sequences where it is above).", ""]
    for section, title in (("recall", "every row"), ("lookup_recall", "lookup rows")):
        lengths = report.get(section) or {}
        rows = [[str(window), *(_window_cell(result["per_sequence"], window, default) for result in lengths.values())]
                for window in _windows(lengths, default)]
        lines += [f"### {title}", "", markdown_table(["window", *(f"{n} tokens" for n in lengths)], rows), ""]
    return "\n".join(lines)


def _windows(lengths: dict, default: int) -> list[int]:
    """The windows a report measured: its ``engine_wW`` methods and the default (``tokenbutler_engine``)."""
    methods = {method for result in lengths.values() for method in result["per_sequence"]}
    prefix = window_method(0)[:-1]
    return sorted({default, *(int(m[len(prefix):]) for m in methods if m.startswith(prefix))})


def _window_cell(per_sequence: dict, window: int, default: int) -> str:
    """One window's recall over sequences and, but for the default, its paired difference from the default's."""
    base = per_sequence["tokenbutler_engine"][BUDGET]
    if window == default:
        return _cell(mean_interval(base))
    values = per_sequence[window_method(window)][BUDGET]
    diffs = [v - b for v, b in zip(values, base)]
    above = sum(d > 0 for d in diffs)
    return f"{_cell(mean_interval(values))}; {signed_cell(mean_interval(diffs))} ({above} of {len(diffs)})"


def append_window_table(out: Path) -> None:
    """Append ``window_table`` of ``OUT.json`` to ``OUT.md``."""
    report = json.loads(out.with_suffix(".json").read_text())
    markdown = out.with_suffix(".md")
    markdown.write_text(markdown.read_text().rstrip("\n") + "\n\n" + window_table(report) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluation.METHODS = evaluation.METHODS + tuple(window_method(w) for w in WINDOWS)
    evaluation._selections = _selections_with_windows(evaluation._selections)
    predictor_report.main(argv)  # evaluation's METHODS and _selections are read at call time: the patched ones
    append_window_table(Path(argv[argv.index("--out") + 1]))


if __name__ == "__main__":
    main()
