"""End to end: under a budget that covers every token, each policy decodes exactly like dense."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offload_engine.config import Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.engine import Engine
from offload_engine.models import ModelAdapter

POLICIES = ["oracle", "quest", "h2o", "snapkv", "random", "critical(quest)", "critical(h2o)", "critical(snapkv)"]
CONTEXT, PROMPT, NEW = 96, 40, 8


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return ModelAdapter(LlamaForCausalLM(config))


def engine(adapter: ModelAdapter, mode: KVMode, policy: str = "dense") -> Engine:
    selection = SelectionConfig(policy=policy, budget=Budget(tokens=CONTEXT), sinks=4, window=8)
    return Engine(adapter, EngineConfig(context=CONTEXT, mode=mode, selection=selection))


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(0, 64, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def dense(adapter, prompt):
    reference = engine(adapter, KVMode.DENSE_DEVICE)
    ids = reference.generate(prompt, SamplingConfig(max_new_tokens=NEW)).token_ids
    return ids, reference.score_continuation(prompt, ids).logprobs


@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_covering_every_token_decodes_exactly_like_dense(adapter, prompt, dense, policy):
    sparse = engine(adapter, KVMode.SPARSE_OFFLOAD, policy)
    ids = sparse.generate(prompt, SamplingConfig(max_new_tokens=NEW)).token_ids
    assert ids == dense[0]
    torch.testing.assert_close(sparse.score_continuation(prompt, ids).logprobs, dense[1], rtol=0, atol=1e-5)


def test_streaming_with_a_budget_covering_everything_decodes_like_dense():
    from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
    from offload_engine.models import ModelAdapter
    from tiny_models import tiny_model

    adapter = ModelAdapter(tiny_model("mistral"))
    prompt = list(range(3, 40))
    dense = Engine(adapter, EngineConfig(context=64)).generate(prompt, SamplingConfig(max_new_tokens=8))
    selection = SelectionConfig(policy="streaming", budget=Budget(tokens=64), sinks=2, window=4)
    sparse = Engine(adapter, EngineConfig(context=64, mode=KVMode.SPARSE_OFFLOAD, selection=selection))
    result = sparse.generate(prompt, SamplingConfig(max_new_tokens=8))
    assert result.token_ids == dense.token_ids
    assert all(moved == result.stats.h2d_bytes[1] for moved in result.stats.h2d_bytes[1:])  # one token a step


@pytest.mark.parametrize("rule", ["radius", "runs"])
def test_the_attended_share_counts_what_the_steps_attended(adapter, prompt, rule):
    """Streaming under a budget of sinks + window attends exactly 12 tokens per (layer, KV head) and step
    (decode positions 40..47 see 41..48 tokens); an oracle whose runs rule doubles its selection attends
    more than the budget, and the count says so. Nothing is counted unless asked for."""
    targets = list(range(1, 10))  # 9 targets: 8 decode steps, at positions 40..47
    selection = SelectionConfig(policy="streaming", budget=Budget(tokens=12), sinks=4, window=8)
    counting = EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD, selection=selection, count_attended=True)
    share = Engine(adapter, counting).score_continuation(prompt, targets).attended_share
    assert share == pytest.approx(8 * 12 / sum(range(41, 49)))
    generated = Engine(adapter, counting).generate(prompt, SamplingConfig(max_new_tokens=9, ignore_eos=True))
    assert generated.stats.attended_share == pytest.approx(8 * 12 / sum(range(41, 49)))
    silent = EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD, selection=selection)
    assert Engine(adapter, silent).score_continuation(prompt, targets).attended_share is None

    budget = Budget(tokens=20)  # sinks 4 + window 8 + 8 selected, then grown by the neighbour rule
    grown = SelectionConfig(policy="oracle", budget=budget, sinks=4, window=8, neighbor_rule=rule,
                            neighbors=1 if rule == "radius" else 0)
    config = EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD, selection=grown, count_attended=True)
    share = Engine(adapter, config).score_continuation(prompt, targets).attended_share
    assert 8 * 20 / sum(range(41, 49)) < share <= 8 * 28 / sum(range(41, 49)) + 1e-9


@pytest.mark.parametrize("policy", ["oracle", "quest", "streaming"])
def test_a_window_that_follows_a_share_budget_attends_exactly_the_budget(adapter, prompt, dense, policy):
    """Widest window 64 under a 90% share at 41..48 tokens: the window is (k - 4) // 2 = 16..20 tokens and grows
    during the run, so the ring holds older tokens than the window; each step attends exactly k = ceil(0.9 n)
    tokens per (layer, KV head) (a ring slot attended with its selected copy, or one dropped, would move the
    count). At 100% every step attends everything: logprobs equal dense's."""
    targets = list(range(1, 10))  # decode positions 40..47: sequences of 41..48 tokens
    share = SelectionConfig(policy=policy, budget=Budget(fraction=0.9), sinks=4, window=64)
    config = EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD, selection=share, count_attended=True)
    budgets = [-(-9 * n // 10) for n in range(41, 49)]
    assert [(k - 4) // 2 for k in budgets][::7] == [16, 20]  # the window grows between the first and last step
    attended = Engine(adapter, config).score_continuation(prompt, targets).attended_share
    assert attended == pytest.approx(sum(budgets) / sum(range(41, 49)))

    everything = SelectionConfig(policy=policy, budget=Budget(fraction=1.0), sinks=4, window=64)
    config = EngineConfig(context=CONTEXT, mode=KVMode.SPARSE_OFFLOAD, selection=everything, count_attended=True)
    scored = Engine(adapter, config).score_continuation(prompt, dense[0])
    assert scored.attended_share == 1.0
    torch.testing.assert_close(scored.logprobs, dense[1], rtol=0, atol=1e-5)
