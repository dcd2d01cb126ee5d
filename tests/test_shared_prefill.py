"""One recorded dense prefill replayed into every policy gives exactly the results of normal runs."""

from __future__ import annotations

import pytest
import torch

from offload_engine.config import Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.engine import Engine
from offload_engine.errors import ConfigError
from offload_engine.models import ModelAdapter
from offload_engine.policies import build_policy
from tiny_models import tiny_model

CONTEXT, PROMPT, NEW = 160, 120, 10
# (policy spec, selection overrides); a small budget so that the policies select differently
POINTS = [
    ("dense", {}),
    ("oracle", {}), ("quest", {}), ("snapkv", {}), ("h2o", {}), ("streaming", {}), ("random", {}),
    ("tokenbutler", {}), ("critical(tokenbutler)", {}), ("critical(h2o)", {}),
    ("tokenbutler", {"interval": 4, "neighbor_rule": "runs"}),
]


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return ModelAdapter(tiny_model("llama", initializer_range=0.3))  # peaked attention: selections matter


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(3, 300, (PROMPT,), generator=torch.Generator().manual_seed(2)).tolist()


def make_engine(adapter: ModelAdapter, spec: str, overrides: dict) -> Engine:
    if spec == "dense":
        return Engine(adapter, EngineConfig(context=CONTEXT))
    selection = SelectionConfig(policy=spec, budget=Budget(fraction=0.2), sinks=2, window=4, **overrides)
    options = {"random_weights": True} if "tokenbutler" in spec else {}
    return Engine(adapter, EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD, selection=selection),
                  policy=build_policy(spec, **options))


def run(engine: Engine, prompt: list[int], record=None):
    """Greedy tokens, then the teacher-forced logits of those tokens, with or without ``record``."""
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW, ignore_eos=True), prefill=record)
    scored = engine.score_continuation(prompt, result.token_ids, keep_logits=True, prefill=record)
    return result.token_ids, scored.logits


def test_every_policy_replaying_one_record_matches_its_normal_run_exactly(adapter, prompt):
    engines = [make_engine(adapter, spec, overrides) for spec, overrides in POINTS]
    normal = [run(engine, prompt) for engine in engines]
    record = engines[0].record_prefill(prompt)
    replayed = [run(engine, prompt, record) for engine in engines]  # one record, every policy in turn
    for (spec, overrides), (ids, logits), (ids_r, logits_r) in zip(POINTS, normal, replayed):
        assert ids_r == ids, (spec, overrides)
        assert torch.equal(logits_r, logits), (spec, overrides)
    assert {key[0] for key in record.observations} == {"h2o", "snapkv"}  # derived once, shared
    distinct = {tuple(ids) for ids, _ in normal}
    assert len(distinct) > 2, "the policies should not all agree at this budget (the test would prove little)"


def test_a_replayed_run_does_not_run_the_model_prefill(adapter, prompt, monkeypatch):
    engine = make_engine(adapter, "quest", {})
    record = engine.record_prefill(prompt)
    calls = []
    monkeypatch.setattr(engine, "_model_prefill", lambda *args: calls.append(args))
    engine.generate(prompt, SamplingConfig(max_new_tokens=2), prefill=record)
    assert calls == []


def test_a_record_of_another_prompt_is_refused(adapter, prompt):
    engine = make_engine(adapter, "quest", {})
    record = engine.record_prefill(prompt[:-1])
    with pytest.raises(ConfigError, match="another prompt"):
        engine.generate(prompt, SamplingConfig(max_new_tokens=2), prefill=record)
