"""The latency report's three files: JSON (everything), Markdown (tables), PNG (ms/step vs context)."""

from __future__ import annotations

import math
from pathlib import Path

from .report import fmt, markdown_header, markdown_table, ratio_cell, write_json

COLUMNS = ["mode", "median ms/step", "p90 ms/step", "prefill s", "speed-up vs dense-offload",
           "ratio to dense-gpu", "floor ms (ratio)", "MiB H2D/step", "GB/s over step (% of memcpy peak)",
           "KV on device", "gather", "status"]
BREAKDOWN_COLUMNS = ["mode", "selection", "copy", "wait", "attention", "rest"]
PAIRED_COLUMNS = ["mode", "rounds", "ratio to dense-gpu by round", "ratio to dense-gpu, geomean [95%]",
                  "ratio to streaming-offload, geomean [95%]"]
NO_PAGES = "without the page prefilter"  # paired_ratios' key of a page-prefiltered row's own mode without it
NO_BONUS = "without the keep bonus"  # ... of a row with a keep bonus (top-k hysteresis), its mode without it
# the references a variant of a mode is paired with, and what the report says of each
OWN_MODE = {NO_PAGES: "Against the same without the page prefilter: the same mode, interval and neighbour rule, "
                      "every token scored.",
            NO_BONUS: "Against the same without the keep bonus: the same mode, interval and neighbour rule, every "
                      "token ranked by its score alone."}


def write_report(report: dict, out_dir: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``; return their paths.

    The report itself records the file names only (the three sit side by side), never a local path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: str(out_dir / f"{stem}.{kind}") for kind in ("json", "md", "png")}
    report["files"] = {kind: Path(path).name for kind, path in files.items()}
    plot(report, Path(files["png"]))
    Path(files["md"]).write_text(to_markdown(report))
    write_json(Path(files["json"]), report)
    return files


def _row_cells(row: dict) -> list[str]:
    if row["status"] != "ok":
        return [row["label"]] + ["-"] * (len(COLUMNS) - 2) + [f"{row['status']}: {row['reason']}"]
    share = row["fraction_of_memcpy_peak"]
    percent = "" if share is None or math.isnan(share) else f" ({100 * share:.0f}%)"
    return [
        row["label"], fmt(row["median_ms"], 2), fmt(row["p90_ms"], 2), fmt(row["prefill_s"], 2),
        fmt(row["speedup_vs_dense_offload"], 2), fmt(row["ratio_to_dense_gpu"], 2),
        f"{fmt(row['floor_ms'], 2)} ({fmt(row['ratio_to_floor'], 2)})",
        fmt(row["h2d_bytes_per_step"] / 2**20, 2), fmt(row["h2d_gbps_over_step"], 2) + percent,
        f"{row['kv_on_device_bytes'] / 2**20:.1f} MiB ({100 * row['kv_on_device_share']:.1f}%)",
        row["gather_method"] or "-", "ok",
    ]


def _breakdown_cells(row: dict) -> list[str]:
    parts = row["breakdown"]
    return [row["label"]] + [f"{fmt(parts[p]['ms_per_step'], 2)} ({100 * parts[p]['share']:.0f}%)"
                             for p in BREAKDOWN_COLUMNS[1:]]


def _paired_note(report: dict) -> str:
    """Which ratio to judge a target by, where the report has the ratios round by round."""
    if not any(row.get("paired_ratios") for row in report["rows"]):
        return ""
    return (" The ratio columns divide those fastest rounds, each mode's own, which may come from different rounds "
            "and so favour the noisier mode; the ratios round by round under each context's tables pair the modes "
            "within a round and are the ones to judge a target by.")


def _paired_lines(rows: list[dict], repeats: int) -> list[str]:
    """The context's ratios round by round (rows' ``paired_ratios``), where some row ran in two rounds or more."""
    paired = [r for r in rows if any(len(s["per_round"]) > 1 for s in r.get("paired_ratios", {}).values())]
    if not paired:
        return []
    own = [key for key in OWN_MODE if any(key in row["paired_ratios"] for row in paired)]
    cells = []
    for row in paired:
        ratios = row["paired_ratios"]
        to_dense = ratios.get("dense-gpu")
        counts = sorted({len(s["per_round"]) for s in ratios.values()})  # rounds in which both modes ran
        cells.append([row["label"], " / ".join(str(n) if n == repeats else f"{n} of {repeats}" for n in counts),
                      ", ".join(fmt(r, 2) for r in to_dense["per_round"]) if to_dense else "-",
                      ratio_cell(to_dense), ratio_cell(ratios.get("streaming-offload"))]
                     + [ratio_cell(ratios.get(key)) for key in own])
    order = ("every other round in reverse order" if all(r.get("round_order") == "alternating" for r in paired)
             else "in the same order every round, dense-gpu first")
    return ["", f"Ratios round by round: each round ran every mode once, one after the other ({order}), so a ratio "
            "within a round compares steps measured minutes apart at most; geometric mean over the rounds [95% t "
            "interval of the log ratios]. Against streaming-offload: the same interval and neighbour rule. Rounds: "
            "those in which both modes ran." + "".join(" " + OWN_MODE[key] for key in own), "",
            markdown_table(PAIRED_COLUMNS + [f"ratio to the same {key}, geomean [95%]" for key in own], cells)]


