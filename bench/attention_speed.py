"""Decode attention on the CPU: PyTorch's fused kernel against two grouped matmuls, side by side.

    python -m tbrun_bench.attention_speed --out bench/reports/decode_attention_cpu

One query token of every query head over ``N`` cached tokens of its KV head, per layer: what a decode
step runs once per layer. Shapes: SmolLM2-135M (9 query heads, 3 KV heads, head dim 64) and
Llama-3.1-8B (32, 8, 128); ``N`` from a 2,048-token working set (a sparse layer) to 32k (a dense
layer at long context); with the sparse mode's validity mask and without (dense). The two methods
alternate call by call on the same tensors, so load from other processes hits both alike; each cell
is a median over the calls. Both give the same output (tests/test_attention_memory.py).
Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import torch

from offload_engine.attention import fused_decode_attention, grouped_decode_attention

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.1-8b": (32, 8, 128)}
LENGTHS = (2048, 8192, 32768)


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        for length in LENGTHS:
            q = torch.randn(heads, dim, generator=generator)
            k, v = (torch.randn(kv_heads, length, dim, generator=generator) for _ in range(2))
            for masked in (True, False):
                valid = torch.rand(kv_heads, length, generator=generator) > 0.1 if masked else None
                timed = time_alternating({"fused": lambda: fused_decode_attention(q, k, v, valid, 0.125),
                                          "grouped": lambda: grouped_decode_attention(q, k, v, valid, 0.125)},
                                         args.calls, args.warmup)
                rows.append({"shape": shape, "tokens": length, "masked": masked, **timed,
                             "ratio": timed["grouped"]["median_ms"] / timed["fused"]["median_ms"]})
                print(f"{shape} {length} {'masked' if masked else 'dense'}: fused {timed['fused']['median_ms']:.2f} "
                      f"ms, grouped {timed['grouped']['median_ms']:.2f} ms", flush=True)
    return {"provenance": provenance("python -m tbrun_bench.attention_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup, "dtype": "float32"},
            "cases": rows}


def to_markdown(report: dict) -> str:
    table = [[c["shape"], f"{c['tokens']:,}", "yes" if c["masked"] else "no", f"{c['fused']['median_ms']:.3f}",
              f"{c['grouped']['median_ms']:.3f}", f"{c['ratio']:.2f}"] for c in report["cases"]]
    s = report["setting"]
    return "\n".join([
        markdown_header("Decode attention on the CPU: fused kernel against grouped matmuls", report), "",
        f"{s['threads']} torch thread(s), {s['dtype']}; {s['calls']} timed calls per method and case after "
        f"{s['warmup']} warm-up calls, the methods alternating on the same tensors. Median ms per call (one "
        "layer of one decode step).", "",
        markdown_table(["shape", "tokens", "mask", "fused ms", "grouped ms", "ratio"], table), "",
        "`offload_engine.attention.decode_attention` runs `grouped_decode_attention` on the CPU (each KV head's "
        "keys and values read once for its group of query heads, nothing expanded) and the fused kernels "
        "(`fused_decode_attention`: flash for dense, memory-efficient with the groups expanded for masked) on CUDA.",
    ])


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=30)


if __name__ == "__main__":
    main()
