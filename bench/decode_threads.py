"""A CPU decode on the cores torch was given: the native kernels on all of them, or torch's threads beside one kernel thread.

    python -m tbrun_bench.decode_threads --out bench/reports/decode_threads

On the CPU a decode step is native calls (every projection; the norms, MLP and attention of a Llama-form layer;
tokenbutler's selection) with a few small torch operations between them. Two ways to use ``--threads`` T cores,
alternating in one process, paired by round:

- ``kernels on 1`` (``TBRUN_NATIVE_THREADS=1``, the default before ``native.decode_threads``): torch on T
  threads, every kernel on the caller's thread;
- ``kernels on T`` (the default now): for the decode, torch on one thread and the kernels splitting their rows
  among T (``native.decode_threads``; workers that spin between calls, ``Workers`` in ``native/selection.cpp``).

Every mode of ``tbrun generate`` on the embedded model (its settings: sinks 4, the window following the budget up
to 128, the shipped predictor), at a short prompt (the ``make run`` one) and at ``--long`` tokens of
torch's own ``nn/modules/module.py`` (a file every install has), each prompt prefilled once (``record_prefill``)
and replayed into every run, greedy, ``--new-tokens`` a run. A round runs every (prompt, mode) under both
settings, the order flipping every round; a run's figure is its median ms a step. Writes ``OUT.json`` and
``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from unittest import mock

import torch
from rich.progress import Progress

from offload_engine import Engine, EngineConfig, KVMode, SamplingConfig, load_model, native

from .overhead import sparse_selection
from .report import (fmt, machine_header, markdown_header, markdown_table, provenance, ratio_cell, ratio_summary,
                     write_reports)

SHORT_PROMPT = "Write a short story about a robot who learns to paint."  # make run's
MODES = {"dense-device": None, "dense-offload": "dense", "streaming 10%": "streaming:10%",
         "tokenbutler 10%": "tokenbutler:10%"}  # sparse: overhead.sparse_selection's specs
SETTINGS = ("kernels on 1", "kernels on T")
CONTEXT = 8192


def long_prompt(tokenizer, length: int) -> list[int]:
    """The first ``length`` tokens of torch's ``nn/modules/module.py``."""
    text = (Path(torch.__file__).parent / "nn" / "modules" / "module.py").read_text()
    ids = tokenizer(text)["input_ids"]
    if len(ids) < length:
        raise SystemExit(f"--long {length}: torch's nn/modules/module.py has {len(ids)} tokens; give fewer.")
    return ids[:length]


def engine_for(adapter, mode: str) -> Engine:
    """The engine ``tbrun generate`` builds for ``mode`` (sparse: its selection settings, ``sparse_selection``)."""
    spec = MODES[mode]
    if spec is None:
        return Engine(adapter, EngineConfig(context=CONTEXT, mode=KVMode.DENSE_DEVICE, device="cpu"))
    if spec == "dense":
        return Engine(adapter, EngineConfig(context=CONTEXT, mode=KVMode.DENSE_OFFLOAD, device="cpu"))
    return Engine(adapter, EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD,
                                        selection=sparse_selection(spec).selection, device="cpu"))


def run_once(engine: Engine, prompt: list[int], record, new_tokens: int, setting: str) -> float:
    """Median ms a step of one greedy run under ``setting`` (the variable restored after)."""
    with mock.patch.dict(os.environ):  # restores the environment as it was
        if setting == "kernels on 1":
            os.environ[native.THREADS_VARIABLE] = "1"
        result = engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True), prefill=record)
    return statistics.median(result.stats.decode_ms)


