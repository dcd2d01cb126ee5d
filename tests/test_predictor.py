"""The TokenButler predictor: shapes, the teacher, distillation, checkpoints and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from offload_engine.errors import ConfigError
from offload_engine.models import ModelAdapter
from offload_engine.predictor.checkpoint import (
    WEIGHTS_NAME, PredictorError, load_checkpoint, publish, read_config, save_checkpoint,
)
from offload_engine.predictor.data import DataError, TokenSequences, collect_text_files, load_sequences
from offload_engine.predictor.evaluation import budget_counts, evaluate, select_top, streaming_mask
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor, pool_query_heads, widen_hidden
from offload_engine.predictor.teacher import (distillation_loss, layer_states, mixed_distillation_loss, sample_rows,
                                              teacher_mixed_keys, teacher_probs)
from offload_engine.predictor import training
from offload_engine.predictor.training import TrainConfig, TrainingError, train, warmup_cosine

from tiny_models import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def peaked_adapter(arch: str = "llama", layers: int = 4, kv_heads: int = 2, seed: int = 0) -> ModelAdapter:
    """A tiny random model whose attention is peaked (q/k weights scaled up), so that top-k
    selection matters and a predictor has something to learn."""
    model = tiny_model(arch, seed=seed, num_hidden_layers=layers, num_key_value_heads=kv_heads)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    return ModelAdapter(model)


def random_sequences(count: int, length: int, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def small_config(**overrides) -> TrainConfig:
    base = dict(seq_len=96, steps=6, producer_every=2, dim=8, hidden=32, rows=32, lr=1e-2,
                checkpoint_every=2, held_out=2, eval_rows=16)
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("arch, kv_heads", [("llama", 4), ("qwen2", 2), ("mistral", 1)])
def test_predictor_shapes_for_mha_and_gqa(arch, kv_heads):
    adapter = peaked_adapter(arch, layers=4, kv_heads=kv_heads)
    config = PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32)
    predictor = TokenButlerPredictor(config)
    assert config.producers == (0, 2)
    assert list(config.consumers(0)) == [1, 2] and list(config.consumers(2)) == [3]
    assert [config.producer_of(layer) for layer in range(4)] == [None, 0, 0, 2]
    assert predictor.key_proj.shape == (3, kv_heads, adapter.dims.head_dim, 8)
    x = torch.randn(5, adapter.dims.hidden_size)
    assert predictor.importance_queries(0, x).shape == (5, 2, 4, 8)
    assert predictor.importance_queries(2, x).shape == (5, 1, 4, 8)
    keys = predictor.project_keys(1, torch.randn(kv_heads, 11, adapter.dims.head_dim))
    assert keys.shape == (kv_heads, 11, 8)
    scores = predictor.head_scores(torch.randn(5, 4, 8), keys)
    assert scores.shape == (4, 5, 11)
    assert predictor.group_max(scores).shape == (kv_heads, 5, 11)


def test_head_scores_pair_each_query_head_with_its_kv_group():
    config = PredictorConfig(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=16, dim=4, hidden=8)
    predictor = TokenButlerPredictor(config)
    queries, keys = torch.randn(3, 6, 4), torch.randn(2, 7, 4)
    scores = predictor.head_scores(queries, keys)
    for head in range(6):
        expected = queries[:, head] @ keys[head // 3].T / math.sqrt(4)
        torch.testing.assert_close(scores[head], expected)
    torch.testing.assert_close(predictor.group_max(scores)[1], scores[3:6].amax(0))


def test_fewer_query_heads_stand_for_blocks_of_their_group():
    """Two query heads for 6 heads in 2 KV groups: query head j scores its group's keys and stands for model
    heads 3j..3j+2 (``pool_heads`` / ``expand_heads``); pooling a predictor's heads averages their queries,
    so its logits are the means of the old heads' logits."""
    config = PredictorConfig(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=16, dim=4, hidden=8,
                             producer_every=2)
    full = TokenButlerPredictor(config)
    pooled = pool_query_heads(full, 2)
    assert pooled.config.query_heads == 2 and pooled.config.query_group == 1 and full.config.query_heads == 6
    x, keys = torch.randn(5, 16), torch.randn(2, 7, 4)
    queries = pooled.importance_queries(0, x)
    assert queries.shape == (5, 2, 2, 4)
    torch.testing.assert_close(queries, full.importance_queries(0, x).view(5, 2, 2, 3, 4).mean(dim=3))
    scores = pooled.head_scores(queries[:, 1], keys)
    for head in range(2):
        torch.testing.assert_close(scores[head], queries[:, 1, head] @ keys[head].T / math.sqrt(4))
    full_scores = full.head_scores(full.importance_queries(0, x)[:, 1], keys)  # [6, R, T]
    torch.testing.assert_close(scores, full_scores.view(2, 3, 5, 7).mean(dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(pooled.expand_heads(scores), scores.repeat_interleave(3, dim=0))
    assert torch.equal(pooled.pool_heads(torch.arange(6.0)), torch.tensor([1.0, 4.0]))
    assert pooled.num_parameters() < full.num_parameters()


def test_widening_keeps_what_the_predictor_computes_and_refuses_to_narrow():
    config = PredictorConfig(num_layers=5, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=16, dim=4, hidden=8,
                             producer_every=2)
    narrow = TokenButlerPredictor(config).eval()
    wide = widen_hidden(narrow, 20).eval()
    assert wide.config.hidden == 20 and wide.config == replace(config, hidden=20)
    x, k = torch.randn(5, 16), torch.randn(2, 7, 8)
    for producer in (0, 2):
        torch.testing.assert_close(wide.importance_queries(producer, x), narrow.importance_queries(producer, x))
    assert torch.equal(wide.project_keys(3, k), narrow.project_keys(3, k))
    assert wide.queries[0][1].weight[8:].abs().sum() > 0  # the new units have inputs, and learn
    assert widen_hidden(narrow, 8) is narrow
    with pytest.raises(ConfigError, match="cannot narrow"):
        widen_hidden(narrow, 4)
    training.check_init_shape(config, replace(config, hidden=20, query_heads=2))  # both taken
    with pytest.raises(TrainingError, match="another shape"):
        training.check_init_shape(replace(config, hidden=20), config)
    adapted = training.adapt_init(narrow, replace(config, hidden=20, query_heads=2))
    assert (adapted.config.hidden, adapted.config.query_heads) == (20, 2)


def test_pooled_teacher_rows_give_each_model_heads_loss_against_its_query_head():
    """The loss of a predictor with one query head per KV group is the model heads' cross-entropies against
    the query head standing for each, however it is computed: on the teacher's mixed keys pooled over the
    group (training's default), on its rows pooled, or on every model head against expanded logits."""
    adapter = peaked_adapter("qwen2", kv_heads=2)
    dims = adapter.dims
    predictor = TokenButlerPredictor(PredictorConfig.for_model(dims, 2, 8, 32, query_heads=dims.num_kv_heads))
    generator = torch.Generator().manual_seed(3)
    length, rows = 40, torch.tensor([10, 25, 39])
    q = torch.randn(dims.num_heads, len(rows), dims.head_dim, generator=generator) * 3
    k = torch.randn(dims.num_kv_heads, length, dims.head_dim, generator=generator)
    probs = teacher_probs(q, k, rows, adapter.scaling)  # [H, R, T]
    mix = teacher_mixed_keys(q, k, rows, adapter.scaling)  # [H, R, D]
    queries = torch.randn(len(rows), dims.num_kv_heads, 8, generator=generator)  # [R, Hq, d']
    logits = predictor.head_scores(queries, predictor.project_keys(1, k))  # [Hq, R, T]
    target = predictor.project_head_rows(1, predictor.pool_heads(mix))
    mixed = mixed_distillation_loss(logits, queries.transpose(0, 1), target, rows, 1 / math.sqrt(8))
    pooled = distillation_loss(predictor.pool_heads(probs), logits, rows)
    per_head = distillation_loss(probs, predictor.expand_heads(logits), rows)
    torch.testing.assert_close(mixed, per_head, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, per_head, rtol=1e-4, atol=1e-5)


def test_query_heads_must_split_the_groups_evenly():
    with pytest.raises(ConfigError, match=r"--query-heads 4: .* choose one of \[2, 6\]"):
        PredictorConfig(num_layers=4, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=16, query_heads=4)
    with pytest.raises(ConfigError, match="--query-heads 0"):
        PredictorConfig(num_layers=4, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=16, query_heads=0)
    assert PredictorConfig(num_layers=4, num_heads=6, num_kv_heads=2, head_dim=8, hidden_size=16).query_heads == 6


def test_one_query_head_per_kv_group_learns_the_groups_attention(tmp_path):
    """Trained with --query-heads = KvH on the group's mean attention, the predictor selects far better than
    random and it reloads with its own head count."""
    adapter, data, config = tiny_training()
    assert adapter.dims.group_size > 1
    config.query_heads = adapter.dims.num_kv_heads
    result = train(adapter, data, config, tmp_path / "out")
    assert result.predictor.config.query_heads == adapter.dims.num_kv_heads
    recall, random_recall = result.report["recall"]["tokenbutler"]["10%"], result.report["recall"]["random"]["10%"]
    assert recall > 2 * random_recall
    loaded, stored = load_checkpoint(tmp_path / "out", adapter.dims)
    assert stored["predictor"]["query_heads"] == adapter.dims.num_kv_heads
    assert loaded.config == result.predictor.config


def test_predictor_refuses_bad_sizes():
    with pytest.raises(ConfigError, match="--dim"):
        PredictorConfig(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=16, dim=0)
    with pytest.raises(ConfigError, match="2 layers"):
        PredictorConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=16)


# ------------------------------------------------------------------------------------ teacher
def test_teacher_pass_is_the_models_own_forward():
    adapter = peaked_adapter("qwen2")
    ids = random_sequences(1, 40)
    states = list(layer_states(adapter, ids))
    assert [s.layer for s in states] == list(range(4))
    expected = adapter.model(ids, output_hidden_states=True).hidden_states
    for state in states:  # the attention input is the norm of the layer's input hidden state
        torch.testing.assert_close(state.x, adapter.attention_input(state.layer, expected[state.layer])[0])


def test_teacher_probs_are_causal_softmax_rows():
    adapter = peaked_adapter()
    state = list(layer_states(adapter, random_sequences(1, 30)))[1]
    rows = sample_rows(30, 8, torch.Generator().manual_seed(0))
    assert rows[-1] == 29 and rows.min() >= 15 and len(rows) == 9
    probs = teacher_probs(state.q[:, rows], state.k, rows, adapter.scaling)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 9))
    for r, row in enumerate(rows.tolist()):
        assert probs[:, r, row + 1:].abs().sum() == 0
    full = torch.softmax(torch.einsum("htd,hsd->hts", state.q, state.k.repeat_interleave(2, 0)) * adapter.scaling
                         + torch.full((30, 30), float("-inf")).triu(1), -1)
    torch.testing.assert_close(probs, full[:, rows])


