"""The CPU index gather: per head with rows as their dtype, against what ``gather_fragments`` runs.

    python -m tbrun_bench.gather_rows_speed --out bench/reports/gather_cpu

One layer's delta fetch on the CPU (``gather_fragments(..., method="index")``): ``count`` random
tokens per KV head from a token-major host store ``[context, KvH, D]`` into ascending free slots
of a ``[KvH, slots, D]`` working set, as the residency map hands them out: per KV head
``index_select`` + ``index_copy_`` of ``D``-rows (the gather before 2026-12-03), against
``gather_fragments``, which moves every head at once over flat row tables with 16-byte elements
where the layout allows. The two methods
alternate call by call on the same fragments; each cell is a median over the calls. Both write the
same bytes (tests/test_gather.py). Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import torch

from offload_engine.cpu_cache.gather import gather_fragments
from offload_engine.memory import dtype_name

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

# (shape name, KV heads, head dim, dtype, context, fragments per head)
CASES = [("smollm2-135m", 3, 64, torch.float32, 32768, 2048), ("smollm2-135m", 3, 64, torch.float32, 131072, 2048),
         ("smollm2-135m", 3, 64, torch.bfloat16, 32768, 2048), ("llama-3.1-8b", 8, 128, torch.bfloat16, 32768, 2048),
         ("llama-3.1-8b", 8, 128, torch.float32, 32768, 512)]


def gather_as_dtype(src, positions, slots, dst) -> None:
    """The index gather as it was: per head ``index_select`` + ``index_copy_`` of ``D``-rows."""
    for head in range(src.shape[0]):
        dst[head].index_copy_(0, slots[head], src[head].index_select(0, positions[head]))


def fragments(heads: int, context: int, count: int, slots: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """positions ``[KvH, count]`` distinct random tokens; slots ``[KvH, count]`` ascending free slots."""
    positions = torch.stack([torch.randperm(context, generator=generator)[:count] for _ in range(heads)])
    free = torch.stack([torch.randperm(slots, generator=generator)[:count].sort().values for _ in range(heads)])
    return positions, free


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, heads, dim, dtype, context, count in CASES:
        store = torch.randn(context, heads, dim, generator=generator).to(dtype)  # token-major, as the host store
        src = store.transpose(0, 1)  # [KvH, C, D]
        dst = torch.zeros(heads, 2 * count + 1, dim, dtype=dtype)
        positions, slots = fragments(heads, context, count, 2 * count, generator)
        timed = time_alternating({"as_dtype": lambda: gather_as_dtype(src, positions, slots, dst),
                                  "wide": lambda: gather_fragments(src, positions, slots, dst)}, args.calls, args.warmup)
        mib = heads * count * dim * dst.element_size() / 2**20
        rows.append({"shape": name, "kv_heads": heads, "head_dim": dim, "dtype": dtype_name(dtype),
                     "context": context, "fragments_per_head": count, "mib": mib, "as_dtype": timed["as_dtype"],
                     "wide": timed["wide"], "ratio": timed["wide"]["median_ms"] / timed["as_dtype"]["median_ms"]})
        print(f"{name} {dtype} {context}: per head {timed['as_dtype']['median_ms']:.2f} ms, gather_fragments "
              f"{timed['wide']['median_ms']:.2f} ms", flush=True)
        del store, src, dst
    return {"provenance": provenance("python -m tbrun_bench.gather_rows_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup}, "cases": rows}


def to_markdown(report: dict) -> str:
    table = [[c["shape"], c["dtype"], f"{c['context']:,}", f"{c['kv_heads']} x {c['fragments_per_head']:,}",
              f"{c['mib']:.2f}", f"{c['as_dtype']['median_ms']:.3f}", f"{c['wide']['median_ms']:.3f}",
              f"{c['ratio']:.2f}"] for c in report["cases"]]
    s = report["setting"]
    return "\n".join([
        markdown_header("The CPU index gather: per head against all heads at once in 16-byte rows", report), "",
        f"{s['threads']} torch thread(s); {s['calls']} timed calls per method and case after {s['warmup']} warm-up "
        "calls, the methods alternating on the same fragments (random tokens of a token-major host store into "
        "ascending slots). Median ms per call of one layer's K (or V).", "",
        markdown_table(["shape", "dtype", "context", "fragments", "MiB", "per head ms", "gather_fragments ms", "ratio"],
                       table), "",
        "On the CPU `gather_fragments` sees the host store and the working set as flat tables of rows (`row_table`), "
        "so one `index_select` and one `index_copy_` move every head, and moves rows as 16-byte elements whenever "
        "a row is a multiple of 16 bytes (`as_wide_rows`): the same bytes, fewer elements to step through.",
    ])


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=40)


if __name__ == "__main__":
    main()
