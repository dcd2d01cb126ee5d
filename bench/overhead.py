"""Overhead of tbrun's CPU path: dense-device decode per step against transformers' own generate.

Both run the same model (the embedded SmolLM2-135M-Instruct by default, fp32 on the CPU) on the
same random prompt of 1k, 4k and 7.5k tokens, greedy, a fixed number of new tokens, in one
process. Repetitions are interleaved (tbrun and transformers alternate at each context, and the
order flips every repetition) so drift in a shared machine's load hits both alike; a warm-up
run of each is excluded, and so are the first ``--skip`` steps of every run.

How a step is timed:
- tbrun: ``result.stats.decode_ms``, the engine's wall time from feeding a token to having
  sampled the next one (one entry per decode step).
- transformers: ``model.generate`` with a logits processor that takes a timestamp each time it
  is called; it is called once per new token, right after that token's forward pass, so the
  interval between two calls is one full decode step (forward with ``DynamicCache``, logits
  processing, greedy choice, cache and stopping bookkeeping). ``min_new_tokens`` keeps both
  from stopping at an end-of-sequence token (tbrun: its EOS set is emptied for the run).

Run: ``python -m tbrun_bench.overhead --out bench/reports`` (``make bench-overhead``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from offload_engine import (
    Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, load_model, parse_context,
)

from .report import fmt, machine_header, markdown_header, markdown_table, provenance, summarize_ms, write_json

TARGET_RATIO = 1.1  # issue 2: at most 1.1x transformers' ms per step
SINKS, WINDOW = 4, 32  # of the sparse runners


class StepClock:
    """A logits processor that records ``time.perf_counter()`` at every call (one per new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive calls: one entry per decode step."""
        return [1000.0 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])]


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """``length`` token ids drawn uniformly (ids below 256 skipped: special and byte tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab_size, (length,), generator=generator).tolist()


def run_tbrun(adapter, prompt: list[int], new_tokens: int,
              selection: SelectionConfig | None = None) -> tuple[list[float], float, list[int]]:
    """Per-step ms, prefill seconds and generated ids of the engine: dense on the device, or
    sparse offload under ``selection``."""
    mode = KVMode.DENSE_DEVICE if selection is None else KVMode.SPARSE_OFFLOAD
    config = EngineConfig(context=len(prompt) + new_tokens + 1, mode=mode, device=str(adapter.device),
                          selection=selection or SelectionConfig())
    engine = Engine(adapter, config)
    # a fixed number of steps, like min_new_tokens on the other side
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
    return list(result.stats.decode_ms), result.stats.prefill_seconds, result.token_ids


def sparse_selection(spec: str) -> SelectionConfig:
    """``tokenbutler:10%`` -> the selection of a sparse runner (sinks 4, window 32, as in tbrun eval)."""
    policy, _, budget = spec.partition(":")
    return SelectionConfig(policy=policy, budget=Budget.parse(budget or "10%"), sinks=SINKS, window=WINDOW)


def run_transformers(model, prompt: list[int], new_tokens: int) -> tuple[list[float], float, list[int]]:
    """Per-step ms, prefill seconds and generated ids of ``model.generate`` (greedy, DynamicCache)."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    ids = torch.tensor([prompt], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
        )
    prefill = clock.stamps[0] - start if clock.stamps else float("nan")
    return clock.step_ms(), prefill, out[0, len(prompt):].tolist()


def measure(adapter, contexts: list[int], new_tokens: int, repeats: int, skip: int, seed: int, log,
            sparse: tuple[str, ...] = ()) -> list[dict]:
    """Interleaved repetitions at every context; returns one row per context.

    ``sparse``: extra tbrun runners in sparse-offload mode, as ``policy:budget`` specs.
    """
    runners = {"tbrun": lambda p: run_tbrun(adapter, p, new_tokens),
               "transformers": lambda p: run_transformers(adapter.model, p, new_tokens)}
    for spec in sparse:
        selection = sparse_selection(spec)
        runners[f"tbrun {spec}"] = lambda p, sel=selection: run_tbrun(adapter, p, new_tokens, sel)
    prompts = {c: random_prompt(adapter.dims.vocab_size, c, seed + c) for c in contexts}
    for name, runner in runners.items():  # warm-up, excluded
        log(f"warm-up: {name} at {contexts[0]} tokens")
        runner(prompts[contexts[0]])
    samples = {(name, c): [] for name in runners for c in contexts}
    prefill = {(name, c): [] for name in runners for c in contexts}
    outputs: dict = {}
    for rep in range(repeats):
        for c in contexts:
            order = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for name in order:
                steps, prefill_s, ids = runners[name](prompts[c])
                samples[name, c] += steps[skip:]
                prefill[name, c].append(prefill_s)
                outputs[name, c] = ids
                median = summarize_ms(steps[skip:])["median_ms"]
                log(f"rep {rep + 1}/{repeats}, {c} tokens, {name}: median {median:.1f} ms/step")
    return [_row(c, samples, prefill, outputs, sparse) for c in contexts]


def _row(context: int, samples: dict, prefill: dict, outputs: dict, sparse: tuple[str, ...] = ()) -> dict:
    ours, theirs = summarize_ms(samples["tbrun", context]), summarize_ms(samples["transformers", context])
    extra = {}
    for spec in sparse:
        timing = summarize_ms(samples[f"tbrun {spec}", context])
        extra[spec] = timing | {"ratio_to_transformers": timing["median_ms"] / theirs["median_ms"],
                                "ratio_to_dense": timing["median_ms"] / ours["median_ms"]}
    return {
        "sparse": extra,
        "context": context,
        "tbrun": ours | {"prefill_s_median": _median(prefill["tbrun", context])},
        "transformers": theirs | {"prefill_s_median": _median(prefill["transformers", context])},
        "ratio_median": ours["median_ms"] / theirs["median_ms"],
        "ratio_p90": ours["p90_ms"] / theirs["p90_ms"],
        "same_tokens": outputs["tbrun", context] == outputs["transformers", context],
    }


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def to_markdown(report: dict) -> str:
    rows = [[r["context"], fmt(r["tbrun"]["median_ms"]), fmt(r["tbrun"]["p90_ms"]),
             fmt(r["transformers"]["median_ms"]), fmt(r["transformers"]["p90_ms"]),
             fmt(r["ratio_median"], 2), fmt(r["ratio_p90"], 2),
             f'{fmt(r["tbrun"]["prefill_s_median"], 2)} / {fmt(r["transformers"]["prefill_s_median"], 2)}',
             "yes" if r["same_tokens"] else "no"] for r in report["rows"]]
    headers = ["context", "tbrun median ms", "tbrun p90 ms", "transformers median ms", "transformers p90 ms",
               "ratio (median)", "ratio (p90)", "prefill s (tbrun / transformers)", "same tokens"]
    s = report["settings"]
    notes = [
        "", f"Model {s['model']} ({s['dtype']}), greedy, {s['new_tokens']} new tokens per run, {s['repeats']} "
        f"interleaved repetitions, first {s['skip_steps']} steps of each run and one warm-up run of each excluded; "
        f"{report['rows'][0]['tbrun']['steps'] if report['rows'] else 0} steps per cell.",
        f"Target: tbrun at most {TARGET_RATIO}x transformers' median ms per step.", "", s["timing_method"], "",
    ]
    return markdown_header("Overhead: tbrun dense-device decode vs transformers generate", report) + "\n" + \
        "\n".join(notes) + "\n" + markdown_table(headers, rows) + "\n" + _sparse_markdown(report)


def _sparse_markdown(report: dict) -> str:
    """The sparse-offload runners measured beside the two above, if any."""
    rows = [[r["context"], spec, fmt(t["median_ms"]), fmt(t["p90_ms"]), fmt(t["ratio_to_dense"], 2),
             fmt(t["ratio_to_transformers"], 2)]
            for r in report["rows"] for spec, t in r.get("sparse", {}).items()]
    if not rows:
        return ""
    headers = ["context", "sparse offload (policy:budget)", "median ms", "p90 ms", "ratio to tbrun dense",
               "ratio to transformers"]
    return (f"\n## Sparse offload in the same run\n\nSame prompts, interleaved with the runs above; sinks {SINKS}, "
            f"window {WINDOW}.\n\n" + markdown_table(headers, rows) + "\n")


TIMING_METHOD = (
    "Timing: tbrun's per-step time is the engine's own (feed a token, sample the next); transformers' is the "
    "interval between consecutive calls of a timestamping logits processor, i.e. one full generate step."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tbrun_bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path or id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--contexts", default="1k,4k,7.5k", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per context")
    parser.add_argument("--skip", type=int, default=1, help="first steps of each run to exclude")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/reports"), help="report folder")
    parser.add_argument("--name", default="overhead_cpu", help="report file name (without extension)")
    parser.add_argument("--sparse", action="append", default=[],
                        help="also time sparse offload, as policy:budget (e.g. tokenbutler:10%%); repeatable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    contexts = [parse_context(c) for c in args.contexts.split(",")]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log("loading the model")
    adapter = load_model(args.model, dtype=torch.float32, device="cpu", progress=log)
    rows = measure(adapter, contexts, args.new_tokens, args.repeats, args.skip, args.seed, log, tuple(args.sparse))
    report = {
        "benchmark": "overhead",
        "provenance": provenance("python -m tbrun_bench.overhead"),
        "machine": machine_header(torch.device("cpu")),
        "settings": {"model": args.model or "embedded SmolLM2-135M-Instruct", "dtype": "fp32",
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "skip_steps": args.skip,
                     "seed": args.seed, "sparse": args.sparse, "target_ratio": TARGET_RATIO, "timing_method": TIMING_METHOD},
        "rows": rows,
    }
    write_json(args.out / f"{args.name}.json", report)
    (args.out / f"{args.name}.md").write_text(to_markdown(report))
    log(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
