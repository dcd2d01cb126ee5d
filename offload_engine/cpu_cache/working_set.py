"""The device working set of the sparse mode: what attention reads at a decode step.

One buffer per layer for K and one for V, ``[KvH, S + W + n_sel + 1, D]``, in four regions:

    [ sinks (S) | local-window ring (W) | selected slots (n_sel) | trash (1) ]

Sinks and the window are written from tokens computed on the device (in prefill and decode)
and are never fetched from the host. The selected slots are filled by the prefetcher from the
host store following the layer's ``ResidencyMap``. The trash slot absorbs padding copies and is
never attended. Attention runs over the whole buffer with a mask of valid slots, so no
concatenation or allocation happens per step.
"""

from __future__ import annotations

import torch

from .residency import ResidencyMap


class LayerWorkingSet:
    """Device K/V slots of one layer and the positions they hold."""

    def __init__(self, kv_heads: int, head_dim: int, sinks: int, window: int, num_slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.sinks, self.window, self.num_slots = sinks, window, num_slots
        total = sinks + window + num_slots + 1
        self.keys = torch.zeros(kv_heads, total, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.residency = ResidencyMap(kv_heads, num_slots, device)

    @property
    def selected_keys(self) -> torch.Tensor:
        """``[KvH, n_sel + 1, D]``: the selected slots and the trash slot (a view)."""
        return self.keys[:, self.sinks + self.window:]

    @property
    def selected_values(self) -> torch.Tensor:
        return self.values[:, self.sinks + self.window:]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class WorkingSet:
    """All layers' working sets plus the shared position bookkeeping of sinks and window.

    ``ring_pos [W]``: the position held by each ring slot (-1 empty); a token at position ``p``
    (``p >= S``) lives in ring slot ``p % W`` while it is among the last W tokens.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, sinks: int, window: int,
                 slots_per_layer: list[int], dtype: torch.dtype, device: torch.device):
        self.sinks, self.window = sinks, window
        self.layers = [
            LayerWorkingSet(kv_heads, head_dim, sinks, window, slots_per_layer[layer], dtype, device)
            for layer in range(num_layers)
        ]
        self.ring_pos = torch.full((window,), -1, dtype=torch.long, device=device)
        self.sink_pos = torch.full((sinks,), -1, dtype=torch.long, device=device)
        self.device = device

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put the prompt's sinks and last W tokens in place. k, v ``[KvH, T, D]`` on the device."""
        length = k.shape[1]
        ws = self.layers[layer]
        n_sinks = min(self.sinks, length)
        ws.keys[:, :n_sinks] = k[:, :n_sinks]
        ws.values[:, :n_sinks] = v[:, :n_sinks]
        first = min(length, max(self.sinks, length - self.window))
        ring = torch.arange(first, length, device=self.device)
        slots = self.sinks + ring % self.window
        ws.keys[:, slots] = k[:, first:length]
        ws.values[:, slots] = v[:, first:length]
        if layer == 0:
            self.sink_pos[:n_sinks] = torch.arange(n_sinks, device=self.device)
            self.ring_pos[ring % self.window] = ring

    def write_token(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the decoded token's k, v ``[KvH, D]`` into the ring (or a sink slot)."""
        ws = self.layers[layer]
        slot = position if position < self.sinks else self.sinks + position % self.window
        ws.keys[:, slot] = k
        ws.values[:, slot] = v
        if layer == 0:
            if position < self.sinks:
                self.sink_pos[position] = position
            else:
                self.ring_pos[position % self.window] = position

    def positions(self, layer: int) -> torch.Tensor:
        """The position held by every slot of ``layer``, ``-1`` where not attended: ``[KvH, N]``."""
        ws = self.layers[layer]
        kv_heads = ws.keys.shape[0]
        shared = torch.cat([self.sink_pos, self.ring_pos]).expand(kv_heads, -1)
        return torch.cat([shared, ws.residency.active_positions()], dim=-1)