def test_recall_selection_helpers():
    rows = torch.tensor([9, 19])
    assert budget_counts(rows, 0.1).tolist() == [1, 2]
    scores = torch.tensor([[[0.0, 5, 1, 3]]])
    assert select_top(scores, torch.tensor([2])).tolist() == [[[False, True, False, True]]]
    mask = streaming_mask(torch.tensor([9]), torch.tensor([6]), 10, sinks=4)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9]


def test_schedule_warms_up_then_decays_to_zero():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(99) < 0.01


# ----------------------------------------------------------------------------------- training
def tiny_training(position_offsets: bool = True):
    """(adapter, data, config) of a 60-step run on a peaked tiny Qwen2 (about a second)."""
    adapter = peaked_adapter("qwen2")
    data = TokenSequences(train=random_sequences(60, 128, seed=1), held_out=random_sequences(3, 128, seed=2),
                          files=1, tokens=0)
    config = TrainConfig(seq_len=128, steps=60, producer_every=2, dim=16, hidden=64, rows=64, lr=1e-2,
                         checkpoint_every=30, held_out=3, eval_rows=32, position_offsets=position_offsets)
    return adapter, data, config


def test_training_lowers_held_out_loss_and_beats_random(tmp_path):
    adapter, data, config = tiny_training()
    torch.manual_seed(config.seed)
    untrained = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 16, 64))
    before = evaluate(untrained, adapter, data.held_out, rows=32)
    after = train(adapter, data, config, tmp_path / "out").report
    assert after["loss"] < before["loss"] - 0.2
    recall, random_recall = after["recall"]["tokenbutler"]["10%"], after["recall"]["random"]["10%"]
    assert recall > 2 * random_recall and recall > before["recall"]["tokenbutler"]["10%"] + 0.08
    # keys and queries rounded to bfloat16 (the CPU engine's compact cache) select nearly alike
    assert abs(after["recall"]["tokenbutler_bf16"]["10%"] - recall) < 0.02
    assert json.loads((tmp_path / "out" / "report.json").read_text())["loss"] == pytest.approx(after["loss"])