def measure(args) -> dict:
    if os.environ.get(native.THREADS_VARIABLE):
        raise SystemExit(f"unset {native.THREADS_VARIABLE}: this benchmark sets it per run")
    torch.set_num_threads(args.threads)
    if native.kernels() is None:
        raise SystemExit(f"the native kernels are not available here ({native.status()}): nothing to compare")
    adapter = load_model(None, device="cpu")
    prompts = {"short": adapter.tokenizer(SHORT_PROMPT)["input_ids"], "long": long_prompt(adapter.tokenizer, args.long)}
    engines = {mode: engine_for(adapter, mode) for mode in MODES}
    records = {name: engines["dense-device"].record_prefill(ids) for name, ids in prompts.items()}
    cases = [(name, mode) for name in prompts for mode in MODES]
    times = {case: {setting: [] for setting in SETTINGS} for case in cases}
    with Progress() as progress:
        task = progress.add_task("rounds", total=args.rounds * len(cases) * len(SETTINGS))
        for round_ in range(args.rounds):
            order = SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]
            for name, mode in cases:
                for setting in order:
                    ms = run_once(engines[mode], prompts[name], records[name], args.new_tokens, setting)
                    times[(name, mode)][setting].append(ms)
                    progress.advance(task)
    rows = []
    for (name, mode), by_setting in times.items():
        one, many = by_setting["kernels on 1"], by_setting["kernels on T"]
        rows.append({"prompt": name, "prompt_tokens": len(prompts[name]), "mode": mode,
                     "ms_kernels_on_1": one, "ms_kernels_on_T": many,
                     "median_ms_kernels_on_1": statistics.median(one), "median_ms_kernels_on_T": statistics.median(many),
                     "ratio": ratio_summary([b / a for a, b in zip(one, many)])})
    return {"provenance": provenance("python -m tbrun_bench.decode_threads"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
                        "long_prompt_tokens": args.long, "context": CONTEXT, "native": native.status(),
                        "short_prompt": SHORT_PROMPT},
            "rows": rows}


def to_markdown(report: dict) -> str:
    s = report["setting"]
    table = [[row["mode"], f"{row['prompt']} ({row['prompt_tokens']:,})", fmt(row["median_ms_kernels_on_1"]),
              fmt(row["median_ms_kernels_on_T"]), ratio_cell(row["ratio"])] for row in report["rows"]]
    return "\n".join([
        markdown_header("A CPU decode's threads: the native kernels on the cores torch had, or one kernel thread",
                        report), "",
        f"`--threads {s['threads']}`. Two settings alternate in one process, the order flipping every round "
        f"({s['rounds']} rounds): **kernels on 1** (`TBRUN_NATIVE_THREADS=1`, the default before): torch on "
        f"{s['threads']} threads and every native kernel on the caller's; **kernels on T** (the default now, "
        f"`native.decode_threads`): for the decode, torch on one thread and the kernels splitting their rows among "
        f"{s['threads']}. Each run: `tbrun generate`'s engine for the mode (context {s['context']:,}; sparse modes "
        "at 10%, sinks 4, the window following the budget up to 128, the shipped predictor), the prompt's prefill "
        f"recorded once and replayed, greedy, {s['new_tokens']} new tokens; its figure is its median ms a step. "
        "Prompts: the short one of `make run` and the first tokens of torch's own `nn/modules/module.py`. Ratio: "
        "kernels on T / kernels on 1, paired by round, geometric mean [95% t interval]. The tokens are the same "
        "under both (the kernels split rows, each computed alike: tests/test_copy_thread.py). Native kernels: "
        f"{s['native']}.", "",
        markdown_table(["mode", "prompt (tokens)", "kernels on 1, ms a step", "kernels on T, ms a step",
                        "ratio [95%]"], table),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch's threads, the cores a decode may use")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long", type=int, default=7500, help="tokens of the long prompt")
    parser.add_argument("--out", required=True, type=Path, help="report path without extension")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 2 or args.new_tokens < 2 or args.long < 64:
        parser.error("--threads >= 1, --rounds >= 2, --new-tokens >= 2 and --long >= 64")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = measure(args)
    write_reports(args.out, report, to_markdown(report))


if __name__ == "__main__":
    main()
