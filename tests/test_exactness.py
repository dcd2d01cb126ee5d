"""With the dense policy, every KV mode reproduces transformers' own greedy generation."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.models import ModelAdapter

from tiny_models import tiny_model

NEW_TOKENS = 10


def reference(model, prompt: torch.Tensor):
    """transformers' greedy generate with its DynamicCache: (token ids, per-step logits [N, V])."""
    out = model.generate(prompt[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0].float()


def engine_for(adapter, mode: KVMode, prompt_len: int, budget: Budget | None = None) -> Engine:
    selection = SelectionConfig(policy="dense", budget=budget, sinks=2, window=4)
    return Engine(adapter, EngineConfig(context=prompt_len + NEW_TOKENS + 3, mode=mode, selection=selection,
                                        prefill_chunk=16))


@pytest.mark.parametrize("mode", list(KVMode))
@pytest.mark.parametrize("prompt_len", [1, 5, 16, 37])
def test_dense_policy_matches_transformers(arch, mode, prompt_len):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    ref_ids, ref_logits = reference(model, prompt)
    engine = engine_for(adapter, mode, prompt_len)
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert result.token_ids == ref_ids
    scored = engine.score_continuation(prompt.tolist(), ref_ids, keep_logits=True)
    torch.testing.assert_close(scored.logits, ref_logits, atol=2e-4, rtol=1e-4)
    assert scored.predicted.tolist() == ref_ids


def test_sparse_mode_with_budget_covering_everything_is_exact(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    prompt = torch.randint(0, model.config.vocab_size, (29,), generator=torch.Generator().manual_seed(1))
    ref_ids, _ = reference(model, prompt)
    engine = engine_for(adapter, KVMode.SPARSE_OFFLOAD, 29, budget=Budget(tokens=29 + NEW_TOKENS + 3))
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids == ref_ids


def test_mha_model_is_exact_in_sparse_mode():
    model = tiny_model("llama", num_key_value_heads=4)
    prompt = torch.randint(0, model.config.vocab_size, (21,), generator=torch.Generator().manual_seed(2))
    ref_ids, _ = reference(model, prompt)
    engine = engine_for(ModelAdapter(model), KVMode.SPARSE_OFFLOAD, 21)
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids == ref_ids


def test_long_prompt_prefill_chunks_match_unchunked():
    """A prompt spanning several prefill chunks (not a multiple of the chunk) gives the same logits."""
    model = tiny_model("qwen2")
    adapter = ModelAdapter(model)
    prompt = torch.randint(0, model.config.vocab_size, (83,), generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, model.config.vocab_size, (4,), generator=torch.Generator().manual_seed(4)).tolist()
    scores = []
    for chunk in (7, 4096):
        engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.DENSE_OFFLOAD, prefill_chunk=chunk))
        scores.append(engine.score_continuation(prompt.tolist(), target, keep_logits=True).logits)
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (streams, events, pinned host store)")
@pytest.mark.parametrize("mode", list(KVMode))
def test_cuda_modes_match_transformers(mode):
    """The CUDA path (copy stream, per-layer events, pinned store, write-back stream) is exact too."""
    model = tiny_model("llama").cuda()
    prompt = torch.randint(0, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(5)).cuda()
    ref_ids, _ = reference(model, prompt)
    selection = SelectionConfig(policy="dense", sinks=2, window=4)
    engine = Engine(ModelAdapter(model), EngineConfig(context=64, mode=mode, selection=selection, device="cuda",
                                                      prefill_chunk=16))
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids == ref_ids
