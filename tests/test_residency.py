"""The residency map and the sparse mode's fetch bookkeeping."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, native
from offload_engine.selection.residency import ResidencyMap
from offload_engine.models import ModelAdapter
from offload_engine.policies.random import RandomPolicy
from tiny_models import tiny_model


# On the CPU tensors' memory: the native kernel (what the CPU runs where it is built) and numpy (where it
# is not); torch (what a GPU runs, here on CPU tensors).
BOOKKEEPING = pytest.mark.parametrize("on_host", ["native", "numpy", "torch"], indirect=True)


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    """The native kernels built once for this module, in a temporary folder."""
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def on_host(request, monkeypatch, native_cache):
    """``on_host`` for the map under test, with the native kernels switched on or off to match."""
    kind = request.param
    monkeypatch.setenv("TBRUN_NATIVE_CACHE", str(native_cache))
    monkeypatch.setenv("TBRUN_NATIVE", "0" if kind == "numpy" else "1")
    native.reset()
    if kind == "native" and native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    yield kind != "torch"
    native.reset()


def active_sets(rmap: ResidencyMap) -> list[set[int]]:
    return active_sets_of(rmap.active_positions())


@BOOKKEEPING
def test_update_activates_exactly_the_selection_and_fetches_only_missing(on_host):
    rmap = ResidencyMap(rows=2, num_slots=5, device=torch.device("cpu"), capacity=64, on_host=on_host)
    first = torch.tensor([[10, 11, 12, -1], [3, 7, -1, -1]])
    plan = rmap.update(first)
    assert plan.counts.tolist() == [3, 2]
    assert active_sets(rmap) == [{10, 11, 12}, {3, 7}]
    second = torch.tensor([[11, 12, 20, 21], [3, 7, 8, -1]])
    plan = rmap.update(second)
    assert plan.counts.tolist() == [2, 1]
    fetched = [set(plan.positions[h, : plan.counts[h]].tolist()) for h in range(2)]
    assert fetched == [{20, 21}, {8}]
    assert active_sets(rmap) == [{11, 12, 20, 21}, {3, 7, 8}]
    # padding copies go to the trash slot, never to a live slot
    assert (plan.slots[1, 1:] == rmap.num_slots).all()


def test_a_position_past_the_capacity_is_refused_before_any_row_changes():
    """On the host the lookups run through flat indices, where position ``capacity`` of row 0 would
    read row 1's entries: the map refuses it and stays as it was."""
    rmap = ResidencyMap(rows=2, num_slots=4, device=torch.device("cpu"), capacity=16, on_host=True)
    rmap.update(torch.tensor([[1, 2], [3, -1]]))
    state = (rmap.slot_pos.clone(), rmap.slot_of.clone(), rmap.active.clone())
    with pytest.raises(ValueError, match="past the capacity 16"):
        rmap.update(torch.tensor([[1, 16], [3, -1]]))
    assert all(torch.equal(a, b) for a, b in zip(state, (rmap.slot_pos, rmap.slot_of, rmap.active)))


@BOOKKEEPING
def test_reselecting_a_stale_token_does_not_fetch_it_again(on_host):
    rmap = ResidencyMap(rows=1, num_slots=4, device=torch.device("cpu"), capacity=64, on_host=on_host)
    rmap.update(torch.tensor([[1, 2]]))
    rmap.update(torch.tensor([[5, -1]]))  # 1 and 2 stay in their slots, inactive
    assert active_sets(rmap) == [{5}]
    plan = rmap.update(torch.tensor([[1, 5]]))
    assert plan.counts.tolist() == [0]
    assert active_sets(rmap) == [{1, 5}]


@BOOKKEEPING
def test_slots_are_never_shared_by_two_positions(on_host):
    rmap = ResidencyMap(rows=3, num_slots=16, device=torch.device("cpu"), capacity=64, on_host=on_host)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        chosen = torch.stack([torch.randperm(40, generator=gen)[:12] for _ in range(3)])
        rmap.update(torch.sort(chosen, dim=-1).values)
        for row, chosen_row in zip(rmap.slot_pos[:, :-1], chosen):
            held = row[row >= 0].tolist()
            assert len(held) == len(set(held))
            assert set(chosen_row.tolist()) <= set(held)


