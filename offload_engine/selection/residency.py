"""Which selected tokens are in the device slots, and what must be fetched.

``ResidencyMap`` is bookkeeping only: it holds token positions, never K or V. One map serves a
bank of rows, one row per (layer, KV head), so a producer's whole group of layers is updated by
one call with no Python loop over layers or heads. On a device it runs with plain tensor
operations there (no read-back), tested on CPU tensors (``on_host=False``); on the CPU the same
rules run in one native call on the tensors' memory (``offload_engine/native``), or as numpy
operations where the native kernels are not built; both tested against the torch path.

A token fetched once stays in its slot until the slot is needed for another token; tokens that
were selected at the previous step and are selected again are not fetched again (delta fetch).
Empty slots are always filled first and lowest first, and a filled slot never empties, so the
slots in use form a prefix: at most ``min(num_slots, hi - lo)`` when every selected position lies
in ``[lo, hi)``. Attention reads only that prefix, a bound known on the host without a sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import native
from .pages import PageRows
from .ranking import HeldTerms
from .scores import GroupScores

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
    the trash slot that absorbs padding copies. ``slot_of [R, capacity]`` int32: the inverse, the
    slot holding each position (-1: not resident), so membership is a gather, not a search
    (4 bytes per position and row: 1/32 of the K and V it indexes at head_dim 64, float32).
    ``active [R, num_slots + 1]``: the slot belongs to the current selection (only active slots
    are attended); pass a view to have the map write the attention mask in place.
    """

    @staticmethod
    def bytes_needed(rows: int, num_slots: int, capacity: int) -> int:
        """Bytes of the tables a map of these arguments allocates, ``slot_pos`` (int64) and ``slot_of`` (int32);
        ``active`` is the caller's (a bank's mask) or ``rows * (num_slots + 1)`` bytes more."""
        return rows * ((num_slots + 1) * 8 + (capacity + 1) * 4)

    def __init__(self, rows: int, num_slots: int, device: torch.device, capacity: int,
                 active: torch.Tensor | None = None, on_host: bool | None = None):
        self.num_slots = num_slots
        # CPU tensors: the update runs as numpy array operations on the same memory (a few
        # microseconds each where a torch call costs ten or more: the map is ~40 small operations
        # per producer and step). Device tensors: torch, with no read-back.
        self.on_host = device.type == "cpu" if on_host is None else on_host
        if self.on_host:
            native.kernels()  # built (the first time on this machine) or loaded now, not in a timed step
        self.slot_pos = torch.full((rows, num_slots + 1), EMPTY, dtype=torch.long, device=device)
        # one spare column (index ``capacity``) takes the writes of padding entries
        self.slot_of = torch.full((rows, capacity + 1), EMPTY, dtype=torch.int32, device=device)
        self._scratch = capacity
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
        self._bound: dict[tuple, native.BoundSelectRows] = {}  # bind_select's, per slice of rows

    @property
    def capacity(self) -> int:
        """Positions the map can hold: ``[0, capacity)``."""
        return self._scratch

    def clear(self) -> None:
        """Every slot empty and inactive, appending again: the state of a new map."""
        self.slot_pos.fill_(EMPTY)
        self.slot_of.fill_(EMPTY)
        self.active.fill_(False)  # in place: it may be a view of the bank's attention mask
        self.appending, self.held_upto = True, None

    def update(self, selected: torch.Tensor, rows: slice = slice(None)) -> FetchPlan:
        """Make ``selected [r, k]`` (distinct positions per row, ``-1`` padding, k <= num_slots) the
        active set of ``rows``; any order. Returns the copies that bring the missing positions in;
        resident ones stay where they are. Every step is a gather, scatter or prefix sum over
        ``k`` or ``num_slots`` entries: no sort, no search, no read-back on CUDA.
        """
        if selected.shape[-1] > self.num_slots:
            raise ValueError(f"{selected.shape[-1]} selected tokens exceed {self.num_slots} slots")
        self.appending = False
        if self.on_host:
            return self._update_on_host(selected, rows)
        slot_pos, slot_of, n, scratch = self.slot_pos[rows], self.slot_of[rows], self.num_slots, self._scratch
        chosen = selected >= 0
        where = torch.where(chosen, slot_of.gather(-1, torch.where(chosen, selected, scratch)).long(), EMPTY)
        missing = chosen & (where < 0)  # [r, k]
        kept = torch.zeros_like(slot_pos, dtype=torch.bool)  # [r, n + 1]: slots whose token stays selected
        kept.scatter_(-1, torch.where(where >= 0, where, n), True)  # the trash column absorbs the rest
        kept[:, n] = False
        counts = missing.sum(dim=-1)
        width = int(counts.max()) if self._exact_width and counts.numel() else selected.shape[-1]
        # The i-th missing position of a row goes to the i-th free slot: empty slots first, then
        # slots holding a token no longer selected (it stays fetchable for free until overwritten).
        held = slot_pos[:, :n] >= 0
        rank = held.to(torch.uint8) + kept[:, :n].to(torch.uint8)  # 0 empty, 1 stale, 2 kept
        free = _compact(torch.arange(n, device=selected.device).expand(rank.shape[0], -1), rank, 2, width, fill=n)
        fresh = _compact(selected, (~missing).to(torch.uint8), 1, width, fill=0)
        real = torch.arange(width, device=selected.device) < counts.unsqueeze(-1)  # [r, width]
        slots = torch.where(real, free, n)
        positions = torch.where(real, fresh, 0)
        evicted = slot_pos.gather(-1, slots)  # the token each new copy overwrites, or -1
        slot_of.scatter_(-1, torch.where(real & (evicted >= 0), evicted, scratch), EMPTY)
        slot_of.scatter_(-1, torch.where(real, positions, scratch), slots.int())
        slot_of[:, scratch] = EMPTY
        slot_pos.scatter_(-1, slots, torch.where(real, positions, EMPTY))
        slot_pos[:, n] = EMPTY
        kept.scatter_(-1, slots, real)
        kept[:, n] = False
        self.active[rows] = kept
        return FetchPlan(positions=positions, slots=slots, counts=counts)

    def _update_on_host(self, selected: torch.Tensor, rows: slice) -> FetchPlan:
        """``update`` on the CPU tensors' memory, by the native kernel where it is built, else as numpy
        operations: the same slots, the same plan."""
        if not isinstance(rows, slice):  # an index tensor would give copies, and the writes would be lost
            raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
        chosen_all = selected.numpy()
        slot_pos, slot_of, active = self.slot_pos[rows].numpy(), self.slot_of[rows].numpy(), self.active[rows].numpy()
        n, count = self.num_slots, chosen_all.shape[0]
        if chosen_all.size and chosen_all.max() >= self._scratch:  # a flat lookup would read the next row
            raise ValueError(f"selected position {int(chosen_all.max())} is past the capacity {self._scratch}")
        kernels = native.kernels()
        if kernels is not None:
            positions, slots, counts = kernels.residency_update(chosen_all, slot_pos, slot_of, active)
            return FetchPlan(positions=torch.from_numpy(positions), slots=torch.from_numpy(slots),
                             counts=torch.from_numpy(counts))
        chosen = chosen_all >= 0
        # gathers and scatters through flat row-offset indices (numpy's *_along_axis build 2-D index arrays)
        row_starts = np.arange(count, dtype=np.int64)[:, None]
        looked_up = np.where(chosen, chosen_all, self._scratch) + row_starts * slot_of.shape[1]
        where = slot_of.reshape(-1).take(looked_up)  # [r, k]; -1: not resident
        missing = chosen & (where < 0)
        kept = np.zeros((count, n + 1), dtype=bool)
        kept.reshape(-1)[np.where(where >= 0, where, n) + row_starts * (n + 1)] = True
        kept[:, n] = False
        counts = missing.sum(axis=-1, dtype=np.int64)
        width = int(counts.max()) if count else 0
        # free slots: empty first, then stale (held, no longer selected), each lowest first; kept last
        rank = (slot_pos[:, :n] >= 0).astype(np.int8) + kept[:, :n]
        free = np.argsort(rank, axis=-1, kind="stable")[:, :width]
        fresh = np.take_along_axis(chosen_all, np.argsort(~missing, axis=-1, kind="stable")[:, :width], axis=-1)
        real = np.arange(width) < counts[:, None]
        slots = np.where(real, free, n)
        positions = np.where(real, fresh, 0)
        at_row, at = np.nonzero(real)
        into, new = slots[at_row, at], positions[at_row, at]
        evicted = slot_pos[at_row, into]
        gone = evicted >= 0
        slot_of[at_row[gone], evicted[gone]] = EMPTY
        slot_of[at_row, new] = into
        slot_pos[at_row, into] = new
        kept[at_row, into] = True
        active[...] = kept
        return FetchPlan(positions=torch.from_numpy(positions), slots=torch.from_numpy(slots),
                         counts=torch.from_numpy(counts))

    def select(self, scores: GroupScores, keep: int, rows: slice, held: HeldTerms | None = None) -> FetchPlan | None:
        """``update(topk_positions(scores.compute(), keep, scores.lo, ordered=False), rows)`` in one native
        call: each row scored, its top ``keep`` taken and its residency updated while its scores are in the
        cache. None (nothing done) where that call does not apply: a map off the host, no native kernels,
        keys the kernel does not read, rows that are not the scores' rows, or a step ``accepts`` refuses; the
        caller then takes the separate steps. ``rows``: the map's rows of ``scores``' ``[Lg * KvH]`` rows, a slice.
        ``held``: the scores of the positions the rows' slots hold raised first (``ranking.favour_held``).
        """
        run = self.prepare_select(scores, keep, rows, held)
        return None if run is None else run()

    def prepare_select(self, scores: GroupScores, keep: int, rows: slice, held: HeldTerms | None = None
                       ) -> Callable[[], FetchPlan] | None:
        """``select`` in two halves: everything checked now, and the native call returned to be made later,
        on another thread (the copy thread), before anything reads the rows. None where ``select`` is. ``held``:
        the top-k's hysteresis, the scores of the positions held in the rows' slots raised (``favour_held``)."""
        if not isinstance(rows, slice):  # an index tensor would give copies, and the writes would be lost
            raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
        native_rows = scores.native_rows() if self.on_host and native.kernels() is not None else None
        if native_rows is None:
            return None
        queries, keys, scales = native_rows
        pages = scores.page_rows()
        if scores.pages is not None and pages is None:  # a prefilter the native kernel does not take
            return None
        bound = self.bind_select(rows, keys, scores.reduction, scales, pages)
        if bound is None or not self.accepts(bound, scores.m, scores.lo, scores.hi, keep):
            return None
        return self.prepare_bound(bound, queries.contiguous(), scores.m, scores.lo, scores.hi, keep, held=held)

    def bind_select(self, rows: slice, keys: torch.Tensor, reduction: str, scales: torch.Tensor | None = None,
                    pages: PageRows | None = None, copies: "native.RowCopies | None" = None,
                    network: "native.QueryNetwork | None" = None, reweight: "native.Reweight | None" = None
                    ) -> "native.BoundSelectRows | None":
        """The one-call selection of ``rows`` (a slice) bound to these keys ``[R, d', capacity]`` (and int8 keys'
        ``scales`` ``[R, capacity]``, and the page prefilter's bounds ``pages``) and to the map's tables, checked
        once: kept per slice of rows (and whether it copies) and bound again only when the keys' memory or
        layout, the rule or the prefilter changes. ``copies``: the call also copies what it places (the
        backend's ``RowCopies`` of those rows); ``network``: it may run the producer's query network first
        (``native.QueryNetwork``); ``reweight``: it selects by critical(...)'s two stages (``native.Reweight``).
        None where the map is off the host, the kernels are not built, or ``rows`` are not the keys' rows."""
        kernels = native.kernels() if self.on_host else None
        if kernels is None or len(range(self.slot_pos.shape[0])[rows]) != keys.shape[0]:
            return None
        place = (rows.start, rows.stop, rows.step, copies is not None, network is not None)
        bound = self._bound.get(place)
        if bound is None or not bound.matches(keys, reduction, scales, pages, copies, network, reweight):
            tables = (self.slot_pos[rows].numpy(), self.slot_of[rows].numpy(), self.active[rows].numpy())
            bound = self._bound[place] = kernels.bind_select_rows(keys, *tables, reduction, scales, pages, copies,
                                                                  network, reweight)
        return bound

    def unbind(self) -> None:
        """Drop the bound selections (and the compact keys they hold): a closed backend's map keeps no policy
        memory alive."""
        self._bound.clear()

    def accepts(self, bound: "native.BoundSelectRows", tokens: int, lo: int, hi: int, keep: int) -> bool:
        """Whether the bound selection takes this step: the top ``keep`` of candidates ``[lo, hi)`` among the
        first ``tokens`` keys, with ``keep`` in ``[1, min(candidates, num_slots)]``, every position within the
        map's and the keys' capacity, and the native kernels still switched on (``TBRUN_NATIVE``). The one set
        of conditions of the one-call selection (``prepare_select``, the planner's ``NativeProducer``)."""
        return (0 <= lo < hi <= tokens <= min(self._scratch, bound.capacity)
                and 0 < keep <= min(hi - lo, self.num_slots) and native.enabled())

    def prepare_bound(self, bound: "native.BoundSelectRows", queries: torch.Tensor | None, tokens: int, lo: int,
                      hi: int, keep: int, x: torch.Tensor | None = None, held: HeldTerms | None = None
                      ) -> Callable[[], FetchPlan]:
        """The bound selection of a step ``accepts`` took, to be made now or on the copy thread: queries
        ``[R, g, d']`` float32, contiguous (any scale folded in), or None and the producer's input ``x`` for a
        selection bound with its query network. From here the rows no longer hold the candidates in order
        (``appending`` is off). ``held``: as for ``prepare_select``."""
        self.appending = False

        def run() -> FetchPlan:
            positions, slots, counts = bound(queries, tokens, lo, hi, keep, x, held)
            return FetchPlan(positions=torch.from_numpy(positions), slots=torch.from_numpy(slots),
                             counts=torch.from_numpy(counts))

        return run

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
        self.slot_of[:, start:hi] = (new - lo).int()
        self.active[:, start - lo : hi - lo] = True
        self.held_upto = hi
        positions = new.expand(rows, -1)
        counts = torch.full((rows,), hi - start, dtype=torch.long, device=device)
        return FetchPlan(positions=positions, slots=positions - lo, counts=counts)

    def held(self, rows: slice, lo: int, hi: int) -> torch.Tensor:
        """Whether each position of ``[lo, hi)`` is in a slot of ``rows`` (selected now, or before and not yet
        overwritten: fetched again for free): ``[r, hi - lo]`` bool, on the map's device."""
        return self.slot_of[rows, lo:hi] >= 0

    def active_positions(self, rows: slice = slice(None)) -> torch.Tensor:
        """Positions of the active slots, ``-1`` elsewhere: ``[r, num_slots + 1]``."""
        return torch.where(self.active[rows], self.slot_pos[rows], EMPTY)


def _compact(values: torch.Tensor, rank: torch.Tensor, levels: int, width: int, fill: int) -> torch.Tensor:
    """Per row, the entries of ``values [r, n]`` whose ``rank [r, n]`` is below ``levels``, lowest rank
    first and in index order within a rank, packed into ``[r, width]`` (``fill`` where short).

    A stable counting sort by prefix sums (``levels`` is 1 or 2): no comparison sort, no host read.
    """
    rows = values.shape[0]
    place = torch.full_like(values, width)  # width: the spare column for skipped or overflowing entries
    base = torch.zeros(rows, 1, dtype=values.dtype, device=values.device)
    for level in range(levels):
        here = rank == level
        place = torch.where(here, base + torch.cumsum(here, dim=-1) - 1, place)
        base = base + here.sum(dim=-1, keepdim=True)
    out = torch.full((rows, width + 1), fill, dtype=values.dtype, device=values.device)
    out.scatter_(-1, place.clamp(max=width), values)
    return out[:, :width]
