"""Distillation on a cached teacher: the same loss as the teacher in the loop, resumable builds,
and a clear refusal of a cache made for another model or sequence length."""

from __future__ import annotations

import pytest
import torch

from offload_engine.predictor import training
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
from offload_engine.predictor.data import TokenSequences
from offload_engine.predictor.teacher import sample_rows
from offload_engine.predictor.teacher_cache import (
    CacheSpec, TeacherCache, TeacherCacheError, TeacherCacheMix, build_teacher_cache, cache_identity, shard_path,
    spec_record,
)
from offload_engine.predictor.training import TrainConfig, train

from test_predictor import peaked_adapter, random_sequences

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN, ROWS = 96, 24


def spec_for(adapter, dtype="float32", seq_len=SEQ_LEN, rows=ROWS, lookahead=1) -> CacheSpec:
    shape = PredictorConfig.for_model(adapter.dims).model_shape()
    return CacheSpec(model_name="tiny", model_shape=shape, seq_len=seq_len, rows=rows, dtype=dtype, lookahead=lookahead)


def rows_and_offsets(seed: int = 0):
    """draw_rows for build_teacher_cache: seeded per sequence, offsets 0, 40, 80, ..."""
    def draw(index: int):
        return sample_rows(SEQ_LEN, ROWS, torch.Generator().manual_seed(seed + index)), 40 * index
    return draw


def grads_of(predictor) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in predictor.named_parameters()}


@pytest.mark.parametrize("dtype, tolerance, lookahead", [("float32", 1e-5, 1), ("float16", 2e-3, 1), ("float32", 1e-5, 3)])
def test_cached_teacher_gives_the_loss_and_gradients_of_the_teacher_in_the_loop(tmp_path, dtype, tolerance, lookahead):
    adapter = peaked_adapter("qwen2", layers=5)
    sequences = random_sequences(3, SEQ_LEN, seed=3)
    draw = rows_and_offsets()
    cache = build_teacher_cache(adapter, sequences, tmp_path / "cache", spec_for(adapter, dtype, lookahead=lookahead),
                                draw)
    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32))
    for index in range(3):
        rows, offset = draw(index)
        predictor.zero_grad()
        live = training.distill_step(predictor, adapter, sequences[index].unsqueeze(0), rows, offset,
                                     lookahead=lookahead)
        live_grads = grads_of(predictor)
        predictor.zero_grad()
        shard = cache.load(index)
        assert shard.offset == offset and torch.equal(shard.rows, rows)
        cached = training.distill_layers(predictor, shard.states(), shard.rows, adapter.scaling)
        assert cached == pytest.approx(live, rel=tolerance)
        for name, grad in grads_of(predictor).items():
            torch.testing.assert_close(grad, live_grads[name], rtol=tolerance * 10, atol=tolerance)


def test_a_rotating_predictor_trains_on_the_cache_as_with_the_teacher_in_the_loop(tmp_path):
    """rope_pairs: no mixed keys; the teacher's rows are recomputed from the cached attention inputs
    (x) at the shard's positions, giving the loss and gradients of the teacher in the loop."""
    adapter = peaked_adapter("llama", layers=4)
    sequences = random_sequences(2, SEQ_LEN, seed=4)
    draw = rows_and_offsets()
    cache = build_teacher_cache(adapter, sequences, tmp_path / "cache", spec_for(adapter), draw)
    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32, rope_pairs=2))
    for index in range(2):
        rows, offset = draw(index)
        predictor.zero_grad()
        live = training.distill_step(predictor, adapter, sequences[index].unsqueeze(0), rows, offset)
        live_grads = grads_of(predictor)
        predictor.zero_grad()
        cached = training.cached_step(predictor, cache, index, ROWS, adapter.scaling, torch.Generator(), adapter)
        assert offset > 0 or index == 0
        assert cached == pytest.approx(live, rel=1e-5)
        for name, grad in grads_of(predictor).items():
            torch.testing.assert_close(grad, live_grads[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="only with the model"):
        training.cached_step(predictor, cache, 0, ROWS, adapter.scaling, torch.Generator())


def test_one_cache_serves_predictors_with_any_producer_spacing(tmp_path):
    adapter = peaked_adapter("llama", layers=5)
    sequences = random_sequences(1, SEQ_LEN, seed=4)
    draw = rows_and_offsets()
    cache = build_teacher_cache(adapter, sequences, tmp_path / "cache", spec_for(adapter), draw)
    for every in (1, 2, 4):
        predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=every, dim=8, hidden=16))
        rows, offset = draw(0)
        live = training.distill_step(predictor, adapter, sequences[:1], rows, offset)
        assert training.distill_layers(predictor, cache.load(0).states(), rows, adapter.scaling) == pytest.approx(live, rel=1e-5)


