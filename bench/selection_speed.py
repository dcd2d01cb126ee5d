"""TokenButler's group-mean scores on the CPU: torch (batched matmul, softmax, mean) against the native
kernel (offload_engine/native), per producer, side by side in one run.

    python -m tbrun_bench.selection_speed --out bench/reports/selection_cpu

A producer scores every (consumer layer, KV head) row it serves against the compact key cache:
``softmax(q' k'^T / sqrt(d')).mean over the group's query heads``. Shapes: SmolLM2-135M at the
shipped G = 2 (2 layers x 3 KV heads, 3 query heads each, d' 16), Qwen2.5-0.5B (2 x 2 KV heads, 7 query
heads each) and Llama-3.1-8B at the reference G = 4 (4 x 8 KV heads, 4 query heads each). Keys are read
cold, as in a decode step, where the weights and the KV of the other layers pass through the caches
between two producers: each call reads the next of 15 producers' caches (each method its own turn
through them, far apart), built like the engine's (``ProjectedKeyCache``, rows padded). The methods
alternate call by call, so load from other processes hits both alike; each cell is a median.
Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import itertools

import torch

from offload_engine import native
from offload_engine.policies.tokenbutler import ProjectedKeyCache, fused_group_mean_scores, group_mean_probabilities

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

PRODUCERS = 15  # caches cycled through, so that every call reads its keys from memory, not from cache
# name, consumer layers, KV heads, query heads per KV head, d', tokens
CASES = [("smollm2-135m G=2", 2, 3, 3, 16, 8192), ("smollm2-135m G=2", 2, 3, 3, 16, 32768),
         ("smollm2-135m G=2", 2, 3, 3, 16, 131072), ("qwen2.5-0.5b G=2", 2, 2, 7, 16, 32768),
         ("llama-3.1-8b G=4", 4, 8, 4, 16, 32768)]


def torch_scores(grouped: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The torch path of ``TokenButlerPolicy._group_scores``: ``[Lg, KvH, g, d']`` x ``[Lg, KvH, d', m]``."""
    return group_mean_probabilities(torch.matmul(grouped, keys))


def producer_caches(layers: int, kv_heads: int, dim: int, tokens: int, generator) -> list[torch.Tensor]:
    """``PRODUCERS`` key views ``[Lg, KvH, d', tokens]`` of separately allocated, padded caches."""
    views = []
    for _ in range(PRODUCERS):
        cache = ProjectedKeyCache(layers, kv_heads, tokens, dim, torch.float32, torch.device("cpu"))
        cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator))
        views.append(cache.columns(range(1, layers + 1), 0, tokens))
    return views


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    if native.kernels() is None:
        raise SystemExit(f"the native kernel is not available here: {native.status()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, layers, kv_heads, group, dim, tokens in CASES:
        caches = producer_caches(layers, kv_heads, dim, tokens, generator)
        grouped = torch.randn(layers, kv_heads, group, dim, generator=generator) / dim ** 0.5
        torch_turn = itertools.cycle(caches)
        native_turn = itertools.cycle(caches[PRODUCERS // 2 :] + caches[: PRODUCERS // 2])
        timed = time_alternating({"torch": lambda: torch_scores(grouped, next(torch_turn)),
                                  "native": lambda: fused_group_mean_scores(grouped, next(native_turn))},
                                 args.calls, args.warmup)
        difference = (fused_group_mean_scores(grouped, caches[0]) - torch_scores(grouped, caches[0])).abs().max()
        key_bytes = layers * kv_heads * dim * tokens * 4
        torch_ms, native_ms = timed["torch"]["median_ms"], timed["native"]["median_ms"]
        rows.append({"shape": name, "layers": layers, "kv_heads": kv_heads, "group": group, "dim": dim,
                     "tokens": tokens, "torch": timed["torch"], "native": timed["native"],
                     "speedup": torch_ms / native_ms, "key_mib": key_bytes / 2**20,
                     "native_key_gbps": key_bytes / native_ms / 1e6, "max_abs_difference": float(difference)})
        print(f"{name}, {tokens} tokens: torch {torch_ms:.2f} ms, native {native_ms:.2f} ms", flush=True)
        del caches
    return {"provenance": provenance("python -m tbrun_bench.selection_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup,
                        "producers_cycled": PRODUCERS}, "cases": rows}


def to_markdown(report: dict) -> str:
    table = [[c["shape"], f"{c['layers']} x {c['kv_heads']}", str(c["group"]), str(c["dim"]), f"{c['tokens']:,}",
              f"{c['key_mib']:.1f}", f"{c['torch']['median_ms']:.2f}", f"{c['native']['median_ms']:.2f}",
              f"{c['speedup']:.2f}", f"{c['native_key_gbps']:.1f}", f"{c['max_abs_difference']:.1e}"]
             for c in report["cases"]]
    s = report["setting"]
    return "\n".join([
        markdown_header("TokenButler's group-mean scores on the CPU: torch against the native kernel", report), "",
        f"{s['threads']} thread(s); per producer and step, {s['calls']} timed calls per method after {s['warmup']} "
        f"warm-up calls, alternating, each call reading the keys of the next of {s['producers_cycled']} producers' "
        "caches (cold, as in a decode step). Median ms per call. speed-up: torch / native; GB/s: the compact keys "
        "read per call / the native kernel's time; max |difference|: the largest gap between the two methods' "
        "scores (probabilities, each row summing to 1).", "",
        markdown_table(["shape", "layers x KV heads", "query heads per KV head", "d'", "tokens", "keys MiB",
                        "torch ms", "native ms", "speed-up", "native GB/s", "max abs difference"], table), "",
        "torch: `softmax(matmul(q', k'), -1).mean(-2)` over `[Lg, KvH, g, m]`, as `TokenButlerPolicy` runs it without "
        "the kernel. native: `offload_engine/native/selection.cpp`, one pass over the keys (each key vector feeding "
        "every query head of its group in registers, an online softmax per tile of 512 tokens) and one over a "
        "`[g, m]` buffer.",
    ])


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=30)


if __name__ == "__main__":
    main()
