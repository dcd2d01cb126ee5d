"""How many of vLLM's KV blocks a token-level selection touches (measured inside vLLM with the plugin).

vLLM moves KV between device and host in whole blocks (16 tokens on GPU by default, 128 on CPU).
A token-level selection of ``k`` tokens touches at most ``k`` blocks; this counts how many it
touches on real prompts, so the offloading design note (docs/vllm.md) can say what a
block-granular transfer of tbrun's selection would move against a token-granular one.

    OMP_NUM_THREADS=1 python -m tbrun_bench.vllm_block_coverage --context 6144
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .report import fmt, machine_header, markdown_header, markdown_table, provenance, write_json

BLOCK_SIZES = (1, 16, 32, 128)
POLICIES = ("policy=tokenbutler,budget=10%", "policy=critical(tokenbutler),budget=10%")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=6144)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--policy", default=POLICIES[0], help="TBRUN_VLLM value")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args(argv)

    os.environ["TBRUN_VLLM"] = args.policy
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from offload_engine.integrations.vllm import plugin, register
    from offload_engine.models import embedded_model_dir

    from .vllm_bench import prompts

    register()
    model = str(embedded_model_dir())
    batch = prompts(model, args.prompts, args.context)
    llm = LLM(model, dtype="float32", max_model_len=args.context + args.steps + 64, enforce_eager=True,
              max_num_seqs=args.prompts, seed=0)
    plugin.RUNTIME.block_coverage = {size: [0, 0] for size in BLOCK_SIZES}
    llm.generate([{"prompt_token_ids": p} for p in batch],
                 SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True), use_tqdm=False)
    counts = plugin.RUNTIME.block_coverage
    rows = [{"block_size": size, "attended_tokens": t, "blocks_touched": b, "tokens_moved_per_attended": b * size / t}
            for size, (t, b) in counts.items()]
    report = {"benchmark": "vllm_block_coverage", "provenance": provenance("python -m tbrun_bench.vllm_block_coverage"),
              "machine": machine_header(torch.device("cpu")),
              "settings": {"policy": args.policy, "context": args.context, "prompts": args.prompts, "steps": args.steps},
              "results": rows}
    write_json(args.out / "vllm_block_coverage.json", report)
    (args.out / "vllm_block_coverage.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    s = report["settings"]
    rows = [[r["block_size"], r["attended_tokens"], r["blocks_touched"], fmt(r["tokens_moved_per_attended"], 2)]
            for r in report["results"]]
    return "\n".join([
        markdown_header("Blocks a token-level selection touches (vLLM + tbrun plugin)", report), "",
        f"`TBRUN_VLLM={s['policy']}`, {s['prompts']} needle prompts of {s['context']} tokens, {s['steps']} decode "
        "steps each, summed over the selecting layers, KV heads and steps (sinks and window included). "
        "`tokens moved per attended token`: what moving whole blocks would cost per token the selection "
        "attends (1.0 = token-granular).", "",
        markdown_table(["block size", "attended tokens", "blocks touched", "tokens moved per attended token"], rows), "",
    ])


if __name__ == "__main__":
    main()