def _compact_keys_text(report: dict) -> str:
    """How tokenbutler's projected keys were stored in this run, for the floor's description (its reads are
    the keys as stored: an int8 token d' + 2 bytes a KV head, bfloat16 2 d')."""
    stored = sorted({row["compact_key_dtype"] for row in report["rows"] if row.get("compact_key_dtype")})
    return f": tokenbutler's projected keys as stored, {' and '.join(stored)}" if stored else ""


def _read_rate(report: dict) -> float:
    rates = [row["memory_read_gbps"] for row in report["rows"] if row.get("memory_read_gbps")]
    return rates[0] if rates else math.nan


SCORING_MODES = ("tokenbutler-offload", "quest-offload")  # their selection follows the scores
RANDOM = "random"  # LatencySettings.predictor of a random-weight predictor (and of reports before the option)


def _breakdown_steps_text(report: dict) -> str:
    """Which decode steps the breakdown covers: the timed ones, or (reports before the per-step record) all."""
    timed = any(row.get("breakdown_steps") == "timed" for row in report["rows"])
    return ("the timed steps, as the timings" if timed else
            "every decode step, warm-up included (so a sparse mode's first step, which fetches every layer's whole "
            "selection, is in `copy`)")


def _tile_prefill_text(report: dict) -> str:
    """What prefill s holds with ``--synthetic-kv-tile``: the tile prefilled once per context and replayed into
    every mode (``tile_prefill_s``), or, in reports before that, each mode's own prefill of it."""
    seconds = [row["tile_prefill_s"] for row in report["rows"] if row.get("tile_prefill_s") is not None]
    if not seconds:
        return "prefill s is the tile's prefill and the fill."
    return (f"the tile was prefilled once per context ({fmt(min(seconds), 1)}-{fmt(max(seconds), 1)} s, "
            "`tile_prefill_s` in the JSON) and replayed into every mode, so prefill s is the replay and the fill.")


def _predictor_text(report: dict) -> str:
    """Which predictor tokenbutler ran with: random weights of ``--predictor-shape``'s sizes, or a trained one."""
    s = report["settings"]
    if s.get("predictor", RANDOM) == RANDOM:
        shape = s.get("predictor_shape", "4:512:16").split(":")  # reports before the option: the reference sizes
        return (f"tokenbutler's predictor (random weights) a producer every {shape[0]} layers, hidden width "
                f"{shape[1]}, d' {shape[2]}")
    loaded = sorted({row["predictor"] for row in report["rows"] if row.get("predictor")})
    return f"tokenbutler's predictor the trained {', '.join(loaded) or s['predictor']} (`--predictor {s['predictor']}`)"


def _fetched_share(report: dict) -> tuple[float, float] | None:
    """Lowest and highest share of the selected budget fetched per step by the scoring policies at interval 1."""
    shares = [1.0 - row["delta_fetch_saving"] for row in report["rows"]
              if row["status"] == "ok" and row.get("interval") == 1 and row["mode"] in SCORING_MODES
              and not math.isnan(row.get("delta_fetch_saving", math.nan))]
    return (min(shares), max(shares)) if shares else None


def _share_range(shares: tuple[float, float]) -> str:
    low, high = (f"{share:.0%}" for share in shares)
    return low if low == high else f"{low}-{high}"


def _weights_text(settings: dict) -> str:
    """The weights' form a decode step read (recorded from stop 56 on), after the dtype."""
    weights = settings.get("weights")
    return f" (decode weights: {weights})" if weights and not weights.endswith(" tensors") else ""


