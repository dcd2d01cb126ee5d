"""Prefix reuse (offload_engine.session) on tiny random models: a follow-up prompt prefills only its
new tokens and gives what a fresh prefill of the whole prompt gives (dense modes; sparse offload:
test_serve_sparse_session.py)."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.models import ModelAdapter
from offload_engine.session import Session, StopGeneration
from offload_engine.stats import GenerationStats

from tiny_models import tiny_model

GREEDY = SamplingConfig(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    # std 0.2: a random model at the default 0.02 repeats one token, which would hide a wrong prefix
    return ModelAdapter(tiny_model("llama", initializer_range=0.2))


def engine(adapter, mode: KVMode) -> Engine:
    selection = SelectionConfig(policy="dense" if mode is not KVMode.SPARSE_OFFLOAD else "streaming",
                                budget=Budget(tokens=24) if mode is KVMode.SPARSE_OFFLOAD else None,
                                sinks=2, window=8)
    return Engine(adapter, EngineConfig(context=128, mode=mode, selection=selection, prefill_chunk=4))


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", [KVMode.DENSE_DEVICE, KVMode.DENSE_OFFLOAD])
def test_follow_up_prefills_only_new_tokens_and_matches_a_fresh_prefill(adapter, mode, one_thread):
    eng = engine(adapter, mode)
    session = Session(eng)
    first, reuse = session.generate(ids(21, 0), GREEDY)
    assert reuse.reused_tokens == 0 and first.finish_reason == "length"
    assert session.cached_tokens == 21 + len(first.token_ids) - 1
    follow_up = ids(21, 0) + first.token_ids + ids(9, 1)
    second, reuse = session.generate(follow_up, GREEDY)
    assert reuse.reused_tokens == session_cached_before(first) and reuse.prefilled_tokens == 9 + 1
    fresh = eng.generate(follow_up, GREEDY)
    assert second.token_ids == fresh.token_ids
    session.close()


def session_cached_before(first) -> int:
    """The KV after a generation covers the prompt and every generated token but the last."""
    return len(first.prompt_ids) + len(first.token_ids) - 1


@pytest.mark.parametrize("mode", [KVMode.DENSE_DEVICE, KVMode.DENSE_OFFLOAD])
def test_continuation_prefill_logits_equal_a_full_prefill(adapter, mode, one_thread):
    eng = engine(adapter, mode)
    session = Session(eng)
    prompt = ids(30, 2)
    session.generate(prompt[:13], SamplingConfig(max_new_tokens=1))  # caches prompt[:13]
    backend, reuse = session._backend_for(prompt, None)
    assert reuse.reused_tokens == 13
    with torch.inference_mode():
        continued = session._prefill_continuation(prompt, 13, backend, GenerationStats(), None)
        full_backend = eng._new_backend()
        full = eng._prefill(prompt, full_backend, GenerationStats(), None)
        full_backend.close()
    torch.testing.assert_close(continued, full, atol=1e-4, rtol=1e-4)
    session.close()


def test_a_repeated_prompt_prefills_its_last_token_only(adapter, one_thread):
    eng = engine(adapter, KVMode.DENSE_DEVICE)
    session = Session(eng)
    prompt = ids(17, 3)
    first, _ = session.generate(prompt, GREEDY)
    again, reuse = session.generate(prompt, GREEDY)
    assert (reuse.reused_tokens, reuse.prefilled_tokens) == (16, 1)
    assert again.token_ids == first.token_ids


def test_a_cancelled_generation_frees_its_kv_and_a_stopped_one_keeps_it(adapter, one_thread):
    session = Session(engine(adapter, KVMode.DENSE_OFFLOAD))

    def stop_after(count: int, reason: str):
        seen = []

        def on_token(token: int) -> None:
            seen.append(token)
            if len(seen) == count:
                raise StopGeneration(reason)
        return on_token

    result, _ = session.generate(ids(12, 6), SamplingConfig(max_new_tokens=50, ignore_eos=True),
                                 on_token=stop_after(3, "stop"))
    assert (result.finish_reason, len(result.token_ids), session.cached_tokens) == ("stop", 3, 12 + 2)
    backend = session._backend
    result, _ = session.generate(ids(12, 6), SamplingConfig(max_new_tokens=50, ignore_eos=True),
                                 on_token=stop_after(2, "cancelled"))
    assert result.finish_reason == "cancelled" and len(result.token_ids) == 2
    assert session.cached_tokens == 0 and session._backend is None and backend.host.closed