def test_an_interrupted_build_resumes_at_the_first_missing_shard(tmp_path):
    adapter = peaked_adapter()
    sequences = random_sequences(4, SEQ_LEN, seed=5)
    spec, draw = spec_for(adapter), rows_and_offsets()
    whole = build_teacher_cache(adapter, sequences, tmp_path / "whole", spec, draw)

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(adapter, sequences, tmp_path / "cut", spec, draw, on_shard=stop_after_two)
    assert shard_path(tmp_path / "cut", 1).exists() and not shard_path(tmp_path / "cut", 2).exists()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")) == []  # no torn temp files
    with pytest.raises(TeacherCacheError, match="misses 2 of its 4 shards.*run the same command again"):
        TeacherCache.open(tmp_path / "cut")
    first_shard = shard_path(tmp_path / "cut", 0).stat().st_mtime_ns
    resumed = build_teacher_cache(adapter, sequences, tmp_path / "cut", spec, draw)
    assert shard_path(tmp_path / "cut", 0).stat().st_mtime_ns == first_shard  # not recomputed
    for index in range(4):
        a, b = whole.load(index), resumed.load(index)
        assert torch.equal(a.k, b.k) and torch.equal(a.x, b.x) and a.offset == b.offset


def test_a_cache_of_another_model_length_or_build_is_refused(tmp_path):
    adapter = peaked_adapter()
    sequences = random_sequences(2, SEQ_LEN, seed=6)
    cache = build_teacher_cache(adapter, sequences, tmp_path / "cache", spec_for(adapter), rows_and_offsets())
    shape = PredictorConfig.for_model(adapter.dims).model_shape()
    cache.check_model("tiny", shape, SEQ_LEN)
    other = PredictorConfig.for_model(peaked_adapter(layers=6).dims).model_shape()
    with pytest.raises(TeacherCacheError, match="made for tiny .*not for other"):
        cache.check_model("other", other, SEQ_LEN)
    with pytest.raises(TeacherCacheError, match="sequences of 96 tokens, not --seq-len 128"):
        cache.check_model("tiny", shape, 128)
    with pytest.raises(TeacherCacheError, match="another build"):  # never overwritten by a different spec
        build_teacher_cache(adapter, sequences, tmp_path / "cache", spec_for(adapter, rows=8), rows_and_offsets())
    with pytest.raises(TeacherCacheError, match=r"another build .*sequences of 96 tokens.*not .*of 48 tokens"):
        # another --seq-len cuts other text too: the length is what the message names
        build_teacher_cache(adapter, random_sequences(2, SEQ_LEN // 2, seed=6), tmp_path / "cache",
                            spec_for(adapter, seq_len=SEQ_LEN // 2), rows_and_offsets())
    with pytest.raises(TeacherCacheError, match="other training text"):  # same shape, other tokens: not resumed into
        build_teacher_cache(adapter, random_sequences(2, SEQ_LEN, seed=7), tmp_path / "cache", spec_for(adapter),
                            rows_and_offsets())
    with pytest.raises(TeacherCacheError, match="holds no teacher cache"):
        TeacherCache.open(tmp_path / "empty")


def test_training_on_a_cache_learns_like_training_with_the_teacher_in_the_loop(tmp_path):
    """Both sources train to about the same held-out loss, and a cached run resumes to the same weights."""
    adapter = peaked_adapter("qwen2")
    data = TokenSequences(train=random_sequences(30, 128, seed=1), held_out=random_sequences(3, 128, seed=2),
                          files=1, tokens=0)
    base = dict(seq_len=128, steps=60, producer_every=2, dim=16, hidden=64, rows=48, lr=1e-2,
                checkpoint_every=30, held_out=3, eval_rows=32)
    generator = torch.Generator().manual_seed(0)

    def draw(index):
        return sample_rows(128, 64, generator), 0
    spec = CacheSpec("tiny", PredictorConfig.for_model(adapter.dims).model_shape(), 128, 64)
    cache = build_teacher_cache(adapter, data.train, tmp_path / "cache", spec, draw)
    live = train(adapter, data, TrainConfig(**base), tmp_path / "live").report
    cached = train(adapter, data, TrainConfig(**base, teacher_cache="tiny-cache"), tmp_path / "cached", cache=cache)
    untrained = live["recall"]["random"]["10%"]
    assert cached.report["recall"]["tokenbutler"]["10%"] > 2 * untrained
    assert cached.report["loss"] == pytest.approx(live["loss"], rel=0.15)

    def stop_at_31(stats):
        if stats.step == 31:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(adapter, data, TrainConfig(**base, teacher_cache="tiny-cache"), tmp_path / "cut", cache=cache,
              on_step=stop_at_31)
    resumed = train(adapter, data, TrainConfig(**base, teacher_cache="tiny-cache"), tmp_path / "cut", cache=cache,
                    resume=True)
    assert resumed.resumed_from == 30
    for name, tensor in cached.predictor.state_dict().items():
        torch.testing.assert_close(resumed.predictor.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_epochs_visit_every_shard_once_in_a_new_order():
    first = [training.epoch_order(5, step, seed=0) for step in range(5)]
    second = [training.epoch_order(5, step, seed=0) for step in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5)) and first != second


def test_the_mixed_key_loss_is_the_cross_entropy_against_the_teachers_rows():
    """logsumexp(s) - q'.(P k)W*scale == -sum_t P_t log softmax(s)_t, with future tokens masked."""
    from offload_engine.predictor.teacher import (
        distillation_loss, mixed_distillation_loss, row_states, teacher_mixed_keys, teacher_probs,
    )
    adapter = peaked_adapter("qwen2", layers=3)
    ids, rows = random_sequences(1, SEQ_LEN, seed=8), sample_rows(SEQ_LEN, ROWS)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32))
    states = list(row_states(adapter, ids, rows))
    queries = predictor.importance_queries(0, states[0].x)[:, 0]  # [R, H, d']
    k = states[1].k
    logits = predictor.head_scores(queries, predictor.project_keys(1, k))
    reference = distillation_loss(teacher_probs(states[1].q, k, rows, adapter.scaling), logits, rows)
    mixed = predictor.project_head_rows(1, teacher_mixed_keys(states[1].q, k, rows, adapter.scaling))
    got = mixed_distillation_loss(logits, queries.transpose(0, 1), mixed, rows, 1 / 8 ** 0.5).detach()
    reference = reference.detach()
    assert float(reference) > 0.5  # a real loss, not a degenerate zero
    assert float(got) == pytest.approx(float(reference), rel=1e-5)


def test_a_lookahead_teacher_is_the_mean_attention_of_the_next_rows_over_the_tokens_up_to_the_row():
    """Row r's target with lookahead N: rows r .. r+N-1 (those in the sequence: near its end fewer, the last
    row not counted again), each one's softmax over the tokens up to r only, averaged; applied to the keys.
    Lookahead 1 is the row's own attention."""
    from offload_engine.predictor.teacher import ahead_rows, layer_states, row_states, teacher_mixed_keys

    adapter = peaked_adapter("qwen2", layers=2)
    ids = random_sequences(1, SEQ_LEN, seed=11)
    rows = torch.tensor([10, 40, SEQ_LEN - 2, SEQ_LEN - 1])
    full = list(layer_states(adapter, ids))[1]  # q [H, T, D], k [KvH, T, D]
    keys = full.k.float().repeat_interleave(adapter.dims.num_heads // adapter.dims.num_kv_heads, 0)  # [H, T, D]
    expected = []
    for r in rows.tolist():
        ahead = [r + j for j in range(3) if r + j < SEQ_LEN]
        logits = torch.einsum("hjd,htd->hjt", full.q[:, ahead].float(), keys) * adapter.scaling
        logits[..., r + 1:] = float("-inf")
        probs = torch.softmax(logits, dim=-1).mean(dim=1)  # [H, T]
        expected.append(torch.einsum("ht,htd->hd", probs, keys))
    expected = torch.stack(expected, dim=1)  # [H, R, D]
    state = list(row_states(adapter, ids, rows, lookahead=3))[1]
    assert state.q.shape[1] == 3 * len(rows) and torch.equal(state.x, full.x[rows])
    assert ahead_rows(rows, SEQ_LEN, 3).tolist()[-3:] == [SEQ_LEN - 1] * 3
    torch.testing.assert_close(state.teacher_mix(rows, adapter.scaling), expected, rtol=1e-5, atol=1e-6)
    own = teacher_mixed_keys(full.q[:, rows], full.k, rows, adapter.scaling)
    torch.testing.assert_close(list(row_states(adapter, ids, rows))[1].teacher_mix(rows, adapter.scaling), own)
    assert not torch.allclose(expected, own, atol=1e-3)  # looking ahead changes the target


def test_a_lookahead_cache_is_its_own_build_and_trains_only_that_lookahead(tmp_path):
    from offload_engine.errors import ConfigError

    adapter = peaked_adapter()
    sequences = random_sequences(2, SEQ_LEN, seed=6)
    plain = build_teacher_cache(adapter, sequences, tmp_path / "plain", spec_for(adapter), rows_and_offsets())
    assert "lookahead" not in plain.manifest["spec"]  # caches built before the option keep their identity
    with pytest.raises(TeacherCacheError, match="another build .*float32\\), not .*float32, lookahead 4"):
        build_teacher_cache(adapter, sequences, tmp_path / "plain", spec_for(adapter, lookahead=4), rows_and_offsets())
    ahead = build_teacher_cache(adapter, sequences, tmp_path / "ahead", spec_for(adapter, lookahead=4), rows_and_offsets())
    assert TeacherCache.open(tmp_path / "ahead").spec.lookahead == 4 and ahead.manifest["spec"]["lookahead"] == 4
    config = TrainConfig(seq_len=SEQ_LEN, steps=2, producer_every=2, dim=8, hidden=16, rows=8, held_out=0)
    data = TokenSequences(train=sequences[:0], held_out=sequences[:0], files=[], tokens=0)
    with pytest.raises(ConfigError, match="--lookahead 4, not 1"):
        train(adapter, data, config, tmp_path / "out", cache=ahead)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="cannot be combined with --rope-pairs"):
        TrainConfig(seq_len=SEQ_LEN, lookahead=4, rope_pairs=2, dim=8)
    with pytest.raises(ConfigError, match="--lookahead must be >= 1"):
        TrainConfig(seq_len=SEQ_LEN, lookahead=0)


def test_a_cache_that_would_not_fit_on_the_disk_is_refused_before_the_model_runs(tmp_path, monkeypatch):
    from collections import namedtuple
    from offload_engine.predictor import teacher_cache

    adapter = peaked_adapter()
    spec = spec_for(adapter)
    one = teacher_cache.shard_bytes(spec, adapter.dims.num_heads, adapter.dims.num_kv_heads, adapter.dims.head_dim)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: usage(0, 0, one))  # room for one shard
    ran = []
    monkeypatch.setattr(teacher_cache, "row_states", lambda *args: ran.append(1))
    with pytest.raises(TeacherCacheError, match="needs about .* GiB .* fewer --sequences"):
        build_teacher_cache(adapter, random_sequences(3, SEQ_LEN), tmp_path / "cache", spec, rows_and_offsets())
    assert not ran


