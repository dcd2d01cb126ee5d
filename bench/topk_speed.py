"""Top-k on the CPU: torch.topk against the engine's top-k (numpy's partition after a sampled cut)
and against the same partition without the cut, side by side in one run.

    python -m tbrun_bench.topk_speed --out bench/reports/topk_cpu

A producer's selection takes the top ``keep`` of ``n`` candidate scores for every (consumer layer,
KV head) row at once. Rows: 12 (SmolLM2-135M: 4 consumer layers x 3 KV heads) and 32 (Llama-3.1-8B:
4 x 8). Scores: softmax of Gaussian logits (peaked, like the predictor's group-mean probabilities).
The three methods alternate call by call on the same scores, so load from other processes hits both
alike; each cell is a median over the calls. Both return the same tokens, ties at the cut aside (tests/test_ranking.py).
Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import sys

import torch

from offload_engine.selection import ranking
from offload_engine.selection.ranking import topk_unsorted

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

CASES = [(12, 8192, 820), (12, 16384, 1024), (12, 32768, 2048), (12, 32768, 3277), (12, 131072, 2048),
         (32, 32768, 2048), (32, 131072, 2048)]


def topk_without_cut(scores: torch.Tensor, keep: int):
    """``topk_unsorted`` with the sampled cut switched off: every row partitioned whole."""
    saved, ranking.PREFILTER_MIN_CANDIDATES = ranking.PREFILTER_MIN_CANDIDATES, sys.maxsize
    try:
        return topk_unsorted(scores, keep)
    finally:
        ranking.PREFILTER_MIN_CANDIDATES = saved


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for count, n, keep in CASES:
        scores = torch.softmax(3 * torch.randn(count, n, generator=generator), dim=-1)
        timed = time_alternating({"plain": lambda: torch.topk(scores, keep, dim=-1, sorted=False),
                                  "whole": lambda: topk_without_cut(scores, keep),
                                  "partition": lambda: topk_unsorted(scores, keep)}, args.calls, args.warmup)
        plain_ms, whole_ms, partition_ms = timed["plain"], timed["whole"], timed["partition"]
        rows.append({"rows": count, "candidates": n, "keep": keep, "torch_topk": plain_ms, "partition_whole": whole_ms,
                     "partition": partition_ms, "ratio": partition_ms["median_ms"] / plain_ms["median_ms"],
                     "cut_speedup": whole_ms["median_ms"] / partition_ms["median_ms"]})
        print(f"{count} x {n}, keep {keep}: torch.topk {plain_ms['median_ms']:.2f} ms, partition without the cut "
              f"{whole_ms['median_ms']:.2f} ms, with it {partition_ms['median_ms']:.2f} ms", flush=True)
    return {"provenance": provenance("python -m tbrun_bench.topk_speed"), "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup}, "cases": rows}


def to_markdown(report: dict) -> str:
    table = [[str(c["rows"]), f"{c['candidates']:,}", f"{c['keep']:,}", f"{c['torch_topk']['median_ms']:.2f}",
              f"{c['partition_whole']['median_ms']:.2f}", f"{c['partition']['median_ms']:.2f}", f"{c['ratio']:.2f}",
              f"{c['cut_speedup']:.2f}"] for c in report["cases"]]
    s = report["setting"]
    return "\n".join([
        markdown_header("Top-k on the CPU: torch.topk against the engine's (numpy's partition after a sampled cut)",
                        report), "",
        f"{s['threads']} torch thread(s); {s['calls']} timed calls per method and case after {s['warmup']} warm-up "
        "calls, the methods alternating on the same scores (softmax of Gaussian logits). Median ms per call. "
        "ratio: the engine's top-k / torch.topk; cut speed-up: the partition without the cut / with it.", "",
        markdown_table(["rows", "candidates", "keep", "torch.topk ms", "partition, no cut ms", "engine (cut + partition) ms",
                        "ratio", "cut speed-up"], table), "",
        "`offload_engine.selection.ranking.topk_unsorted` partitions every row with `numpy.argpartition` on the "
        "CPU (float32 and float64 scores); rows of 4,096 candidates or more keeping at most a quarter are first cut to "
        "the entries at or above a threshold read from every 8th entry, and only those are partitioned (a row the "
        "sample misjudges is partitioned whole). The same tokens as torch.topk but for ties at the cut "
        "(tests/test_ranking.py); torch.topk elsewhere.",
    ])


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=40)


if __name__ == "__main__":
    main()
