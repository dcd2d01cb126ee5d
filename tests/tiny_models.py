"""Tiny random Llama / Qwen2 / Qwen3 / Mistral / Gemma 3 models built from configs (nothing is
downloaded), a small byte-level tokenizer trained on the spot, for tests.

``mistral_sw`` is Mistral with an 8-token sliding window on every layer; ``gemma3`` alternates
sliding (8 tokens, local RoPE base) and global layers, with its query scaling, embedding scale,
sandwich norms and final-logit soft-capping; ``qwen3`` has per-head q/k norms."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from offload_engine.models import ModelAdapter

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral_sw": (MistralConfig, MistralForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
}
WINDOW = 8  # the sliding window of the sliding-window tiny models
EXTRA = {  # per architecture, on top of TINY
    "qwen3": dict(head_dim=16),
    "mistral_sw": dict(sliding_window=WINDOW, eos_token_id=None),  # its seed-0 greedy run hits id 2
    "gemma3": dict(eos_token_id=None, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, final_logit_softcapping=3.0,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}),
}
SLIDING_ARCHS = ("mistral_sw", "gemma3")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France, famous for the Eiffel Tower and its museums.",
    "def add(a, b):\n    return a + b\n",
    "Memory bandwidth limits decoding; the KV cache grows with every token of context.",
]


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-weight model of the named architecture (float32, CPU, eval mode)."""
    config_cls, model_cls = ARCHS[arch]
    settings = {**TINY, **EXTRA.get(arch, {}), **overrides}
    if arch == "gemma3" and "layer_types" not in overrides:  # every second layer global, the last one too
        n = settings["num_hidden_layers"]
        settings["layer_types"] = ["full_attention" if i % 2 or i == n - 1 else "sliding_attention" for i in range(n)]
    torch.manual_seed(seed)
    return model_cls(config_cls(**settings)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a vocabulary that fits ``TINY['vocab_size']``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def selecting_model() -> ModelAdapter:
    """Five layers, 4 query and 2 KV heads, init std 0.2 (varied tokens): the selection tests' model."""
    return ModelAdapter(tiny_model("llama", num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                   initializer_range=0.2))


def seeded_policy(adapter: ModelAdapter, spec: str, query_heads: int | None = None, **options):
    """``build_policy(spec, **options)``; a tokenbutler spec gets a small seeded predictor (a producer every 2
    layers, d' 8, I 32, ``query_heads`` query heads, by default the model's) for ``adapter``."""
    from offload_engine.policies import build_policy
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

    if "tokenbutler" not in spec:
        return build_policy(spec, **options)
    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32,
                                                               query_heads=query_heads))
    return build_policy(spec, predictor=predictor.eval(), **options)

