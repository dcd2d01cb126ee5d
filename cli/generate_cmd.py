"""``tbrun generate``: stream an answer and print what the run cost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from offload_engine.config import (
    DEFAULT_WINDOW, Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig, check_refresh_layers, parse_context,
    parse_layers,
)
from offload_engine.errors import ConfigError

from .common import check_output_file, console, err_console, read_prompt, user_errors

if TYPE_CHECKING:
    from offload_engine.engine import Engine, GenerationResult

# The engine, the models and the policies (torch, transformers) are imported inside the functions that use them,
# so that `tbrun --help` and an option refused at parsing answer without loading them.


def register(app: typer.Typer) -> None:
    app.command("generate")(user_errors(generate))


# The model and where its KV lives: shared with ``tbrun serve`` (cli/serve_cmd.py), which takes the same options.
MODEL = typer.Option(None, "--model", "-m", help="Hub id or local path; default: the embedded SmolLM2-135M-Instruct.")
CONTEXT = typer.Option(None, "--context", "-c",
                       help="KV capacity: 4096, 32k, 128k, 1m. Default: the model's positions, at most 8k.")
OFFLOAD = typer.Option(False, "--offload/--no-offload", help="Keep the KV cache in host memory.")
POLICY = typer.Option("dense", "--policy", help="Token selection with --offload: dense, streaming, tokenbutler, ...")
BUDGET = typer.Option(None, "--budget", help="Tokens per layer and KV head (2048) or a share (10%); default 2048.")
SINKS = typer.Option(4, "--sinks", help="First tokens always attended.")
WINDOW = typer.Option(DEFAULT_WINDOW, "--window", help="Widest local window: the most recent tokens always attended "
                      "are half the budget after the sinks, at least 16 (or --window if smaller), at most this.")
INTERVAL = typer.Option(1, "--interval", help="Predict every N steps, reuse the selection between.")
REFRESH_LAYERS = typer.Option("", "--refresh-layers",
                              help="With --interval N > 1: layers that still select at every step, e.g. 14-23 "
                                   "(those whose selection drifts fastest).")
COPY_THREAD = typer.Option(False, "--copy-thread/--no-copy-thread",
                           help="CPU offload: run the copies, and tokenbutler's selections ahead of them, on one more "
                                "thread while the model computes (for a core that --threads leaves free).")
KEEP_BONUS = typer.Option(0.0, "--keep-bonus",
                          help="Hysteresis of the selection: a token already on the device keeps its place unless a "
                               "newcomer scores this share more (0.25: 25%); fewer tokens copied a step. 0: off.")
NEIGHBORS = typer.Option(0, "--neighbors", help="Also fetch this many positions after each selected one.")
NEIGHBOR_RULE = typer.Option("radius", "--neighbor-rule",
                             help="radius (--neighbors N), or runs: after each run of c selected, the next c.")
PREDICTOR = typer.Option(None, "--predictor", help="TokenButler checkpoint directory.")
KEY_DTYPE = typer.Option("auto", "--key-dtype",
                         help="tokenbutler: how its compact cache stores projected keys: auto (the model's dtype; "
                              "for a float32 model on the CPU with the native kernels, int8 where the CPU has "
                              "AVX512-VNNI, else bfloat16), float32, bfloat16 or int8.")
PAGE_PREFILTER = typer.Option(0, "--page-prefilter",
                              help="tokenbutler: rank pages of N tokens by their compact keys' bounds first and score "
                                   "the tokens of the best only (4x the budget's worth); 0: score every token. "
                                   "Experimental: faster at long contexts on the CPU, but it loses needles that "
                                   "scoring every token finds (docs/predictor.md, \"Page prefilter\").")
DEVICE = typer.Option(None, "--device", help="cuda or cpu (default: cuda when present).")
DTYPE = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU).")
ALLOW_ROPE_SCALING = typer.Option(False, "--allow-rope-scaling",
                                  help="Allow a context past the model's trained positions.")


@dataclass(slots=True)
class EngineOptions:
    """The values of the options above, as a command received them."""

    model: Optional[str]
    context: Optional[str]
    offload: bool
    policy: str
    budget: Optional[str]
    sinks: int
    window: int
    interval: int
    neighbors: int
    neighbor_rule: str
    predictor: Optional[Path]
    device: Optional[str]
    dtype: Optional[str]
    allow_rope_scaling: bool
    refresh_layers: str = ""
    copy_thread: bool = False
    key_dtype: str = "auto"
    page_prefilter: int = 0
    keep_bonus: float = 0.0


def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="Read the prompt from a file."),
    model: Optional[str] = MODEL,
    context: Optional[str] = CONTEXT,
    offload: bool = OFFLOAD,
    policy: str = POLICY,
    budget: Optional[str] = BUDGET,
    sinks: int = SINKS,
    window: int = WINDOW,
    interval: int = INTERVAL,
    refresh_layers: str = REFRESH_LAYERS,
    neighbors: int = NEIGHBORS,
    neighbor_rule: str = NEIGHBOR_RULE,
    predictor: Optional[Path] = PREDICTOR,
    key_dtype: str = KEY_DTYPE,
    page_prefilter: int = PAGE_PREFILTER,
    keep_bonus: float = KEEP_BONUS,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    temperature: float = typer.Option(0.0, "--temperature", help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    allow_rope_scaling: bool = ALLOW_ROPE_SCALING,
    copy_thread: bool = COPY_THREAD,
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Also write the statistics as JSON here."),
) -> None:
    """Generate text for a prompt, streaming tokens, then print a summary of the run."""
    from offload_engine.engine import encode_prompt

    text = read_prompt(prompt, prompt_file)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens)
    if stats_json is not None:
        check_output_file(stats_json, "--stats-json")
    engine = build_engine(EngineOptions(model, context, offload, policy, budget, sinks, window, interval, neighbors,
                                        neighbor_rule, predictor, device, dtype, allow_rope_scaling, refresh_layers,
                                        copy_thread, key_dtype, page_prefilter, keep_bonus))
    ids = encode_prompt(engine.adapter.tokenizer, text, chat)
    result = _run(engine, engine.adapter.tokenizer, ids, sampling)
    extra = [_sliding_window_row(engine.adapter.dims, engine.config.context, engine.adapter.dtype, engine.config.mode),
             _budget_row(engine.config, len(result.prompt_ids) + len(result.token_ids) - 1),
             _weights_row(engine.adapter)]
    _print_summary(result, [row for row in extra if row is not None])
    if stats_json is not None:
        stats_json.write_text(json.dumps(result.stats.to_dict(), indent=2))


def build_engine(o: EngineOptions) -> Engine:
    """Check the options, refuse what cannot fit before loading weights, load the model, build the engine."""
    from offload_engine.engine import Engine, resolve_device
    from offload_engine.memory import parse_dtype
    from offload_engine.models import load_model, model_dims, resolve_model_path, transformers_source

    device_name = o.device or ("cuda" if _cuda_available() else "cpu")
    torch_device = resolve_device(device_name)
    torch_dtype = parse_dtype(o.dtype or ("bf16" if torch_device.type == "cuda" else "fp32"))
    mode = _mode(o.offload, o.policy)
    if o.predictor is not None and "tokenbutler" not in o.policy:
        raise ConfigError("--predictor is only used by --policy tokenbutler.")
    from offload_engine.policies.tokenbutler import KEY_DTYPES

    if o.key_dtype not in KEY_DTYPES:
        raise ConfigError(f"--key-dtype {o.key_dtype!r} is not one of {', '.join(KEY_DTYPES)}.")
    if o.key_dtype != "auto" and "tokenbutler" not in o.policy:
        raise ConfigError("--key-dtype is only used by --policy tokenbutler (its compact cache of projected keys).")
    if o.keep_bonus and mode is not KVMode.SPARSE_OFFLOAD:
        raise ConfigError("--keep-bonus shapes which tokens a sparse --policy fetches: add --offload and a --policy "
                          "other than dense, or drop it.")
    if o.page_prefilter and "tokenbutler" not in o.policy:
        raise ConfigError("--page-prefilter is only used by --policy tokenbutler (pages of its compact keys).")
    source = resolve_model_path(o.model, progress=lambda msg: err_console.print(msg, style="dim", markup=False))
    policy_object = (_policy(o.policy, o.predictor, o.key_dtype, o.page_prefilter)
                     if mode is KVMode.SPARSE_OFFLOAD else None)
    if policy_object is not None:  # (sized_policy checks it too, but after the predictor is looked for)
        from offload_engine.selection.planner import check_keep_bonus

        check_keep_bonus(o.keep_bonus, policy_object)
    dims = model_dims(source)
    named = transformers_source(source)[0]  # what the loaded model's config will name (a .gguf: its folder)
    capacity = parse_context(o.context) if o.context is not None else min(dims.max_positions, 8192)
    if mode is KVMode.SPARSE_OFFLOAD and o.predictor is None:
        _say_chosen_predictor(o.policy, named, o.interval, capacity)
    if mode is KVMode.SPARSE_OFFLOAD and o.predictor is not None:
        _check_predictor_model(o.predictor, o.model, dims)
    check_refresh_layers(parse_layers(o.refresh_layers), dims.num_layers)  # before the weights load
    selection = SelectionConfig(
        policy=o.policy, budget=_budget(o.budget, mode, capacity), sinks=o.sinks, window=o.window,
        interval=o.interval, neighbors=o.neighbors, neighbor_rule=o.neighbor_rule, refresh_layers=o.refresh_layers,
        keep_bonus=o.keep_bonus,
    )
    config = EngineConfig(context=capacity, mode=mode, selection=selection, device=device_name,
                          allow_rope_scaling=o.allow_rope_scaling, copy_thread=o.copy_thread)
    _check_fits(dims, capacity, torch_dtype, torch_device, mode, o.allow_rope_scaling)
    if mode is KVMode.SPARSE_OFFLOAD:  # the working set and the policy's state too (the weights are not counted)
        from offload_engine.backends.sparse_offload import sized_policy

        sized_policy(dims, capacity, torch_dtype, torch_device, selection, policy_object, model_source=named)
    adapter = load_model(source, dtype=torch_dtype, device=device_name)
    return Engine(adapter, config, policy=policy_object)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mode(offload: bool, policy: str) -> KVMode:
    if not offload:
        if policy != "dense":
            raise ConfigError(f"--policy {policy} selects tokens to fetch from host memory: add --offload.")
        return KVMode.DENSE_DEVICE
    return KVMode.DENSE_OFFLOAD if policy == "dense" else KVMode.SPARSE_OFFLOAD


def _policy(spec: str, predictor: Optional[Path], key_dtype: str = "auto", page_prefilter: int = 0):
    from offload_engine.policies import build_policy

    options = {"predictor_path": str(predictor)} if predictor is not None else {}
    if key_dtype != "auto":
        options["key_dtype"] = key_dtype
    if page_prefilter:
        options["page_prefilter"] = page_prefilter
    return build_policy(spec, **options)


def _say_chosen_predictor(policy: str, source: str, interval: int, capacity: int) -> None:
    """Say on stderr when tokenbutler will load a shipped predictor other than the model's default one: the
    one trained for ``--interval``, or the one fine-tuned for short contexts at ``--context`` (the policy
    chooses it: ``shipped_predictor_named``)."""
    if "tokenbutler" not in policy:
        return
    from offload_engine.policies.tokenbutler import shipped_predictor_named

    chosen = shipped_predictor_named(source, interval, capacity)
    if chosen is None or chosen == shipped_predictor_named(source):
        return
    reason = f"--interval {interval}" if interval > 1 else f"a context of {capacity} tokens"
    err_console.print(f"{reason}: using the predictor trained for it, {chosen.name} (docs/predictor.md); "
                      "--predictor DIR overrides", style="dim", markup=False)


def _check_predictor_model(predictor: Path, model: Optional[str], dims) -> None:
    """Before the weights load: refuse a ``--predictor`` that is not a checkpoint or was trained for a model of
    another shape (``PredictorError``), and say on stderr when it was trained for a model of another name with
    this shape (a fine-tune of the same base can share a predictor; another model of equal shape cannot)."""
    from offload_engine.models import EMBEDDED_MODEL_NAME
    from offload_engine.predictor.checkpoint import check_shape, read_config, resolve_checkpoint_dir

    path = resolve_checkpoint_dir(predictor)
    recorded = read_config(path)
    check_shape(recorded, dims, path)
    trained = recorded.get("model_name")
    running = EMBEDDED_MODEL_NAME if model in (None, "", "default", "embedded") else model
    if trained and Path(trained).name.lower() != Path(running).name.lower():
        err_console.print(f"note: predictor {str(predictor)!r} was trained for {trained}, not {running} "
                          "(same shape): if that is another model, its selections mean little; train one for this "
                          "model with `tbrun train-predictor`.", style="yellow", markup=False)


def _budget(text: Optional[str], mode: KVMode, capacity: int) -> Budget | None:
    if mode is not KVMode.SPARSE_OFFLOAD:
        if text is not None:
            raise ConfigError("--budget applies to sparse policies with --offload (not to --policy dense).")
        return None
    if text is None:
        return Budget(tokens=min(2048, capacity))
    budget = Budget.parse(text)
    if budget.tokens is not None and budget.tokens > capacity:
        raise ConfigError(f"--budget {budget.tokens} is above --context {capacity}: lower it.")
    return budget


def _check_fits(dims, capacity, dtype, device, mode, allow_rope_scaling) -> None:
    """Refuse, before loading weights, a context the model or the machine cannot hold."""
    from offload_engine.errors import InsufficientMemoryError
    from offload_engine.memory import MachineMemory

    if capacity > dims.max_positions and not allow_rope_scaling:
        raise ConfigError(
            f"--context {capacity} is longer than the {dims.max_positions} positions the model was trained for: "
            "lower --context, or opt in to RoPE extrapolation with --allow-rope-scaling."
        )
    offload = mode is not KVMode.DENSE_DEVICE
    memory = MachineMemory.now(device)
    fits = memory.max_context(dims, dtype, offload)
    if capacity > fits:
        footprint = dims.kv_footprint(capacity, dtype)
        need = footprint.global_bytes + footprint.ring_bytes
        where = "host" if offload or device.type == "cpu" else str(device)
        hint = "lower --context" if offload or device.type == "cpu" else "add --offload, or lower --context"
        raise InsufficientMemoryError(
            f"a {capacity}-token KV cache needs {need / 2**30:.2f} GiB of {where} memory; this machine can hold "
            f"{fits} tokens ({'host' if where == 'host' else 'device'} memory free now): {hint}."
        )


def _run(engine: Engine, tokenizer, ids: list[int], sampling: SamplingConfig) -> GenerationResult:
    """Prefill under a progress bar, then stream the decoded text as tokens arrive."""
    streamed: list[int] = []
    shown = [""]

    def on_token(token: int) -> None:
        streamed.append(token)
        text = tokenizer.decode(streamed, skip_special_tokens=True)
        console.print(text[len(shown[0]):], end="", soft_wrap=True, markup=False)
        shown[0] = text

    columns = (TextColumn("prefill {task.fields[tokens]} tokens"), BarColumn(), MofNCompleteColumn(),
               TextColumn("layers"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("prefill", total=engine.adapter.dims.num_layers, tokens=len(ids))
        holder: dict = {}

        def on_prefill(done: int, total: int) -> None:
            progress.update(task, completed=done)
            if done == total:
                progress.stop()

        holder["result"] = engine.generate(ids, sampling, on_token=on_token, on_prefill=on_prefill)
    console.print()
    return holder["result"]


def _sliding_window_row(dims, capacity: int, dtype, mode: KVMode) -> tuple[str, str] | None:
    """The summary row of what sliding-window layers save, or None when no layer slides at this context."""
    local = dims.local_windows(capacity)
    if not local:
        return None
    return ("sliding-window layers", sliding_window_text(dims, capacity, dtype, mode is not KVMode.DENSE_DEVICE))


def sliding_window_text(dims, capacity: int, dtype, offload: bool) -> str:
    """``N of L layers keep a W-token ring on the device: ...`` with the KV bytes they save."""
    local = dims.local_windows(capacity)
    footprint = dims.kv_footprint(capacity, dtype)
    widths = sorted(set(local.values()))
    where = "host KV store" if offload else "KV cache"
    return (f"{len(local)} of {dims.num_layers} layers keep a {'/'.join(map(str, widths))}-token ring on the device "
            f"({footprint.ring_bytes:,} bytes); {where} {footprint.global_bytes:,} bytes instead of "
            f"{footprint.all_layers_bytes:,} (saves {footprint.saved_bytes:,} bytes)")


def _budget_row(config: EngineConfig, length: int) -> tuple[str, str] | None:
    """What the budget came to at the last decode step (the sequence ``length`` tokens long, its newest included):
    sinks, the window that follows the budget and the selected rest, per layer and KV head; None unless the sparse
    mode ran a decode step under a budget."""
    from offload_engine.selection import Selector

    budget = config.selection.budget
    if config.mode is not KVMode.SPARSE_OFFLOAD or budget is None or length <= 0:
        return None
    selector = Selector(config.selection, config.context, frozenset())
    tokens = selector.budget_tokens(length)
    label = f"{tokens:,} of {length:,} tokens"
    label = f"{budget} = {label}" if budget.fraction is not None else label
    if tokens >= length:
        return "budget (last step)", f"{label}: every token (the budget covers the sequence)"
    sinks, window, bonus = config.selection.sinks, selector.window(length), config.selection.keep_bonus
    return "budget (last step)", (f"{label} per layer and KV head: sinks {sinks}, window {window}, "
                                  f"{tokens - sinks - window:,} selected" + (f", keep bonus {bonus:g}" if bonus else ""))


def _weights_row(adapter) -> tuple[str, str] | None:
    """Where a decode step read the weights from: a GGUF model's blocks on the CPU (``gguf_weights``), else nothing
    to say (the model's own tensors)."""
    from offload_engine.models import GGUF_BLOCKS_SWITCH

    attached = adapter.weight_blocks
    if attached is None or attached.matrices == 0:
        return None
    return "weights (decode)", f"{attached.summary()}; {GGUF_BLOCKS_SWITCH}=0 for float32"


def _print_summary(result: GenerationResult, extra: list[tuple[str, str]] | tuple = ()) -> None:
    s = result.stats
    table = Table(title="tbrun generate", show_header=False, title_justify="left")
    rows = [
        ("mode / policy", f"{s.mode} / {s.policy}"),
        ("prompt tokens", f"{s.prompt_tokens}"),
        ("new tokens", f"{s.new_tokens} ({result.finish_reason})"),
        ("prefill", f"{s.prefill_seconds:.2f} s"),
        ("decode", f"{s.ms_per_step:.1f} ms/step (median), {s.tokens_per_second:.1f} tokens/s"),
        ("KV moved host->device", f"{s.h2d_bytes_per_step / 2**20:.2f} MiB/step"),
        ("KV on device", f"prefill peak {s.prefill_peak_kv_bytes / 2**20:.1f} MiB, decode {s.decode_kv_bytes / 2**20:.1f} MiB"),
        ("peak memory", f"host {s.peak_host_bytes / 2**30:.2f} GiB, device {s.peak_device_bytes / 2**30:.2f} GiB"),
    ]
    if s.predictor:
        keys = f", projected keys {s.compact_keys}" if s.compact_keys else ""
        rows.insert(1, ("predictor", s.predictor + keys))
    rows += extra
    for name, value in rows:
        table.add_row(name, value)
    err_console.print(table)
    for note in s.notes:
        err_console.print(f"note: {note}", markup=False, style="yellow")
    if s.interrupted:
        err_console.print("[yellow]interrupted: the text above is what was generated so far[/]")
