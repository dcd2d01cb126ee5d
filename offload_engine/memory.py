"""Memory arithmetic for a request, done from the model's config before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .cpu_cache.host_store import HOST_HEADROOM_BYTES
from .models import ModelDims

UNBOUNDED = 2**62  # max_context when every layer has a sliding window (KV does not grow with context)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """``bf16`` / ``fp16`` / ``fp32`` -> a torch dtype."""
    from .errors import ConfigError

    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how reports and statistics name a dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class MachineMemory:
    """Free memory now: host (available RAM) and device (free CUDA memory, or None on CPU)."""

    host_available: int
    device_free: int | None

    @classmethod
    def now(cls, device: torch.device) -> "MachineMemory":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        return cls(psutil.virtual_memory().available, free)

    def max_context(self, dims: ModelDims, dtype: torch.dtype, offload: bool) -> int:
        """The longest context whose KV cache fits (ignoring the model's own position limit).

        With offload the KV lives in host memory; without it on the device (host on a CPU run).
        Sliding-window layers hold a fixed ring (on the device) whatever the context: only the
        global layers' KV grows with it. ``UNBOUNDED`` when every layer slides.
        """
        long = dims.kv_footprint(UNBOUNDED, dtype)  # a context past every window
        per_token = dims.kv_bytes_per_token(dtype) // dims.num_layers * len(dims.global_layers(UNBOUNDED))
        room = self.host_available - HOST_HEADROOM_BYTES
        if not offload and self.device_free is not None:
            room = self.device_free
        if not offload or self.device_free is None:  # the rings share this memory (CPU run, or no offload)
            room -= long.ring_bytes
        if per_token == 0:
            return UNBOUNDED if room >= 0 else 0
        return max(0, room // per_token)