def test_position_offsets_keep_the_predictor_working_at_later_positions(tmp_path):
    """RoPE keys carry absolute phases: trained at positions 0..T only, a predictor fails once the
    same text sits later in the context; trained at random offsets, it holds."""
    drops = {}
    for offsets in (False, True):
        adapter, data, config = tiny_training(position_offsets=offsets)
        predictor = train(adapter, data, config, tmp_path / str(offsets)).predictor
        recall = [evaluate(predictor, adapter, data.held_out, rows=32, offset=shift)["recall"]["tokenbutler"]["10%"]
                  for shift in (0, 350)]
        drops[offsets] = recall[0] - recall[1]
    assert drops[False] > 0.1 and drops[True] < 0.05


def test_saved_and_reloaded_predictor_gives_identical_scores(tmp_path):
    adapter = peaked_adapter()
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32))
    save_checkpoint(tmp_path / "ckpt", predictor, {"model_name": "tiny"})
    loaded, config = load_checkpoint(tmp_path / "ckpt", adapter.dims)
    assert config["model_name"] == "tiny" and config["predictor"]["dim"] == 8 and "commit" in config
    x, k = torch.randn(3, adapter.dims.hidden_size), torch.randn(2, 9, adapter.dims.head_dim)
    for model in (predictor, loaded):
        model.eval()
    expected = predictor.head_scores(predictor.importance_queries(0, x)[:, 1], predictor.project_keys(2, k))
    got = loaded.head_scores(loaded.importance_queries(0, x)[:, 1], loaded.project_keys(2, k))
    assert torch.equal(expected, got)


