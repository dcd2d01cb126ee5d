"""Every policy and the predictor on Qwen3, Gemma 3 and sliding-window Mistral; the CLI's view of
sliding-window savings; unsupported architectures still refused with the supported list."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.models import SUPPORTED_MODEL_TYPES, ModelAdapter
from offload_engine.policies import available_policies, build_policy
from offload_engine.predictor.data import TokenSequences
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
from offload_engine.predictor.teacher import layer_states
from offload_engine.predictor.training import TrainConfig, train

from tbrun_cli.main import app
from tiny_models import WINDOW, tiny_model, tiny_tokenizer

NEW_ARCHS = ("qwen3", "gemma3", "mistral_sw")
POLICIES = [name for name in available_policies() if "<" not in name] + ["critical(quest)", "critical(h2o)"]
CONTEXT, PROMPT, NEW = 64, 40, 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=NEW_ARCHS)
def adapter(request) -> ModelAdapter:
    return ModelAdapter(tiny_model(request.param, num_hidden_layers=4, initializer_range=0.2))


def policy_for(adapter: ModelAdapter, name: str):
    if name == "tokenbutler":
        torch.manual_seed(0)
        config = PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32)
        return build_policy(name, predictor=TokenButlerPredictor(config).eval())
    return build_policy(name)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_on_each_architecture(adapter, policy):
    mode = KVMode.DENSE_OFFLOAD if policy == "dense" else KVMode.SPARSE_OFFLOAD
    selection = SelectionConfig(policy=policy, budget=Budget(tokens=12), sinks=2, window=4)
    engine = Engine(adapter, EngineConfig(context=CONTEXT, mode=mode, selection=selection),
                    policy=policy_for(adapter, policy) if mode is KVMode.SPARSE_OFFLOAD else None)
    prompt = torch.randint(1, 320, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW, ignore_eos=True))
    assert len(result.token_ids) == NEW
    assert all(0 <= t < 320 for t in result.token_ids)
    moved = sum(result.stats.h2d_bytes)
    if adapter.dims.global_layers(CONTEXT):  # global layers fetch from the host store
        assert moved > 0
    else:  # every layer slides within the context: nothing lives on the host
        assert moved == 0


def test_predictor_trains_on_each_architecture(tmp_path):
    for arch in NEW_ARCHS:
        adapter = ModelAdapter(tiny_model(arch, num_hidden_layers=4))
        ids = torch.randint(1, 320, (6, 40), generator=torch.Generator().manual_seed(2))
        data = TokenSequences(train=ids[:4], held_out=ids[4:], files=1, tokens=0)
        config = TrainConfig(seq_len=40, steps=3, producer_every=2, dim=8, hidden=16, rows=8, lr=1e-2,
                             checkpoint_every=3, held_out=2, eval_rows=8)
        torch.manual_seed(0)
        before = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=16))
        steps = []
        result = train(adapter, data, config, tmp_path / arch, on_step=steps.append)
        assert [s.step for s in steps][-1] == 3 and all(torch.isfinite(torch.tensor(s.loss)) for s in steps)
        after = result.predictor.key_proj.detach()
        assert after.shape == before.key_proj.shape and not torch.equal(after, before.key_proj.detach())


def test_predictor_sees_post_norm_post_rope_keys():
    """The teacher pass hands the predictor the keys the model caches (q/k-normed, rotated)."""
    for arch in ("qwen3", "gemma3"):
        model = tiny_model(arch)
        adapter = ModelAdapter(model)
        ids = torch.randint(1, 320, (1, 2 * WINDOW), generator=torch.Generator().manual_seed(0))
        cache = model(ids, use_cache=True).past_key_values
        for state in layer_states(adapter, ids):
            cached = cache.layers[state.layer].keys[0]  # sliding layers cache their last window only
            torch.testing.assert_close(state.k[:, -cached.shape[1]:], cached)


# -------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def flat(output: str) -> str:
    return " ".join(output.split())


def test_cli_shows_what_sliding_layers_save(tmp_path):
    path = tmp_path / "tiny-gemma3"
    tokenizer = tiny_tokenizer()
    tiny_model("gemma3", num_hidden_layers=4, max_position_embeddings=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    result = runner.invoke(app, ["generate", "--model", str(path), "--prompt", "The quick brown fox " * 4,
                                 "--no-chat", "--max-new-tokens", "3", "--context", "128", "--offload"])
    assert result.exit_code == 0, result.output
    dims = ModelAdapter(tiny_model("gemma3", num_hidden_layers=4)).dims
    saved = dims.kv_footprint(128, torch.float32).saved_bytes
    assert "2 of 4 layers keep a 8-token ring" in flat(result.output)
    assert f"saves {saved:,} bytes" in flat(result.output)
    info = runner.invoke(app, ["info", "--model", str(path), "--dtype", "fp32"])
    assert info.exit_code == 0, info.output
    at_positions = dims.kv_footprint(256, torch.float32).saved_bytes
    assert f"saves {at_positions:,} bytes" in flat(info.output)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import Gemma2Config

    Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, vocab_size=64).save_pretrained(tmp_path / "gemma2")
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "gemma2"), "--prompt", "hi"])
    assert result.exit_code == 2
    text = flat(result.output)
    assert "'gemma2' is not supported" in text
    assert all(name in text for name in SUPPORTED_MODEL_TYPES) and "qwen3" in text and "gemma3_text" in text


def test_attention_softcapping_is_refused_clearly():
    from offload_engine.errors import UnsupportedArchitectureError
    from offload_engine.models import dims_from_config

    config = tiny_model("gemma3").config
    config.attn_logit_softcapping = 50.0
    with pytest.raises(UnsupportedArchitectureError, match="soft-capping"):
        dims_from_config(config)
