"""Which selected tokens are in the device slots, and what must be fetched.

``ResidencyMap`` is bookkeeping only: it holds token positions, never K or V. One map serves a
bank of rows, one row per (layer, KV head), so a producer's whole group of layers is updated by
one call with no Python loop over layers or heads. It runs with plain tensor operations on the
device its tensors live on, so it is tested on the CPU.

A token fetched once stays in its slot until the slot is needed for another token; tokens that
were selected at the previous step and are selected again are not fetched again (delta fetch).
Empty slots are always filled first and lowest first, and a filled slot never empties, so the
slots in use form a prefix: at most ``min(num_slots, hi - lo)`` when every selected position lies
in ``[lo, hi)``. Attention reads only that prefix, a bound known on the host without a sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY = -1


@dataclass(slots=True)
class FetchPlan:
    """Copies to make: host position ``positions[r, j]`` into slot ``slots[r, j]``.

    Both ``[R, m]`` long (``R`` rows: (layer, KV head) pairs, layer-major). Padding pairs point at
    the trash slot (index ``num_slots``) and read position 0, so a gather needs no mask;
    ``counts[r]`` is the number of real copies of row r (the first ``counts[r]`` pairs).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor

    @property
    def width(self) -> int:
        return self.positions.shape[-1]

    def rows(self, start: int, stop: int) -> "FetchPlan":
        """The plan of rows ``[start, stop)`` (views)."""
        return FetchPlan(self.positions[start:stop], self.slots[start:stop], self.counts[start:stop])


class ResidencyMap:
    """Slot bookkeeping of the selected-token regions of a bank of rows.

    ``slot_pos [R, num_slots + 1]``: the position held by each slot (-1: empty); the last column is
    the trash slot that absorbs padding copies. ``active [R, num_slots + 1]``: the slot belongs to
    the current selection (only active slots are attended); pass a view to have the map write
    the attention mask in place.
    """

    def __init__(self, rows: int, num_slots: int, device: torch.device, active: torch.Tensor | None = None):
        self.num_slots = num_slots
        self.slot_pos = torch.full((rows, num_slots + 1), EMPTY, dtype=torch.long, device=device)
        if active is None:
            active = torch.zeros(rows, num_slots + 1, dtype=torch.bool, device=device)
        if tuple(active.shape) != (rows, num_slots + 1):
            raise ValueError(f"active mask {tuple(active.shape)} is not [{rows}, {num_slots + 1}]")
        self.active = active
        self._exact_width = device.type == "cpu"  # reading the count back costs a sync on CUDA
        # Until the first ``update``, the rows hold candidates in order (slot j: position lo + j) up to
        # ``held_upto``, so ``append`` can extend them without any search.
        self.appending = True
        self.held_upto: int | None = None

    def update(self, selected: torch.Tensor, rows: slice = slice(None)) -> FetchPlan:
        """Make ``selected [r, k]`` (positions, ``-1`` padding, k <= num_slots) the active set of ``rows``.

        Returns the copies that bring the missing positions in; resident ones stay where they are.
        """
        if selected.shape[-1] > self.num_slots:
            raise ValueError(f"{selected.shape[-1]} selected tokens exceed {self.num_slots} slots")
        self.appending = False
        slot_pos = self.slot_pos[rows]
        held = slot_pos[:, : self.num_slots]
        kept = _is_member(held, selected) & (held >= 0)  # slots whose token is selected again
        missing = _is_member(selected, held, negate=True) & (selected >= 0)
        counts = missing.sum(dim=-1)
        width = int(counts.max()) if self._exact_width and counts.numel() else selected.shape[-1]
        # The i-th missing position of a row goes to the i-th free slot: empty slots first, then
        # slots holding a token no longer selected (it stays fetchable for free until overwritten).
        missing_first = torch.argsort((~missing).to(torch.int8), dim=-1, stable=True)[:, :width]
        slot_rank = 2 * kept.to(torch.int8) + (held >= 0).to(torch.int8)
        free_first = torch.argsort(slot_rank, dim=-1, stable=True)[:, :width]
        real = torch.arange(width, device=selected.device) < counts.unsqueeze(-1)
        positions = torch.where(real, selected.gather(-1, missing_first), torch.zeros_like(missing_first))
        slots = torch.where(real, free_first, torch.full_like(free_first, self.num_slots))
        slot_pos.scatter_(-1, slots, torch.where(real, positions, torch.full_like(positions, EMPTY)))
        slot_pos[:, self.num_slots] = EMPTY
        self.active[rows] = _is_member(slot_pos, selected) & (slot_pos >= 0)
        return FetchPlan(positions=positions, slots=slots, counts=counts)

    def append(self, lo: int, hi: int) -> FetchPlan | None:
        """Select every candidate ``[lo, hi)`` of every row, slot ``j`` holding position ``lo + j``.

        Only positions not yet held are copied. Valid while ``appending`` (no ``update`` yet): no
        sort, no search, the same few operations for any number of rows. None when nothing is new.
        """
        if not self.appending:
            raise RuntimeError("append() after update(): the slots no longer hold the candidates in order")
        start = lo if self.held_upto is None else self.held_upto
        if hi <= start:
            return None
        if hi - lo > self.num_slots:
            raise ValueError(f"{hi - lo} candidates exceed {self.num_slots} slots")
        rows, device = self.slot_pos.shape[0], self.slot_pos.device
        new = torch.arange(start, hi, device=device)
        self.slot_pos[:, start - lo : hi - lo] = new
        self.active[:, start - lo : hi - lo] = True
        self.held_upto = hi
        positions = new.expand(rows, -1)
        counts = torch.full((rows,), hi - start, dtype=torch.long, device=device)
        return FetchPlan(positions=positions, slots=positions - lo, counts=counts)

    def active_positions(self, rows: slice = slice(None)) -> torch.Tensor:
        """Positions of the active slots, ``-1`` elsewhere: ``[r, num_slots + 1]``."""
        return torch.where(self.active[rows], self.slot_pos[rows], EMPTY)


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
