"""What every benchmark report carries: the machine, the command, the commit, and the numbers.

A report is a JSON file (everything, machine-readable) and a Markdown file (the same numbers
for people), written side by side.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from offload_engine.evaluation.scoring import t_interval
from offload_engine.machine import REPO_ROOT, commit_at_start, cpu_model, cupy_status, portable_word

commit_at_start(str(REPO_ROOT))  # the commit the reports name: the one checked out when the run began


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_ms(values: list[float]) -> dict[str, float]:
    """Median, p90, mean and count of per-step times in ms."""
    return {
        "median_ms": statistics.median(values) if values else math.nan,
        "p90_ms": percentile(values, 90),
        "mean_ms": statistics.fmean(values) if values else math.nan,
        "steps": len(values),
    }


def ratio_summary(ratios: list[float]) -> dict:
    """Ratios paired by round (or repetition) -> their geometric mean and its 95% t interval (on the
    logarithms: a ratio and its inverse get mirror intervals); the interval is None under two rounds."""
    logs = [math.log(r) for r in ratios]
    interval = t_interval(logs)
    mean = math.exp(sum(logs) / len(logs)) if logs else math.nan
    return {"per_round": ratios, "geomean": mean,
            "ci95": None if interval is None else [math.exp(interval[1]), math.exp(interval[2])]}


def ratio_cell(summary: dict | None) -> str:
    """``geomean [low, high]`` of a ``ratio_summary`` (without the interval under two rounds; "-" for none)."""
    if not summary:
        return "-"
    interval = summary["ci95"]
    spread = f" [{fmt(interval[0], 2)}, {fmt(interval[1], 2)}]" if interval else ""
    return fmt(summary["geomean"], 2) + spread


def time_alternating(methods: dict, calls: int, warmup: int) -> dict[str, dict[str, float]]:
    """Time zero-argument ``methods`` call by call in turn (so load from other processes hits them
    alike): ``{name: summarize_ms(times of the calls after the warm-up)}``."""
    times = {name: [] for name in methods}
    for call in range(warmup + calls):
        for name, method in methods.items():
            began = time.perf_counter()
            method()
            if call >= warmup:
                times[name].append(1000 * (time.perf_counter() - began))
    return {name: summarize_ms(values) for name, values in times.items()}


def micro_benchmark_main(argv: list[str] | None, doc: str, measure, to_markdown, calls: int) -> None:
    """The command line of a one-thread micro-benchmark module: ``--threads --calls --warmup --out``;
    runs ``measure(args)`` and writes ``OUT.json`` and ``OUT.md`` (``to_markdown(report)``)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=calls)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True, type=Path, help="report path without extension")
    args = parser.parse_args(argv)
    report = measure(args)
    write_reports(args.out, report, to_markdown(report))


def gpu_driver() -> str:
    """The NVIDIA driver version from nvidia-smi, or a reason it is unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi not available)"


def machine_header(device: torch.device) -> dict:
    """The machine a report was measured on: CPU, cores, RAM, GPU, driver, library versions."""
    import transformers

    memory = psutil.virtual_memory()
    header = {
        "cpu": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "host_ram_gib": round(memory.total / 2**30, 1),
        "host_ram_available_gib": round(memory.available / 2**30, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cpu":
        from offload_engine import native

        header["cpu_selection_kernel"] = native.status()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_driver=gpu_driver(),
            cuda=torch.version.cuda,
            cupy=cupy_status(),
        )
        try:
            import triton

            header["triton"] = triton.__version__
        except ImportError:
            header["triton"] = "not installed"
    return header


# environment variables that change what a run measures: a command names those set, as its shell would take them
RUN_VARIABLES = ("TBRUN_NATIVE", "TBRUN_NATIVE_THREADS")


def provenance(program: str | None = None) -> dict:
    """The command line (``program`` replaces argv[0], e.g. ``python -m ...``; absolute paths made
    portable; preceded by the ``RUN_VARIABLES`` set), commit and time."""
    program = program or Path(sys.argv[0]).name
    variables = [f"{name}={shlex.quote(os.environ[name])}" for name in RUN_VARIABLES if name in os.environ]
    return {
        "command": " ".join([*variables, program, *(shlex.quote(portable_word(arg)) for arg in sys.argv[1:])]),
        "commit": commit_at_start(str(REPO_ROOT)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def write_json(path: Path, report: dict) -> Path:
    """Write ``report`` as indented JSON (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")
    return path


def write_reports(out: Path, report: dict, markdown: str) -> None:
    """``OUT.json`` and ``OUT.md`` beside each other (``out`` without extension); say where."""
    write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_header(title: str, report: dict) -> str:
    """Title, command, commit, date and the machine as a bullet list, then any post-processing note."""
    prov, machine = report["provenance"], report["machine"]
    lines = [f"# {title}", "", f"- command: `{prov['command']}`", f"- commit: `{prov['commit']}`",
             f"- date: {prov['date']}"]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in machine.items()]
    if report.get("post_processing"):  # a report changed after its run says how
        lines += ["", f"Post-processing: {report['post_processing']}"]
    return "\n".join(lines)


def predictor_label(record: dict | str | None) -> str:
    """A predictor as reports name it, from its record (``evaluation.harness.predictor_record``: repository path and
    weights sha256): "`path` (weights sha256 `1234abcd...`)"; a plain name (older reports) as it is."""
    if not isinstance(record, dict):
        return str(record)
    return f"`{record['path']}` (weights sha256 `{(record['sha256'] or '?')[:8]}...`)"


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table, ``-`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"
