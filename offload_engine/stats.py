"""What a generation measured: timings, bytes moved, memory peaks."""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict, dataclass, field

import torch


@dataclass(slots=True)
class GenerationStats:
    """Statistics of one ``generate`` call; ``decode_ms`` has one entry per decode step."""

    mode: str = ""
    policy: str = ""
    predictor: str = ""  # tokenbutler's checkpoint folder and weights hash (TokenButlerPolicy.predictor_source)
    compact_keys: str = ""  # the dtype tokenbutler's compact cache stores projected keys in (int8, bfloat16, ...)
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    h2d_bytes: list[int] = field(default_factory=list)  # host-to-device KV bytes per decode step
    prefill_peak_kv_bytes: int = 0  # most KV held on the compute device during prefill
    decode_kv_bytes: int = 0  # KV held on the compute device during decode
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)  # things to tell the user once (budget floor, ...)
    breakdown: dict | None = None  # per-phase ms per step and share, when EngineConfig.profile is set
    step_phases_ms: list[dict] = field(default_factory=list)  # with profile: each decode step's phase ms, in order
    attended_share: float | None = None  # share of the cached tokens attended, with EngineConfig.count_attended

    @property
    def ms_per_step(self) -> float:
        return statistics.median(self.decode_ms) if self.decode_ms else 0.0

    @property
    def tokens_per_second(self) -> float:
        total = sum(self.decode_ms)
        return 1000.0 * len(self.decode_ms) / total if total else 0.0

    @property
    def h2d_bytes_per_step(self) -> float:
        return statistics.mean(self.h2d_bytes) if self.h2d_bytes else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(ms_per_step=self.ms_per_step, tokens_per_second=self.tokens_per_second,
                    h2d_bytes_per_step=self.h2d_bytes_per_step)
        return data


def peak_host_bytes() -> int:
    """The process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes(device: torch.device) -> int:
    """Peak allocated memory on a CUDA device; 0 on the CPU (see ``peak_host_bytes``)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
