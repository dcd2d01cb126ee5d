"""TokenButler's group-mean scores on the CPU: torch (batched matmul, softmax, mean) against the native
kernel (offload_engine/native) on float32 keys, bfloat16 keys and int8 keys (what the engine stores for a
float32 model on the CPU: int8 where the CPU has AVX512-VNNI, else bfloat16), per producer, side by side in
one run; and the producer's query network on one token
(``LayerNorm -> Linear -> SiLU -> Linear``), torch against the native kernel, cycling 15 producers' weights.

    python -m tbrun_bench.selection_speed --out bench/reports/selection_cpu

A producer scores every (consumer layer, KV head) row it serves against the compact key cache:
``softmax(q' k'^T / sqrt(d')).mean over the group's query heads``. Shapes: SmolLM2-135M at the
shipped G = 2 (2 layers x 3 KV heads, 3 query heads each, d' 16), Qwen2.5-0.5B (2 x 2 KV heads, 7 query
heads each) and Llama-3.1-8B at the reference G = 4 (4 x 8 KV heads, 4 query heads each). Keys are read
cold, as in a decode step, where the weights and the KV of the other layers pass through the caches
between two producers: each call reads the next of 15 producers' caches (each method its own turn
through them, far apart), built like the engine's (``ProjectedKeyCache``, rows padded). The methods
alternate call by call, so load from other processes hits all alike; each cell is a median.
Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import itertools

import torch

from offload_engine import native
from offload_engine.policies.tokenbutler import ProjectedKeyCache
from offload_engine.predictor.network import query_mlp, quantize_query
from offload_engine.selection.scores import fused_group_scores, group_mean_probabilities

from .report import (machine_header, markdown_header, markdown_table, micro_benchmark_main, provenance,
                     time_alternating)

PRODUCERS = 15  # caches cycled through, so that every call reads its keys from memory, not from cache
# name, consumer layers, KV heads, query heads per KV head, d', tokens
CASES = [("smollm2-135m G=2", 2, 3, 3, 16, 8192), ("smollm2-135m G=2", 2, 3, 3, 16, 32768),
         ("smollm2-135m G=2", 2, 3, 3, 16, 131072), ("qwen2.5-0.5b G=2", 2, 2, 7, 16, 32768),
         ("llama-3.1-8b G=4", 4, 8, 4, 16, 32768)]
# name, hidden size E, inner width I, outputs (consumers x query heads x d')
NETWORKS = [("smollm2-135m G=2 I=128", 576, 128, 2 * 9 * 16), ("llama-3.1-8b G=4 I=512", 4096, 512, 4 * 32 * 16)]


def torch_scores(grouped: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The torch path of ``TokenButlerPolicy._group_scores``: ``[Lg, KvH, g, d']`` x ``[Lg, KvH, d', m]``."""
    return group_mean_probabilities(torch.matmul(grouped, keys))


def producer_caches(layers: int, kv_heads: int, dim: int, tokens: int, generator,
                    dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``PRODUCERS`` key views ``[Lg, KvH, d', tokens]`` of separately allocated, padded caches."""
    views = []
    for _ in range(PRODUCERS):
        cache = ProjectedKeyCache(layers, kv_heads, tokens, dim, dtype, torch.device("cpu"))
        cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator))
        views.append(cache.columns(range(1, layers + 1), 0, tokens))
    return views


