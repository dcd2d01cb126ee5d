"""Sliding-window ("local") layers: a device ring of their last ``window`` tokens, nothing else.

A layer whose sliding window is shorter than the context (Gemma 3's local layers, Mistral with
``sliding_window``) never attends a token older than its window, so it never needs the host
store: every backend keeps its ring on the device, never offloads it and never selects for it.
Only global layers go through the host store and selection.

Token ``p`` lives in ring slot ``p % window``. Attention is order-free (RoPE is already applied to
the keys), so a decode step attends the filled slots as they lie: all ``window`` of them once the
sequence is that long, else the prefix ``[0, p]``.
"""

from __future__ import annotations

import torch

from ..models import ModelDims
from .base import DecodeKV


class LocalRings:
    """``keys[l]``, ``values[l]``: ``[KvH, window_l, D]`` on the device, for every local layer ``l``."""

    def __init__(self, dims: ModelDims, capacity: int, dtype: torch.dtype, device: torch.device):
        self.windows = dims.local_windows(capacity)
        shapes = {layer: (dims.num_kv_heads, window, dims.head_dim) for layer, window in self.windows.items()}
        self.keys = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer, shape in shapes.items()}
        self.values = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer, shape in shapes.items()}

    def __contains__(self, layer: int) -> bool:
        return layer in self.windows

    @staticmethod
    def bytes_needed(dims: ModelDims, capacity: int, dtype: torch.dtype) -> int:
        """Device bytes of the rings at a ``capacity``-token context (for checks before allocating)."""
        return dims.kv_footprint(capacity, dtype).ring_bytes

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the prompt's last ``window`` tokens. k, v ``[KvH, T, D]``."""
        window, length = self.windows[layer], k.shape[1]
        first = max(0, length - window)
        slots = torch.arange(first, length, device=k.device) % window
        self.keys[layer][:, slots] = k[:, first:]
        self.values[layer][:, slots] = v[:, first:]

    def decode(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> DecodeKV:
        """Write the token at ``position`` (k, v ``[KvH, D]``) over the oldest one; the ring to attend."""
        window = self.windows[layer]
        self.keys[layer][:, position % window] = k
        self.values[layer][:, position % window] = v
        filled = min(position + 1, window)
        return DecodeKV(self.keys[layer][:, :filled], self.values[layer][:, :filled], None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys.values()) + sum(t.nbytes for t in self.values.values())

    def close(self) -> None:
        self.keys, self.values = {}, {}
