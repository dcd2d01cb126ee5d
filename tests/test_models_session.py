"""Prefix reuse with sliding-window layers: a ring cannot go back, so the session prefills the
whole prompt again (and says so), giving what a fresh generation gives."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Engine, EngineConfig, KVMode, SamplingConfig
from offload_engine.models import ModelAdapter
from offload_engine.session import Session

from tiny_models import tiny_model

GREEDY = SamplingConfig(max_new_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("mode", [KVMode.DENSE_DEVICE, KVMode.DENSE_OFFLOAD])
def test_sliding_models_fall_back_to_a_full_prefill(mode, one_thread):
    adapter = ModelAdapter(tiny_model("gemma3", initializer_range=0.2))
    engine = Engine(adapter, EngineConfig(context=96, mode=mode, prefill_chunk=4))
    session = Session(engine)
    prompt = torch.randint(3, 300, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    first, reuse = session.generate(prompt, GREEDY)
    follow_up = prompt + first.token_ids + [5, 6, 7]
    second, reuse = session.generate(follow_up, GREEDY)
    assert reuse.reused_tokens == 0 and reuse.prefilled_tokens == len(follow_up) and reuse.note
    assert second.token_ids == engine.generate(follow_up, GREEDY).token_ids
    session.close()
