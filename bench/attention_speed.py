"""Decode attention on the CPU: PyTorch's fused kernel, two grouped matmuls and the native kernel, side by side.

    python -m tbrun_bench.attention_speed --out bench/reports/decode_attention_cpu

One query token of every query head over ``N`` cached tokens of its KV head, per layer: what a decode
step runs once per layer. Shapes: SmolLM2-135M (9 query heads, 3 KV heads, head dim 64) and
Llama-3.1-8B (32, 8, 128); ``N`` from a 2,048-token working set (a sparse layer) to 32k (a dense
layer at long context); with the sparse mode's validity mask and without (dense). The methods alternate
call by call, so load from other processes hits them alike; each cell is a median over the calls. Each
call reads the next of enough copies of the KV (``COLD_BYTES`` in all) that it comes from memory, not
the caches, as in a decode step, which reads every layer's KV once. The native kernel
(``native.SelectionKernels.decode_attention``, what the CPU runs where it is built) is timed where it is
built. All give the same output (tests/test_attention_memory.py, tests/test_native.py).
Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import itertools
import math

import torch

from offload_engine import native
from offload_engine.attention import fused_decode_attention, grouped_decode_attention

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.1-8b": (32, 8, 128)}
LENGTHS = (2048, 8192, 32768)


COLD_BYTES = 768 * 2**20  # the copies of a case's KV: more than twice this machine's last-level cache


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    kernels = native.kernels()
    rows = []
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        for length in LENGTHS:
            copies = max(1, math.ceil(COLD_BYTES / (2 * kv_heads * length * dim * 4)))
            q = torch.randn(heads, dim, generator=generator)
            k, v = (torch.randn(copies, kv_heads, length, dim, generator=generator) for _ in range(2))
            turn = itertools.count()
            for masked in (True, False):
                valid = torch.rand(kv_heads, length, generator=generator) > 0.1 if masked else None

                def cold(method):  # the next copy at every call
                    return lambda: method(q, k[next(turn) % copies], v[next(turn) % copies], valid, 0.125)

                methods = {"fused": cold(fused_decode_attention), "grouped": cold(grouped_decode_attention)}
                if kernels is not None and kernels.decode_attention(q, k[0], v[0], valid, 0.125) is not None:
                    methods["native"] = cold(kernels.decode_attention)  # where it applies to the shape
                timed = time_alternating(methods, args.calls, args.warmup)
                rows.append({"shape": shape, "tokens": length, "masked": masked, "copies": copies, **timed,
                             "ratio": timed["grouped"]["median_ms"] / timed["fused"]["median_ms"],
                             "native_ratio": (timed["native"]["median_ms"] / timed["grouped"]["median_ms"]
                                              if "native" in timed else None)})
                print(f"{shape} {length} {'masked' if masked else 'dense'}: "
                      + ", ".join(f"{name} {t['median_ms']:.2f} ms" for name, t in timed.items()), flush=True)
            del k, v
    return {"provenance": provenance("python -m tbrun_bench.attention_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup, "dtype": "float32",
                        "cold_bytes": COLD_BYTES, "native": native.status()},
            "cases": rows}


def to_markdown(report: dict) -> str:
    table = [[c["shape"], f"{c['tokens']:,}", "yes" if c["masked"] else "no", f"{c['fused']['median_ms']:.3f}",
              f"{c['grouped']['median_ms']:.3f}", _ms(c.get("native")), f"{c['ratio']:.2f}",
              "-" if c.get("native_ratio") is None else f"{c['native_ratio']:.2f}"] for c in report["cases"]]
    s = report["setting"]
    cold = (f" Each call read the next of enough copies of the case's KV ({s['cold_bytes'] / 2**20:,.0f} MiB in "
            "all) that it came from memory, as in a decode step." if s.get("cold_bytes") else
            " Every call read the same tensors (cache-warm where they fit the caches).")
    return "\n".join([
        markdown_header("Decode attention on the CPU: fused kernel, grouped matmuls and the native kernel", report), "",
        f"{s['threads']} torch thread(s), {s['dtype']}; {s['calls']} timed calls per method and case after "
        f"{s['warmup']} warm-up calls, the methods alternating. Median ms per call (one layer of one decode "
        f"step).{cold} Native kernels: {s.get('native', 'not timed')}.", "",
        markdown_table(["shape", "tokens", "mask", "fused ms", "grouped ms", "native ms", "grouped / fused",
                        "native / grouped"], table), "",
        "The mask leaves out a random tenth of the tokens, each in its own place: the native kernel's test of "
        "each token then often mispredicts, where a working set's masked slots lie in runs (unfilled slots, the "
        "ring's older part).", "",
        "`offload_engine.attention.decode_attention` runs the native kernel on the CPU where it is built (one pass "
        "over each KV head's keys for its group of query heads, softmax, one pass over its values; next rows "
        "prefetched), else `grouped_decode_attention` (two grouped matmuls, nothing expanded), and the fused "
        "kernels (`fused_decode_attention`: flash for dense, memory-efficient with the groups expanded for "
        "masked) on CUDA.",
    ])


def _ms(timed: dict | None) -> str:
    return "-" if timed is None else f"{timed['median_ms']:.3f}"


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=30)


if __name__ == "__main__":
    main()
