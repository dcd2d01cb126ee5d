"""The page prefilter's cost on the CPU: a producer's one-call selection (scores, top-k and residency update,
``SelectionKernels.select_rows``) with every candidate scored against pages of 16 ranked first
(``selection/pages.py``), side by side in one run.

    python -m tbrun_bench.page_prefilter_speed --out bench/reports/page_prefilter_speed

SmolLM2-135M's shape at the shipped G = 2 (2 layers x 3 KV heads, 3 query heads each, d' 16), int8 compact
keys (what the engine stores for a float32 model on a CPU with AVX512-VNNI; bfloat16 elsewhere), a budget of
2,048 tokens per layer and KV head (sinks 4, window 128: 1,916 selected, the latency bench's budget) and 4x the
budget's worth of pages scored. Keys are random with every 64 neighbouring tokens sharing a common part (real
compact keys are alike in neighbourhoods; what matters here is how many pages are read, not which). Each call
reads the next of 15 producers' caches (cold, as in a decode step, where the model's weights pass through the
caches between two producers), queries cycling through 8; the two methods alternate call by call, each with its
own residency tables, so load from other processes hits both alike. Measured, on this machine: what it costs in
recall is bench/reports/page_prefilter.md.
"""

from __future__ import annotations

import numpy as np
import torch

from offload_engine import native
from offload_engine.policies.tokenbutler import ProjectedKeyCache
from offload_engine.selection.pages import PageBounds, PagePrefilter, page_rows

from .report import machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance, time_alternating

PRODUCERS, QUERIES = 15, 8
LAYERS, KV_HEADS, GROUP, DIM = 2, 3, 3, 16  # SmolLM2-135M at G = 2
SINKS, WINDOW, BUDGET = 4, 128, 2048
CONTEXTS = (8192, 32768, 65536, 131072)
PREFILTER = PagePrefilter(16, 4.0)


def producer(tokens: int, generator) -> tuple[ProjectedKeyCache, PageBounds]:
    """One producer's int8 compact keys (``ProjectedKeyCache``, as the engine writes them) and their pages."""
    cache = ProjectedKeyCache(LAYERS, KV_HEADS, tokens, DIM, torch.int8, torch.device("cpu"))
    for layer in range(1, LAYERS + 1):
        shared = torch.randn(KV_HEADS, -(-tokens // 64), DIM, generator=generator).repeat_interleave(64, dim=1)
        cache.write(layer, 0, torch.randn(KV_HEADS, tokens, DIM, generator=generator) + 2 * shared[:, :tokens])
    pages = PageBounds(LAYERS, KV_HEADS, DIM, tokens, PREFILTER, torch.device("cpu"), key_dtype=torch.int8)
    pages.refresh(cache.keys, cache.scales, tokens)
    return cache, pages


def bound_selection(cache: ProjectedKeyCache, pages: PageBounds | None, tokens: int):
    """``select_rows`` bound to the producer's keys (and pages), with residency tables of its own."""
    rows, keep = LAYERS * KV_HEADS, BUDGET - SINKS - WINDOW
    tables = (np.full((rows, keep + 1), -1, np.int64), np.full((rows, tokens + 1), -1, np.int32),
              np.zeros((rows, keep + 1), np.bool_))
    keys, scales = cache.of_layers(range(1, LAYERS + 1))
    rows_of_pages = None if pages is None else page_rows(pages.of_layers(0, LAYERS), PREFILTER)
    return native.kernels().bind_select_rows(keys.flatten(0, 1), *tables, "mean", scales.flatten(0, 1),
                                             rows_of_pages)


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    kernels = native.kernels()
    if kernels is None or not kernels.int8_quad_products:
        raise SystemExit(f"this needs the native kernels with AVX512-VNNI (int8 keys): {native.status()}")
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randn(LAYERS * KV_HEADS, GROUP, DIM, generator=generator) / DIM ** 0.5 for _ in range(QUERIES)]
    keep = BUDGET - SINKS - WINDOW
    rows = []
    for tokens in CONTEXTS:
        made = [producer(tokens, generator) for _ in range(PRODUCERS)]
        lo, hi = SINKS, tokens - WINDOW
        methods = {}
        for name, with_pages in (("every token", False), ("pages of 16", True)):
            bound = [bound_selection(cache, pages if with_pages else None, tokens) for cache, pages in made]
            turn = iter(range(10**9))

            def call(bound=bound, turn=turn):
                i = next(turn)
                bound[i % PRODUCERS](queries[i % QUERIES], tokens, lo, hi, keep)

            methods[name] = call
        timed = time_alternating(methods, args.calls, args.warmup)
        every, paged = timed["every token"]["median_ms"], timed["pages of 16"]["median_ms"]
        kept = PREFILTER.kept_pages(tokens, lo, hi, keep)
        rows.append({"tokens": tokens, "every_token": timed["every token"], "pages": timed["pages of 16"],
                     "ratio": paged / every, "kept_pages": kept, "candidate_pages": -(-hi // 16) - lo // 16,
                     "key_mib": LAYERS * KV_HEADS * tokens * (DIM + 2) / 2**20})
        print(f"{tokens} tokens: every token {every:.3f} ms, pages of 16 {paged:.3f} ms a producer", flush=True)
        del made, methods
    return {"provenance": provenance("python -m tbrun_bench.page_prefilter_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup,
                        "producers_cycled": PRODUCERS, "budget": BUDGET, "sinks": SINKS, "window": WINDOW,
                        "page": PREFILTER.page, "factor": PREFILTER.factor, "native": native.status()},
            "cases": rows}


def to_markdown(report: dict) -> str:
    s = report["setting"]
    table = [[f"{c['tokens']:,}", f"{c['key_mib']:.2f}", _kept_cell(c), f"{c['every_token']['median_ms']:.3f}",
              f"{c['pages']['median_ms']:.3f}", f"{c['ratio']:.2f}"] for c in report["cases"]]
    return "\n".join([
        markdown_header("The page prefilter's cost: a producer's one-call selection with and without it", report), "",
        f"{s['threads']} thread(s); SmolLM2-135M's shape at G = 2 (2 layers x 3 KV heads, 3 query heads each, d' 16), "
        f"int8 compact keys; a budget of {s['budget']:,} tokens (sinks {s['sinks']}, window {s['window']}); pages of "
        f"{s['page']}, {s['factor']:g}x the budget's worth scored. {s['calls']} timed calls per method after "
        f"{s['warmup']} warm-up calls, alternating, each reading the next of {s['producers_cycled']} producers' "
        "caches (cold, as in a decode step). Median ms per producer call (scores, top-k and residency update of its "
        f"6 rows); ratio: pages / every token. Native kernels: {s['native']}. See the module docstring of "
        "`bench/page_prefilter_speed.py`; the recall it costs: `bench/reports/page_prefilter.md`.", "",
        markdown_table(["tokens", "keys MiB a producer", "pages kept of those holding candidates",
                        "every token ms", "pages of 16 ms", "ratio"], table),
    ])


def _kept_cell(case: dict) -> str:
    if not case["kept_pages"]:  # PagePrefilter.kept_pages: more than half the pages would be scored
        return f"none: does not apply ({case['candidate_pages']} pages)"
    return f"{case['kept_pages']} of {case['candidate_pages']} ({100 * case['kept_pages'] / case['candidate_pages']:.0f}%)"


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=40)


if __name__ == "__main__":
    main()
