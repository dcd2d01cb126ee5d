"""Invariants of the selection policies, on random tensors and a tiny fake model (CPU, fast).

A ``Driver`` plays the engine's part: it writes each token's K/V to a host store, calls the
policy's hooks in the engine's order (observe, score, select, observe the attention), and uses the
real ``Selector`` for the budget arithmetic and the top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_engine.attention import attention_weights
from offload_engine.config import Budget, SelectionConfig
from offload_engine.cpu_cache.host_store import HostKVStore
from offload_engine.errors import ConfigError
from offload_engine.models import ModelDims
from offload_engine.policies import available_policies, build_policy
from offload_engine.policies.base import NEVER, Candidates, Policy, PolicyContext
from offload_engine.selection import topk_positions
from offload_engine.policies.critical import CriticalPolicy, value_norms
from offload_engine.policies.h2o import H2OPolicy
from offload_engine.policies.prompt_attention import causal_column_sums
from offload_engine.policies.quest import QuestPolicy
from offload_engine.policies.snapkv import SnapKVPolicy
from offload_engine.selection import Selector

DIMS = ModelDims(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=12,
                 max_positions=256, vocab_size=32)
SINKS, WINDOW, CAPACITY = 2, 4, 128
SCORED = ["oracle", "quest", "h2o", "snapkv", "random"]


class TinyAdapter:
    """The two things policies ask of a model adapter: the attention scaling and ``W_O`` per head."""

    def __init__(self, dims: ModelDims, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.scaling = dims.head_dim ** -0.5
        self.w_o = [torch.randn(dims.num_heads, dims.head_dim, dims.hidden_size, generator=generator)
                    for _ in range(dims.num_layers)]

    def output_projection(self, layer: int) -> torch.Tensor:
        return self.w_o[layer]  # [H, D, E]


def make_context(host: HostKVStore | None = None, capacity: int = CAPACITY) -> PolicyContext:
    return PolicyContext(dims=DIMS, capacity=capacity, device=torch.device("cpu"), dtype=torch.float32,
                         adapter=TinyAdapter(DIMS), host_store=host, sinks=SINKS, window=WINDOW)


class Driver:
    """Runs a policy through a prompt and decode steps the way the sparse engine does."""

    def __init__(self, policy, budget: int, prompt: int = 40, seed: int = 0):
        self.policy = policy
        self.generator = torch.Generator().manual_seed(seed)
        self.host = HostKVStore(DIMS, CAPACITY, torch.float32, pin=False)
        self.selector = Selector(SelectionConfig(budget=Budget(tokens=budget), sinks=SINKS, window=WINDOW),
                                 CAPACITY, frozenset())
        policy.bind(make_context(self.host))
        self.length = 0
        self.prefill(prompt)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * scale

    def prefill(self, length: int) -> None:
        heads, kv_heads, dim = DIMS.num_heads, DIMS.num_kv_heads, DIMS.head_dim
        for layer in range(DIMS.num_layers):
            q = self.randn(heads, length, dim, scale=2.0)
            k, v = self.randn(kv_heads, length, dim), self.randn(kv_heads, length, dim)
            self.host.write(layer, 0, k, v)
            self.policy.observe_prefill(layer, self.randn(length, DIMS.hidden_size), q, k, v)
        self.length = length

    def step(self) -> dict[int, tuple[Candidates, torch.Tensor, torch.Tensor]]:
        """One decode step; per layer: (candidates, scores [KvH, n], selected positions [KvH, k])."""
        position, out = self.length, {}
        for layer in range(DIMS.num_layers):
            q = self.randn(DIMS.num_heads, DIMS.head_dim, scale=2.0)
            k, v = self.randn(DIMS.num_kv_heads, DIMS.head_dim), self.randn(DIMS.num_kv_heads, DIMS.head_dim)
            self.host.write(layer, position, k.unsqueeze(1), v.unsqueeze(1))
            self.policy.observe_decode(layer, position, self.randn(DIMS.hidden_size), q, k, v)
            candidates = self.selector.candidates(layer, position)
            scores = self.policy.score(layer, q, candidates)
            selected = self.selector.select(scores, candidates, slots=CAPACITY)
            if self.policy.wants_attention:
                self.attend(layer, q, candidates, selected)
            out[layer] = (candidates, scores, selected)
        self.length += 1
        return out

    def attend(self, layer: int, q: torch.Tensor, candidates: Candidates, selected: torch.Tensor) -> None:
        """Report the attention over sinks + selected + window, as the engine does."""
        kv_heads = DIMS.num_kv_heads
        fixed = torch.cat([torch.arange(0, candidates.lo), torch.arange(candidates.hi, candidates.position + 1)])
        positions = torch.cat([fixed.expand(kv_heads, -1), selected], dim=1)  # [KvH, N], -1 padding
        keys = torch.stack([self.host.keys[layer][h, positions[h].clamp(min=0)] for h in range(kv_heads)])
        weights = attention_weights(q, keys, positions >= 0, self.policy.ctx.adapter.scaling)
        self.policy.observe_attention(layer, positions, weights)


def assert_kept_highest(scores: torch.Tensor, candidates: Candidates) -> None:
    """The kept candidates' scores are at least every dropped candidate's, per KV head."""
    kept = topk_positions(scores, candidates.keep, candidates.lo)
    for head in range(scores.shape[0]):
        chosen = kept[head][kept[head] >= 0] - candidates.lo
        dropped = torch.ones(scores.shape[1], dtype=torch.bool)
        dropped[chosen] = False
        if chosen.numel() and dropped.any():
            assert scores[head, chosen].min() >= scores[head, dropped].max()
        assert not torch.isneginf(scores[head, chosen]).any()


# ----------------------------------------------------------------------------------- all policies
@pytest.mark.parametrize("spec", SCORED + [f"critical({name})" for name in SCORED])
def test_each_policy_keeps_its_highest_scores(spec):
    policy = build_policy(spec)
    driver = Driver(policy, budget=SINKS + WINDOW + 10)
    for _ in range(6):
        for candidates, scores, _ in driver.step().values():
            assert scores.shape == (DIMS.num_kv_heads, candidates.count)
            assert scores.dtype == torch.float32 and not torch.isnan(scores).any()
            assert_kept_highest(scores, candidates)


def test_registry_builds_every_policy_and_wraps_any_sparse_one():
    names = [name for name in available_policies() if "(" not in name]
    assert set(SCORED) <= set(names) and "critical(<base>)" in available_policies()
    for name in names:
        if name == "dense":  # every token of every layer: nothing to re-weight
            with pytest.raises(ConfigError, match="attends every token, as dense does"):
                build_policy(f"critical({name})")
            continue
        wrapped = build_policy(f"critical({name})")
        assert isinstance(wrapped, CriticalPolicy) and wrapped.base.name == name
    assert build_policy("critical(h2o)").wants_attention
    assert build_policy("critical(oracle)").evaluation_only
    assert build_policy("quest", page_size=8).page_size == 8
    with pytest.raises(ConfigError):
        build_policy("quest", page_size=0)


@pytest.mark.parametrize("spec, message", [
    ("critical(critical(quest))", "'critical(critical(quest))' wraps critical in critical"),
    ("critical( critical(tokenbutler) )", "wraps critical in critical"),
    ("critical(critical)", "wraps critical in critical"),
    ("critical(dense)", "attends every token, as dense does"),
    ("critical", "'critical' wraps a policy: write critical(<base>)"),
    ("quest(h2o)", "'quest' does not wrap a policy"),
    ("critical(quest(h2o))", "'quest' does not wrap a policy"),
    ("critical(magic)", "unknown policy 'magic'"),
])
def test_nesting_that_is_not_a_policy_is_refused_saying_what_is_accepted(spec, message):
    with pytest.raises(ConfigError) as caught:
        build_policy(spec)
    assert message in str(caught.value)
    if "wraps critical" in message or "wraps a policy" in message:  # the bases it may wrap are listed
        assert "<base> one of h2o, oracle, quest, random, snapkv, streaming, tokenbutler." in str(caught.value)


# ------------------------------------------------------------------------------------------ oracle
def test_oracle_scores_are_the_true_attention_probabilities():
    driver = Driver(build_policy("oracle"), budget=SINKS + WINDOW + 8)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(DIMS.num_heads, DIMS.head_dim, generator=generator)
    position = driver.length - 1  # the last prompt token plays the current one
    candidates = driver.selector.candidates(0, position)
    scores = driver.policy.score(0, q, candidates)
    keys = driver.host.keys[0][:, : position + 1].repeat_interleave(2, dim=0)  # [H, T, D]
    probs = torch.softmax(torch.einsum("hd,htd->ht", q, keys) * DIMS.head_dim ** -0.5, dim=-1)
    expected = probs.view(DIMS.num_kv_heads, 2, -1).amax(dim=1)[:, candidates.lo : candidates.hi]
    torch.testing.assert_close(scores.exp(), expected)


# ------------------------------------------------------------------------------------------- quest
@settings(max_examples=40, deadline=None)
@given(page_size=st.integers(1, 9), prompt=st.integers(1, 50), decoded=st.integers(0, 12),
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.01, 1.0, 30.0]), integer_keys=st.booleans())
def test_quest_page_bound_is_an_upper_bound_of_every_token(page_size, prompt, decoded, seed, scale, integer_keys):
    generator = torch.Generator().manual_seed(seed)
    length = prompt + decoded
    keys = torch.randn(DIMS.num_kv_heads, length, DIMS.head_dim, generator=generator) * scale
    if integer_keys:  # ties and zeros
        keys = keys.round().clamp(-2, 2)
    policy = QuestPolicy(page_size=page_size)
    policy.bind(make_context())
    policy.observe_prefill(0, None, None, keys[:, :prompt], None)
    for position in range(prompt, length):
        policy.observe_decode(0, position, None, None, keys[:, position], None)
    q = torch.randn(DIMS.num_heads, DIMS.head_dim, generator=generator)
    lo = int(torch.randint(0, length, (1,), generator=generator))
    hi = int(torch.randint(lo + 1, length + 1, (1,), generator=generator))
    scores = policy.score(0, q, Candidates(lo=lo, hi=hi, keep=1, position=length))
    true = torch.einsum("kgd,knd->kgn", q.view(DIMS.num_kv_heads, 2, -1), keys[:, lo:hi]) * DIMS.head_dim ** -0.5
    slack = 1e-5 * (1 + true.abs().amax())
    assert (scores + slack >= true.amax(dim=1)).all()
    pages = torch.arange(lo, hi) // page_size
    for page in pages.unique():  # every token of a page carries the page's score
        assert (scores[:, pages == page] == scores[:, pages == page][:, :1]).all()


def test_quest_selects_whole_pages():
    driver = Driver(QuestPolicy(page_size=4), budget=SINKS + WINDOW + 9, prompt=60)
    for candidates, _, selected in driver.step().values():
        for head in range(DIMS.num_kv_heads):
            pages = selected[head][selected[head] >= 0] // 4
            counts = torch.bincount(pages)
            full = torch.arange(counts.numel())
            inside = (full * 4 >= candidates.lo) & (full * 4 + 4 <= candidates.hi)
            partial = inside & (counts > 0) & (counts < 4)
            assert int(partial.sum()) <= 1  # only the page the budget cuts through is partial


# --------------------------------------------------------------------------------------------- h2o
def test_h2o_prefill_column_sums_match_the_full_attention_matrix_in_any_chunking():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(DIMS.num_heads, 23, DIMS.head_dim, generator=generator) * 2
    k = torch.randn(DIMS.num_kv_heads, 23, DIMS.head_dim, generator=generator)
    mask = torch.ones(23, 23, dtype=torch.bool).tril()
    logits = torch.einsum("htd,hsd->hts", q, k.repeat_interleave(2, dim=0)) * 0.5
    expected = torch.softmax(logits.masked_fill(~mask, NEVER), dim=-1).sum(dim=1)
    for chunk in (1, 4 * 23 * 3, 1 << 20):
        torch.testing.assert_close(causal_column_sums(q, k, 0.5, chunk), expected)


def test_h2o_never_resurrects_an_evicted_token():
    keep = 6
    driver = Driver(H2OPolicy(), budget=SINKS + WINDOW + keep, prompt=20)
    evicted = {(layer, head): set() for layer in range(DIMS.num_layers) for head in range(DIMS.num_kv_heads)}
    for _ in range(40):
        for layer, (candidates, scores, selected) in driver.step().items():
            for head in range(DIMS.num_kv_heads):
                chosen = set(selected[head][selected[head] >= 0].tolist())
                gone = evicted[(layer, head)]
                assert not chosen & gone, "an evicted token came back"
                assert torch.isneginf(scores[head, [p - candidates.lo for p in gone]]).all()
                gone |= set(range(candidates.lo, candidates.hi)) - chosen
                live = candidates.count - len(gone)
                assert live == min(candidates.count, keep)  # H2O's fixed-size cache
    accumulated = driver.policy.accumulated[0]
    for head in range(DIMS.num_kv_heads):
        assert torch.isneginf(accumulated[head, sorted(evicted[(0, head)])]).all()


def test_h2o_evicts_nothing_while_the_budget_covers_every_candidate():
    driver = Driver(H2OPolicy(), budget=100, prompt=20)
    for _ in range(10):
        for _, scores, _ in driver.step().values():
            assert torch.isfinite(scores).all()


# ------------------------------------------------------------------------------------------ snapkv
def test_snapkv_scores_do_not_change_during_decode():
    driver = Driver(SnapKVPolicy(window=8), budget=SINKS + WINDOW + 10, prompt=40)
    q = torch.zeros(DIMS.num_heads, DIMS.head_dim)
    fixed = Candidates(lo=SINKS, hi=60, keep=10, position=60)
    before = [driver.policy.score(layer, q, fixed) for layer in range(DIMS.num_layers)]
    for _ in range(20):
        driver.step()
    after = [driver.policy.score(layer, q, fixed) for layer in range(DIMS.num_layers)]
    for old, new in zip(before, after):
        assert torch.equal(old, new)
    prompt_part, window_part, generated = old[:, : 32 - SINKS], old[:, 32 - SINKS : 40 - SINKS], old[:, 40 - SINKS :]
    assert (prompt_part <= 8).all() and (prompt_part >= 0).all()  # at most the window's query count
    assert window_part.min() > generated.max() > generated.min() > prompt_part.max()


def test_snapkv_vote_is_independent_of_its_chunking():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(DIMS.num_heads, 30, DIMS.head_dim, generator=generator)
    k = torch.randn(DIMS.num_kv_heads, 30, DIMS.head_dim, generator=generator)
    results = []
    for chunk in (1, 1 << 20):
        policy = SnapKVPolicy(window=8, chunk_elements=chunk)
        policy.bind(make_context())
        policy.observe_prefill(0, None, q, k, None)
        results.append(policy.scores[0][:, :30])
    torch.testing.assert_close(results[0], results[1])
    logits = torch.einsum("hwd,htd->hwt", q[:, 22:], k.repeat_interleave(2, dim=0)) * DIMS.head_dim ** -0.5
    causal = torch.arange(30) <= torch.arange(22, 30).unsqueeze(-1)  # [w, T]
    votes = torch.softmax(logits.masked_fill(~causal, NEVER), dim=-1).sum(dim=1)[:, :22]  # [H, 22]
    pooled = F.avg_pool1d(votes.unsqueeze(1), 7, stride=1, padding=3).squeeze(1)
    torch.testing.assert_close(results[0][:, :22], pooled.view(DIMS.num_kv_heads, 2, -1).mean(dim=1))
    assert (results[0][:, 22:] == 10).all()  # the observation window: the top tier (window + 2)


# ---------------------------------------------------------------------------------------- critical
@pytest.mark.parametrize("name", SCORED + ["streaming", "dense"])
def test_critical_with_alpha_one_selects_exactly_like_its_base(name):
    wrapped = CriticalPolicy(base=build_policy(name), alpha=1.0)
    driver = Driver(wrapped, budget=SINKS + WINDOW + 7)
    q = torch.randn(DIMS.num_heads, DIMS.head_dim, generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        for layer, (candidates, scores, selected) in driver.step().items():
            base_scores = wrapped.base.score(layer, q, candidates)
            ours = wrapped.reweight(range(layer, layer + 1), base_scores.unsqueeze(0), candidates)[0]
            assert torch.equal(topk_positions(ours, candidates.keep, candidates.lo),
                               topk_positions(base_scores, candidates.keep, candidates.lo))


def _two_stages(base: torch.Tensor, value_aware: torch.Tensor, half: int) -> tuple[set[int], set[int]]:
    """CriticalKV's two stages over one head's candidates, by plain torch.topk: the top ``half`` by ``base``, then
    the top ``half`` of the others by ``value_aware``."""
    first = set(torch.topk(base, half).indices.tolist())
    rest = value_aware.clone()
    rest[list(first)] = NEVER
    return first, set(torch.topk(rest, half).indices.tolist())


def test_critical_two_stages_keep_the_base_top_then_the_value_aware_top():
    keep, count = 8, 30
    wrapped = CriticalPolicy(base=build_policy("oracle"), alpha=0.5)  # logit-like: A is a softmax
    wrapped.bind(make_context())
    generator = torch.Generator().manual_seed(4)
    v = torch.randn(DIMS.num_kv_heads, 40, DIMS.head_dim, generator=generator)
    wrapped.observe_prefill(1, None, None, v, v)
    base = torch.randn(DIMS.num_kv_heads, count, generator=generator) * 3
    candidates = Candidates(lo=5, hi=5 + count, keep=keep, position=40)
    chosen = topk_positions(wrapped.reweight(range(1, 2), base.unsqueeze(0), candidates)[0], keep, 0)
    attention = torch.softmax(base, dim=-1)
    value_aware = (attention + 1e-4) * wrapped.norms[1][:, 5 : 5 + count]
    for head in range(DIMS.num_kv_heads):
        first, second = _two_stages(base[head], value_aware[head], 4)
        assert set(chosen[head].tolist()) == first | second


def test_critical_keep_bonus_raises_held_tokens_in_each_stage_on_its_own_scale():
    """--keep-bonus with critical(...): the first stage ranks the base's logits plus log(1 + b) where held, the
    second stage's value-aware scores of held tokens are times 1 + b, and every first-stage token still ranks
    above every second-stage one (held or not)."""
    keep, count, bonus = 8, 30, 1.0
    wrapped = CriticalPolicy(base=build_policy("oracle"), alpha=0.5)  # logit-like scores
    wrapped.bind(make_context())
    generator = torch.Generator().manual_seed(4)
    v = torch.randn(DIMS.num_kv_heads, 40, DIMS.head_dim, generator=generator)
    wrapped.observe_prefill(1, None, None, v, v)
    base = torch.randn(DIMS.num_kv_heads, count, generator=generator) * 3
    held = torch.rand(DIMS.num_kv_heads, count, generator=generator) < 0.5
    candidates = Candidates(lo=5, hi=5 + count, keep=keep, position=40)
    asked = []
    assert wrapped.keeps_held(lambda layers, c: asked.append((layers, c)) or held.unsqueeze(0), bonus)
    favoured = wrapped.reweight(range(1, 2), base.unsqueeze(0), candidates)[0]
    assert asked == [(range(1, 2), candidates)]
    chosen = topk_positions(favoured, keep, 0)
    attention = torch.softmax(base, dim=-1)  # A stays the base's own
    value_aware = (attention + 1e-4) * wrapped.norms[1][:, 5 : 5 + count]
    value_aware = torch.where(held, value_aware * (1 + bonus), value_aware)
    ranked = torch.where(held, base + math.log1p(bonus), base)
    changed = False
    for head in range(DIMS.num_kv_heads):
        first, second = _two_stages(ranked[head], value_aware[head], 4)
        assert set(chosen[head].tolist()) == first | second
        assert favoured[head, list(first)].min() > favoured[head, list(set(range(count)) - first)].max()
        changed |= first != set(torch.topk(base[head], 4).indices.tolist())
    assert changed  # the bonus moved a held token into some head's first stage
    assert wrapped.keeps_held(None, 0.0)  # it takes the bonus itself, and none turns it off
    unfavoured = wrapped.reweight(range(1, 2), base.unsqueeze(0), candidates)[0]
    assert len(asked) == 1 and not torch.equal(unfavoured, favoured)


def test_value_norms_are_the_group_mean_of_the_l1_norm_of_v_times_w_o():
    generator = torch.Generator().manual_seed(6)
    v = torch.randn(DIMS.num_kv_heads, 5, DIMS.head_dim, generator=generator)
    w_o = torch.randn(DIMS.num_heads, DIMS.head_dim, DIMS.hidden_size, generator=generator)
    expected = torch.zeros(DIMS.num_kv_heads, 5)
    for head in range(DIMS.num_heads):
        expected[head // 2] += (v[head // 2] @ w_o[head]).abs().sum(dim=-1) / 2
    torch.testing.assert_close(value_norms(v, w_o), expected)
    strided = w_o.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # [H, D, E] view of an [E, H, D] weight
    torch.testing.assert_close(value_norms(v, strided), expected)


class NeverPolicy(Policy):
    """Scores every candidate -inf (never select)."""

    name = "never"

    def score(self, layer, q, candidates):
        return torch.full((DIMS.num_kv_heads, candidates.count), NEVER)


def test_critical_keeps_never_selected_tokens_never_selected():
    wrapped = CriticalPolicy(base=NeverPolicy())
    driver = Driver(wrapped, budget=SINKS + WINDOW + 5)
    for _ in range(3):
        for _, scores, selected in driver.step().values():
            assert torch.isneginf(scores).all() and (selected < 0).all()


def test_critical_refuses_bad_settings():
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"eps": -1.0}):
        with pytest.raises(ConfigError):
            CriticalPolicy(base=build_policy("random"), **bad)


# ------------------------------------------------------------------------------------------ random
def test_random_is_deterministic_for_a_seed():
    def draws(seed: int) -> list[torch.Tensor]:
        driver = Driver(build_policy("random", seed=seed), budget=SINKS + WINDOW + 5)
        return [scores for _ in range(3) for _, scores, _ in driver.step().values()]

    first, again, other = draws(7), draws(7), draws(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0][:, :5], first[2][:, :5])  # a fresh draw at the next step
    assert all(((s >= 0) & (s < 1)).all() for s in first)