def test_rotating_predictors_round_trip_and_older_checkpoints_load_without_rotation(tmp_path):
    import json

    adapter = peaked_adapter()
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32, rope_pairs=4)).eval()
    save_checkpoint(tmp_path / "rope", predictor, {"model_name": "tiny"})
    loaded, config = load_checkpoint(tmp_path / "rope", adapter.dims)
    assert config["predictor"]["rope_pairs"] == 4 and loaded.config.uses_positions
    x, k = torch.randn(3, adapter.dims.hidden_size), torch.randn(2, 9, adapter.dims.head_dim)
    for model in (predictor, loaded.eval()):
        assert torch.equal(model.importance_queries(0, x, torch.arange(3))[:, 1], loaded.importance_queries(0, x, torch.arange(3))[:, 1])
    plain = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32))
    save_checkpoint(tmp_path / "old", plain, {"model_name": "tiny"})
    stored = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("rope_pairs", "rope_base", "query_heads"):  # what a checkpoint from before the options holds
        stored["predictor"].pop(key)
    (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
    old, _ = load_checkpoint(tmp_path / "old", adapter.dims)
    assert not old.config.uses_positions and old.config.query_heads == adapter.dims.num_heads
    with pytest.raises(ConfigError, match="rope-pairs 5"):
        PredictorConfig.for_model(adapter.dims, 2, 8, 32, rope_pairs=5)


def test_checkpoint_for_another_model_shape_is_refused_naming_both(tmp_path):
    other = peaked_adapter(layers=6)
    save_checkpoint(tmp_path / "ckpt", TokenButlerPredictor(PredictorConfig.for_model(other.dims)), {"model_name": "six"})
    with pytest.raises(PredictorError) as info:
        load_checkpoint(tmp_path / "ckpt", peaked_adapter(layers=4).dims)
    message = str(info.value)
    assert "six (6 layers" in message and "the model has 4 layers" in message


def test_corrupted_and_half_written_checkpoints_are_refused(tmp_path):
    predictor = TokenButlerPredictor(PredictorConfig(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=16))
    path = save_checkpoint(tmp_path / "ckpt", predictor)
    weights = path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    with pytest.raises(PredictorError, match="corrupted or half-written"):
        load_checkpoint(path)
    (path / "config.json").write_text('{"format": ')
    with pytest.raises(PredictorError, match="corrupted"):
        read_config(path)
    (path / "config.json").unlink()
    with pytest.raises(PredictorError, match="no config.json"):
        load_checkpoint(path)
    with pytest.raises(PredictorError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_save_replaces_atomically_and_publish_copies_the_predictor(tmp_path):
    config = PredictorConfig(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=16)
    first, second = TokenButlerPredictor(config), TokenButlerPredictor(config)
    save_checkpoint(tmp_path / "ckpt", first)
    save_checkpoint(tmp_path / "ckpt", second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old copies left
    publish(tmp_path / "ckpt", tmp_path / "out")
    loaded, _ = load_checkpoint(tmp_path / "out")
    assert torch.equal(loaded.key_proj, second.key_proj)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    adapter = peaked_adapter()
    data = TokenSequences(train=random_sequences(6, 96), held_out=random_sequences(1, 96, seed=5), files=1, tokens=0)
    whole = train(adapter, data, small_config(), tmp_path / "whole").predictor

    def stop_at_5(stats):
        if stats.step == 5:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(adapter, data, small_config(), tmp_path / "cut", on_step=stop_at_5)
    with pytest.raises(TrainingError, match="--resume"):
        train(adapter, data, small_config(), tmp_path / "cut")
    with pytest.raises(TrainingError, match="same options"):
        train(adapter, data, small_config(dim=4), tmp_path / "cut", resume=True)
    resumed = train(adapter, data, small_config(), tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 4
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.predictor.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    adapter = peaked_adapter()
    data = TokenSequences(train=random_sequences(6, 96), held_out=random_sequences(1, 96, seed=5), files=1, tokens=0)
    real_step = training.distill_step
    calls = []

    def failing_step(*args):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real_step(*args)

    monkeypatch.setattr(training, "distill_step", failing_step)
    with pytest.raises(TrainingError, match="step 3.*not finite.*step-000002"):
        train(adapter, data, small_config(), tmp_path / "out")
    load_checkpoint(tmp_path / "out", adapter.dims)  # the step-2 checkpoint is intact and loadable


def test_bad_training_input_is_refused(tmp_path):
    adapter = peaked_adapter()
    data = TokenSequences(train=random_sequences(2, 96), held_out=random_sequences(1, 96), files=1, tokens=0)
    with pytest.raises(ConfigError, match="longer than the model supports"):
        train(adapter, data, small_config(seq_len=1024), tmp_path / "out")
    with pytest.raises(ConfigError, match="--steps"):
        small_config(steps=0)


# --------------------------------------------------------------------------------------- data
def test_text_data_is_split_by_file_and_interleaved(tmp_path):
    for i in range(30):
        folder = tmp_path / ("prose" if i % 3 else "code")
        folder.mkdir(exist_ok=True)
        (folder / f"f{i}.{'txt' if i % 3 else 'py'}").write_text(f"Sentence number {i} about the fox. " * 20)
    (tmp_path / "prose" / "image.png").write_bytes(b"\x89PNG\x00\x00")
    files = collect_text_files([tmp_path / "prose", tmp_path / "code"])
    assert len(files) == 30 and files[1].parent.name == "code"  # round-robin over the two paths
    data = load_sequences([tmp_path / "prose", tmp_path / "code"], tiny_tokenizer(), 32, 20, 2)
    assert data.train.shape == (20, 32) and data.held_out.shape[1] == 32 and data.files == 30


def test_missing_or_empty_data_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        collect_text_files([tmp_path / "nope"])
    with pytest.raises(DataError, match="no text files"):
        collect_text_files([tmp_path])
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="less than one sequence"):
        load_sequences([tmp_path], tiny_tokenizer(), 512, 4, 1)


def test_interval_study_reuses_the_anchor_selection():
    from offload_engine.predictor.interval_eval import interval_recall

    adapter = peaked_adapter()
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32)).eval()
    report = interval_recall(predictor, adapter, random_sequences(1, 96), interval=4, window=8, anchors=2)
    offsets = report["by_offset"]
    assert offsets["fresh"][0] == offsets["reuse"][0]  # at the anchor, reuse is the fresh prediction
    assert all(0.0 <= value <= 1.0 + 1e-6 for values in offsets.values() for value in values)
    assert set(report["mean"]) == {"fresh", "reuse", "reuse_radius1", "reuse_runs", "reuse_radius1_2x", "reuse_runs_2x"}


def test_several_predictors_from_one_teacher_pass_report_what_each_reports_alone():
    adapter = peaked_adapter("qwen2")
    torch.manual_seed(0)
    first = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32))
    second = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 1, 16, 16))
    sequences = random_sequences(2, 96, seed=9)
    from offload_engine.predictor.evaluation import evaluate_many
    together = evaluate_many({"a": first, "b": second, "none": None}, adapter, sequences, rows=16, seed=4)
    for name, predictor in (("a", first), ("b", second), ("none", None)):
        assert together[name] == evaluate(predictor, adapter, sequences, rows=16, seed=4)
    assert together["a"]["recall"]["tokenbutler"] != together["b"]["recall"]["tokenbutler"]


