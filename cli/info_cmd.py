"""``tbrun info``: what this machine can do, and how long a context it can hold for a model."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .common import console, user_errors


def register(app: typer.Typer) -> None:
    app.command("info")(user_errors(info))


def info(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to size contexts for (default: embedded)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="KV dtype: bf16, fp16, fp32."),
) -> None:
    """Device, CUDA, pinned memory, cupy, Triton, the gather method and why, host RAM, and the longest
    context that fits."""
    import torch

    from offload_engine.machine import describe_machine
    from offload_engine.memory import UNBOUNDED, MachineMemory, dtype_name, parse_dtype
    from offload_engine.models import model_dims, resolve_model_path
    from offload_engine.policies.tokenbutler import compact_key_dtype

    from .generate_cmd import sliding_window_text

    machine = describe_machine()
    table = Table(title="tbrun info", show_header=False, title_justify="left")
    for key, value in machine.items():
        table.add_row(key, str(value))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype or ("bf16" if device.type == "cuda" else "fp32"))
    source = resolve_model_path(model)
    dims = model_dims(source)
    memory = MachineMemory.now(device)
    per_token = dims.kv_bytes_per_token(torch_dtype)
    table.add_row("model", f"{model or 'embedded SmolLM2-135M-Instruct'} ({dims.num_layers} layers, "
                           f"{dims.num_kv_heads} KV heads x {dims.head_dim}, {dims.max_positions} positions)")
    table.add_row("KV per token", f"{per_token / 1024:.1f} KiB ({dtype_name(torch_dtype)})")
    table.add_row("tokenbutler's projected keys", f"{dtype_name(compact_key_dtype('auto', torch_dtype, device))} "
                                                  "(--key-dtype auto, this model dtype and device)")
    if dims.local_windows(dims.max_positions):
        table.add_row(f"sliding-window layers (at {dims.max_positions:,} tokens)",
                      sliding_window_text(dims, dims.max_positions, torch_dtype, offload=True))
    for offload in (False, True):
        fits = memory.max_context(dims, torch_dtype, offload)
        where = "host memory (--offload)" if offload else ("GPU memory" if device.type == "cuda" else "memory (CPU run)")
        if fits >= UNBOUNDED:
            table.add_row(f"max context, KV in {where}", "unbounded by KV (every layer has a sliding window); "
                                                         f"the model's positions stop at {dims.max_positions}")
            continue
        note = "" if fits <= dims.max_positions else f"; the model's positions stop at {dims.max_positions}"
        table.add_row(f"max context, KV in {where}", f"{fits:,} tokens{note}")
    console.print(table)
