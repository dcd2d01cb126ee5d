"""``tbrun bench``: latency of every KV mode side by side, and the gather methods on their own."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from offload_engine.config import parse_context
from offload_engine.errors import ConfigError

from .common import console, err_console, user_errors

bench_app = typer.Typer(help="Measure latency and write a report (JSON + Markdown + PNG).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    bench_app.command("latency")(user_errors(latency))
    bench_app.command("gather")(user_errors(gather))
    app.add_typer(bench_app, name="bench")


def latency(
    arch: str = typer.Option("llama-3.1-8b", "--arch", help="Architecture with random weights: a name in "
                             "bench/archs (llama-3.1-8b, qwen2.5-7b, llama-3.2-3b, llama-3.2-1b, qwen2.5-0.5b, smollm2-135m, "
                             "tiny-llama) or a config .json."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Time a real checkpoint instead of --arch."),
    contexts: str = typer.Option("32k,64k,128k,256k", "--contexts", help="KV capacities, comma-separated."),
    modes: str = typer.Option("dense-gpu,dense-offload,tokenbutler-offload,streaming-offload,random-offload",
                              "--modes", help="Modes, comma-separated: dense-gpu, dense-offload, <policy>-offload."),
    budget: int = typer.Option(2048, "--budget", help="Tokens per (layer, KV head) for the sparse modes."),
    interval: str = typer.Option("1,4", "--interval", help="Prediction intervals to run, comma-separated."),
    neighbors: str = typer.Option("off,on", "--neighbors", help="Neighbour fetching settings: off, on or off,on."),
    decode_steps: int = typer.Option(64, "--decode-steps", help="Timed decode steps per mode."),
    warmup: int = typer.Option(8, "--warmup", help="Decode steps run first and excluded."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when present)."),
    gather_method: Optional[str] = typer.Option(None, "--gather-method",
                                                help="index, batched-copy, zero-copy or zero-copy-cupy "
                                                     "(default: the fastest that passes its self-check)."),
    seed: int = typer.Option(0, "--seed"),
    synthetic_kv: bool = typer.Option(False, "--synthetic-kv", help="Fill the KV cache with random keys and values "
                                      "instead of running the prefill (decode time does not depend on them)."),
    repeats: int = typer.Option(1, "--repeats", help="Rounds over every mode (interleaved); each mode keeps its "
                                "fastest round (a shared machine's load only slows a round down)."),
    predictor_shape: str = typer.Option("4:512:16", "--predictor-shape", help="G:I:D[:Q] of tokenbutler's random-weight "
                                        "predictor: a producer every G layers, hidden width I, d' = D, Q query heads "
                                        "per KV head (default: the model's). 4:512:16: the reference sizes; 2:128:16: "
                                        "the shipped SmolLM2-135M predictor; 2:128:16:1: one query head per KV head."),
    predictor: str = typer.Option("random", "--predictor", help="tokenbutler's predictor: random (random weights of "
                                  "--predictor-shape's sizes; its selections renew most of the budget every step), "
                                  "shipped (the one tbrun generate loads for --model and the interval) or a "
                                  "checkpoint folder."),
    synthetic_kv_tile: Optional[str] = typer.Option(None, "--synthetic-kv-tile", help="With --synthetic-kv and "
                                                    "--model: fill the KV with the real keys and values of the "
                                                    "prompt's first N tokens (e.g. 4k), repeated and turned by RoPE to "
                                                    "their positions, so selections change as on real text."),
    refresh_layers: str = typer.Option("", "--refresh-layers", help="Also run every interval > 1 with these layers "
                                       "selecting at every step (e.g. 20-23)."),
    copy_thread: bool = typer.Option(False, "--copy-thread", help="CPU: offload modes copy (tokenbutler also "
                                     "selects) on one more thread while the model computes; dense-gpu gets one "
                                     "more torch thread instead, so every mode uses the same cores."),
    page_prefilter: str = typer.Option("0", "--page-prefilter", help="tokenbutler: page sizes of its page "
                                       "prefilter to run, comma-separated, 0 for none (e.g. 0,16: both side by "
                                       "side, paired)."),
    keep_bonus: str = typer.Option("0", "--keep-bonus", help="The scoring modes' selection hysteresis to run, "
                                   "comma-separated (e.g. 0,0.25: both side by side, paired; see tbrun generate)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for the report files."),
    append: bool = typer.Option(False, "--append", help="Keep the other contexts already in the report at --out "
                                "(measure long contexts in separate commands, get one report)."),
) -> None:
    """Decode ms per step of every mode at every context, in one process on one prompt."""
    from tbrun_bench.latency import LatencySettings, run_latency

    settings = LatencySettings(
        contexts=[parse_context(c) for c in _split(contexts)], arch=arch, model=model, modes=_split(modes),
        budget=budget, intervals=[_int(i, "--interval") for i in _split(interval)],
        neighbors=[_on_off(n) for n in _split(neighbors)], decode_steps=decode_steps, warmup=warmup,
        device=_device(device), gather_method=gather_method, seed=seed, synthetic_kv=synthetic_kv,
        repeats=repeats, predictor_shape=predictor_shape, predictor=predictor,
        synthetic_kv_tile=parse_context(synthetic_kv_tile) if synthetic_kv_tile else 0,
        refresh_layers=refresh_layers, copy_thread=copy_thread,
        page_prefilters=[_int(p, "--page-prefilter") for p in _split(page_prefilter)],
        keep_bonuses=[_number(b, "--keep-bonus") for b in _split(keep_bonus)],
    )
    report = run_latency(settings, out, log=lambda msg: err_console.print(msg, style="dim", markup=False),
                         append=append)
    console.print(Path(report["files"]["md"]).read_text(), markup=False, soft_wrap=True)
    console.print(f"report: {', '.join(report['files'].values())}", markup=False, soft_wrap=True)


def gather(
    context: str = typer.Option("128k", "--context", help="Tokens in the host store (per KV head)."),
    budget: int = typer.Option(2048, "--budget", help="Fragments gathered per KV head."),
    kv_heads: int = typer.Option(8, "--kv-heads"),
    head_dim: int = typer.Option(128, "--head-dim"),
    repeats: int = typer.Option(50, "--repeats", help="Timed gathers per method (after 5 warm-up)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when present)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for the report files."),
) -> None:
    """Time every gather method on one layer's K of a pinned store; GB/s against the memcpy peak."""
    from tbrun_bench.gather import GatherSettings, run_gather

    settings = GatherSettings(context=parse_context(context), budget=budget, kv_heads=kv_heads, head_dim=head_dim,
                              repeats=repeats, device=_device(device))
    report = run_gather(settings, out)
    console.print(Path(report["files"]["md"]).read_text(), markup=False, soft_wrap=True)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a whole number.") from None


def _number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a number.") from None


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise ConfigError(f"--neighbors {text!r}: use on, off, or off,on.")
    return text.lower() == "on"


def _device(name: Optional[str]) -> str:
    import torch

    from offload_engine.engine import resolve_device

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_device(name)  # refuse cuda on a machine without it, with a clear message
    return name
