"""Bytes that cross per decode step, measured on the embedded model, and what they imply for a big one.

Runs the embedded SmolLM2-135M-Instruct on one long needle-in-a-haystack prompt (real text, the
shipped predictor) in dense offload and in tokenbutler sparse offload at interval 1 and 4, with and
without neighbours, with delta fetch; records the host-to-device bytes of every step. From the
steady-state steps it derives the *churn*: the share of the attended selected tokens that had to
be fetched at a step. The churn, not the model, sets the traffic, so it carries over to a larger
model at the same budget rule; the report then projects the decode step of the Llama-3.1-8B shape
at 128k and 512k tokens on PCIe Gen4 and Gen5, labelled as a projection with its formula.

    python -m tbrun_bench.bytes_report --context 8k --budget 10% --out bench/reports
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from rich.progress import Progress

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.config import parse_context
from offload_engine.evaluation.harness import predictor_record
from offload_engine.evaluation.tasks import niah_sample
from offload_engine.models import load_model
from offload_engine.policies.tokenbutler import shipped_predictor_for

from .report import fmt, machine_header, markdown_header, markdown_table, predictor_label, provenance, write_json

SINKS, WINDOW = 4, 32
VARIANTS = (  # label, interval, neighbors, rule, keep bonus (the top-k's hysteresis)
    ("tokenbutler i1", 1, 0, "radius", 0.0),
    ("tokenbutler i1 + neighbours", 1, 1, "radius", 0.0),
    ("tokenbutler i4", 4, 0, "radius", 0.0),
    ("tokenbutler i4 + neighbours", 4, 1, "radius", 0.0),
    ("tokenbutler i4 + runs", 4, 0, "runs", 0.0),
    ("tokenbutler i1, keep bonus 0.25", 1, 0, "radius", 0.25),
    ("tokenbutler i1, keep bonus 1", 1, 0, "radius", 1.0),
)
# The projected machine: Llama-3.1-8B (32 layers, 8 KV heads, head_dim 128, bf16) on one H100-class GPU.
BIG = {"layers": 32, "kv_heads": 8, "head_dim": 128, "bytes": 2, "weights_gb": 16.06, "hbm_gbps": 3350.0,
       "predictor_dim": 16}
BUSES = {"PCIe Gen4 x16": 25.0, "PCIe Gen5 x16": 50.0}  # sustained host-to-device GB/s (method.md)


def run(adapter, prompt: list[int], context: int, steps: int, mode: KVMode, selection: SelectionConfig | None):
    config = EngineConfig(context=context, mode=mode, **({"selection": selection} if selection else {}))
    result = Engine(adapter, config).generate(prompt, SamplingConfig(max_new_tokens=steps + 1, ignore_eos=True))
    return result.stats.h2d_bytes, result.text


def churn(moved: list[int], adapter, keep: int, growth: int) -> float:
    """Steady-state fetched fragments over attended selected fragments (selecting layers only)."""
    dims = adapter.dims
    fragment = 2 * dims.head_dim * torch.empty((), dtype=adapter.dtype).element_size()
    dense_layer = dims.num_kv_heads * fragment  # layer 0 takes the one token leaving the window
    selected = (dims.num_layers - 1) * dims.num_kv_heads * keep * growth * fragment
    steady = statistics.fmean(moved[1:])
    return max(0.0, steady - dense_layer) / selected


def project(share: float, tokens: int, budget: int, growth: int) -> dict:
    """Projected decode step of the big shape: bytes over each bus, and the device-memory floor."""
    b = BIG
    fragment = 2 * b["head_dim"] * b["bytes"]
    dense_bytes = b["layers"] * b["kv_heads"] * fragment * tokens
    sparse_bytes = share * (b["layers"] - 1) * b["kv_heads"] * (budget - SINKS - WINDOW) * growth * fragment
    compact = (b["layers"] - 1) * b["kv_heads"] * tokens * b["predictor_dim"] * b["bytes"]
    layer0 = b["kv_heads"] * fragment * tokens
    attended = (b["layers"] - 1) * b["kv_heads"] * budget * growth * fragment
    hbm_ms = (b["weights_gb"] * 1e9 + compact + layer0 + attended) / (b["hbm_gbps"] * 1e9) * 1e3
    dense_gpu_ms = (b["weights_gb"] * 1e9 + dense_bytes) / (b["hbm_gbps"] * 1e9) * 1e3
    out = {"tokens": tokens, "dense_offload_bytes": dense_bytes, "sparse_bytes": sparse_bytes,
           "device_floor_ms": hbm_ms, "dense_on_gpu_ms": dense_gpu_ms}
    for bus, gbps in BUSES.items():
        out[bus] = {"dense_offload_ms": dense_bytes / (gbps * 1e9) * 1e3 + dense_gpu_ms,
                    "sparse_ms_overlapped": max(hbm_ms, sparse_bytes / (gbps * 1e9) * 1e3),
                    "sparse_ms_serial": hbm_ms + sparse_bytes / (gbps * 1e9) * 1e3}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", default="8k")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per run (the first fills)")
    parser.add_argument("--big-budget", type=int, default=2048, help="tokens per (layer, KV head) projected")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    context, budget = parse_context(args.context), Budget.parse(args.budget)
    adapter = load_model(None)
    sample = niah_sample(adapter.tokenizer, "single", 0, 1, context - args.steps - 8, seed=0)
    prompt = list(sample.prompt_ids)
    rows = []
    with Progress() as progress:
        task = progress.add_task("bytes per step", total=len(VARIANTS) + 1)
        dense, _ = run(adapter, prompt, context, args.steps, KVMode.DENSE_OFFLOAD, None)
        progress.advance(task)
        dense_steady = statistics.fmean(dense[1:])
        for label, interval, neighbors, rule, bonus in VARIANTS:
            selection = SelectionConfig(policy="tokenbutler", budget=budget, sinks=SINKS, window=WINDOW,
                                        interval=interval, neighbors=neighbors, neighbor_rule=rule, keep_bonus=bonus)
            moved, text = run(adapter, prompt, context, args.steps, KVMode.SPARSE_OFFLOAD, selection)
            keep = budget.tokens_for(len(prompt) + 1) - SINKS - WINDOW
            share = churn(moved, adapter, keep, selection.neighbor_growth)
            rows.append({"label": label, "interval": interval, "neighbors": neighbors, "rule": rule, "keep_bonus": bonus,
                         "first_step_bytes": moved[0], "steady_bytes_per_step": statistics.fmean(moved[1:]),
                         "share_of_dense_offload": statistics.fmean(moved[1:]) / dense_steady, "churn": share,
                         "projection": [project(share, t, args.big_budget, selection.neighbor_growth)
                                        for t in (131072, 524288)],
                         "answer": text})
            progress.advance(task)
    report = {"benchmark": "bytes", "provenance": provenance("python -m tbrun_bench.bytes_report"),
              "machine": machine_header(torch.device("cpu")),
              "settings": {"context": context, "prompt_tokens": len(prompt), "budget": str(budget), "sinks": SINKS,
                           "window": WINDOW, "steps": args.steps, "big_budget": args.big_budget, "big_shape": BIG,
                           "buses_gbps": BUSES,
                           "predictor": {f"interval {interval}": predictor_record(shipped_predictor_for(adapter, interval, context))
                                         for interval in sorted({variant[1] for variant in VARIANTS})}},
              "dense_offload_bytes_per_step": dense_steady, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bytes_per_step.json", report)
    (args.out / "bytes_per_step.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


def predictors_sentence(records) -> str:
    """The predictors the variants loaded (``predictor_record`` per interval), as a sentence; older reports named none."""
    if not isinstance(records, dict):
        return ""
    named = [f"{label}: {predictor_label(record)}" for label, record in records.items() if record]
    return " Predictors (shipped, by interval): " + "; ".join(named) + "." if named else ""


def to_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [markdown_header("Bytes that cross per decode step (measured), and a projection for Llama-3.1-8B", report),
             "", f"Measured: embedded SmolLM2-135M-Instruct (fp32), one needle-in-a-haystack prompt of "
             f"{s['prompt_tokens']} tokens, budget {s['budget']} per (layer, KV head) with sinks {s['sinks']} and window "
             f"{s['window']}, {s['steps']} decode steps; steady state = every step after the first (which fills the "
             f"working set). Dense offload moves {report['dense_offload_bytes_per_step'] / 2**20:.1f} MiB per step."
             + predictors_sentence(s.get("predictor")),
             "", markdown_table(
                 ["variant", "first step MiB", "steady MiB/step", "share of dense offload", "churn"],
                 [[r["label"], fmt(r["first_step_bytes"] / 2**20, 2), fmt(r["steady_bytes_per_step"] / 2**20, 3),
                   f"{100 * r['share_of_dense_offload']:.2f}%", f"{100 * r['churn']:.1f}%"] for r in report["rows"]]),
             "", "Churn = steady fetched fragments / attended selected fragments of the selecting layers (layer 0 "
             "stays resident and takes only the token leaving the window).", "",
             "## Projection (not a measurement): Llama-3.1-8B shape, bf16, budget "
             f"{s['big_budget']} tokens per (layer, KV head)", "",
             "Formulas: fragment = 2 x 128 x 2 B = 512 B per (token, layer, KV head). Dense offload bytes = 32 x 8 x "
             "512 B x T; sparse bytes = churn x 31 x 8 x (budget - sinks - window) x growth x 512 B (layer 0 resident). "
             "Device floor = (16.06 GB weights + compact keys 31 x 8 x T x 16 x 2 B + layer-0 KV + attended KV) / "
             "3,350 GB/s HBM. Dense offload ms = bus time of the whole KV + dense on-GPU time; sparse ms = max(device "
             "floor, bus time) if copies overlap compute (prefetch ahead), their sum if not. Buses: Gen4 25 GB/s, "
             "Gen5 50 GB/s sustained. The churn measured here (135M model, 8k tokens) is assumed to hold.", ""]
    header = ["variant", "T", "dense on GPU ms", "bus", "dense offload ms", "sparse ms (overlapped / serial)",
              "speed-up vs dense offload"]
    table = []
    for r in report["rows"]:
        for p in r["projection"]:
            for bus in BUSES:
                b = p[bus]
                table.append([r["label"], f"{p['tokens'] // 1024}k", fmt(p["dense_on_gpu_ms"], 1), bus,
                              fmt(b["dense_offload_ms"], 0), f"{fmt(b['sparse_ms_overlapped'], 1)} / "
                              f"{fmt(b['sparse_ms_serial'], 1)}",
                              f"{b['dense_offload_ms'] / b['sparse_ms_serial']:.0f}x - "
                              f"{b['dense_offload_ms'] / b['sparse_ms_overlapped']:.0f}x"])
    lines += [markdown_table(header, table), ""]
    lines += ["At 512k tokens the dense KV (64 GiB) plus weights does not fit an 80 GB GPU beside activations; the "
              "dense-on-GPU column is what it would take if it did.", "",
              "Read these as bounds, not predictions: they assume the 512-byte fragment gathers run at the bus's "
              "sustained rate and that the predictor, top-k and residency work hide under the weights' read time. "
              "With a churn of a few percent the sparse bytes are tens of MB per step, so even at a quarter of the "
              "bus rate the transfer stays below the device floor; what the projection cannot see is per-layer "
              "kernel-launch and synchronisation overhead, which the GPU latency report "
              "(`bench/gpu_first_run.sh`) measures. The TokenButler paper reports up to 7.6x over dense offload "
              "for its own engine, which gathers on the CPU and copies layer 0 whole every step."]
    return "\n".join(lines) + "\n"


def rewrite_markdown(json_path: Path) -> None:
    """Regenerate the Markdown of a report from its JSON (after a change of wording)."""
    import json

    report = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(to_markdown(report))


if __name__ == "__main__":
    main()
