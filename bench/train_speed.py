"""Distillation speed: the teacher in the loop against a teacher cache, side by side in one run.

    python -m tbrun_bench.train_speed --teacher-cache runs/cache-2k --steps 4 --out bench/reports/predictor_training_speed

Both sources train the same predictor shape on sequences of the same length with the same rows per
step (the in-the-loop steps run the model on random token ids: a teacher pass costs the same on any
text). Steps alternate (one
in-the-loop step, then cached steps) so that load from other processes hits both alike. Also
reported: the one-off cost of building one shard (a teacher pass), so the break-even number of
epochs can be read off. Writes ``OUT.json`` and ``OUT.md`` with the machine, command and commit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from offload_engine.models import load_model
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
from offload_engine.predictor.teacher import row_states, sample_rows
from offload_engine.predictor.teacher_cache import TeacherCache, sequence_tensors
from offload_engine.predictor.training import cached_step, distill_step

from .report import machine_header, markdown_header, markdown_table, provenance, summarize_ms, write_reports


def measure(args) -> dict:
    adapter = load_model(args.model)
    cache = TeacherCache.open(args.teacher_cache)
    seq_len = cache.spec.seq_len
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, args.producer_every, args.dim, args.hidden))
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=1e-4)
    live_ms, cached_ms, shard_ms = [], [], []
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        ids = torch.randint(0, adapter.dims.vocab_size, (1, seq_len), generator=generator)
        rows = sample_rows(seq_len, args.rows, generator)
        live_ms.append(_timed(lambda: distill_step(predictor, adapter, ids, rows, 0), predictor, optimizer))
        for repeat in range(args.cached_per_live):
            index = (step * args.cached_per_live + repeat) % len(cache)
            cached_ms.append(_timed(lambda: cached_step(predictor, cache, index, args.rows, adapter.scaling, generator),
                                    predictor, optimizer))
        began = time.perf_counter()
        shard_rows = sample_rows(seq_len, cache.spec.rows, generator)
        sequence_tensors(row_states(adapter, ids, shard_rows, 0), shard_rows, torch.float16, adapter.scaling)
        shard_ms.append(1000 * (time.perf_counter() - began))
        print(f"round {step + 1}/{args.steps}: in the loop {live_ms[-1] / 1000:.1f} s, cached "
              f"{cached_ms[-1] / 1000:.2f} s, one shard {shard_ms[-1] / 1000:.1f} s", flush=True)
    live, cached, shard = summarize_ms(live_ms), summarize_ms(cached_ms), summarize_ms(shard_ms)
    return {
        "provenance": provenance("python -m tbrun_bench.train_speed"),
        "machine": machine_header(torch.device("cpu")),
        "setting": {"seq_len": seq_len, "rows_per_step": args.rows + 1, "predictor": predictor.config.to_dict(),
                    "cache": {"sequences": len(cache), "rows": cache.spec.rows, "dtype": cache.spec.dtype,
                              "gib": round(cache.bytes_on_disk() / 2**30, 2)},
                    "torch_threads": torch.get_num_threads()},
        "ms_per_step": {"teacher_in_the_loop": live, "teacher_cache": cached, "build_one_shard": shard},
        "speedup_median": live["median_ms"] / cached["median_ms"],
        "steps_per_s": {"teacher_in_the_loop": 1000 / live["median_ms"], "teacher_cache": 1000 / cached["median_ms"]},
    }


def _timed(step, predictor, optimizer) -> float:
    """Milliseconds of one optimizer step (gradients, clip, update)."""
    began = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    step()
    torch.nn.utils.clip_grad_norm_(predictor.parameters(), 10.0)
    optimizer.step()
    return 1000 * (time.perf_counter() - began)


def to_markdown(report: dict) -> str:
    s, ms = report["setting"], report["ms_per_step"]
    rows = [[name.replace("_", " "), f"{v['median_ms'] / 1000:.2f}", f"{v['p90_ms'] / 1000:.2f}", str(v['steps'])]
            for name, v in ms.items()]
    epochs = ms["build_one_shard"]["median_ms"] / max(1e-9, ms["teacher_in_the_loop"]["median_ms"] - ms["teacher_cache"]["median_ms"])
    return "\n".join([
        markdown_header("Predictor distillation: teacher in the loop vs a teacher cache", report), "",
        f"Sequences of {s['seq_len']} tokens, {s['rows_per_step']} query rows per step, predictor "
        f"hidden {s['predictor']['hidden']}, d' {s['predictor']['dim']}, a producer every "
        f"{s['predictor']['producer_every']} layers; cache of {s['cache']['sequences']} sequences x "
        f"{s['cache']['rows']} rows in {s['cache']['dtype']} ({s['cache']['gib']} GiB); {s['torch_threads']} torch thread(s). "
        "Steps alternate between the two sources in one process.", "",
        markdown_table(["", "median s/step", "p90 s/step", "steps"], rows), "",
        f"**Cached training is {report['speedup_median']:.1f}x faster per step** "
        f"({report['steps_per_s']['teacher_cache']:.3f} vs {report['steps_per_s']['teacher_in_the_loop']:.3f} steps/s). "
        f"Building a shard costs one teacher pass; the cache pays for itself after about {epochs:.1f} epochs "
        "(shard cost / time saved per step), and every later sweep run on the same cache saves the whole teacher.",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-cache", required=True, type=Path)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=4, help="in-the-loop steps (each followed by cached ones)")
    parser.add_argument("--cached-per-live", type=int, default=3)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--producer-every", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", required=True, type=Path, help="report path without extension")
    args = parser.parse_args(argv)
    report = measure(args)
    write_reports(args.out, report, to_markdown(report))


if __name__ == "__main__":
    main()