class ReferenceSlots:
    """A plain-Python model of the slot rules: resident tokens stay put; missing ones take empty
    slots first, lowest first, then slots of tokens no longer selected, lowest first."""

    def __init__(self, num_slots: int):
        self.slots = [None] * num_slots

    def update(self, selected: list[int]) -> dict[int, int]:
        """``selected`` in row order: the i-th missing position takes the i-th free slot."""
        resident = {p: s for s, p in enumerate(self.slots) if p is not None}
        missing = [p for p in selected if p not in resident]
        empty = [s for s, p in enumerate(self.slots) if p is None]
        stale = [s for s, p in enumerate(self.slots) if p is not None and p not in selected]
        placed = dict(zip(missing, empty + stale))
        for position, slot in placed.items():
            self.slots[slot] = position
        return placed


@BOOKKEEPING
def test_update_follows_the_slot_rules_and_keeps_its_inverse_map(on_host, rows=3, slots=12, capacity=40):
    rmap = ResidencyMap(rows=rows, num_slots=slots, device=torch.device("cpu"), capacity=capacity, on_host=on_host)
    references = [ReferenceSlots(slots) for _ in range(rows)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        sizes = torch.randint(0, slots + 1, (rows,), generator=generator).tolist()
        chosen = [torch.randperm(capacity, generator=generator)[:n].tolist() for n in sizes]
        width = max(sizes)
        selected = torch.tensor([row + [-1] * (width - len(row)) for row in chosen], dtype=torch.long)
        plan = rmap.update(selected)  # any order within a row
        for r, reference in enumerate(references):
            placed = reference.update(chosen[r])
            n = int(plan.counts[r])
            got = dict(zip(plan.positions[r, :n].tolist(), plan.slots[r, :n].tolist()))
            assert got == placed
            assert (plan.slots[r, n:] == slots).all()  # padding goes to the trash slot
            assert rmap.slot_pos[r, :slots].tolist() == [-1 if p is None else p for p in reference.slots]
            assert active_sets(rmap)[r] == set(chosen[r])
            inverse = {p: s for s, p in enumerate(reference.slots) if p is not None}
            assert {p: int(rmap.slot_of[r, p]) for p in range(capacity) if rmap.slot_of[r, p] >= 0} == inverse


@pytest.mark.parametrize("on_host", ["native", "numpy"], indirect=True)
def test_host_and_torch_bookkeeping_agree_on_row_ranges_and_a_mask_view(on_host, rows=6, slots=10, capacity=50):
    """The planner updates a producer's rows of a bank at a time, and the mask is a view of the bank's."""
    masks = [torch.zeros(rows, 3, slots + 1, dtype=torch.bool) for _ in range(2)]
    maps = [ResidencyMap(rows, slots, torch.device("cpu"), capacity, active=mask[:, 1], on_host=on_host)
            for mask, on_host in zip(masks, (True, False))]
    generator = torch.Generator().manual_seed(2)
    for step in range(40):
        part = slice(0, 2) if step % 3 == 0 else slice(2, 6) if step % 3 == 1 else slice(None)
        count = len(range(rows)[part])
        chosen = torch.stack([torch.randperm(capacity, generator=generator)[:slots] for _ in range(count)])
        chosen[:, torch.randint(0, slots + 1, (1,), generator=generator).item():] = -1  # padding at the end
        plans = [m.update(chosen, part) for m in maps]
        for field in ("positions", "slots", "counts"):
            assert torch.equal(getattr(plans[0], field), getattr(plans[1], field)), (step, field)
        assert torch.equal(maps[0].slot_pos, maps[1].slot_pos) and torch.equal(maps[0].slot_of, maps[1].slot_of)
        assert torch.equal(masks[0], masks[1]) and not masks[0][:, [0, 2]].any()


class RecordingEngine:
    """Wraps the sparse backend's copies to see what crossed the bus at every step, and checks after
    each step that exactly the selection of every layer is active on the device."""

    def __init__(self, engine: Engine):
        self.fetched: list[dict[int, list[set[int]]]] = []
        self.active: list[dict[int, list[set[int]]]] = []
        original = engine._new_backend

        def new_backend(*args):
            backend = original(*args)
            copy = backend._copy

            def recording_copy(layer, plan):
                counts = plan.counts.tolist()
                self.fetched[-1][layer] = [set(plan.positions[h, :n].tolist()) for h, n in enumerate(counts)]
                copy(layer, plan)

            backend._copy = recording_copy
            begin, decode = backend.begin_step, backend.decode_layer

            def recording_begin(position):
                self.fetched.append({})
                self.active.append({})
                begin(position)

            def recording_decode(layer, position, *tensors):
                kv = decode(layer, position, *tensors)
                bank = backend.working_set.bank_of[layer]
                self.active[-1][layer] = active_sets_of(bank.residency.active_positions(bank.rows([layer])))
                return kv

            backend.begin_step, backend.decode_layer = recording_begin, recording_decode
            self.backend = backend
            return backend

        engine._new_backend = new_backend


def active_sets_of(positions: torch.Tensor) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in positions]