def quantised_caches(layers: int, kv_heads: int, dim: int, tokens: int,
                     generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``PRODUCERS`` int8 caches as the engine writes them (``ProjectedKeyCache.write``: codes and a float16
    scale per token and KV head): (codes ``[Lg, KvH, d', tokens]``, scales ``[Lg, KvH, tokens]``) views."""
    caches = []
    for _ in range(PRODUCERS):
        cache = ProjectedKeyCache(layers, kv_heads, tokens, dim, torch.int8, torch.device("cpu"))
        for layer in range(1, layers + 1):
            cache.write(layer, 0, torch.randn(kv_heads, tokens, dim, generator=generator))
        caches.append((cache.columns(range(1, layers + 1), 0, tokens), cache.scales))
    return caches


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    if native.kernels() is None:
        raise SystemExit(f"the native kernel is not available here: {native.status()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, layers, kv_heads, group, dim, tokens in CASES:
        caches = producer_caches(layers, kv_heads, dim, tokens, generator)
        halves = producer_caches(layers, kv_heads, dim, tokens, generator, torch.bfloat16)
        grouped = torch.randn(layers, kv_heads, group, dim, generator=generator) / dim ** 0.5
        torch_turn = itertools.cycle(caches)
        native_turn = itertools.cycle(caches[PRODUCERS // 2 :] + caches[: PRODUCERS // 2])
        half_turn = itertools.cycle(halves[PRODUCERS // 3 :] + halves[: PRODUCERS // 3])
        codes = quantised_caches(layers, kv_heads, dim, tokens, generator)
        code_turn = itertools.cycle(codes[2 * PRODUCERS // 3 :] + codes[: 2 * PRODUCERS // 3])
        timed = time_alternating({"torch": lambda: torch_scores(grouped, next(torch_turn)),
                                  "native": lambda: fused_group_scores(grouped, next(native_turn)),
                                  "bf16": lambda: fused_group_scores(grouped, next(half_turn)),
                                  "int8": lambda: fused_group_scores(grouped, *_with_mean(next(code_turn)))},
                                 args.calls, args.warmup)
        difference = (fused_group_scores(grouped, caches[0]) - torch_scores(grouped, caches[0])).abs().max()
        # bfloat16 keys against torch on the same keys widened (and the query rounded where the kernel does)
        query = grouped.bfloat16().float() if native.kernels().bf16_pair_products and dim % 2 == 0 else grouped
        half_difference = (fused_group_scores(grouped, halves[0]) - torch_scores(query, halves[0].float())).abs().max()
        # int8 keys against torch on the dequantised keys (and the query quantised where the kernel does)
        quads = native.kernels().int8_quad_products and dim % 4 == 0
        dequantised = codes[0][0].float() * codes[0][1].float().unsqueeze(-2)
        code_difference = (fused_group_scores(grouped, *_with_mean(codes[0]))
                           - torch_scores(quantize_query(grouped) if quads else grouped, dequantised)).abs().max()
        key_bytes = layers * kv_heads * dim * tokens * 4
        torch_ms, native_ms, half_ms, code_ms = (timed[method]["median_ms"] for method in ("torch", "native", "bf16", "int8"))
        rows.append({"shape": name, "layers": layers, "kv_heads": kv_heads, "group": group, "dim": dim,
                     "tokens": tokens, "torch": timed["torch"], "native": timed["native"], "native_bf16": timed["bf16"],
                     "native_int8": timed["int8"], "speedup": torch_ms / native_ms, "bf16_vs_float32": half_ms / native_ms,
                     "int8_vs_bf16": code_ms / half_ms, "int8_quad_products": quads,
                     "key_mib": key_bytes / 2**20, "native_key_gbps": key_bytes / native_ms / 1e6,
                     "max_abs_difference": float(difference), "bf16_max_abs_difference": float(half_difference),
                     "int8_max_abs_difference": float(code_difference)})
        print(f"{name}, {tokens} tokens: torch {torch_ms:.2f} ms, native {native_ms:.2f} ms, "
              f"native on bf16 keys {half_ms:.2f} ms, on int8 keys {code_ms:.2f} ms", flush=True)
        del caches, halves, codes
    return {"provenance": provenance("python -m tbrun_bench.selection_speed"),
            "machine": machine_header(torch.device("cpu")),
            "setting": {"threads": args.threads, "calls": args.calls, "warmup": args.warmup,
                        "producers_cycled": PRODUCERS, "native": native.status()}, "cases": rows,
            "query_networks": [measure_network(*shape, args) for shape in NETWORKS]}


@torch.no_grad()
def measure_network(name: str, hidden: int, inner: int, outputs: int, args) -> dict:
    """One token through ``PRODUCERS`` producers' query networks in turn: torch's modules
    against ``SelectionKernels.query_mlp`` on the same weights."""
    torch.manual_seed(hidden)
    networks = [query_mlp(hidden, inner, outputs).eval() for _ in range(PRODUCERS)]
    arguments = [(n[0].weight, n[0].bias, n[0].eps, n[1].weight, n[3].weight) for n in networks]
    x = torch.randn(hidden)
    kernels = native.kernels()
    torch_turn = itertools.cycle(networks)
    native_turn = itertools.cycle(arguments[PRODUCERS // 2 :] + arguments[: PRODUCERS // 2])
    timed = time_alternating({"torch": lambda: next(torch_turn)(x),
                              "native": lambda: kernels.query_mlp(x, *next(native_turn))}, args.calls, args.warmup)
    difference = (kernels.query_mlp(x, *arguments[0]) - networks[0](x)).abs().max()
    torch_ms, native_ms = timed["torch"]["median_ms"], timed["native"]["median_ms"]
    print(f"query network {name}: torch {torch_ms:.3f} ms, native {native_ms:.3f} ms", flush=True)
    return {"shape": name, "hidden": hidden, "inner": inner, "outputs": outputs, "torch": timed["torch"],
            "native": timed["native"], "speedup": torch_ms / native_ms,
            "weight_mib": (hidden * inner + inner * outputs) * 4 / 2**20, "max_abs_difference": float(difference)}


def to_markdown(report: dict) -> str:
    table = [[c["shape"], f"{c['layers']} x {c['kv_heads']}", str(c["group"]), str(c["dim"]), f"{c['tokens']:,}",
              f"{c['key_mib']:.1f}", f"{c['torch']['median_ms']:.2f}", f"{c['native']['median_ms']:.2f}",
              f"{c['speedup']:.2f}", f"{c['native_key_gbps']:.1f}", f"{c['max_abs_difference']:.1e}",
              f"{c['native_bf16']['median_ms']:.2f}", f"{c['bf16_vs_float32']:.2f}", f"{c['bf16_max_abs_difference']:.1e}",
              _int8_cell(c, "native_int8", lambda t: f"{t['median_ms']:.2f}"), _int8_cell(c, "int8_vs_bf16", "{:.2f}".format),
              _int8_cell(c, "int8_max_abs_difference", "{:.1e}".format)]
             for c in report["cases"]]
    s = report["setting"]
    return "\n".join([
        markdown_header("TokenButler's group-mean scores on the CPU: torch against the native kernel", report), "",
        f"{s['threads']} thread(s); per producer and step, {s['calls']} timed calls per method after {s['warmup']} "
        f"warm-up calls, alternating, each call reading the keys of the next of {s['producers_cycled']} producers' "
        "caches (cold, as in a decode step). Median ms per call. speed-up: torch / native; GB/s: the compact keys "
        "read per call / the native kernel's time; max |difference|: the largest gap between the two methods' "
        "scores (probabilities, each row summing to 1). bf16: the native kernel on bfloat16 copies of the keys "
        "(half the bytes), its time / the float32 kernel's, and its largest gap to torch on the same keys widened "
        f"(the query rounded to bfloat16 too where the kernel takes AVX512-BF16 pair products). int8: the native "
        "kernel on int8 codes with a float16 scale per token (18 bytes a token at d' 16 against bfloat16's 32), "
        "its time / the bf16 one's, and its largest gap to torch on the dequantised keys (the query quantised to "
        "int8 too where the kernel takes AVX512-VNNI quad products, `quantize_query`). Native kernels: "
        f"{s.get('native', 'not recorded')}.", "",
        markdown_table(["shape", "layers x KV heads", "query heads per KV head", "d'", "tokens", "keys MiB (fp32)",
                        "torch ms", "native ms", "speed-up", "native GB/s", "max abs difference", "native bf16 ms",
                        "bf16 / fp32", "bf16 max abs difference", "native int8 ms", "int8 / bf16",
                        "int8 max abs difference"], table), "",
        "torch: `softmax(matmul(q', k'), -1).mean(-2)` over `[Lg, KvH, g, m]`, as `TokenButlerPolicy` runs it without "
        "the kernel. native: `offload_engine/native/selection.cpp`, one pass over the keys (each key vector feeding "
        "every query head of its group in registers, an online softmax per tile of 512 tokens) and one over a "
        "`[g, m]` buffer; bfloat16 keys are multiplied in pairs by vdpbf16ps where the CPU has AVX512-BF16, else "
        "widened as they are read; int8 codes by vpdpbusd (4 byte products a lane) against the int8 query where the "
        "CPU has AVX512-VNNI, else widened as they are read and each token's logits times its scale.", "",
        "## The query network, one token per producer", "",
        "A producer's importance queries at a decode step: `LayerNorm(E) -> Linear(E, I) -> SiLU -> Linear(I, out)` "
        f"on one token, each call on the next of {s['producers_cycled']} producers' networks (SmolLM2's 15 hold 6.6 "
        "MiB of weights, which a large last-level cache may keep; in a decode step the model's layers pass between "
        "two producers and evict them), torch's "
        "modules against the native kernel (`tbrun_query_mlp`: the rows of each matrix streamed in order), both in "
        "float32. Median ms per call.", "",
        markdown_table(["shape", "E x I x out", "weights MiB", "torch ms", "native ms", "speed-up", "max abs difference"],
                       [[n["shape"], f"{n['hidden']} x {n['inner']} x {n['outputs']}", f"{n['weight_mib']:.2f}",
                         f"{n['torch']['median_ms']:.3f}", f"{n['native']['median_ms']:.3f}", f"{n['speedup']:.1f}",
                         f"{n['max_abs_difference']:.1e}"] for n in report.get("query_networks", [])]),
    ])


def _with_mean(cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, str, torch.Tensor]:
    """An int8 cache's (codes, scales) as ``fused_group_scores``' arguments after the query, the mean rule."""
    codes, scales = cache
    return codes, "mean", scales


def _int8_cell(case: dict, key: str, form) -> str:
    """A case's int8 figure, or "-" in a report from before int8 keys were timed."""
    return form(case[key]) if key in case else "-"


def main(argv: list[str] | None = None) -> None:
    micro_benchmark_main(argv, __doc__, measure, to_markdown, calls=30)


if __name__ == "__main__":
    main()
