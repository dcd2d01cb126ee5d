"""The device working set of the sparse mode: what attention reads at a decode step.

Layers are grouped in banks of equal shape (the selected layers in one, the dense layers in
another). A bank holds K and V for all its layers, ``[Lb, KvH, S + W + n_sel + 1, D]``, in four
regions along the slot axis:

    [ sinks (S) | local-window ring (W) | selected slots (n_sel) | trash (1) ]

and the attention mask ``valid [Lb, KvH, S + W + n_sel + 1]``. Sinks and the window are written
from tokens computed on the device (in prefill and decode) and are never fetched from the host,
except once after a rewind (prefix reuse), when the kept prefix's are read back from the host store.
The selected slots are filled by the prefetcher following the bank's ``ResidencyMap``, which
writes the selected region of ``valid`` in place; the sink and window regions of ``valid`` are
written once per step for every layer at once. The trash slot absorbs padding copies and is
never attended. Attention reads a prefix of the slots under the mask: no concatenation or
allocation per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection.residency import ResidencyMap


@dataclass(slots=True)
class LayerView:
    """What attention reads for one layer: keys, values ``[KvH, N, D]``, valid ``[KvH, N]``."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor


class Bank:
    """K/V slots, mask and residency of a set of layers that share one slot count."""

    def __init__(self, layers: list[int], kv_heads: int, head_dim: int, fixed: int, num_slots: int,
                 capacity: int, dtype: torch.dtype, device: torch.device):
        self.layers = layers
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.fixed, self.num_slots, self.kv_heads = fixed, num_slots, kv_heads
        total = fixed + num_slots + 1
        self.keys = torch.zeros(len(layers), kv_heads, total, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(len(layers), kv_heads, total, dtype=torch.bool, device=device)
        active = self.valid[:, :, fixed:].view(len(layers) * kv_heads, num_slots + 1)
        self.residency = ResidencyMap(len(layers) * kv_heads, num_slots, device, capacity, active=active)

    def rows(self, layers: range | list[int]) -> slice:
        """The residency rows of ``layers``, which must sit next to each other in this bank."""
        first = self.index[layers[0]]
        if [self.index[layer] for layer in layers] != list(range(first, first + len(layers))):
            raise ValueError(f"layers {list(layers)} are not adjacent in their bank")
        return slice(first * self.kv_heads, (first + len(layers)) * self.kv_heads)

    def adjacent_runs(self, layers: list[int]) -> list[list[int]]:
        """``layers`` split into runs that sit next to each other in this bank (order kept)."""
        runs: list[list[int]] = []
        for layer in layers:
            if runs and self.index[layer] == self.index[runs[-1][-1]] + 1:
                runs[-1].append(layer)
            else:
                runs.append([layer])
        return runs

    def selected_keys(self, layer: int) -> torch.Tensor:
        """``[KvH, n_sel + 1, D]``: the selected slots and the trash slot of ``layer`` (a view)."""
        return self.keys[self.index[layer], :, self.fixed:]

    def selected_values(self, layer: int) -> torch.Tensor:
        return self.values[self.index[layer], :, self.fixed:]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def bytes_needed(layers: int, kv_heads: int, head_dim: int, fixed: int, num_slots: int, capacity: int,
                     dtype: torch.dtype) -> int:
        """Bytes a bank of these arguments allocates (``allocated_bytes``), before making it."""
        slots = fixed + num_slots + 1
        return (layers * kv_heads * slots * (2 * head_dim * dtype.itemsize + 1)  # K, V and the mask
                + ResidencyMap.bytes_needed(layers * kv_heads, num_slots, capacity))  # its map views the mask

    @property
    def allocated_bytes(self) -> int:
        """K, V, the mask and the residency map's own tables."""
        return self.nbytes + self.valid.nbytes + self.residency.slot_pos.nbytes + self.residency.slot_of.nbytes


class WorkingSet:
    """Every layer's working set, in banks, plus the sink and window positions shared by all.

    ``ring_pos [W]``: the position held by each ring slot (-1 empty); a token at position ``p``
    (``p >= S``) lives in ring slot ``p % W`` while it is among the last W tokens. ``W`` is the widest
    window (``--window``); at a step whose window ``w`` is narrower (a budget that follows the
    sequence, ``Selector.window``) the ring's slots older than the last ``w`` tokens are not attended.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, sinks: int, window: int,
                 slots_per_layer: list[int], capacity: int, dtype: torch.dtype, device: torch.device,
                 layers: list[int] | None = None):
        """``layers``: the layers it holds (default all; sliding-window layers have none)."""
        self.sinks, self.window, self.device = sinks, window, device
        held = list(range(num_layers)) if layers is None else list(layers)
        self.first_layer = held[0] if held else None
        by_slots: dict[int, list[int]] = {}
        for layer in held:
            by_slots.setdefault(slots_per_layer[layer], []).append(layer)
        self.banks = [Bank(layers, kv_heads, head_dim, sinks + window, slots, capacity, dtype, device)
                      for slots, layers in by_slots.items()]
        self.bank_of = {layer: bank for bank in self.banks for layer in bank.layers}
        self._views: dict[int, tuple[int, LayerView]] = {}  # layer -> (slots viewed, its view): reused while equal
        self.sink_pos = torch.full((sinks,), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((window,), -1, dtype=torch.long, device=device)
        self.first_attended = 0  # the window's first position at this step (ring slots before it: not attended)
        self._narrow = False  # the last step's window was narrower than the ring

    @property
    def nbytes(self) -> int:
        """K and V of every bank: the KV on the device."""
        return sum(bank.nbytes for bank in self.banks)

    @staticmethod
    def bytes_needed(num_layers: int, kv_heads: int, head_dim: int, sinks: int, window: int,
                     slots_per_layer: list[int], capacity: int, dtype: torch.dtype,
                     layers: list[int] | None = None) -> int:
        """Bytes a ``WorkingSet`` of these arguments (but the device) allocates (``allocated_bytes``): what the
        sparse backend checks before allocating."""
        held = list(range(num_layers)) if layers is None else list(layers)
        by_slots: dict[int, int] = {}
        for layer in held:
            by_slots[slots_per_layer[layer]] = by_slots.get(slots_per_layer[layer], 0) + 1
        banks = sum(Bank.bytes_needed(count, kv_heads, head_dim, sinks + window, slots, capacity, dtype)
                    for slots, count in by_slots.items())
        return banks + (sinks + window) * 8  # sink_pos, ring_pos (int64)

    @property
    def allocated_bytes(self) -> int:
        return sum(bank.allocated_bytes for bank in self.banks) + self.sink_pos.nbytes + self.ring_pos.nbytes

    def slot_of(self, position: int) -> int:
        """The ring (or sink) slot a decode token at ``position`` is written to (``write_token``)."""
        return position if position < self.sinks else self.sinks + position % self.window

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put the prompt's sinks and last W tokens in place. k, v ``[KvH, T, D]`` on the device."""
        self.write_range(layer, 0, k, v)

    def write_range(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens at positions ``[start, end)`` (k, v ``[KvH, end - start, D]`` on the device) whose
        place is a sink or the ring once the sequence is ``end`` long: the sinks among them and the
        last W. The ring's older slots keep what they hold (a prefix continued after ``rewind``)."""
        end = start + k.shape[1]
        bank = self.bank_of[layer]
        keys, values = bank.keys[bank.index[layer]], bank.values[bank.index[layer]]
        sinks = range(start, max(start, min(self.sinks, end)))
        keys[:, sinks.start:sinks.stop] = k[:, : len(sinks)]
        values[:, sinks.start:sinks.stop] = v[:, : len(sinks)]
        first = min(end, max(start, self.sinks, end - self.window))
        ring = torch.arange(first, end, device=self.device)
        slots = self.sinks + ring % self.window
        keys[:, slots], values[:, slots] = k[:, first - start:], v[:, first - start:]
        if layer == self.first_layer:
            self.sink_pos[sinks.start:sinks.stop] = torch.arange(sinks.start, sinks.stop, device=self.device)
            self.ring_pos[ring % self.window] = ring
            self._publish_fixed()

    def forget(self) -> None:
        """Back to holding no token (before a ``rewind`` puts the kept prefix back): positions and
        masks cleared, every selected slot empty. K/V stay as they are, unattended."""
        self.sink_pos.fill_(-1)
        self.ring_pos.fill_(-1)
        self.first_attended = 0
        for bank in self.banks:
            bank.residency.clear()
        self._publish_fixed()

    def begin_step(self, position: int, window: int | None = None) -> None:
        """Position bookkeeping of the token about to be decoded, once for every layer; ``window``: the
        step's local window ``w <= W`` (default ``W``)."""
        if position < self.sinks:
            self.sink_pos[position] = position
        else:
            self.ring_pos[position % self.window] = position
        narrow = window is not None and window < self.window
        # after the sinks and a full ring, at the widest window, every slot stays valid
        if position < self.sinks + self.window or narrow or self._narrow:
            self._publish_fixed(max(0, position + 1 - (window if narrow else self.window)))
        self._narrow = narrow

    def _publish_fixed(self, first: int = 0) -> None:
        """The sink and ring regions of every bank's mask: slots that hold a position ``>= first`` (sinks: any)."""
        self.first_attended = first
        fixed_valid = torch.cat([self.sink_pos >= 0, self.ring_pos >= max(first, self.sinks)])  # [S + W]
        for bank in self.banks:
            bank.valid[:, :, : bank.fixed] = fixed_valid

    def write_token(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the decoded token's k, v ``[KvH, D]`` into its ring (or sink) slot."""
        bank = self.bank_of[layer]
        slot = self.slot_of(position)
        bank.keys[bank.index[layer], :, slot] = k
        bank.values[bank.index[layer], :, slot] = v

    def layer_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``layer``'s keys and values, every slot: ``[KvH, slots, D]`` each (for a bound writer)."""
        bank = self.bank_of[layer]
        return bank.keys[bank.index[layer]], bank.values[bank.index[layer]]

    def view(self, layer: int, used_slots: int) -> LayerView:
        """Sinks, window and the first ``used_slots`` selected slots of ``layer``."""
        bank = self.bank_of[layer]
        end = bank.fixed + min(used_slots, bank.num_slots)
        held = self._views.get(layer)
        if held is not None and held[0] == end:  # views of fixed storage: the last step's, once the slots are full
            return held[1]
        i = bank.index[layer]
        view = LayerView(bank.keys[i, :, :end], bank.values[i, :, :end], bank.valid[i, :, :end])
        self._views[layer] = end, view
        return view

    def positions(self, layer: int, used_slots: int) -> torch.Tensor:
        """The position held by every slot of ``view(layer, used_slots)``, ``-1`` where not attended."""
        bank = self.bank_of[layer]
        ring = torch.where(self.ring_pos >= max(self.first_attended, self.sinks), self.ring_pos, -1)
        fixed = torch.cat([self.sink_pos, ring]).expand(bank.kv_heads, -1)
        selected = bank.residency.active_positions(bank.rows([layer]))[:, : min(used_slots, bank.num_slots)]
        return torch.cat([fixed, selected], dim=-1)
