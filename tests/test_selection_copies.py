"""On the CPU without a copy thread, a producer's one-call native selection copies the K/V rows it places
(``RowCopies``), where a gather per layer followed it before. It must change where the copies are made, never
what is computed: the same tokens, logits, selections and bytes moved as the per-layer gathers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, native
from offload_engine.selection import planner as planner_module

from recording import record_results
from tiny_models import seeded_policy, selecting_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(native.kernels() is None, reason=f"needs the native kernels: {native.status()}")]

PROMPT, NEW = 90, 8


@pytest.fixture(scope="module")
def adapter():
    return selecting_model()


def _run(adapter, spec: str, fused: bool, profile: bool = False, interval: int = 1, **options):
    selection = SelectionConfig(policy=spec, budget=Budget(tokens=24), sinks=2, window=6, interval=interval)
    engine = Engine(adapter, EngineConfig(context=160, mode=KVMode.SPARSE_OFFLOAD, selection=selection,
                                          profile=profile), policy=seeded_policy(adapter, spec, **options))
    original = engine._new_backend

    def new_backend(*args):
        backend = original(*args)
        if not fused:
            backend.planner.row_copies = None  # the per-layer gathers, as before
        return backend

    engine._new_backend = new_backend
    prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW))
    return result, engine.score_continuation(prompt, result.token_ids)


@pytest.mark.parametrize("spec, options", [
    ("tokenbutler", {}),
    ("tokenbutler", {"key_dtype": "bfloat16"}),
    ("tokenbutler", {"key_dtype": "float32"}),
    ("tokenbutler", {"interval": 4}),
    ("tokenbutler", {"key_dtype": "bfloat16", "page_prefilter": 16}),
])
def test_the_selection_copies_what_the_layers_gathers_copied(adapter, spec, options, monkeypatch):
    gathers = record_results(monkeypatch, native.BoundGatherPairs, "__call__")
    plain, plain_scores = _run(adapter, spec, fused=False, **options)
    gathered = len(gathers)
    gathers.clear()
    copied_calls = record_results(monkeypatch, native.RowCopies, "take_seconds")
    fused, fused_scores = _run(adapter, spec, fused=True, **options)
    assert copied_calls, "no producer's selection copied: the fused path did not run"
    assert len(gathers) < gathered  # the producers' layers were not gathered again
    assert fused.token_ids == plain.token_ids
    assert fused.stats.h2d_bytes == plain.stats.h2d_bytes and sum(plain.stats.h2d_bytes) > 0
    torch.testing.assert_close(fused_scores.logprobs, plain_scores.logprobs, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"key_dtype": "bfloat16", "page_prefilter": 16}])
def test_the_selection_runs_the_query_network_as_the_separate_call_did(adapter, options, monkeypatch):
    """A producer's native selection runs its query network in the same call (``NetworkStep``): no separate
    query-network call, and the same tokens, logits and bytes as the two calls of before."""
    networks = record_results(monkeypatch, native.BoundQueryMLP, "__call__")
    one_call, one_call_scores = _run(adapter, "tokenbutler", fused=True, **options)
    assert networks == []  # every producer step ran the network inside its selection
    bind = planner_module.NativeProducer.bind.__func__
    monkeypatch.setattr(planner_module.NativeProducer, "bind", classmethod(
        lambda cls, scoring, bank, copies=None, network=False: bind(cls, scoring, bank, copies, False)))
    two_calls, two_calls_scores = _run(adapter, "tokenbutler", fused=True, **options)
    assert networks and all(networks)
    assert one_call.token_ids == two_calls.token_ids and one_call.stats.h2d_bytes == two_calls.stats.h2d_bytes
    torch.testing.assert_close(one_call_scores.logprobs, two_calls_scores.logprobs, rtol=0, atol=0)


def _replace_linear_weights(policy, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in policy.predictor.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(torch.randn(module.weight.shape, generator=generator) * 0.1)


def test_a_predictor_parameter_replaced_mid_generation_is_read_from_the_next_step(adapter, monkeypatch):
    """The network the selection runs is the one the predictor holds: replaced during a generation, the next
    producer step binds the new weights and stays on the one-call path, so both paths generate the same tokens."""
    results, made = {}, []
    original_network = native.QueryNetwork.__init__
    monkeypatch.setattr(native.QueryNetwork, "__init__",
                        lambda self, *a, **k: made.append(1) or original_network(self, *a, **k))
    for path in ("one call", "two calls"):
        if path == "two calls":
            bind = planner_module.NativeProducer.bind.__func__
            monkeypatch.setattr(planner_module.NativeProducer, "bind", classmethod(
                lambda cls, scoring, bank, copies=None, network=False: bind(cls, scoring, bank, copies, False)))
        policy = seeded_policy(adapter, "tokenbutler")
        producers = sum(policy.predictor.is_producer(layer) for layer in range(adapter.dims.num_layers))
        selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6)
        engine = Engine(adapter, EngineConfig(context=160, mode=KVMode.SPARSE_OFFLOAD, selection=selection),
                        policy=policy)
        prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
        seen = []

        def on_token(token, policy=policy, seen=seen):
            seen.append(token)
            if len(seen) == 3:
                _replace_linear_weights(policy, 7)

        networks = record_results(monkeypatch, native.BoundQueryMLP, "__call__")
        results[path] = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW), on_token=on_token).token_ids
        if path == "one call":
            assert len(made) == 2 * producers  # bound once, and once again to the new weights
            assert networks == []  # no step left the one call for the two
    assert results["one call"] == results["two calls"]


def test_a_profiled_step_counts_the_selections_copies_as_copying(adapter, monkeypatch):
    from offload_engine.profiling import PhaseClock

    shifted = []
    original = PhaseClock.shift
    monkeypatch.setattr(PhaseClock, "shift", lambda self, *a: shifted.append(a) or original(self, *a))
    result, _ = _run(adapter, "tokenbutler", fused=True, profile=True)
    assert shifted and all(a[:2] == ("selection", "copy") and a[2] > 0 for a in shifted)
    parts, steps = result.stats.breakdown, result.stats.decode_ms
    assert parts["copy"]["ms_per_step"] > 0 and parts["selection"]["ms_per_step"] > 0
    assert all(step["selection"] >= 0 for step in result.stats.step_phases_ms)  # moved, never counted twice
    step = sum(steps) / len(steps)
    assert abs(sum(part["ms_per_step"] for part in parts.values()) - step) <= 0.1 * step


def test_a_reused_backend_times_the_next_generations_copies_on_its_clock(adapter):
    """``tbrun serve``'s session keeps a backend across requests: the phases of each generation (the copies its
    producers' selections make included) go to that generation's clock."""
    from offload_engine.session import Session

    selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6)
    engine = Engine(adapter, EngineConfig(context=200, mode=KVMode.SPARSE_OFFLOAD, selection=selection, profile=True),
                    policy=seeded_policy(adapter, "tokenbutler"))
    session = Session(engine)
    prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    first, _ = session.generate(prompt, SamplingConfig(max_new_tokens=NEW))
    second, reuse = session.generate(prompt + first.token_ids, SamplingConfig(max_new_tokens=NEW))
    assert reuse.reused_tokens > 0  # the same backend
    parts = second.stats.breakdown
    assert parts["selection"]["ms_per_step"] > 0 and parts["copy"]["ms_per_step"] > 0
    session.close()


def test_row_copies_move_exactly_the_rows_a_gather_moves():
    """The kernel's copies against index_select / index_copy_ on the same plan, rows of two layers x 2 heads at
    token-major strides (the host store's), into slot tables (the working set's); copies that do not serve the
    rows are refused at binding, and an entry outside a table (only possible if the tables shrank after
    binding) at the call, with nothing of that row copied."""
    generator = torch.Generator().manual_seed(0)
    kernels = native.kernels()
    heads, tokens, dim, slots = 2, 300, 16, 40
    store = torch.randn(2, tokens, heads, dim, generator=generator)  # [layer, token, head, D], token-major
    values = torch.randn(2, tokens, heads, dim, generator=generator)
    key_slots, value_slots = torch.zeros(2, heads, slots + 1, dim), torch.zeros(2, heads, slots + 1, dim)
    rows = [(store[layer, :, h], values[layer, :, h], key_slots[layer, h], value_slots[layer, h])
            for layer in range(2) for h in range(heads)]
    copies = kernels.bind_row_copies(rows)
    assert copies is not None and copies.rows == 4
    copies.timed = True
    keys = torch.randn(4, 8, tokens, generator=generator)
    tables = (np.full((4, slots + 1), -1, np.int64), np.full((4, tokens + 1), -1, np.int32),
              np.zeros((4, slots + 1), np.bool_))
    bound = kernels.bind_select_rows(keys, *tables, "mean", copies=copies)
    queries = torch.randn(4, 3, 8, generator=generator)
    positions, slot_index, counts = bound(queries, tokens, 2, tokens - 4, 30)
    assert counts.tolist() == [30] * 4 and copies.take_seconds() > 0 and copies.take_seconds() == 0
    for r, (layer, h) in enumerate((layer, h) for layer in range(2) for h in range(heads)):
        want_keys, want_values = torch.zeros(slots + 1, dim), torch.zeros(slots + 1, dim)
        index = torch.from_numpy(slot_index[r, : counts[r]].copy())
        source = torch.from_numpy(positions[r, : counts[r]].copy())
        want_keys.index_copy_(0, index, store[layer, :, h].index_select(0, source))
        want_values.index_copy_(0, index, values[layer, :, h].index_select(0, source))
        assert torch.equal(key_slots[layer, h], want_keys) and torch.equal(value_slots[layer, h], want_values)
    with pytest.raises(ValueError, match="do not serve"):
        kernels.bind_select_rows(keys[:3], *(t[:3] for t in tables), "mean", copies=copies)
    copies.args.dst_rows = 5  # as if the slot tables had shrunk: the kernel checks every entry before copying
    key_slots.zero_()
    with pytest.raises(IndexError, match="outside the bound copies' tables"):
        bound(queries + 1, tokens, 2, tokens - 4, 30)
    assert not key_slots.any()
    assert kernels.bind_row_copies([(store[0, :, 0], values[0, :, 0], key_slots[0, 0], value_slots[0, :, :, 0])]) is None
