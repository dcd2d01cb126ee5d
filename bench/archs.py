"""Real architectures with random weights, for latency runs that download nothing.

``archs/<name>.json`` holds a transformers config (model type, sizes, GQA, RoPE parameters).
A decode step's time does not depend on the weights' values, so a model built from the config
with random weights on the target device times like the released checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from offload_engine.errors import ConfigError
from offload_engine.models import ModelAdapter

ARCH_DIR = Path(__file__).resolve().parent / "archs"


def arch_names() -> list[str]:
    """The architectures shipped in ``archs/`` (file names without ``.json``)."""
    return sorted(path.stem for path in ARCH_DIR.glob("*.json"))


def arch_path(name_or_path: str) -> Path:
    """``llama-3.1-8b`` -> ``archs/llama-3.1-8b.json``; an existing ``.json`` path is used as is."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file():
        return path
    shipped = ARCH_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"--arch {name_or_path!r} is neither a config file nor one of: {', '.join(arch_names())}.")


def arch_config(name_or_path: str):
    """The transformers config of an architecture (keys starting with ``_`` are comments)."""
    from transformers import AutoConfig

    fields = json.loads(arch_path(name_or_path).read_text())
    fields = {key: value for key, value in fields.items() if not key.startswith("_")}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{arch_path(name_or_path)} has no model_type.")
    return AutoConfig.for_model(model_type, **fields)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (as deployed), fp32 on the CPU (the engine's CPU path)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_random_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None,
                       seed: int = 0) -> ModelAdapter:
    """A randomly initialised model of the architecture, created directly on ``device``.

    Weights are materialised on the device (no host copy of an 8B model), in ``dtype``
    (default: bf16 on CUDA, fp32 on CPU). Returns the engine's adapter (no tokenizer).
    """
    from transformers import AutoModelForCausalLM

    config = arch_config(name_or_path)
    dtype = dtype or default_dtype(device)
    check_fits(config, dtype, torch.device(device))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return ModelAdapter(model.eval())


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in ``dtype``, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_fits(config, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, weights that the device (or host, on CPU) cannot hold."""
    import psutil

    from offload_engine.errors import InsufficientMemoryError

    needed = weight_bytes(config, dtype)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if needed > free:
        raise InsufficientMemoryError(
            f"the random-weight model needs {needed / 2**30:.1f} GiB on {device} but {free / 2**30:.1f} GiB is free: "
            "pick a smaller --arch (tiny-llama runs anywhere)."
        )
