"""A decode step's linear layers on the CPU: the native kernel over float32, q4_1 and q8_0 weights, from memory.

    python -m tbrun_bench.linear_speed --out bench/reports/linear_cpu

One token through one weight matrix (``native.SelectionKernels.linear``, what every projection of a CPU decode
step runs), at the embedded SmolLM2-135M's shapes: the MLP's gate/up ``[1536, 576]`` and down ``[576, 1536]``,
and the output head ``[49152, 576]`` (q8_0 in its GGUF file, the rest q4_1). Each call reads the next of enough
copies of the matrix (``COLD_BYTES`` of the format's bytes in all) that its weights come from memory, as in a
decode step, which reads every weight once. The formats alternate call by call. Beside them, the machine's
streaming read rate (a sum over ``COLD_BYTES`` of float32, one thread): a format whose GB/s of its own bytes
stays well below that rate is bound by its widening (compute), not by memory. The block contents are random
codes with random float16 scales (the kernel's time does not depend on the values). Writes ``OUT.json`` and
``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch

from offload_engine import native
from offload_engine.native import BLOCK_BYTES, WEIGHT_BLOCK, WeightBlocks, attach_weight_blocks

from .report import machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance, time_alternating

SHAPES = {"mlp gate/up": (1536, 576), "mlp down": (576, 1536), "output head": (49152, 576)}
FORMATS = ("float32", "q4_1", "q8_0")
COLD_BYTES = 512 * 2**20  # each format's copies of a matrix: more than twice a server's last-level cache
SWEEP = 16  # matrices a timed call multiplies in a row (a decode step runs its matrices one after another)


def random_blocks(rows: int, cols: int, block_format: str, generator: np.random.Generator) -> torch.Tensor:
    """uint8 ``[rows, cols / 32 * bytes a block]``: random codes, each block's float16 d (and q4_1's m)
    a small finite number."""
    size, blocks = BLOCK_BYTES[block_format], cols // WEIGHT_BLOCK
    data = generator.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    halves = 2 if block_format == "q4_1" else 1
    scales = (generator.standard_normal((rows, blocks, halves)) * 0.01).astype(np.float16)
    data[:, :, : 2 * halves] = scales.view(np.uint8).reshape(rows, blocks, 2 * halves)
    return torch.from_numpy(data.reshape(rows, blocks * size))


def matrix_copies(rows: int, cols: int, block_format: str, copies: int, seed: int) -> list[torch.Tensor]:
    """``copies`` float32 weights ``[rows, cols]``, each with random blocks of ``block_format`` attached
    (the kernel then reads the blocks) or, for float32, none."""
    generator = np.random.default_rng(seed)
    weights = []
    for _ in range(copies):
        weight = torch.empty(rows, cols)  # never read where blocks are attached: the kernel reads the blocks
        if block_format == "float32":
            weight.normal_(0.0, 0.02)
        else:
            attach_weight_blocks(weight, WeightBlocks(block_format, random_blocks(rows, cols, block_format, generator)))
        weights.append(weight)
    return weights


def format_bytes(rows: int, cols: int, block_format: str) -> int:
    """The bytes a product reads from the weights in ``block_format``."""
    if block_format == "float32":
        return rows * cols * 4
    return rows * cols // WEIGHT_BLOCK * BLOCK_BYTES[block_format]


def streaming_read_gbps(repeats: int = 5) -> float:
    """The best of ``repeats`` one-thread sums over ``COLD_BYTES`` of float32, in GB/s."""
    buffer = torch.ones(COLD_BYTES // 4)
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - began)
    return COLD_BYTES / best / 1e9


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    kernels = native.kernels()
    if kernels is None:
        raise SystemExit(f"the native kernels are not available here ({native.status()}): nothing to time")
    rows_out = []
    for index, (name, (rows, cols)) in enumerate(SHAPES.items()):
        x = torch.randn(cols)
        methods, copies_of = {}, {}
        for block_format in FORMATS:
            copies = max(2, math.ceil(COLD_BYTES / format_bytes(rows, cols, block_format)))
            weights = matrix_copies(rows, cols, block_format, copies, seed=index)
            turn = itertools.cycle(weights)

            def sweep(turn=turn):  # SWEEP matrices in a row, each the next copy, as a decode step runs them
                for _ in range(SWEEP):
                    kernels.linear(x, next(turn), None)

            methods[block_format] = sweep
            copies_of[block_format] = weights
        timed = time_alternating(methods, args.calls, args.warmup)
        cells = {}
        for block_format in FORMATS:
            ms = timed[block_format]["median_ms"] / SWEEP
            cells[block_format] = {**timed[block_format], "copies": len(copies_of[block_format]),
                                   "bytes": format_bytes(rows, cols, block_format),
                                   "ps_per_weight": ms * 1e9 / (rows * cols),
                                   "gbps": format_bytes(rows, cols, block_format) / (ms / 1000) / 1e9}
        rows_out.append({"matrix": name, "rows": rows, "cols": cols, "formats": cells})
        print(f"{name} [{rows}, {cols}]: " + ", ".join(
            f"{f} {c['ps_per_weight']:.0f} ps a weight ({c['gbps']:.1f} GB/s)" for f, c in cells.items()), flush=True)
        del copies_of, methods
    return {"provenance": provenance("python -m tbrun_bench.linear_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup, "sweep": SWEEP,
                        "cold_bytes": COLD_BYTES, "native": native.status()},
            "streaming_read_gbps": streaming_read_gbps(),
            "cases": rows_out}


def to_markdown(report: dict) -> str:
    s = report["setting"]
    table = []
    for case in report["cases"]:
        for block_format, cell in case["formats"].items():
            table.append([case["matrix"], f"[{case['rows']:,}, {case['cols']:,}]", block_format,
                          f"{cell['median_ms']:.3f}", f"{cell['ps_per_weight']:.0f}", f"{cell['gbps']:.1f}",
                          f"{cell['gbps'] / report['streaming_read_gbps']:.2f}"])
    return "\n".join([
        markdown_header("A decode step's linear layers on the CPU: float32, q4_1 and q8_0 weights", report), "",
        f"{s['threads']} torch thread(s); {s['calls']} timed calls per format and matrix after {s['warmup']} warm-up "
        f"calls, the formats alternating; a call multiplies {s['sweep']} copies of the matrix in a row, as a decode "
        "step runs its matrices. ms: the median call / that count (one token through one matrix, the wrapper's "
        "checks included); ps a weight = that "
        "time / the matrix's weights; GB/s = the format's bytes read / that time. Each call read the next of "
        f"enough copies of the matrix ({s['cold_bytes'] / 2**20:,.0f} MiB of the format's bytes) that it came "
        f"from memory. Streaming read rate of this machine (one thread, a sum over "
        f"{s['cold_bytes'] / 2**20:,.0f} MiB of float32): **{report['streaming_read_gbps']:.1f} GB/s**; share = "
        f"GB/s / that rate. Native kernels: {s['native']}.", "",
        markdown_table(["matrix", "shape", "weights", "ms", "ps a weight", "GB/s", "share of streaming rate"], table),
        "",
        "float32 near a share of 1 is bound by memory; q4_1 and q8_0 read a sixth and about a quarter of the "
        "bytes, and where their share stays low their time is the widening of each block (compute). Every "
        "format gives the same sums as float32 over the widened weights, bit for bit "
        "(`native/selection.cpp`, `matvec_blocks`; tests/test_gguf_weights.py).",
    ])


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=40)


if __name__ == "__main__":
    main()
