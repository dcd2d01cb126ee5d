"""Prefix reuse in sparse offload (offload_engine.session over SparseOffloadKV) on tiny random models:
a follow-up prompt prefills only its new tokens, and the continuation's logits, every decode step's
logits at a small budget, the bytes fetched and the policy's state are those of a fresh prefill of
the whole prompt. Policies whose state comes from the prompt's attention fall back with a note."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.engine import DecodeCursor
from offload_engine.models import ModelAdapter
from offload_engine.policies import build_policy
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
from offload_engine.session import Session
from offload_engine.stats import GenerationStats

from tiny_models import tiny_model

REWINDABLE = ["tokenbutler", "quest", "critical(quest)", "critical(tokenbutler)", "streaming", "oracle", "random"]
SINKS, WINDOW, BUDGET = 2, 8, 16  # at 40+ tokens every selecting layer picks 6 of 30+ candidates
INTERVAL = 2  # selections are reused every other step: the planner's step count must start over too
GREEDY = SamplingConfig(max_new_tokens=6, ignore_eos=True)  # 5 decode steps: an odd count

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    # std 0.2: a random model at the default 0.02 repeats one token, which would hide a wrong prefix
    return ModelAdapter(tiny_model("llama", num_hidden_layers=4, initializer_range=0.2))


def engine(adapter: ModelAdapter, policy: str, copy_thread: bool = False) -> Engine:
    """A sparse-offload engine with its own policy object (a session's backend keeps its policy bound)."""
    selection = SelectionConfig(policy=policy, budget=Budget(tokens=BUDGET), sinks=SINKS, window=WINDOW,
                                interval=INTERVAL)
    config = EngineConfig(context=160, mode=KVMode.SPARSE_OFFLOAD, selection=selection, prefill_chunk=4,
                          copy_thread=copy_thread)
    if "tokenbutler" in policy:  # a random predictor of the tiny model's shape: the same one in every engine
        torch.manual_seed(0)
        predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32))
        return Engine(adapter, config, policy=build_policy(policy, predictor=predictor.eval()))
    return Engine(adapter, config)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_logits(eng: Engine, backend, prompt_len: int, tokens: list[int]) -> list[torch.Tensor]:
    """Teacher-forced decode of ``tokens`` from ``prompt_len``: each step's logits ``[V]``."""
    out = []
    cursor = DecodeCursor(torch.tensor(tokens[0]), prompt_len, eng.device)
    for i in range(len(tokens)):
        out.append(eng._decode_step(cursor, backend))
        backend.end_step()
        if i + 1 < len(tokens):
            cursor.advance(torch.tensor(tokens[i + 1]))
    return out


def policy_state(policy, length: int) -> list[torch.Tensor]:
    """The per-position state a rewound policy must rebuild, for positions ``[0, length)``."""
    inner = getattr(policy, "base", policy)
    state = []
    if hasattr(inner, "kmin"):  # quest: every page (those past the prompt empty: +-inf)
        state += [torch.stack(inner.kmin), torch.stack(inner.kmax)]
    if getattr(inner, "cache", None) is not None:  # tokenbutler's projected keys [L-1, KvH, d', capacity]
        state.append(inner.cache.keys[..., :length])
    if getattr(policy, "norms", None) is not None:  # critical's value norms [L, KvH, capacity]
        state.append(policy.norms[..., :length])
    return state


