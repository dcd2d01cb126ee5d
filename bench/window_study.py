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

``--shares 0.25,0.4,...`` adds ``engine_sNN`` per share: the window ``floor(share * (k - 4))`` clamped to
``[16, ENGINE_WINDOW]`` instead of the engine's half, and its table (``reports/predictor_window_share``: short
contexts, where the widest window does not bind); ``--windows none`` leaves the widths out.
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


def share_method(share: float) -> str:
    return f"engine_s{round(share * 100)}"


def _selections_with_windows(selections, windows=None, shares=()):
    """``evaluation._selections`` plus an ``engine_wW`` mask per window in ``windows`` (default ``WINDOWS``) and an
    ``engine_sNN`` mask per window share in ``shares`` (the engine's widest window, ``floor(share * (k - 4))``
    clamped as it does)."""
    rules = [(window_method(w), w, evaluation.WINDOW_SHARE) for w in (WINDOWS if windows is None else windows)]
    rules += [(share_method(s), evaluation.ENGINE_WINDOW, s) for s in shares]

    def wrapped(probs, logits, rows, fraction, group, generator, stored_logits=None):
        masks = selections(probs, logits, rows, fraction, group, generator, stored_logits)
        if logits is None:
            return masks
        future = evaluation.causal_mask(rows, probs.shape[-1])
        counts = evaluation.budget_counts(rows, fraction)
        shared = evaluation.group_mean_probs(logits.masked_fill(future, float("-inf")), group, future)
        for name, window, share in rules:
            always = evaluation.engine_fixed_mask(rows, counts, probs.shape[-1], window, share)
            masks[name] = evaluation._expand(evaluation.select_top(shared.masked_fill(always, 2.0), counts), group)
        return masks
    return wrapped


SECTIONS = (("recall", "every row"), ("lookup_recall", "lookup rows"))


def window_table(report: dict) -> str:
    """Markdown: recall at ``BUDGET`` per window and length (every row and lookup rows), each with its 95%
    interval over sequences and its difference from the default window paired by sequence; empty for a report
    without a window but the default."""
    default = (report.get("engine_rule") or {}).get("window", OLD_ENGINE_WINDOW)
    heading = [f"## The engine's recall at {BUDGET} by window (sinks {evaluation.SINKS}; the window is "
               f"(k - {evaluation.SINKS}) // 2 clamped to [min(16, W), W], the rest of k by the predictor; "
               f"W = {default} is `tokenbutler_engine`, the engine's default)", "",
               "Each cell: mean [95% interval over sequences]; difference from W = "
               f"{default}: mean [95% t interval of the per-sequence differences] (sequences where it is above).", ""]

    def variants(lengths: dict) -> list[tuple[str, str | None]]:
        return [(str(w), None if w == default else window_method(w)) for w in _windows(lengths, default)]
    return _variants_table(report, heading, "window", variants)


def share_table(report: dict) -> str:
    """Markdown: recall at ``BUDGET`` per window share and length, paired by sequence against the engine's half
    (``tokenbutler_engine``); empty for a report without share methods."""
    prefix = share_method(0)[:-1]
    heading = [f"## The engine's recall at {BUDGET} by the window's share of the budget (sinks {evaluation.SINKS}; "
               f"the window is floor(share x (k - {evaluation.SINKS})) clamped to [16, "
               f"{(report.get('engine_rule') or {}).get('window', evaluation.ENGINE_WINDOW)}], the rest of k by the "
               "predictor; 0.5 is `tokenbutler_engine`, the engine's rule)", "",
               "Each cell: mean [95% interval over sequences]; difference from 0.5: mean [95% t interval of the "
               "per-sequence differences] (sequences where it is above).", ""]

    def variants(lengths: dict) -> list[tuple[str, str | None]]:
        methods = {m for r in lengths.values() for m in r["per_sequence"] if m.startswith(prefix)}
        shares = [("0.5", None)] + [(f"{int(m[len(prefix):]) / 100:g}", m) for m in methods]
        return sorted(shares, key=lambda variant: float(variant[0]))
    return _variants_table(report, heading, "share", variants)


