"""Which selected tokens of one layer are in its device slots, and what must be fetched.

``ResidencyMap`` is bookkeeping only: it holds token positions, never K or V. It runs with
plain tensor operations on whatever device its tensors live on, so it is tested on the CPU.
A token fetched once stays in its slot until the slot is needed for another token; tokens that
were selected at the previous step and are selected again are not fetched again (delta fetch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EMPTY = -1


@dataclass(slots=True)
class FetchPlan:
    """Copies to make: host position ``positions[h, j]`` into slot ``slots[h, j]``.

    Both ``[KvH, m]`` long. Padding pairs point at the trash slot (index ``num_slots``) and read
    position 0, so a gather needs no mask. ``counts[h]`` is the number of real copies of head h.
    """

    positions: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor

    @property
    def width(self) -> int:
        return self.positions.shape[-1]


class ResidencyMap:
    """Slot bookkeeping of the selected-token region of one layer's working set.

    ``slot_pos [KvH, num_slots + 1]``: the position held by each slot (-1: empty); the last
    column is the trash slot that absorbs padding copies. ``active [KvH, num_slots + 1]``: the
    slot belongs to the current selection (only active slots are attended).
    """

    def __init__(self, num_kv_heads: int, num_slots: int, device: torch.device):
        self.num_slots = num_slots
        self.slot_pos = torch.full((num_kv_heads, num_slots + 1), _EMPTY, dtype=torch.long, device=device)
        self.active = torch.zeros(num_kv_heads, num_slots + 1, dtype=torch.bool, device=device)
        self._exact_width = device.type == "cpu"  # reading the count back costs a sync on CUDA

    def update(self, selected: torch.Tensor) -> FetchPlan:
        """Make ``selected`` ``[KvH, k]`` (positions, ``-1`` padding, k <= num_slots) the active set.

        Returns the copies that bring the missing positions in; resident ones stay where they are.
        """
        if selected.shape[-1] > self.num_slots:
            raise ValueError(f"{selected.shape[-1]} selected tokens exceed {self.num_slots} slots")
        held = self.slot_pos[:, : self.num_slots]
        kept = _is_member(held, selected) & (held >= 0)  # slots whose token is selected again
        missing = _is_member(selected, held, negate=True) & (selected >= 0)
        counts = missing.sum(dim=-1)
        width = int(counts.max()) if self._exact_width and counts.numel() else selected.shape[-1]
        # The i-th missing position of a head goes to the i-th free slot: empty slots first, then
        # slots holding a token no longer selected (it stays fetchable for free until overwritten).
        missing_first = torch.argsort((~missing).to(torch.int8), dim=-1, stable=True)[:, :width]
        slot_rank = 2 * kept.to(torch.int8) + (held >= 0).to(torch.int8)
        free_first = torch.argsort(slot_rank, dim=-1, stable=True)[:, :width]
        real = torch.arange(width, device=selected.device) < counts.unsqueeze(-1)
        positions = torch.where(real, selected.gather(-1, missing_first), torch.zeros_like(missing_first))
        slots = torch.where(real, free_first, torch.full_like(free_first, self.num_slots))
        self.slot_pos.scatter_(-1, slots, torch.where(real, positions, torch.full_like(positions, _EMPTY)))
        self.slot_pos[:, self.num_slots] = _EMPTY
        self.active = _is_member(self.slot_pos, selected) & (self.slot_pos >= 0)
        return FetchPlan(positions=positions, slots=slots, counts=counts)

    def active_positions(self) -> torch.Tensor:
        """Positions of the active slots, ``-1`` elsewhere: ``[KvH, num_slots + 1]``."""
        return torch.where(self.active, self.slot_pos, torch.full_like(self.slot_pos, _EMPTY))


def _is_member(values: torch.Tensor, pool: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """Per row, whether each of ``values [R, a]`` occurs in ``pool [R, b]`` (-1 never matches).

    Sort-and-search, so the cost is O((a + b) log b) per row with no Python loop.
    """
    if pool.shape[-1] == 0:
        found = torch.zeros_like(values, dtype=torch.bool)
    else:
        big = torch.iinfo(torch.long).max
        sorted_pool, _ = torch.sort(torch.where(pool < 0, torch.full_like(pool, big), pool), dim=-1)
        probe = torch.where(values < 0, torch.full_like(values, big - 1), values)
        index = torch.searchsorted(sorted_pool, probe).clamp(max=pool.shape[-1] - 1)
        found = sorted_pool.gather(-1, index) == probe
    return ~found if negate else found