def test_a_row_pool_restricts_the_query_rows_to_it():
    from offload_engine.predictor.evaluation import evaluate_many, sample_rows_from
    from offload_engine.predictor.teacher import sample_rows

    adapter = peaked_adapter("qwen2")
    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32))
    sequences = random_sequences(1, 96, seed=9)
    free = evaluate_many({"p": predictor}, adapter, sequences, rows=16, seed=4)["p"]
    drawn = sample_rows(96, 16, torch.Generator().manual_seed(4))  # the rows the free draw used
    pool = torch.zeros(1, 96, dtype=torch.bool)
    pool[0, drawn] = True
    pooled = evaluate_many({"p": predictor}, adapter, sequences, rows=64, seed=4, row_pool=pool)["p"]
    assert pooled["rows_per_sequence"] == 64 and free["rows_per_sequence"] == 17
    for method in ("tokenbutler", "oracle_group", "streaming"):
        assert pooled["recall"][method] == free["recall"][method]
    other = pool.clone()
    other[0, drawn[:-1]] = False
    other[0, 40:48] = True
    assert evaluate_many({"p": predictor}, adapter, sequences, rows=64, seed=4, row_pool=other)["p"]["recall"] \
        != pooled["recall"]
    picked = sample_rows_from(other[0], 5, torch.Generator().manual_seed(0))
    assert picked.numel() == 5 and bool(other[0, picked].all()) and torch.equal(picked, picked.sort().values)