def test_sparse_steps_fetch_only_missing_and_never_sinks_or_window():
    sinks, window = 2, 4
    adapter = ModelAdapter(tiny_model("llama"))
    selection = SelectionConfig(policy="random", budget=Budget(tokens=14), sinks=sinks, window=window)
    engine = Engine(adapter, EngineConfig(context=96, mode=KVMode.SPARSE_OFFLOAD, selection=selection),
                    policy=RandomPolicy(seed=3))
    recorder = RecordingEngine(engine)
    prompt = list(range(1, 60))
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=12))
    assert len(recorder.fetched) == len(result.stats.decode_ms) == 11
    for step, (fetched, active) in enumerate(zip(recorder.fetched, recorder.active)):
        position = len(prompt) + step
        for layer, per_head in fetched.items():
            for head, positions in enumerate(per_head):
                assert all(sinks <= p < position - window + 1 for p in positions)
                assert positions <= active[layer][head]  # what was fetched is attended
        for layer, per_head in active.items():
            for positions in per_head:
                assert len(positions) == 14 - sinks - window
                assert all(sinks <= p < position - window + 1 for p in positions)
    # what was counted as moved is what the bookkeeping fetched
    fragment = 2 * adapter.dims.head_dim * 4
    for counted, fetched in zip(result.stats.h2d_bytes, recorder.fetched):
        assert counted == fragment * sum(len(s) for per_head in fetched.values() for s in per_head)


def test_dense_policy_moves_one_token_per_layer_and_head_after_the_first_step():
    adapter = ModelAdapter(tiny_model("llama"))
    engine = Engine(adapter, EngineConfig(context=64, mode=KVMode.SPARSE_OFFLOAD,
                                          selection=SelectionConfig(policy="dense", sinks=2, window=4)))
    stats = engine.generate(list(range(1, 30)), SamplingConfig(max_new_tokens=6)).stats
    per_token = adapter.dims.num_layers * adapter.dims.num_kv_heads * 2 * adapter.dims.head_dim * 4
    assert stats.h2d_bytes[0] == per_token * (29 - 2 - 4 + 1)
    assert stats.h2d_bytes[1:] == [per_token] * 4


def test_selector_applies_the_neighbor_rules():
    from offload_engine.selection import Candidates
    from offload_engine.selection import Selector

    scores = torch.tensor([[0.0, 9, 8, 0, 0, 0, 7, 0, 0, 0]])  # candidates 10..19; best: 11, 12, 16
    candidates = Candidates(lo=10, hi=20, keep=3, position=30)
    radius = Selector(SelectionConfig(budget=Budget(tokens=20), sinks=1, window=2, neighbors=1), 64, frozenset())
    assert radius.select(scores, candidates, slots=8).tolist() == [[11, 12, 13, 16, 17, -1]]
    runs = Selector(SelectionConfig(budget=Budget(tokens=20), sinks=1, window=2, neighbor_rule="runs"), 64,
                    frozenset())
    assert runs.select(scores, candidates, slots=8).tolist() == [[11, 12, 13, 14, 16, 17]]
    assert runs.slots_for(0) == 2 * (20 - 3)