@pytest.mark.parametrize("policy", REWINDABLE)
@pytest.mark.parametrize("kept", [40, 23, 1], ids=["whole-prompt", "mid-prompt", "inside-sinks"])
def test_continuation_and_sparse_decode_equal_a_fresh_prefill(adapter, policy, kept):
    """Cache a 40-token prompt and its answer, rewind to ``kept`` tokens (23: inside a quest page,
    inside the window ring; 1: inside the sinks), continue with 21 new tokens and decode 8 selecting
    steps."""
    eng, ref = engine(adapter, policy), engine(adapter, policy)
    session = Session(eng)
    first = ids(40, 0)
    session.generate(first, GREEDY)
    assert session.cached_tokens == 40  # the answer was decoded sparsely: not offered for reuse
    prompt = first[:kept] + ids(21, 1)
    backend, reuse = session._backend_for(prompt, None)
    assert (reuse.reused_tokens, reuse.prefilled_tokens) == (kept, 21)
    fresh = ref._new_backend()
    follow = ids(8, 2)
    with torch.inference_mode():
        continued = session._prefill_continuation(prompt, kept, backend, GenerationStats(), None)
        full = ref._prefill(prompt, fresh, GenerationStats(), None)
        torch.testing.assert_close(continued, full, atol=1e-4, rtol=1e-4)
        end = len(prompt)
        for ours, theirs in zip(policy_state(eng.policy, end), policy_state(ref.policy, end), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        for ours, theirs in zip(decode_logits(eng, backend, end, follow), decode_logits(ref, fresh, end, follow)):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert backend.planner.attends_everything is False  # the steps compared did select
    assert backend.h2d_bytes_per_step() == fresh.h2d_bytes_per_step()  # same fetches: nothing stale resident
    fresh.close()
    session.close()


def test_quest_rewind_rebuilds_the_cut_page_from_the_host_store(adapter):
    """Page bounds after rewind(23) + 17 more keys are the bounds of a prefill of all 40."""
    eng, ref = engine(adapter, "quest"), engine(adapter, "quest")
    session = Session(eng)
    prompt = ids(40, 3)
    session.generate(ids(23, 3) + ids(30, 4), GREEDY)  # pages 1 and 2 hold other keys past 23
    backend, reuse = session._backend_for(prompt, None)
    assert reuse.reused_tokens == 23
    fresh = ref._new_backend()
    with torch.inference_mode():
        session._prefill_continuation(prompt, 23, backend, GenerationStats(), None)
        ref._prefill(prompt, fresh, GenerationStats(), None)
    pages = -(-40 // eng.policy.page_size)
    for ours, theirs in ((eng.policy.kmin, ref.policy.kmin), (eng.policy.kmax, ref.policy.kmax)):
        torch.testing.assert_close(torch.stack(ours)[:, :, :pages], torch.stack(theirs)[:, :, :pages],
                                   atol=1e-5, rtol=1e-5)
        assert torch.isinf(torch.stack(ours)[:, :, pages:]).all()  # later pages empty, as after a prefill
    fresh.close()
    session.close()


@pytest.mark.parametrize("policy, copy_thread", [(policy, False) for policy in REWINDABLE]
                         + [("tokenbutler", True), ("quest", True)])
def test_a_follow_up_turn_matches_a_fresh_generation(adapter, policy, copy_thread):
    """Through ``Session.generate``: a short first turn decodes densely (under sinks + window), so its
    answer is reused too; the long follow-up decodes sparsely and gives the fresh run's tokens. With a copy
    thread on the session's engine (its rewinds drain it first), against a fresh engine without one."""
    eng, ref = engine(adapter, policy, copy_thread), engine(adapter, policy)
    session = Session(eng)
    first, reuse = session.generate(ids(4, 5), SamplingConfig(max_new_tokens=4, ignore_eos=True))
    assert reuse.reused_tokens == 0 and session.cached_tokens == 4 + 3  # answer included: dense steps
    follow_up = ids(4, 5) + first.token_ids + ids(33, 6)
    second, reuse = session.generate(follow_up, GREEDY)
    assert (reuse.reused_tokens, reuse.prefilled_tokens) == (7, len(follow_up) - 7) and not reuse.note
    fresh = ref.generate(follow_up, GREEDY)
    assert second.token_ids == fresh.token_ids
    assert second.stats.h2d_bytes == fresh.stats.h2d_bytes
    assert sum(second.stats.h2d_bytes) > 0  # the steps fetched selected tokens
    third, reuse = session.generate(follow_up + second.token_ids + ids(5, 7), GREEDY)
    assert reuse.reused_tokens == len(follow_up)  # the sparsely decoded answer is prefilled again
    assert third.token_ids == ref.generate(follow_up + second.token_ids + ids(5, 7), GREEDY).token_ids
    session.close()


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "critical(h2o)"])
def test_attention_state_policies_fall_back_to_a_full_prefill_and_say_why(adapter, policy):
    eng, ref = engine(adapter, policy), engine(adapter, policy)
    session = Session(eng)
    first, reuse = session.generate(ids(40, 8), GREEDY)
    assert "not available in sparse-offload" in reuse.note and policy in reuse.note
    assert session.cached_tokens == 0  # nothing kept: the backend cannot continue
    follow_up = ids(40, 8) + first.token_ids + ids(5, 9)
    second, reuse = session.generate(follow_up, GREEDY)
    assert (reuse.reused_tokens, reuse.prefilled_tokens) == (0, len(follow_up))
    assert reuse.note in second.stats.notes
    assert second.token_ids == ref.generate(follow_up, GREEDY).token_ids
    session.close()


def test_sliding_window_models_still_refuse_in_sparse_offload():
    adapter = ModelAdapter(tiny_model("gemma3", num_hidden_layers=4, initializer_range=0.2))
    eng, ref = engine(adapter, "streaming"), engine(adapter, "streaming")
    session = Session(eng)
    first, reuse = session.generate(ids(30, 10), GREEDY)
    assert "sliding-window" in reuse.note
    follow_up = ids(30, 10) + first.token_ids + ids(4, 11)
    second, reuse = session.generate(follow_up, GREEDY)
    assert reuse.reused_tokens == 0
    assert second.token_ids == ref.generate(follow_up, GREEDY).token_ids
    session.close()
