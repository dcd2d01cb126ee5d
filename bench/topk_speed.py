"""Top-k on the CPU: torch.topk, numpy's partition after a sampled cut (the engine's path where the
native kernels are not built) and the native kernel (the engine's path where they are), side by side.

    python -m tbrun_bench.topk_speed --out bench/reports/topk_cpu

A producer's selection takes the top ``keep`` of ``n`` candidate scores for every (consumer layer,
KV head) row at once. Rows: 12 (SmolLM2-135M: 4 consumer layers x 3 KV heads) and 32 (Llama-3.1-8B:
4 x 8). Scores: softmax of Gaussian logits (peaked, like the predictor's group-mean probabilities).
The methods alternate call by call on the same scores, so load from other processes hits all alike;
each cell is a median over the calls. All return the same tokens, ties at the cut aside (tests/test_ranking.py).
Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import numpy as np
import torch

from offload_engine import native
from offload_engine.selection import ranking

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

CASES = [(12, 8192, 820), (12, 16384, 1024), (12, 32768, 2048), (12, 32768, 3277), (12, 131072, 2048),
         (32, 32768, 2048), (32, 131072, 2048)]


def numpy_topk(scores: torch.Tensor, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """``topk_unsorted``'s numpy path: the sampled cut, then a partition of what passes, per row."""
    rows = scores.numpy()
    index = ranking._partition_rows(rows, keep)
    return np.take_along_axis(rows, index, axis=-1), index


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    kernels = native.kernels()
    if kernels is None:
        raise SystemExit(f"the native kernels are not available here ({native.status()}): nothing to compare")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for count, n, keep in CASES:
        scores = torch.softmax(3 * torch.randn(count, n, generator=generator), dim=-1)
        timed = time_alternating({"torch": lambda: torch.topk(scores, keep, dim=-1, sorted=False),
                                  "numpy": lambda: numpy_topk(scores, keep),
                                  "native": lambda: kernels.topk_rows(scores, keep)}, args.calls, args.warmup)
        rows.append({"rows": count, "candidates": n, "keep": keep, "torch_topk": timed["torch"],
                     "numpy_partition": timed["numpy"], "native": timed["native"],
                     "native_vs_torch": timed["native"]["median_ms"] / timed["torch"]["median_ms"],
                     "native_vs_numpy": timed["native"]["median_ms"] / timed["numpy"]["median_ms"]})
        print(f"{count} x {n}, keep {keep}: torch.topk {timed['torch']['median_ms']:.2f} ms, numpy cut + partition "
              f"{timed['numpy']['median_ms']:.2f} ms, native {timed['native']['median_ms']:.2f} ms", flush=True)
    return {"provenance": provenance("python -m tbrun_bench.topk_speed"), "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup,
                        "native": native.status()}, "cases": rows}


def to_markdown(report: dict) -> str:
    table = [[str(c["rows"]), f"{c['candidates']:,}", f"{c['keep']:,}", f"{c['torch_topk']['median_ms']:.2f}",
              f"{c['numpy_partition']['median_ms']:.2f}", f"{c['native']['median_ms']:.2f}",
              f"{c['native_vs_torch']:.2f}", f"{c['native_vs_numpy']:.2f}"] for c in report["cases"]]
    s = report["setting"]
    return "\n".join([
        markdown_header("Top-k on the CPU: torch.topk, numpy's partition after a sampled cut, the native kernel",
                        report), "",
        f"{s['threads']} torch thread(s); {s['calls']} timed calls per method and case after {s['warmup']} warm-up "
        "calls, the methods alternating on the same scores (softmax of Gaussian logits). Median ms per call. "
        f"Native kernels: {s['native']}.", "",
        markdown_table(["rows", "candidates", "keep", "torch.topk ms", "numpy cut + partition ms", "native ms",
                        "native / torch.topk", "native / numpy"], table), "",
        "`offload_engine.selection.ranking.topk_unsorted` runs the native kernel on float32 CPU rows "
        "(`tbrun_topk_rows` in offload_engine/native/selection.cpp): the same sampled threshold as the numpy path "
        "(every 8th entry) keeps a few thousand candidates, compacted with AVX-512 where the CPU has it, and the "
        "k-th largest is found by setting its bits from the top, each bit one vectorised count. Where the kernels "
        "are not built, numpy's partition after the cut runs (a row the sample misjudges is partitioned whole). "
        "The same tokens as torch.topk but for ties at the cut (tests/test_ranking.py); torch.topk off the CPU.",
    ])


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=40)


if __name__ == "__main__":
    main()
