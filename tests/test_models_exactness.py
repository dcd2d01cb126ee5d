"""Qwen3, Gemma 3 and sliding-window Mistral through the one adapter: every KV mode reproduces
transformers' own greedy generation, with prompts around the window; what the adapter hands out
(keys post-norm, post-RoPE) is what the model caches; sliding layers never reach the host store."""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.attention import prefill_attention
from offload_engine.backends.dense_offload import DenseOffloadKV
from offload_engine.backends.sparse_offload import SparseOffloadKV
from offload_engine.models import ModelAdapter, layer_windows
from offload_engine.policies import build_policy

from tiny_models import WINDOW, tiny_model

NEW_TOKENS = 10
# name -> (tiny_models architecture, config overrides); qwen2_sw: Qwen2's sliding layers (from max_window_layers)
MODELS = {
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", {}),
    "mistral_sw": ("mistral_sw", {}),
    "qwen2_sw": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    arch, options = MODELS[request.param]
    return tiny_model(arch, **options)


def reference(model, prompt: torch.Tensor):
    """transformers' greedy generate with its own cache: (token ids, per-step logits [N, V]).

    Prompts avoid id 0, the pad id here (transformers would mask it out)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    out = model.generate(prompt[None], generation_config=config)  # no EOS: the engine runs with ignore_eos
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0].float()


def engine_for(adapter: ModelAdapter, mode: KVMode, prompt_len: int, policy: str = "dense", chunk: int = 16) -> Engine:
    selection = SelectionConfig(policy=policy, budget=None, sinks=2, window=4)  # budget None: every token
    return Engine(adapter, EngineConfig(context=prompt_len + NEW_TOKENS + 3, mode=mode, selection=selection,
                                        prefill_chunk=chunk))


@pytest.mark.parametrize("mode", list(KVMode))
@pytest.mark.parametrize("prompt_len", [5, WINDOW, WINDOW + 1, 20])
def test_every_mode_matches_transformers_around_the_window(model, mode, prompt_len):
    adapter = ModelAdapter(model)
    prompt = torch.randint(1, model.config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(prompt_len))
    ref_ids, ref_logits = reference(model, prompt)
    engine = engine_for(adapter, mode, prompt_len, chunk=6)  # chunks smaller than the window, too
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids == ref_ids
    scored = engine.score_continuation(prompt.tolist(), ref_ids, keep_logits=True)
    torch.testing.assert_close(scored.logits, ref_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["quest", "oracle"])
def test_sparse_policies_at_full_budget_match_transformers(model, policy):
    adapter = ModelAdapter(model)
    prompt = torch.randint(1, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    ref_ids, ref_logits = reference(model, prompt)
    engine = engine_for(adapter, KVMode.SPARSE_OFFLOAD, 20, policy=policy)
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids == ref_ids
    scored = engine.score_continuation(prompt.tolist(), ref_ids, keep_logits=True)
    torch.testing.assert_close(scored.logits, ref_logits, atol=2e-4, rtol=1e-4)


def test_windows_come_from_the_config():
    assert layer_windows(tiny_model("llama").config) == ()
    assert layer_windows(tiny_model("qwen3").config) == ()
    assert layer_windows(tiny_model("mistral_sw").config) == (WINDOW,) * 3
    assert layer_windows(tiny_model("gemma3", num_hidden_layers=4).config) == (WINDOW, None, WINDOW, None)
    qwen2 = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1).config
    assert layer_windows(qwen2) == (None, 16, 16)  # Qwen2/3: layers from max_window_layers on slide
    # a Llama config keeps a stray sliding_window as an attribute; transformers' Llama never applies it
    assert layer_windows(tiny_model("llama", sliding_window=8).config) == ()


def test_a_yarn_rope_serves_factor_times_its_original_positions():
    """Qwen2.5 / Qwen3 model cards add YaRN (factor 4 over 32k) and keep max_position_embeddings: the
    scaled positions are what the model is configured for, no --allow-rope-scaling needed."""
    from offload_engine.models import trained_positions

    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
    assert trained_positions(tiny_model("qwen2", max_position_embeddings=64, rope_parameters=yarn).config) == 256
    llama3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64,
                  low_freq_factor=1.0, high_freq_factor=4.0)
    assert trained_positions(tiny_model("llama", max_position_embeddings=512, rope_parameters=llama3).config) == 512
    assert trained_positions(tiny_model("gemma3").config) == tiny_model("gemma3").config.max_position_embeddings


def test_a_dynamic_rope_past_its_positions_gives_every_run_a_fresh_models_logits():
    """A dynamic (NTK) RoPE rescales once positions pass the trained ones and keeps its frequencies;
    each sequence must start from the model's own (a second run of the same prompt, or a scoring
    after a generation, gave other logits), and a server cannot reuse a prefix under it."""
    from offload_engine.session import Session

    dynamic = dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
    model = tiny_model("llama", max_position_embeddings=16, rope_parameters=dynamic)
    prompt = torch.randint(1, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(7))
    ids, logits = reference(model, prompt)  # transformers, fresh: its RoPE grows from 16 to 30 positions
    adapter = ModelAdapter(model)
    engine = Engine(adapter, EngineConfig(context=40, mode=KVMode.DENSE_DEVICE, allow_rope_scaling=True,
                                          selection=SelectionConfig(policy="dense", budget=None, sinks=2, window=4)))
    assert adapter.rope_varies_with_length(40) and not adapter.rope_varies_with_length(16)
    long_ids = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS + 8, ignore_eos=True)).token_ids
    scored = engine.score_continuation(prompt.tolist(), ids, keep_logits=True).logits
    torch.testing.assert_close(scored, logits, atol=1e-4, rtol=1e-4)
    again = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS + 8, ignore_eos=True)).token_ids
    assert again == long_ids and long_ids[:NEW_TOKENS] == ids
    session = Session(engine)
    first, _ = session.generate(prompt.tolist(), SamplingConfig(max_new_tokens=2, ignore_eos=True))
    _, reuse = session.generate(prompt.tolist() + first.token_ids, SamplingConfig(max_new_tokens=2, ignore_eos=True))
    assert reuse.reused_tokens == 0 and "dynamic RoPE" in reuse.note
    session.close()


def test_keys_are_post_norm_post_rope_as_the_model_caches_them():
    """Qwen3 and Gemma 3 norm q and k per head before RoPE: the adapter's keys are the cache's."""
    for arch in ("qwen3", "gemma3"):
        model = tiny_model(arch)
        adapter = ModelAdapter(model)
        ids = torch.randint(1, 320, (1, 6), generator=torch.Generator().manual_seed(0))
        cache = model(ids, use_cache=True).past_key_values
        hidden = adapter.embed(ids)
        rope = adapter.rope(hidden, torch.arange(6).unsqueeze(0))
        for layer in range(adapter.dims.num_layers):
            x = adapter.attention_input(layer, hidden)
            q, k, v = adapter.qkv(layer, x, rope)
            torch.testing.assert_close(k, cache.layers[layer].keys)
            torch.testing.assert_close(v, cache.layers[layer].values)
            out = prefill_attention(q, k, v, adapter.scaling, 16, window=adapter.window(layer))
            hidden = adapter.finish_layer(layer, hidden, out)
        expected = model(ids).logits.float()
        torch.testing.assert_close(adapter.logits(hidden), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_prefill_window_mask_is_transformers_sliding_mask(chunk):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 19, 8, generator=generator) for _ in range(3))
    rows, cols = torch.arange(19).unsqueeze(1), torch.arange(19)
    allowed = (cols <= rows) & (cols > rows - 5)  # kv_idx > q_idx - window
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(prefill_attention(q, k, v, 0.3, chunk, window=5), expected)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(prefill_attention(q, k, v, 0.3, chunk, window=19), causal)


@pytest.mark.parametrize("arch, options", [
    ("gemma3", {}), ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
])
def test_sliding_layers_skip_the_host_store_and_selection(arch, options, monkeypatch):
    model = tiny_model(arch, num_hidden_layers=4, **options)
    adapter = ModelAdapter(model)
    local = set(adapter.dims.local_windows(64))
    assert local == {layer for layer, w in enumerate(layer_windows(model.config)) if w is not None}
    global_layers = [layer for layer in range(4) if layer not in local]
    selected_for: list[int] = []
    original = SparseOffloadKV._copy
    monkeypatch.setattr(SparseOffloadKV, "_copy",
                        lambda self, layer, plan: selected_for.append(layer) or original(self, layer, plan))
    selection = SelectionConfig(policy="quest", budget=Budget(tokens=12), sinks=2, window=4)
    engine = Engine(adapter, EngineConfig(context=64, mode=KVMode.SPARSE_OFFLOAD, selection=selection))
    backends, banked = [], []

    def new_backend(*args, _new=engine._new_backend):
        backends.append(_new(*args))
        banked.append(set(backends[-1].working_set.bank_of))
        return backends[-1]

    monkeypatch.setattr(engine, "_new_backend", new_backend)
    prompt = torch.randint(1, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=6, ignore_eos=True))
    backend = backends[0]
    assert backend.host.layers == global_layers and len(global_layers) == 2
    per_layer = 2 * adapter.dims.num_kv_heads * 64 * adapter.dims.head_dim * 4
    assert backend.host.nbytes == per_layer * len(global_layers)
    assert banked[0] == set(global_layers)  # no slots for sliding layers
    ring = 2 * adapter.dims.num_kv_heads * WINDOW * adapter.dims.head_dim * 4
    assert result.stats.decode_kv_bytes >= ring * len(local)
    assert selected_for and set(selected_for) <= set(global_layers)
    assert set(backend.local.windows) == local
    footprint = adapter.dims.kv_footprint(64, torch.float32)
    assert footprint.saved_bytes == (per_layer - ring) * len(local) > 0

    dense = DenseOffloadKV(adapter.dims, 64, torch.float32, torch.device("cpu"))
    assert [layer for layer in range(4) if dense.host.keys[layer].shape[1] == 64] == global_layers
    dense.close()


def test_a_window_at_least_the_context_is_global():
    """A window that drops nothing within the context keeps the layer global (offloaded)."""
    adapter = ModelAdapter(tiny_model("mistral_sw"))
    assert adapter.dims.local_windows(WINDOW) == {} and adapter.dims.global_layers(WINDOW) == [0, 1, 2]
    assert adapter.dims.local_windows(WINDOW + 1) == {0: WINDOW, 1: WINDOW, 2: WINDOW}
    # every layer sliding: no host KV at all, and decoding still matches transformers
    prompt = torch.randint(1, 320, (12,), generator=torch.Generator().manual_seed(4))
    ref_ids, _ = reference(adapter.model, prompt)
    engine = engine_for(adapter, KVMode.SPARSE_OFFLOAD, 12, policy=build_policy("quest").name)
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert result.token_ids == ref_ids and sum(result.stats.h2d_bytes) == 0