def test_candidate_distillation_leaves_the_sinks_and_window_out():
    from offload_engine.predictor.teacher import candidate_distillation_loss, distillation_loss

    generator = torch.Generator().manual_seed(0)
    rows, length = torch.tensor([20, 31]), 32
    logits = torch.randn(3, 2, length, generator=generator)
    teacher = torch.softmax(torch.randn(3, 2, length, generator=generator).masked_fill(
        torch.arange(length) > rows.unsqueeze(1), float("-inf")), dim=-1)
    # no sinks, no window: every causal position is a candidate, the plain cross-entropy
    torch.testing.assert_close(candidate_distillation_loss(teacher, logits, rows, 0, 0),
                               distillation_loss(teacher, logits, rows))
    # the teacher's mass on the sinks and the window, and the student's logits there, do not count
    moved = teacher.clone()
    moved[..., :2] *= 5.0  # more teacher mass on the two sinks
    base = candidate_distillation_loss(teacher, logits, rows, 2, 4)
    torch.testing.assert_close(candidate_distillation_loss(moved, logits, rows, 2, 4), base)
    assert not torch.allclose(distillation_loss(moved, logits, rows), distillation_loss(teacher, logits, rows))
    window_only = logits.clone()
    for row in range(2):
        window_only[:, row, int(rows[row]) - 3 :] += 7.0
    torch.testing.assert_close(candidate_distillation_loss(teacher, window_only, rows, 2, 4), base)