def to_markdown(report: dict) -> str:
    """Header, settings, then one table per context."""
    s, peaks = report["settings"], report["pinned_memcpy_peak_gbps"]
    model = s["model"] or f"{s['arch']} (random weights)"
    peak_text = ("not measured (no CUDA)" if peaks["before"] is None
                 else f"{fmt(peaks['before'])} GB/s before, {fmt(peaks['after'])} GB/s after the modes ran "
                      "(latest run; % of peak uses the larger)")
    lines = [
        markdown_header("Decode latency per step: tbrun modes side by side", report), "",
        f"Model {model}, {s['dtype']}{_weights_text(s)}; budget {s['budget']} tokens per (layer, KV head); "
        f"{_predictor_text(report)}; "
        f"{s['warmup']} warm-up steps excluded, {s['decode_steps']} timed steps per mode; the prompt fills the "
        f"context less the {s['new_tokens_per_run']} new tokens. Pinned host-to-device memcpy peak: {peak_text}.",
        "",
        "GB/s over step = bytes copied host-to-device per step / median step time (a lower bound of the copy "
        "rate, since copies overlap compute). Speed-up and ratio compare median ms per step at the same context. "
        "Floor ms: the bytes a step must move through memory at the least (weights, the KV attention reads, the "
        f"policy's scoring state{_compact_keys_text(report)}, copies counted twice on the CPU) at the memory read "
        f"rate measured in this run ({fmt(_read_rate(report))} GB/s); the ratio is the mean step (prediction steps "
        "included) / floor.",
        "",
        "Breakdown: ms per step (share of the step) of each phase, timed in the same runs (CPU: timers around "
        "each phase; CUDA: events on the current stream, so copies overlapping compute count in `copy` and the "
        "phases need not add up), over " + _breakdown_steps_text(report) + ". `rest` is the step minus the "
        "phases: projections, MLP, norms, sampling.",
    ]
    if s.get("repeats", 1) > 1:
        lines += ["", f"Each mode ran {s['repeats']} times, interleaved with the others; its row is its fastest round "
                  "(all rounds' medians are in the JSON as `round_medians_ms`)." + _paired_note(report)]
    if s.get("copy_thread"):
        threads = sorted({row.get("model_threads") for row in report["rows"] if row.get("model_threads")})
        lines += ["", "`--copy-thread`: every mode used the same cores. The offload modes ran the model on "
                  f"{min(threads, default='?')} torch thread(s) and their copies on one more thread (tokenbutler's "
                  "selections too, made there ahead of their copies, as a GPU's copy engine and side stream would); "
                  f"dense-gpu, which copies nothing, ran the model on {max(threads, default='?')} torch threads"
                  f"{_kernel_threads_note(report)}. Work "
                  "on the copy thread is off the step's path: it is not in `selection` or `copy`, and `wait` is the "
                  "time the step stalled for it."]
    if s.get("synthetic_kv_tile"):
        lines += ["", f"KV filled with the real keys and values of the prompt's first {s['synthetic_kv_tile']:,} "
                  "tokens, repeated along the positions (each copy's queries and keys turned by RoPE to the positions "
                  "it fills; `--synthetic-kv-tile`), instead of a prefill of the whole prompt: a decode step's time "
                  "does not depend on the values, but a scoring policy's selections change from step to step as they "
                  "do on a real prefix, where random keys renew most of them at every step; "
                  f"{_tile_prefill_text(report)} RoPE runs past the model's trained positions (timing only)."]
    elif s.get("synthetic_kv"):
        lines += ["", "KV filled with random keys and values instead of running the prefill (`--synthetic-kv`): a "
                  "decode step's time does not depend on the values, and prefill s is the fill time."]
    churn = _fetched_share(report)
    if churn and s.get("predictor", RANDOM) == RANDOM:
        lines += ["", f"Random predictor weights redraw the selection at every prediction step: at interval 1 a step "
                  f"of tokenbutler or quest fetched {_share_range(churn)} of the selected budget "
                  "(`1 - delta_fetch_saving`). The "
                  "shipped predictor on the embedded model fetches far less per step (its churn is in "
                  "bench/reports/bytes_per_step.md and in this report's `--model embedded --predictor shipped "
                  "--synthetic-kv-tile` run), so `copy`, and part of `selection` (the residency update), are upper "
                  "bounds here."]
    elif churn:
        lines += ["", f"At interval 1 a step of tokenbutler or quest fetched {_share_range(churn)} of the "
                  "selected budget (`1 - delta_fetch_saving`): what their selections renewed from one step to the "
                  "next."]
    if len(report.get("runs", [])) > 1:
        lines += ["", "Runs merged into this report (each context measured within one run):"]
        lines += [f"- `{run['command']}` at {run['commit']}, contexts {run['contexts']}, memcpy peak "
                  f"{fmt(run['memcpy_peak_gbps_before'])} / {fmt(run['memcpy_peak_gbps_after'])} GB/s"
                  for run in report["runs"]]
    for context in sorted({row["context"] for row in report["rows"]}):
        rows = [_row_cells(r) for r in report["rows"] if r["context"] == context]
        lines += ["", f"## Context {context:,} tokens", "", markdown_table(COLUMNS, rows)]
        split = [_breakdown_cells(r) for r in report["rows"] if r["context"] == context and r.get("breakdown")]
        if split:
            lines += ["", markdown_table(BREAKDOWN_COLUMNS, split)]
        lines += _paired_lines([r for r in report["rows"] if r["context"] == context], s.get("repeats", 1))
    if report.get("files", {}).get("png"):
        lines += ["", f"![ms per step vs context]({Path(report['files']['png']).name})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Median ms per decode step vs context, one line per mode, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label in dict.fromkeys(row["label"] for row in report["rows"]):
        points = sorted((r["context"], r["median_ms"]) for r in report["rows"]
                        if r["label"] == label and r["status"] == "ok")
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("median ms per decode step")
    machine = report["machine"]
    where = machine.get("gpu") or machine.get("cpu", "")
    model = report["settings"]["model"] or report["settings"]["arch"]
    ax.set_title(f"{model} on {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kernel_threads_note(report: dict) -> str:
    """How many threads dense-gpu's native kernels (its decode attention and LM head) had in a copy-thread run,
    where the rows say (runs before they did gave it one unless TBRUN_NATIVE_THREADS said more)."""
    counts = {row.get("kernel_threads") for row in report["rows"] if not row.get("copy_thread")} - {None}
    return f" and its native kernels on {max(counts)}" if counts else ""
