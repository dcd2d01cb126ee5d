"""The selection planner: the batched path selects exactly what the per-layer path selects, the
take-everything path costs no scoring, a share budget below sinks + window is a note, not an
error, and the phase breakdown accounts for the step."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.errors import ConfigError
from offload_engine.models import ModelAdapter
from offload_engine.policies.critical import CriticalPolicy
from offload_engine.selection import Selector
from offload_engine.selection.planner import SelectionPlanner
from offload_engine.selection.scores import GroupScores

from recording import record_attended, record_results
from tiny_models import seeded_policy, selecting_model

pytestmark = pytest.mark.usefixtures("one_thread")

# "/q1": the policy's predictor has one query head per KV head (ranked by its logits, no softmax)
POLICIES = ["tokenbutler", "critical(tokenbutler)", "tokenbutler/q1", "critical(tokenbutler)/q1", "quest", "oracle",
            "h2o", "snapkv", "random", "streaming", "critical(quest)"]
PROMPT, NEW = 70, 10


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return selecting_model()


def make_policy(adapter: ModelAdapter, spec: str):
    """``seeded_policy`` of ``spec``; with the suffix "/q1", a predictor of one query head per KV head."""
    name, _, variant = spec.partition("/")
    return seeded_policy(adapter, name, query_heads=adapter.dims.num_kv_heads if variant == "q1" else None)


def selections(adapter: ModelAdapter, spec: str, batched: bool, policy=None, copy_thread: bool = False,
               **selection) -> tuple[list, list[int]]:
    """Per decode step, per layer, per KV head: the attended selected positions; and the tokens (of ``policy``,
    by default ``make_policy(adapter, spec)``)."""
    config = SelectionConfig(policy=spec.partition("/")[0],
                             **{"budget": Budget(tokens=24), "sinks": 2, "window": 6, **selection})
    engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config,
                                          copy_thread=copy_thread),
                    policy=policy if policy is not None else make_policy(adapter, spec))
    seen = record_attended(engine, batched)
    prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW))
    return seen, result.token_ids


@pytest.mark.parametrize("interval,neighbors", [(1, {}), (4, {"neighbors": 1}), (4, {"neighbor_rule": "runs"}),
                                                (1, {"neighbor_rule": "runs"}),
                                                (4, {"neighbor_rule": "runs", "refresh_layers": "1,3"})])
@pytest.mark.parametrize("spec", POLICIES)
def test_batched_path_selects_exactly_what_the_per_layer_path_selects(adapter, spec, interval, neighbors):
    batched, tokens_b = selections(adapter, spec, True, interval=interval, **neighbors)
    per_layer, tokens_p = selections(adapter, spec, False, interval=interval, **neighbors)
    assert len(batched) == NEW - 1
    assert batched == per_layer
    assert tokens_b == tokens_p
    keep = 24 - 2 - 6
    growth = 2 if set(neighbors) - {"keep_bonus"} else 1
    for step in batched:  # and they really select: at most the budget (grown by neighbours), not everything
        for layer, heads in step.items():
            if "tokenbutler" in spec:
                if layer == 0:
                    continue  # tokenbutler's dense layer
            assert all(0 < len(h) <= keep * growth for h in heads)


def test_refresh_layers_select_every_step_and_the_others_reuse(adapter):
    """Interval 4 with layer 1 refreshed: producer 0 (layers 1-2) plans at every step, producer 2
    (layers 3-4) only on prediction steps; layers 3-4 keep their selection between predictions."""
    policy = make_policy(adapter, "tokenbutler")
    planned: list[int] = []
    scored: list[tuple[int, range, int]] = []  # (producer, layers scored, score rows)
    plan = policy.plan

    def recording_plan(layer, *a, **kw):
        layers, scores = plan(layer, *a, **kw)
        planned.append(layer)
        rows = scores.queries if isinstance(scores, GroupScores) else scores  # described or computed
        scored.append((layer, layers, rows.shape[0]))
        return layers, scores

    policy.plan = recording_plan
    policy.native_scoring = lambda producer: None  # every plan through plan() (the native path: below)
    config = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6, interval=4,
                             refresh_layers="1")
    engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config), policy=policy)
    engine.generate(list(range(1, PROMPT + 1)), SamplingConfig(max_new_tokens=9, ignore_eos=True))
    assert planned.count(0) == 8 and planned.count(2) == 2  # 8 decode steps: predictions at steps 0 and 4
    # on a prediction step producer 0 scores both its layers; between them only the refreshed layer 1
    assert [entry for entry in scored if entry[0] == 0] == [(0, range(1, 3), 2)] + [(0, range(1, 2), 1)] * 3 \
        + [(0, range(1, 3), 2)] + [(0, range(1, 2), 1)] * 3

    seen, _ = selections(adapter, "tokenbutler", True, interval=4, refresh_layers=frozenset({1}))
    for step in range(1, len(seen)):
        if step % 4:
            assert seen[step][3] == seen[step - 1][3] and seen[step][4] == seen[step - 1][4]
    assert any(seen[step][1] != seen[step - 1][1] for step in range(1, len(seen)) if step % 4)


@pytest.mark.parametrize("text,layers", [("14-16", {14, 15, 16}), ("3,7+9-10", {3, 7, 9, 10}), ("", set()),
                                         (" 5 ", {5})])
def test_refresh_layers_parse_numbers_and_ranges(text, layers):
    assert SelectionConfig(interval=4, refresh_layers=text).refresh_layers == frozenset(layers)


def test_refresh_layers_without_an_interval_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="add --interval N or drop --refresh-layers"):
        SelectionConfig(refresh_layers="14-16")
    assert SelectionConfig(refresh_layers="").refresh_layers == frozenset()


def test_the_engine_refuses_refresh_layers_past_the_model(adapter):
    config = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6, interval=4,
                             refresh_layers="3-7")
    with pytest.raises(ConfigError, match=r"\[5, 6, 7\] past the model's last layer 4"):
        Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config),
               policy=make_policy(adapter, "tokenbutler"))


@pytest.mark.parametrize("text", ["9-3", "a", "1-", "-2"])
def test_bad_refresh_layers_say_what_is_wrong(text):
    with pytest.raises(ConfigError, match="refresh-layers"):
        SelectionConfig(refresh_layers=text)


def test_predictive_scores_come_in_one_batched_call_per_producer(adapter):
    policy = make_policy(adapter, "tokenbutler")
    calls = {"plan": 0, "score": 0}
    plan, score = policy.plan, policy.score
    policy.plan = lambda *a, **kw: (calls.__setitem__("plan", calls["plan"] + 1), plan(*a, **kw))[1]
    policy.score = lambda *a: (calls.__setitem__("score", calls["score"] + 1), score(*a))[1]
    policy.native_scoring = lambda producer: None  # every plan through plan() (the native path: below)
    config = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6)
    engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config), policy=policy)
    engine.generate(list(range(1, PROMPT + 1)), SamplingConfig(max_new_tokens=5))
    producers = sum(policy.is_producer(layer) for layer in range(adapter.dims.num_layers))
    assert calls == {"plan": 4 * producers, "score": 0}


@pytest.mark.parametrize("spec", ["tokenbutler", "quest", "critical(tokenbutler)"])
def test_while_everything_fits_nothing_is_scored_and_decoding_equals_dense(adapter, spec):
    policy = make_policy(adapter, spec)

    def refuse(*args, **kwargs):
        raise AssertionError("scored although every candidate fits in the budget")

    policy.score = policy.plan = refuse
    config = SelectionConfig(policy=spec, budget=Budget(tokens=400), sinks=4, window=64)
    prompt = list(range(1, 35))  # 34 tokens: shorter than the window
    sparse = Engine(adapter, EngineConfig(context=512, mode=KVMode.SPARSE_OFFLOAD, selection=config), policy=policy)
    result = sparse.generate(prompt, SamplingConfig(max_new_tokens=6))
    dense = Engine(adapter, EngineConfig(context=512)).generate(prompt, SamplingConfig(max_new_tokens=6))
    assert result.token_ids == dense.token_ids
    assert result.stats.h2d_bytes == [0] * 5  # every token is in the window: nothing crosses
    torch.testing.assert_close(sparse.score_continuation(prompt, dense.token_ids).logprobs,
                               Engine(adapter, EngineConfig(context=512)).score_continuation(prompt, dense.token_ids).logprobs,
                               rtol=0, atol=1e-5)


def test_a_share_budget_below_sinks_and_window_is_a_note_not_an_error(adapter):
    config = SelectionConfig(policy="quest", budget=Budget.parse("5%"), sinks=4, window=64)
    engine = Engine(adapter, EngineConfig(context=512, mode=KVMode.SPARSE_OFFLOAD, selection=config))
    result = engine.generate(list(range(1, 35)), SamplingConfig(max_new_tokens=4))
    assert len(result.token_ids) == 4
    assert len(result.stats.notes) == 1 and "below --sinks + the narrowest window = 20" in result.stats.notes[0]
    with pytest.raises(ConfigError, match="exceed the budget"):
        SelectionConfig(policy="quest", budget=Budget(tokens=19), sinks=4, window=64)


@pytest.mark.parametrize("spec", ["tokenbutler", "critical(tokenbutler)", "quest"])
def test_below_the_floor_nothing_is_scored_and_the_first_step_past_it_predicts(adapter, spec, monkeypatch):
    """A 5% share of a short sequence keeps no candidate (the layers attend sinks and window): no producer
    plans (natively or not) and no layer scores, and the logits are streaming's, which selects nothing either.
    A sequence whose share keeps some selects at every step."""
    calls = {"plan": 0, "score": 0}
    policy = make_policy(adapter, spec)
    score = policy.score
    policy.score = lambda *a: (calls.__setitem__("score", calls["score"] + 1), score(*a))[1]
    plan_ahead = SelectionPlanner._plan_ahead
    monkeypatch.setattr(SelectionPlanner, "_plan_ahead", lambda self, *a: (
        calls.__setitem__("plan", calls["plan"] + 1), plan_ahead(self, *a))[1])
    config = SelectionConfig(policy=spec, budget=Budget.parse("5%"), sinks=4, window=64)
    short = list(range(1, 35))  # 34 tokens: 5% is 2, below sinks + the narrowest window (20); 14 candidates
    engine = Engine(adapter, EngineConfig(context=512, mode=KVMode.SPARSE_OFFLOAD, selection=config), policy=policy)
    seen = record_attended(engine)
    result = engine.generate(short, SamplingConfig(max_new_tokens=6))
    assert calls == {"plan": 0, "score": 0}
    assert "below --sinks + the narrowest window" in result.stats.notes[0]
    dense = policy.dense_layers()
    assert len(seen) == 5 and all(heads == [[]] * adapter.dims.num_kv_heads
                                  for step in seen for layer, heads in step.items() if layer not in dense)
    if not dense:  # no layer attends all (tokenbutler's layer 0 does): the logits are streaming's
        streaming = Engine(adapter, EngineConfig(context=512, mode=KVMode.SPARSE_OFFLOAD, selection=SelectionConfig(
            policy="streaming", budget=Budget.parse("5%"), sinks=4, window=64)))
        torch.testing.assert_close(engine.score_continuation(short, result.token_ids).logprobs,
                                   streaming.score_continuation(short, result.token_ids).logprobs, rtol=0, atol=1e-5)
    long = torch.randint(0, 320, (460,), generator=torch.Generator().manual_seed(3)).tolist()  # 5%: 23, keeps 3
    engine.generate(long, SamplingConfig(max_new_tokens=4))
    producers = sum(policy.is_producer(layer) for layer in range(adapter.dims.num_layers)) if policy.plans_ahead else 0
    assert calls == ({"plan": 3 * producers, "score": 0} if producers
                     else {"plan": 0, "score": 3 * (adapter.dims.num_layers - len(dense))})


@pytest.mark.parametrize("mode,spec", [(KVMode.SPARSE_OFFLOAD, "tokenbutler"), (KVMode.SPARSE_OFFLOAD, "quest"),
                                       (KVMode.DENSE_DEVICE, "dense"), (KVMode.DENSE_OFFLOAD, "dense")])
def test_the_phase_breakdown_accounts_for_the_step(adapter, mode, spec):
    config = SelectionConfig(policy=spec, budget=Budget(tokens=24) if spec != "dense" else None, sinks=2, window=6)
    engine = Engine(adapter, EngineConfig(context=256, mode=mode, selection=config, profile=True),
                    policy=make_policy(adapter, spec) if mode is KVMode.SPARSE_OFFLOAD else None)
    stats = engine.generate(list(range(1, 150)), SamplingConfig(max_new_tokens=6)).stats
    parts = stats.breakdown
    assert set(parts) == {"selection", "copy", "wait", "attention", "rest"}
    total = sum(part["ms_per_step"] for part in parts.values())
    step = sum(stats.decode_ms) / len(stats.decode_ms)
    assert abs(total - step) <= 0.1 * step
    assert abs(sum(part["share"] for part in parts.values()) - 1.0) < 0.1
    # kept step by step too (a report may leave warm-up steps out): the steps' phases add up to the breakdown's
    assert len(stats.step_phases_ms) == len(stats.decode_ms)
    for name in ("selection", "copy", "wait", "attention"):
        per_step = sum(phases[name] for phases in stats.step_phases_ms) / len(stats.decode_ms)
        assert per_step == pytest.approx(parts[name]["ms_per_step"], rel=1e-9, abs=1e-12)
    assert parts["attention"]["ms_per_step"] > 0
    if mode is KVMode.SPARSE_OFFLOAD:
        assert parts["selection"]["ms_per_step"] > 0 and parts["copy"]["ms_per_step"] > 0
    if mode is KVMode.DENSE_OFFLOAD:
        assert parts["copy"]["ms_per_step"] > 0 and parts["selection"]["ms_per_step"] == 0
    unprofiled = Engine(adapter, EngineConfig(context=256, mode=mode, selection=config),
                        policy=make_policy(adapter, spec) if mode is KVMode.SPARSE_OFFLOAD else None)
    assert unprofiled.generate(list(range(1, 150)), SamplingConfig(max_new_tokens=3)).stats.breakdown is None


class HostReadError(AssertionError):
    pass


@pytest.mark.parametrize("spec", ["tokenbutler", "critical(tokenbutler)", "quest", "streaming", "h2o"])
def test_no_device_value_is_read_on_the_host_inside_a_decode_step(adapter, spec, monkeypatch):
    """With CUDA's bookkeeping (plans padded to full width), a step never turns a tensor into a
    Python value: no ``item``, ``int``, ``bool``, ``float`` or ``tolist`` between begin and end of a
    step (the gather method, checked on its own, is left out)."""
    from offload_engine.backends import sparse_offload
    from offload_engine.selection import residency

    original_init = residency.ResidencyMap.__init__

    def padded(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._exact_width = False

    monkeypatch.setattr(residency.ResidencyMap, "__init__", padded)
    guard = {"on": False}
    make_gatherer = sparse_offload.pairs_gatherer

    def unguarded_gatherer(*args, **kwargs):
        gather = make_gatherer(*args, **kwargs)

        def unguarded_gather(*plan):
            was, guard["on"] = guard["on"], False
            try:
                gather(*plan)
            finally:
                guard["on"] = was

        return unguarded_gather

    monkeypatch.setattr(sparse_offload, "pairs_gatherer", unguarded_gatherer)
    for name in ("item", "__int__", "__bool__", "__float__", "tolist", "__index__"):
        method = getattr(torch.Tensor, name)

        def guarded(self, *args, _method=method, _name=name, **kwargs):
            if guard["on"]:
                raise HostReadError(f"Tensor.{_name} inside a decode step")
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    config = SelectionConfig(policy=spec, budget=Budget(tokens=24), sinks=2, window=6, interval=2, neighbors=1)
    engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config),
                    policy=make_policy(adapter, spec))
    step = engine._decode_step

    def guarded_step(*args, **kwargs):
        guard["on"] = True
        try:
            return step(*args, **kwargs)
        finally:
            guard["on"] = False

    engine._decode_step = guarded_step
    result = engine.generate(list(range(1, PROMPT + 1)), SamplingConfig(max_new_tokens=6, ignore_eos=True))
    assert len(result.token_ids) == 6 and sum(result.stats.h2d_bytes) > 0


@pytest.mark.parametrize("interval,neighbors", [(1, {"keep_bonus": 0.5}), (4, {"neighbors": 1, "keep_bonus": 2.0})])
@pytest.mark.parametrize("spec", [p for p in POLICIES if p != "streaming"])
def test_with_a_keep_bonus_the_batched_path_selects_what_the_per_layer_path_selects(adapter, spec, interval, neighbors):
    """The top-k's hysteresis raises the same held positions by the same float32 terms on every path: the
    native one-call selection (tokenbutler's producers), the batched torch path and the per-layer reference;
    critical(...) raises them in its two stages (``keeps_held``) on both of its paths."""
    test_batched_path_selects_exactly_what_the_per_layer_path_selects(adapter, spec, interval, neighbors)


@pytest.mark.parametrize("spec", ["tokenbutler", "critical(tokenbutler)", "critical(tokenbutler)/q1"])
@pytest.mark.parametrize("neighbors, fused", [({}, True), ({"neighbors": 1}, False),
                                              ({"neighbor_rule": "runs"}, False), ({"keep_bonus": 0.5}, True)])
def test_a_producers_selection_is_one_native_call_where_top_k_is_all_it_takes(adapter, spec, neighbors, fused,
                                                                              monkeypatch):
    """On the CPU with the native kernels, tokenbutler's producers score, rank and place their layers in one
    call (ResidencyMap.select) when the selection is the top-k as it is, critical(tokenbutler)'s with its two
    stages in the same call (its value norms bound with the keys); a neighbour rule needs the ranked
    positions, so it keeps the separate steps (and selects what the per-layer path selects: above)."""
    from offload_engine import native

    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    calls = []
    original = native.BoundSelectRows.__call__  # select_rows and the planner's NativeProducer alike
    monkeypatch.setattr(native.BoundSelectRows, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    _, tokens = selections(adapter, spec, True, **neighbors)
    producers = sum(make_policy(adapter, "tokenbutler").predictor.is_producer(layer) for layer in range(5))
    assert len(tokens) == NEW
    assert (len(calls) > 0) == fused
    if fused:  # every prediction step (once the candidates outgrow the budget), every producer
        assert len(calls) % producers == 0 and len(calls) >= producers


@pytest.mark.parametrize("spec", ["tokenbutler", "tokenbutler/q1", "critical(tokenbutler)", "critical(tokenbutler)/q1"])
@pytest.mark.parametrize("selection", [{"interval": 1}, {"interval": 4}, {"interval": 1, "copy_thread": True},
                                       {"interval": 4, "refresh_layers": frozenset({1})},
                                       {"interval": 1, "keep_bonus": 0.5},
                                       {"interval": 1, "keep_bonus": 0.5, "copy_thread": True}])
@pytest.mark.parametrize("key_dtype", ["auto", "float32", "int8"])
def test_the_native_producer_selects_what_the_general_path_selects(adapter, spec, selection, key_dtype, monkeypatch):
    """The planner's NativeProducer (a producer's queries, then its layers' scores, top-k and residency update,
    each one native call bound once) attends exactly what plan(..., describe=True) and prepare_select attend,
    step by step, and generates the same tokens; and it really is the path taken. critical(tokenbutler)'s native
    producer (its two stages in the same call) against its torch form (``plan`` and ``reweight``)."""
    from offload_engine import native
    from offload_engine.selection import planner as planner_module

    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    name, _, variant = spec.partition("/")
    query_heads = adapter.dims.num_kv_heads if variant == "q1" else None
    selection = dict(selection)  # (pytest shares the parameter's dict between the cases)
    copy_thread = selection.pop("copy_thread", False)

    def run(native_path: bool) -> tuple[list, list[int], int]:
        policy = seeded_policy(adapter, name, query_heads=query_heads)
        getattr(policy, "base", policy).key_dtype = key_dtype  # (critical(...): its base's compact keys)
        if not native_path:
            policy.native_scoring = lambda producer: None
        # of the NativeProducer's plans, whether each took the step (None: the general path did)
        fast_plans = record_results(monkeypatch, planner_module.NativeProducer, "plan")
        seen, tokens = selections(adapter, spec, True, policy=policy, copy_thread=copy_thread, **selection)
        return seen, tokens, sum(fast_plans)

    fast_seen, fast_tokens, fast_calls = run(True)
    general_seen, general_tokens, general_calls = run(False)
    assert fast_calls > 0 and general_calls == 0
    assert fast_seen == general_seen and fast_tokens == general_tokens


def test_a_closed_backend_keeps_none_of_the_policys_compact_keys(adapter, monkeypatch):
    """The residency maps' bound selections and the planner's native producers hold views of the policy's
    compact keys; closing the backend (the end of a generate call) lets that memory go with the policy's own
    reference, even while the backend object lives on."""
    import gc
    import weakref

    from offload_engine import native

    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    policy = seeded_policy(adapter, "tokenbutler")
    config = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6)
    engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config), policy=policy)
    backends, storage = [], []
    original = engine._new_backend

    def new_backend(*args):
        backend = original(*args)
        backends.append(backend)  # kept alive past its close
        storage.append(weakref.ref(policy.cache._storage))
        return backend

    bound = []
    original_bind = native.SelectionKernels.bind_select_rows
    monkeypatch.setattr(native.SelectionKernels, "bind_select_rows",
                        lambda self, *args: bound.append(1) or original_bind(self, *args))
    engine._new_backend = new_backend
    prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    engine.generate(prompt, SamplingConfig(max_new_tokens=NEW))
    gc.collect()
    assert bound and len(backends) == 1  # the selection was bound (to the compact keys) during the run
    assert policy.cache is None and storage[0]() is None


@pytest.mark.parametrize("budget", ["5%", "10%", "50%", "100%", "30", "300"])
@pytest.mark.parametrize("window", [8, 64, 128])
def test_the_window_follows_the_budget_and_its_first_position_never_moves_back(budget, window):
    """w = (k - S) // 2 clamped to [min(16, W), W]; sinks + window + kept = the budget once it passes the floor;
    the candidates' end (the window's first position) never decreases as the sequence grows, so no token
    re-enters the window after leaving it (the working set's ring would hold it twice)."""
    config = SelectionConfig(policy="quest", budget=Budget.parse(budget), sinks=4, window=window)
    selector = Selector(config, 2048, frozenset())
    last_hi = 0
    for length in range(1, 2049):
        k, w = config.budget.tokens_for(length), selector.window(length)
        assert min(16, window) <= w <= window
        if k >= config.floor:
            assert w == min(window, max(min(16, window), (k - 4) // 2))
        found = selector.candidates(1, length - 1)
        assert found.hi >= last_hi
        last_hi = found.hi
        if found.count > found.keep:  # something to select: the budget is spent exactly
            assert 4 + w + found.keep == selector.budget_tokens(length)


def test_critical_writes_a_decode_tokens_value_norms_by_the_native_kernel(adapter, monkeypatch):
    """On the CPU with the kernels built, critical(...)'s value norms of each decode token come from one bound
    kernel call per layer (BoundValueNorms; tests/test_native.py: the torch form's norms), not from torch."""
    from offload_engine import native
    from offload_engine.policies import critical as critical_module

    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    written = record_results(monkeypatch, native.BoundValueNorms, "__call__")
    by_torch = []
    original = critical_module.value_norms
    monkeypatch.setattr(critical_module, "value_norms", lambda v, w_o: by_torch.append(v.shape[1]) or original(v, w_o))
    selections(adapter, "critical(tokenbutler)", True)
    assert written and all(written)  # every decode token of every layer, each written
    assert len(written) % adapter.dims.num_layers == 0
    assert 1 not in by_torch  # torch's form only for the prefill's chunks


@pytest.mark.parametrize("spec", ["tokenbutler", "tokenbutler/q1", "quest", "critical(tokenbutler)", "critical(quest)"])
def test_a_keep_bonus_renews_fewer_tokens(adapter, spec):
    """The top-k's hysteresis (--keep-bonus): a held token stays unless a newcomer beats it by the share, so a
    decode copies fewer tokens (host-to-device bytes) than without."""

    def fetched(**selection) -> tuple[int, list]:
        config = SelectionConfig(policy=spec.partition("/")[0], budget=Budget(tokens=24), sinks=2, window=6,
                                 **selection)
        engine = Engine(adapter, EngineConfig(context=160, mode=KVMode.SPARSE_OFFLOAD, selection=config),
                        policy=make_policy(adapter, spec))
        seen = record_attended(engine, True)
        prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
        result = engine.generate(prompt, SamplingConfig(max_new_tokens=40))
        return sum(result.stats.h2d_bytes[1:]), seen  # after the first step's whole selection

    plain, plain_seen = fetched()
    kept, kept_seen = fetched(keep_bonus=1.0)
    assert 0 < kept < plain
    assert kept_seen != plain_seen  # it changed what was attended, not only what was copied


def test_a_keep_bonus_is_a_share_and_refused_where_it_would_not_do_what_it_says(adapter):
    for bad in (-0.1, float("nan"), float("inf"), 101.0):
        with pytest.raises(ConfigError, match="--keep-bonus must be a share"):
            SelectionConfig(keep_bonus=bad)
    policy = seeded_policy(adapter, "tokenbutler", page_prefilter=16)
    config = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=6, keep_bonus=0.25)
    with pytest.raises(ConfigError, match="does not combine with tokenbutler's page prefilter"):
        Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config), policy=policy)
    with pytest.raises(ConfigError, match="does not combine with tokenbutler's page prefilter"):  # wrapped alike
        Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config),
               policy=CriticalPolicy(base=policy))
    for spec in ("streaming", "critical(streaming)"):
        with pytest.raises(ConfigError, match="--policy streaming ranks no tokens"):
            Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=config),
                   policy=make_policy(adapter, spec))