def _variants_table(report: dict, heading: list[str], column: str, variants) -> str:
    """``heading`` and, per section (every row, lookup rows), a table of one row per ``(label, method)`` of
    ``variants(lengths)`` (method None: ``tokenbutler_engine``, the reference) and a column per length; empty
    when no section has a method but the reference."""
    lines, found = list(heading), False
    for section, title in SECTIONS:
        lengths = report.get(section) or {}
        chosen = variants(lengths)
        found |= any(method is not None for _, method in chosen)
        rows = [[label, *(_variant_cell(result["per_sequence"], method) for result in lengths.values())]
                for label, method in chosen]
        lines += [f"### {title}", "", markdown_table([column, *(f"{n} tokens" for n in lengths)], rows), ""]
    return "\n".join(lines) if found else ""


def _windows(lengths: dict, default: int) -> list[int]:
    """The windows a report measured: its ``engine_wW`` methods and the default (``tokenbutler_engine``)."""
    methods = {method for result in lengths.values() for method in result["per_sequence"]}
    prefix = window_method(0)[:-1]
    return sorted({default, *(int(m[len(prefix):]) for m in methods if m.startswith(prefix))})


def _variant_cell(per_sequence: dict, method: str | None) -> str:
    """A method's recall over sequences and its paired difference from ``tokenbutler_engine``'s; None: the
    reference's own recall."""
    if method is None:
        return _cell(mean_interval(per_sequence["tokenbutler_engine"][BUDGET]))
    return _paired_cell(per_sequence, method)


def _paired_cell(per_sequence: dict, method: str) -> str:
    """``method``'s recall over sequences and its paired difference from ``tokenbutler_engine``'s."""
    base = per_sequence["tokenbutler_engine"][BUDGET]
    values = per_sequence[method][BUDGET]
    diffs = [v - b for v, b in zip(values, base)]
    above = sum(d > 0 for d in diffs)
    return f"{_cell(mean_interval(values))}; {signed_cell(mean_interval(diffs))} ({above} of {len(diffs)})"


def append_window_table(out: Path) -> None:
    """Append ``window_table`` (and ``share_table`` where it measured shares) of ``OUT.json`` to ``OUT.md``."""
    report = json.loads(out.with_suffix(".json").read_text())
    tables = [table for table in (window_table(report), share_table(report)) if table]
    markdown = out.with_suffix(".md")
    markdown.write_text(markdown.read_text().rstrip("\n") + "\n\n" + "\n\n".join(tables) + "\n")


def _numbers(argv: list[str], flag: str, default, kind):
    """Pop ``flag A,B,...`` from ``argv`` (predictor_report's own options stay): the numbers, or ``default``."""
    if flag not in argv:
        return default
    at = argv.index(flag)
    text = argv[at + 1] if at + 1 < len(argv) else ""
    del argv[at:at + 2]
    try:
        return tuple(kind(item) for item in text.split(",") if item.strip() and item.strip() != "none")
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: give numbers separated by commas (or none)") from None


def main(argv: list[str] | None = None) -> None:
    """``--windows W,...`` (default ``WINDOWS``; ``none``) and ``--shares S,...`` (default none), then
    predictor_report's arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    windows, shares = _numbers(argv, "--windows", WINDOWS, int), _numbers(argv, "--shares", (), float)
    if any(not 0 < share < 1 for share in shares):
        raise SystemExit(f"--shares {shares}: each share of the budget is between 0 and 1")
    evaluation.METHODS = (evaluation.METHODS + tuple(window_method(w) for w in windows)
                          + tuple(share_method(s) for s in shares))
    evaluation._selections = _selections_with_windows(evaluation._selections, windows, shares)
    predictor_report.main(argv)  # evaluation's METHODS and _selections are read at call time: the patched ones
    append_window_table(Path(argv[argv.index("--out") + 1]))


if __name__ == "__main__":
    main()
