"""vLLM (CPU build) dense against vLLM with tbrun's selection: ms per decode step and tokens/s.

One engine, one run: the plugin is loaded with ``TBRUN_VLLM`` and switched per measurement
(``Runtime.enabled`` off = vLLM's own attention kernel; ``set_selection`` for the budget), so every
mode decodes the same prompts from the same prefix-cached KV. Prompts are distinct needle-in-a-
haystack samples of ``--context`` tokens (``offload_engine.evaluation``); each batch size's prompts
are prefilled once (not timed). Each engine step is timed (``LLMEngine.step``); the first steps,
which prefill the uncached tail of each prompt, are dropped. The modes are interleaved in rounds so
that the load of a shared machine weighs on all of them alike.

Needs the ``vllm`` extra (its own venv; see docs/vllm.md)::

    VLLM_CPU_KVCACHE_SPACE=6 OMP_NUM_THREADS=1 python -m tbrun_bench.vllm_bench --batch 1,4,16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from .report import fmt, machine_header, markdown_header, markdown_table, percentile, provenance, write_json

PLUGIN_CONFIG = "policy=tokenbutler,budget=10%"


def modes() -> list[tuple[str, object]]:
    """(label, selection config or None for vLLM's own kernel)."""
    from offload_engine.config import Budget, SelectionConfig

    return [
        ("vLLM dense (its CPU kernel)", None),
        ("plugin, full budget (every token, tbrun's attention path)", SelectionConfig(budget=None)),
        ("plugin, tokenbutler 10%", SelectionConfig(budget=Budget(fraction=0.1))),
        ("plugin, tokenbutler 10%, interval 4", SelectionConfig(budget=Budget(fraction=0.1), interval=4)),
    ]


def prompts(model: str, count: int, context: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from offload_engine.evaluation.tasks import niah_sample

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [list(niah_sample(tokenizer, "single", i, count, context, 0).prompt_ids) for i in range(count)]


def timed(llm, batch: list[list[int]], tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return time.perf_counter() - start


SKIPPED_STEPS = 2  # the first engine steps prefill the uncached tail of each prompt


def step_times(llm, batch: list[list[int]], steps: int) -> list[float]:
    """Wall time of each engine step (s) generating ``SKIPPED_STEPS + steps`` tokens per prompt; decode steps only."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=SKIPPED_STEPS + steps, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", {"prompt_token_ids": prompt}, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[SKIPPED_STEPS:]


def measure(llm, runtime, batch: list[list[int]], steps: int, rounds: int) -> list[dict]:
    """Decode step times per mode, the modes interleaved in ``rounds`` rounds of ``steps // rounds`` steps,
    so a change in the (shared) machine's load hits every mode alike.

    Reported: the mean (what throughput sees: with ``interval`` one step in N predicts and costs
    more), the median and p90, and every step.
    """
    times: dict[str, list[float]] = {label: [] for label, _ in modes()}
    selecting = dict.fromkeys(times, 0)
    for round_ in range(rounds):
        for label, selection in modes():
            set_mode(runtime, selection)
            if round_ == 0:
                timed(llm, batch, 2)  # warm this mode (first-call allocations)
            before = runtime.selecting_steps
            times[label] += step_times(llm, batch, max(1, steps // rounds))
            selecting[label] += runtime.selecting_steps - before
    set_mode(runtime, None)
    runtime.enabled = True
    rows = []
    for label, values in times.items():
        mean = statistics.fmean(values)
        rows.append({"mode": label, "batch": len(batch), "steps": len(values), "ms_per_step": 1000 * mean,
                     "median_ms": 1000 * statistics.median(values), "p90_ms": 1000 * percentile(values, 90),
                     "tokens_per_s": len(batch) / mean, "selecting_steps": selecting[label],
                     "load_average_1min": round(os.getloadavg()[0], 2),
                     "step_ms": [round(1000 * t, 2) for t in values]})
        print({k: v for k, v in rows[-1].items() if k != "step_ms"}, flush=True)
    return rows


def set_mode(runtime, selection) -> None:
    """None: vLLM's own kernel; a SelectionConfig: the plugin with it (full budget: its own attention path)."""
    runtime.enabled = selection is not None
    runtime.own_dense_attention = selection is not None and selection.budget is None
    if selection is not None:
        runtime.set_selection(selection)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF directory (default: the embedded SmolLM2, converted)")
    parser.add_argument("--context", type=int, default=6144, help="prompt tokens per sequence")
    parser.add_argument("--batch", default="1,4,16", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per mode")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the modes are interleaved in")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch.split(",")]

    os.environ["TBRUN_VLLM"] = PLUGIN_CONFIG
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the switch reaches it
    from vllm import LLM

    from offload_engine.integrations.vllm import plugin, register
    from offload_engine.models import EMBEDDED_MODEL_NAME, embedded_model_dir

    register()
    model = args.model or str(embedded_model_dir())
    everything = prompts(model, max(sizes), args.context)
    llm = LLM(model, dtype="float32", max_model_len=args.context + 2 * args.steps + 64, enforce_eager=True,
              max_num_seqs=max(sizes), seed=0)
    report = {"benchmark": "vllm_cpu", "provenance": provenance("python -m tbrun_bench.vllm_bench"),
              "machine": machine_header(torch.device("cpu")),
              "settings": {"model": args.model or EMBEDDED_MODEL_NAME, "context": args.context, "steps": args.steps, "rounds": args.rounds, "dtype": "float32",
                           "plugin": PLUGIN_CONFIG, "enforce_eager": True,
                           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "unset"),
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
                           "vllm": __import__("vllm").__version__},
              "results": []}
    for size in sizes:
        batch = everything[:size]
        start = time.perf_counter()
        plugin.RUNTIME.enabled = False
        timed(llm, batch, 1)  # prefill into the prefix cache, not timed per step
        report.setdefault("prefill_s", {})[str(size)] = round(time.perf_counter() - start, 1)
        report["results"] += measure(llm, plugin.RUNTIME, batch, args.steps, args.rounds)
        write(report, args.out)  # after each batch size: a partial run still leaves a report
    print(markdown(report))
    return report


def write(report: dict, out: Path) -> None:
    write_json(out / "vllm_cpu.json", report)
    (out / "vllm_cpu.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    s = report["settings"]
    dense = {r["batch"]: r["ms_per_step"] for r in report["results"] if r["mode"].startswith("vLLM dense")}
    rows = [[r["mode"], r["batch"], fmt(r["ms_per_step"]), fmt(r["median_ms"]), fmt(r["p90_ms"]),
             fmt(r["tokens_per_s"], 2), fmt(dense[r["batch"]] / r["ms_per_step"], 2), r["selecting_steps"],
             fmt(r["load_average_1min"], 1)] for r in report["results"]]
    return "\n".join([
        markdown_header("vLLM (CPU build) with tbrun's selection", report), "",
        f"Model {Path(s['model']).name} ({s['dtype']}), {s['context']} prompt tokens per sequence, {s['steps']} "
        f"decode steps timed per mode in {s['rounds']} interleaved rounds, greedy, `ignore_eos`, vLLM {s['vllm']} in eager mode (the plugin's "
        f"TokenButler policy needs it), OMP_NUM_THREADS={s['OMP_NUM_THREADS']}. One engine, modes switched in "
        "place over the same prefix-cached prompts. `selecting steps`: timed decode passes in which some "
        "sequence attended fewer than all its tokens; `load avg`: the machine's 1-minute load average after "
        "the mode (it is shared; compare modes within a batch size).", "",
        markdown_table(["mode", "batch", "ms/step (mean)", "median", "p90", "tokens/s", "speed-up vs dense",
                        "selecting steps", "load avg"], rows), "",
    ])


if __name__ == "__main__":
    main()
