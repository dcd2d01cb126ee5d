"""``tbrun train-predictor`` through typer's test runner, bad input included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tbrun_cli.main import app

runner = CliRunner()
SMALL = ("--seq-len", "32", "--steps", "3", "--checkpoint-every", "2", "--held-out", "1", "--hidden", "16",
         "--dim", "4", "--producer-every", "2", "--rows", "8")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(f"Paris is the capital of France; note {i}. The quick brown fox. " * 8)
    return folder


def train(model_dir, data, out, *extra):
    return runner.invoke(app, ["train-predictor", "--model", model_dir, "--data", str(data), "--out", str(out), *SMALL, *extra])


def test_train_predictor_writes_predictor_checkpoints_and_report(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "out"
    result = train(tiny_model_dir, text_dir, out)
    assert result.exit_code == 0, result.output
    assert "held-out recall" in result.output and "% of the model" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["predictor"]["dim"] == 4 and config["data"]["files"] == 12
    assert config["predictor"]["rope_pairs"] == 0  # off by default (it lost needles on niah)
    assert (out / "predictor.safetensors").is_file() and (out / "report.json").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    again = train(tiny_model_dir, text_dir, out, "--resume")
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("make_data, extra, message", [
    (lambda tmp: tmp / "missing", (), "does not exist"),
    (lambda tmp: tmp, (), "no text files"),
    (None, ("--seq-len", "4096"), "longer than the model supports"),
    (None, ("--steps", "0"), "--steps must be >= 1"),
    (None, ("--rope-pairs", "3"), "--rope-pairs 3: rotate between 0 and d'/2 = 2"),
    (None, ("--lr", "nan"), "--lr must be a positive finite number"),
    (None, ("--lr", "inf"), "--lr must be a positive finite number"),
    (None, ("--held-out", "-1"), "--held-out must be >= 0"),
    (None, ("--device", "foo"), "--device 'foo': use cpu or cuda"),
])
def test_bad_input_is_refused_with_exit_code_2(tiny_model_dir, text_dir, tmp_path, make_data, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = make_data(empty) if make_data else text_dir
    result = train(tiny_model_dir, data, tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_existing_run_needs_resume(tiny_model_dir, text_dir, tmp_path):
    assert train(tiny_model_dir, text_dir, tmp_path / "out").exit_code == 0
    result = train(tiny_model_dir, text_dir, tmp_path / "out")
    assert result.exit_code == 2 and "--resume" in result.output


def test_a_finished_predictor_or_a_file_as_out_is_never_overwritten(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    """A copy of a shipped predictor (no checkpoints) as --out, or --out a file: refused before the model loads."""
    import shutil

    import offload_engine.models as models

    shipped = tmp_path / "shipped"
    shutil.copytree(Path(__file__).resolve().parents[1] / "predictors" / "smollm2-135m-instruct", shipped)
    before = {f.name: f.read_bytes() for f in shipped.iterdir() if f.is_file()}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = train(tiny_model_dir, text_dir, shipped)
    assert result.exit_code == 2 and "already holds a trained predictor" in " ".join(result.output.split())
    assert {f.name: f.read_bytes() for f in shipped.iterdir() if f.is_file()} == before
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    result = train(tiny_model_dir, text_dir, afile)
    assert result.exit_code == 2 and "is a file" in " ".join(result.output.split()) and afile.read_text() == "mine"


def test_resume_refuses_other_training_text(tiny_model_dir, text_dir, tmp_path):
    """Teacher in the loop, the text is what is trained on: a resume must read the same text."""
    out = tmp_path / "out"
    assert train(tiny_model_dir, text_dir, out).exit_code == 0
    result = train(tiny_model_dir, text_dir, out, "--resume", "--recall", "0.25")
    assert result.exit_code == 2 and "use the same options" in " ".join(result.output.split())
    (text_dir / "doc0.txt").write_text("Other words entirely. " * 40)
    result = train(tiny_model_dir, text_dir, out, "--resume")
    assert result.exit_code == 2 and "use the same options" in " ".join(result.output.split())


def test_init_fine_tunes_a_predictor_of_the_same_shape_and_records_it(tiny_model_dir, text_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train(tiny_model_dir, text_dir, first).exit_code == 0
    started = json.loads((first / "config.json").read_text())["weights_sha256"]
    result = train(tiny_model_dir, text_dir, second, "--init", str(first))
    assert result.exit_code == 0, result.output
    config = json.loads((second / "config.json").read_text())
    assert config["init"] == {"name": "first", "weights_sha256": started}
    assert config["weights_sha256"] != started  # it trained from there
    other = train(tiny_model_dir, text_dir, tmp_path / "third", "--init", str(first), "--dim", "8")
    assert other.exit_code == 2 and "another shape" in " ".join(other.output.split())
    unstarted = train(tiny_model_dir, text_dir, second, "--resume")  # the resumed run must start where it did
    assert unstarted.exit_code == 2 and "use the same options" in " ".join(unstarted.output.split())
    missing = train(tiny_model_dir, text_dir, tmp_path / "fourth", "--init", str(tmp_path / "nowhere"))
    assert missing.exit_code == 2, missing.output


def test_query_heads_trains_one_per_kv_group_and_init_pools_a_predictor_of_every_head(tiny_model_dir, text_dir,
                                                                                      tmp_path):
    full, fewer = tmp_path / "full", tmp_path / "fewer"
    assert train(tiny_model_dir, text_dir, full).exit_code == 0
    shape = json.loads((full / "config.json").read_text())["predictor"]
    assert shape["query_heads"] == shape["num_heads"] > shape["num_kv_heads"]
    kv = shape["num_kv_heads"]
    result = train(tiny_model_dir, text_dir, fewer, "--init", str(full), "--query-heads", str(kv))
    assert result.exit_code == 0, result.output
    config = json.loads((fewer / "config.json").read_text())
    assert config["predictor"]["query_heads"] == kv and config["train"]["query_heads"] == kv
    assert config["init"]["weights_sha256"] == json.loads((full / "config.json").read_text())["weights_sha256"]
    assert config["parameters"] < json.loads((full / "config.json").read_text())["parameters"]
    bad = train(tiny_model_dir, text_dir, tmp_path / "bad", "--query-heads", str(kv + 1))
    assert bad.exit_code == 2 and f"--query-heads {kv + 1}" in " ".join(bad.output.split())
    more = train(tiny_model_dir, text_dir, tmp_path / "more", "--init", str(fewer))  # cannot un-pool
    assert more.exit_code == 2 and "another shape" in " ".join(more.output.split())
    wider = train(tiny_model_dir, text_dir, tmp_path / "wider", "--init", str(fewer), "--query-heads", str(kv),
                  "--hidden", "32")  # SMALL's --hidden is 16: widened, new units silent at the start
    assert wider.exit_code == 0, wider.output
    assert json.loads((tmp_path / "wider" / "config.json").read_text())["predictor"]["hidden"] == 32


def test_a_corpus_run_records_sources_by_name_version_and_hash_and_no_local_path(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--corpus", "stdlib:json/*.py",
                                 "--data", str(text_dir), "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    [source] = config["data"]["corpus"]
    assert source["source"] == "stdlib:json/*.py" and source["version"].startswith("python-") and source["files"] > 0
    assert config["data"]["paths"] == [{"name": "text", "files": 12, "sha256": config["data"]["paths"][0]["sha256"]}]
    recorded = json.dumps(config)
    for local in (str(tmp_path), str(tiny_model_dir), "/root", "/work", "/tmp"):
        assert local not in recorded


@pytest.mark.parametrize("extra, message", [
    (("--corpus", "stdlib:json/*.nothing"), "matches no text files"),
    (("--corpus", "not-a-spec"), "is not PACKAGE:GLOB"),
    ((), "give training text"),
    (("--corpus", "stdlib:json/*.py", "--recall", "0.7"), "--recall 0.7 must be between 0 (off) and 0.5"),
])
def test_bad_corpus_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, extra, message):
    result = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--out", str(tmp_path / "o"), *SMALL,
                                 *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


CACHE_SMALL = tuple(w for w in SMALL if w not in ("--steps", "3"))


def test_teacher_cache_is_built_once_then_reused_and_recorded_without_local_paths(tiny_model_dir, text_dir, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["train-predictor", "--model", tiny_model_dir, "--corpus", "stdlib:json/*.py", "--out", str(out),
            "--teacher-cache", str(cache), "--sequences", "3", "--epochs", "2", "--rope-pairs", "1",
            "--candidate-sinks", "2", "--candidate-window", "4", *CACHE_SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher cache: 3 sequences" in result.output
    shards = sorted(p.name for p in cache.glob("seq-*.safetensors"))
    assert shards == ["seq-000000.safetensors", "seq-000001.safetensors", "seq-000002.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 6 and config["train"]["teacher_cache"] == config["teacher_cache"]["id"]
    assert config["predictor"]["rope_pairs"] == 1  # trained on the teacher's rows recomputed from the cache
    assert config["train"]["candidate_window"] == 4
    assert config["data"]["recall"] == {"fraction": 0.0, "min_span": 8, "max_span": 64}
    manifest = json.loads((cache / "manifest.json").read_text())
    for recorded in (json.dumps(config), json.dumps(manifest)):
        for local in (str(tmp_path), str(tiny_model_dir), "/root", "/work", "/tmp"):
            assert local not in recorded
    stamp = (cache / shards[0]).stat().st_mtime_ns
    again = runner.invoke(app, [*args[:-len(CACHE_SMALL)], *CACHE_SMALL, "--out", str(tmp_path / "out2")])
    assert again.exit_code == 0, again.output
    assert (cache / shards[0]).stat().st_mtime_ns == stamp  # reused, not recomputed
    # a complete cache alone, no text, no --sequences or --seq-len: its own sequences and length, x --epochs
    alone = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--teacher-cache", str(cache), "--epochs",
                                "3", "--rope-pairs", "1", "--out", str(tmp_path / "out3"), *_without_seq_len()])
    assert alone.exit_code == 0, alone.output
    trained_alone = json.loads((tmp_path / "out3" / "config.json").read_text())
    assert trained_alone["steps"] == 9
    # no --corpus on this run: the checkpoint names the cache's text, by package, version and hash
    [source] = trained_alone["teacher_cache"]["data"]["corpus"]
    assert trained_alone["data"] is None  # it read no text: no --mix or --recall defaults posing as its text
    assert source["source"] == "stdlib:json/*.py" and len(source["sha256"]) == 64 and source["version"]
    other = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--teacher-cache", str(cache),
                                "--sequences", "5", "--out", str(tmp_path / "out4"), *_without_seq_len()])
    assert other.exit_code == 2 and "complete teacher cache of 3 sequences" in " ".join(other.output.split())


def test_a_stopped_cache_build_is_finished_by_the_same_command(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["train-predictor", "--model", tiny_model_dir, "--corpus", "stdlib:json/*.py", "--teacher-cache", str(cache),
            "--sequences", "3", "--cache-only", "--out", str(tmp_path / "unused"), *CACHE_SMALL]
    assert runner.invoke(app, args).exit_code == 0
    stopped = cache / "seq-000002.safetensors"
    stopped.unlink()  # as if the build had stopped before its last shard (the manifest is written first)
    kept = (cache / "seq-000000.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert stopped.exists() and (cache / "seq-000000.safetensors").stat().st_mtime_ns == kept  # finished, not redone


def test_a_cache_the_text_cannot_fill_is_refused_before_the_teacher_runs(tiny_model_dir, text_dir, tmp_path):
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--data", str(text_dir), "--teacher-cache",
                                 str(cache), "--sequences", "500", "--out", str(tmp_path / "out"), *CACHE_SMALL])
    assert result.exit_code == 2, result.output
    assert "fewer than --sequences 500: pass --sequences" in " ".join(result.output.split())
    assert not list(cache.glob("seq-*.safetensors"))


def _without_seq_len() -> list[str]:
    """CACHE_SMALL without its --seq-len and value."""
    words = list(CACHE_SMALL)
    at = words.index("--seq-len")
    return words[:at] + words[at + 2 :]


@pytest.mark.parametrize("extra, message", [
    (("--steps", "5"), "drop --steps"),
    (("--seq-len", "48"), "holds sequences of 32 tokens, not --seq-len 48"),
    (("--cache-dtype", "int4"), "--cache-dtype 'int4' is not one of"),
    (("--data", "TEXT", "--recall", "0.25"), "--recall or --seed): choose another --teacher-cache folder"),
])
def test_bad_teacher_cache_use_is_refused_with_exit_code_2(tiny_model_dir, text_dir, tmp_path, extra, message):
    cache = tmp_path / "cache"
    base = ["train-predictor", "--model", tiny_model_dir, "--teacher-cache", str(cache), "--sequences", "2"]
    built = runner.invoke(app, [*base, "--data", str(text_dir), "--out", str(tmp_path / "first"), *CACHE_SMALL])
    assert built.exit_code == 0, built.output
    small = list(CACHE_SMALL)
    if "--seq-len" in extra:
        small[small.index("--seq-len") + 1] = extra[1]
        extra = ()
    extra = tuple(str(text_dir) if word == "TEXT" else word for word in extra)
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "second"), *small, *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_training_speed_and_recall_reports_run_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The two report scripts of docs/predictor.md, end to end at tiny sizes: they write JSON and
    Markdown with the numbers they promise (timings are not asserted, only their presence)."""
    from tbrun_bench import predictor_report, train_speed

    cache, out = tmp_path / "cache", tmp_path / "pred"
    built = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--corpus", "stdlib:json/*.py",
                                "--corpus", "stdlib:email/*.py", "--teacher-cache", str(cache), "--sequences", "2",
                                "--out", str(out), *CACHE_SMALL])
    assert built.exit_code == 0, built.output
    train_speed.main(["--teacher-cache", str(cache), "--model", tiny_model_dir, "--steps", "2", "--cached-per-live", "2",
                      "--rows", "8", "--hidden", "16", "--dim", "4", "--producer-every", "2",
                      "--out", str(tmp_path / "speed")])
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["ms_per_step"]["teacher_cache"]["steps"] == 4 and speed["speedup_median"] > 0
    assert "faster per step" in (tmp_path / "speed.md").read_text()
    predictor_report.main(["--predictor", str(out), "--baseline", str(out), "--model", tiny_model_dir,
                           "--corpus", "stdlib:json/*.py", "--corpus", "stdlib:email/*.py", "--lengths", "32:3,64:2",
                           "--rows", "8", "--interval", "1", "--out", str(tmp_path / "recall")])
    recall = json.loads((tmp_path / "recall.json").read_text())
    cell = recall["recall"]["32"]["interval"]["tokenbutler"]["10%"]
    assert recall["recall"]["32"]["sequences"] == 3 and cell["low"] <= cell["mean"] <= cell["high"]
    assert recall["baseline_recall"]["64"]["recall"]["tokenbutler"] == recall["recall"]["64"]["recall"]["tokenbutler"]
    assert "95% interval over held-out sequences" in (tmp_path / "recall.md").read_text()
    assert recall["engine_rule"] == {"sinks": 4, "window": 128, "least_window": 16}
    assert "clamped to [16, 128] (the engine's rule)" in (tmp_path / "recall.md").read_text()
    lookups = recall["lookup_recall"]["64"]
    assert lookups["rows_per_sequence"] == 8 and lookups["recall"] != recall["recall"]["64"]["recall"]
    assert "lookup rows only" in (tmp_path / "recall.md").read_text()
    # the baseline is the predictor itself: paired by sequence, every difference is 0 (misaligned pairs would
    # not be, since the sequences' recalls differ), and the per-sequence values are kept
    per_sequence = recall["recall"]["32"]["per_sequence"]["tokenbutler"]["10%"]
    assert len(per_sequence) == 3 and len(set(per_sequence)) > 1
    paired = recall["paired"]["32"]["tokenbutler_engine"]["10%"]
    assert paired["n"] == 3 and paired["mean"] == paired["low"] == paired["high"] == 0.0
    assert recall["paired_lookup"]["64"]["tokenbutler"]["10%"]["mean"] == 0.0
    assert "paired by sequence" in (tmp_path / "recall.md").read_text()
    assert str(tmp_path) not in json.dumps(recall["predictor"])
    from tbrun_bench import predictor_sweep

    for size in ("16x4", "8x8"):
        predictor_sweep.main(["train", "--teacher-cache", str(cache), "--size", size, "--epochs", "2", "--rows", "8",
                              "--model", tiny_model_dir, "--runs", str(tmp_path / "sweep")])
    assert json.loads((tmp_path / "sweep" / "I8-d8-e2" / "config.json").read_text())["steps"] == 4
    predictor_sweep.main(["report", "--runs", str(tmp_path / "sweep"), "--model", tiny_model_dir, "--baseline", str(out),
                          "--corpus", "stdlib:json/*.py", "--corpus", "stdlib:email/*.py", "--lengths", "32:2",
                          "--rows", "8", "--out", str(tmp_path / "sweep-report")])
    sweep = json.loads((tmp_path / "sweep-report.json").read_text())
    assert sorted(sweep["recall"]["32"]) == ["I16-d4-e2", "I8-d8-e2", "shipped"]
    assert "| I8-d8-e2 | 8 | 8 | 4 |" in (tmp_path / "sweep-report.md").read_text()


def test_recall_on_a_row_pool_leaves_out_sequences_without_rows_and_pairs_the_rest(llama_adapter):
    """A sequence where the pool has no row (no copy was written there) used to stop the report with a
    KeyError; it is left out for every predictor alike, counted, and the rest still pair."""
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
    from tbrun_bench.predictor_report import paired_differences, per_sequence_recall

    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(llama_adapter.dims, 2, 8, 32))
    sequences = torch.randint(0, llama_adapter.dims.vocab_size, (3, 48))
    pool = torch.zeros(3, 48, dtype=torch.bool)
    pool[0, 30:40] = pool[2, 20:48] = True
    results = per_sequence_recall({"predictor": predictor, "baseline": predictor}, llama_adapter, sequences, rows=4,
                                  seed=0, row_pool=pool)
    assert results["predictor"]["sequences"] == 2 and results["predictor"]["sequences_without_rows"] == 1
    assert len(results["predictor"]["per_sequence"]["tokenbutler"]["10%"]) == 2
    assert paired_differences(results["predictor"], results["baseline"])["tokenbutler"]["10%"]["mean"] == 0.0
    with pytest.raises(SystemExit, match="--lookups"):
        per_sequence_recall({"predictor": predictor}, llama_adapter, sequences, rows=4, seed=0,
                            row_pool=torch.zeros_like(pool))


def test_the_recall_report_averages_layer_0_over_every_sequence(llama_adapter):
    from offload_engine.predictor.evaluation import evaluate
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
    from tbrun_bench.predictor_report import per_sequence_recall

    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(llama_adapter.dims, 2, 8, 32))
    sequences = torch.randint(0, llama_adapter.dims.vocab_size, (3, 48))
    merged = per_sequence_recall({"predictor": predictor}, llama_adapter, sequences, rows=4, seed=0)["predictor"]
    alone = [evaluate(predictor, llama_adapter, sequences[i : i + 1], rows=4, seed=i)["layer0"] for i in range(3)]
    mass = [report["oracle_mass"]["10%"] for report in alone]
    assert len(set(mass)) > 1  # the sequences differ, so the first one's alone would be wrong
    assert merged["layer0"]["oracle_mass"]["10%"] == pytest.approx(sum(mass) / 3)


def test_several_complete_caches_train_as_one_mix_taking_turns(tiny_model_dir, tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    small = list(CACHE_SMALL)
    for cache, seq_len, count, offsets in ((short, "32", "3", "--no-position-offsets"),
                                           (long, "48", "2", "--position-offsets")):
        small[small.index("--seq-len") + 1] = seq_len
        built = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--corpus", "stdlib:json/*.py",
                                    "--teacher-cache", str(cache), "--sequences", count, offsets, "--cache-only",
                                    "--out", str(tmp_path / "unused"), *small])
        assert built.exit_code == 0, built.output
    out = tmp_path / "mixed"
    mixed = ["train-predictor", "--model", tiny_model_dir, "--teacher-cache", str(short), "--teacher-cache", str(long),
             "--epochs", "2", "--out", str(out), *CACHE_SMALL]
    result = runner.invoke(app, mixed)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == (3 + 2) * 2  # every shard of both caches, each epoch
    parts = config["teacher_cache"]["mix"]
    assert [(part["spec"]["seq_len"], part["spec"]["position_offsets"], part["sequences"]) for part in parts] == [
        (32, False, 3), (48, True, 2)]
    assert config["train"]["teacher_cache"] == "+".join(part["id"] for part in parts)
    assert [part["data"]["corpus"][0]["source"] for part in parts] == ["stdlib:json/*.py"] * 2
    assert config["train"]["seq_len"] == 48
    assert str(tmp_path) not in json.dumps(config)
    resumed = runner.invoke(app, [*mixed, "--resume"])  # finished: the same run, nothing lost
    assert resumed.exit_code == 0, resumed.output
    swapped = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--teacher-cache", str(long),
                                  "--teacher-cache", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
                                  *CACHE_SMALL])
    assert swapped.exit_code == 2 and "is not a complete teacher cache" in " ".join(swapped.output.split())
    for extra, message in ((("--corpus", "stdlib:json/*.py"), "train on complete caches only"),
                           (("--steps", "4"), "drop --steps"),
                           (("--teacher-cache", str(short)), "named twice")):
        refused = runner.invoke(app, ["train-predictor", "--model", tiny_model_dir, "--teacher-cache", str(short),
                                      "--teacher-cache", str(long), "--out", str(tmp_path / "refused"), *CACHE_SMALL,
                                      *extra])
        assert refused.exit_code == 2, refused.output
        assert message in " ".join(refused.output.split())
