"""The contract between the engine's layer loop and where the KV cache lives.

A backend owns every KV tensor of one sequence. The engine hands it each layer's new K and V
(prompt in prefill, one token per decode step) and gets back what attention must read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiling import PhaseClock


@dataclass(slots=True)
class DecodeKV:
    """What one layer's decode attention reads.

    keys, values ``[KvH, N, D]``; valid ``[KvH, N]`` bool, or None when every slot is attended.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None


class KVBackend:
    """Base class of the three KV modes (dense on device, dense offload, sparse offload)."""

    # which of x and q ``prefill_layer`` reads (``Policy.prefill_reads``: a timing fill builds only these)
    prefill_reads: frozenset[str] = frozenset({"x", "q"})

    def prefill_layer(self, layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the prompt's KV of one layer. x ``[T, E]``, q ``[H, T, D]``, k, v ``[KvH, T, D]``."""
        raise NotImplementedError

    def begin_step(self, position: int) -> None:
        """A decode step for the token at ``position`` starts (before layer 0)."""

    def decode_layer(self, layer: int, position: int, x: torch.Tensor, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> DecodeKV:
        """Append the token's k, v ``[KvH, D]`` and return the KV to attend (x ``[E]``, q ``[H, D]``)."""
        raise NotImplementedError

    def end_layer(self, layer: int) -> None:
        """The layer's attention has been enqueued: its buffers may be refilled after it."""

    def end_step(self) -> None:
        """The step is over (its token has been sampled)."""

    def use_clock(self, clock: PhaseClock | None) -> None:
        """Time the phases on ``clock`` (None: an idle one): at construction, and for a backend kept for another
        request (``Session``) that request's own. Backends that time nothing never read it."""
        self.clock = clock or PhaseClock()

    def attended_share(self) -> float | None:
        """The share of the cached tokens the decode steps attended (over layers, dense ones included, KV
        heads and steps, each step's tokens up to its own; sliding-window layers not counted), when
        counted (sparse offload with ``count_attended``); else None."""
        return None

    def h2d_bytes_per_step(self) -> list[int]:
        """Host-to-device KV bytes of every decode step so far; read once, after the generation
        (counts kept on the device are read back here, never inside a step)."""
        return []

    @property
    def notes(self) -> list[str]:
        """Things the user should be told once about this sequence (for example a budget floor)."""
        return []

    # ------------------------------------------------------- prefix reuse (tbrun serve)
    def rewind(self, length: int) -> bool:
        """Keep positions ``[0, length)`` and forget the rest, so the sequence can go on from
        ``length`` with ``extend_layer``. Returns False when this backend cannot (``cannot_rewind``
        says why): the caller then builds a new one."""
        return False

    def cannot_rewind(self) -> str:
        """Why ``rewind`` returns False, in words for the user; "" when it can rewind."""
        return "this KV backend keeps no reusable prefix"

    def reusable_tokens(self, held: int) -> int:
        """How many of the first ``held`` positions a later prompt may reuse: those whose KV is what
        a prefill of the same tokens computes (all of them in the dense modes)."""
        return held

    def prefix_kv(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored k, v ``[KvH, length, D]`` of positions ``[0, length)`` of ``layer``, on the
        compute device (only after ``rewind`` returned True)."""
        raise NotImplementedError

    def extend_layer(self, layer: int, start: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Store new tokens' KV of one layer at positions ``[start, start + T)`` after a rewind.
        x ``[T, E]``, q ``[H, T, D]``, k, v ``[KvH, T, D]``."""
        raise NotImplementedError

    def device_kv_bytes(self) -> int:
        """KV bytes this backend holds on the compute device now."""
        return 0

    def close(self) -> None:
        """Free every buffer (pinned host memory first)."""