def test_the_shard_size_estimate_is_the_size_written(tmp_path):
    from offload_engine.predictor import teacher_cache

    adapter = peaked_adapter()
    spec = spec_for(adapter, dtype="float16")
    cache = build_teacher_cache(adapter, random_sequences(1, SEQ_LEN), tmp_path / "cache", spec, rows_and_offsets())
    estimate = teacher_cache.shard_bytes(spec, adapter.dims.num_heads, adapter.dims.num_kv_heads, adapter.dims.head_dim)
    written = cache.bytes_on_disk()
    assert estimate <= written < estimate + 4096  # plus the safetensors header


def test_a_mix_of_caches_serves_each_caches_shards_in_turn_and_refuses_other_lookaheads(tmp_path):
    adapter = peaked_adapter("qwen2", layers=5)
    short = build_teacher_cache(adapter, random_sequences(3, SEQ_LEN, seed=3), tmp_path / "short", spec_for(adapter),
                                rows_and_offsets())
    long_spec = spec_for(adapter, seq_len=2 * SEQ_LEN)

    def draw_long(index):
        return sample_rows(2 * SEQ_LEN, ROWS, torch.Generator().manual_seed(index)), 7 * index
    long = build_teacher_cache(adapter, random_sequences(2, 2 * SEQ_LEN, seed=4), tmp_path / "long", long_spec, draw_long)
    mix = TeacherCacheMix([short, long])
    assert len(mix) == 5 and mix.seq_len == 2 * SEQ_LEN and mix.lookahead == 1
    for index, (cache, inner) in enumerate([(short, 0), (short, 1), (short, 2), (long, 0), (long, 1)]):
        shard, direct = mix.load(index), cache.load(inner)
        assert shard.offset == direct.offset and torch.equal(shard.k, direct.k) and torch.equal(shard.rows, direct.rows)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32))
    seen = {training.cached_step(predictor, mix, training.epoch_order(len(mix), step, 0), ROWS, adapter.scaling,
                                 torch.Generator().manual_seed(step)) for step in range(5)}
    assert len(seen) == 5 and all(loss > 0 for loss in seen)
    with pytest.raises(IndexError):
        mix.load(5)
    ahead = build_teacher_cache(adapter, random_sequences(1, SEQ_LEN, seed=5), tmp_path / "ahead",
                                spec_for(adapter, lookahead=2), rows_and_offsets())
    with pytest.raises(TeacherCacheError, match="--lookahead 1 and 2"):
        TeacherCacheMix([short, ahead])


def test_caches_of_the_same_build_from_other_text_are_two_caches_to_a_resumed_run(tmp_path):
    spec = spec_record(CacheSpec(model_name="m", model_shape={"num_layers": 2}, seq_len=32, rows=8))
    made = [TeacherCache(tmp_path, {"spec": spec, "sequences": 3, "sequences_sha256": text})
            for text in ("a" * 64, "b" * 64, "a" * 64)]
    ids = [cache_identity(cache) for cache in made]
    assert ids[0] != ids[1] and ids[0] == ids[2]
    older = TeacherCache(tmp_path, {"spec": spec, "sequences": 3})  # a manifest from before the digest was kept
    assert cache_identity(older).startswith("m-3x32-")
