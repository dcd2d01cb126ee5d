"""The benchmarks' CPU path at tiny sizes: reports are written with every field, every mode has a
row or a reason. No timing is asserted (CI machines are shared and slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tbrun_bench.archs import arch_config, arch_names, build_random_model
from tbrun_bench.latency import ALL_MODES
from tbrun_bench.report import ratio_summary
from tbrun_bench.overhead import TILE_ROPE, measure, to_markdown
from tbrun_cli.main import app

from offload_engine.config import DEFAULT_WINDOW
from offload_engine.errors import ConfigError
from offload_engine.models import dims_from_config
from offload_engine.policies import POLICIES

runner = CliRunner()
REPORTS = Path(__file__).resolve().parents[1] / "bench" / "reports"

EXPECTED_DIMS = {  # (layers, heads, KV heads, head dim) of the released models
    "llama-3.1-8b": (32, 32, 8, 128),
    "qwen2.5-7b": (28, 28, 4, 128),
    "llama-3.2-3b": (28, 24, 8, 128),
    "tiny-llama": (2, 4, 2, 16),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_arch_files_describe_the_released_shapes(name):
    assert name in arch_names()
    dims = dims_from_config(arch_config(name))
    assert (dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim) == EXPECTED_DIMS[name]


def test_llama3_rope_scaling_is_kept():
    rope = arch_config("llama-3.1-8b").rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0


def test_latency_cli_writes_reports_with_a_row_or_reason_per_mode(tmp_path):
    out = tmp_path / "results"
    result = runner.invoke(app, [
        "bench", "latency", "--arch", "tiny-llama", "--contexts", "256,320", "--budget", "96",
        "--decode-steps", "3", "--warmup", "1", "--device", "cpu", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    stem = out / "latency-tiny-llama-cpu"
    for suffix in ("json", "md", "png"):
        assert stem.with_suffix(f".{suffix}").is_file()
    report = json.loads(stem.with_suffix(".json").read_text())
    assert {"provenance", "machine", "settings", "rows", "pinned_memcpy_peak_gbps"} <= set(report)
    assert {"command", "commit"} <= set(report["provenance"])
    assert {"cpu", "host_ram_gib", "torch"} <= set(report["machine"])
    assert report["files"] == {"json": "latency-tiny-llama-cpu.json", "md": "latency-tiny-llama-cpu.md",
                               "png": "latency-tiny-llama-cpu.png"}  # names, never a local path
    for context in (256, 320):
        rows = [r for r in report["rows"] if r["context"] == context]
        assert {r["mode"] for r in rows} == set(ALL_MODES)
        assert len(rows) == 2 + 3 * 4  # sparse modes: 2 intervals x 2 neighbour settings
        for row in rows:
            assert row["status"] == "ok" or row["reason"], row
            if row["status"] == "ok":
                assert row["steps"] == 3
                for key in ("median_ms", "p90_ms", "prefill_s", "h2d_bytes_per_step", "speedup_vs_dense_offload",
                            "ratio_to_dense_gpu", "kv_on_device_share"):
                    assert row[key] is not None, key
    ok = {r["mode"] for r in report["rows"] if r["status"] == "ok"}
    must_run = {"dense-gpu", "dense-offload", "streaming-offload", "random-offload"}
    if "tokenbutler" in POLICIES:  # a random-weight predictor of the model's shape
        must_run.add("tokenbutler-offload")
    assert must_run <= ok
    markdown = stem.with_suffix(".md").read_text()
    assert "## Context 256 tokens" in markdown and "dense-offload" in markdown


def test_paired_ratios_average_on_the_log_scale_and_need_two_rounds_for_an_interval():
    one = ratio_summary([0.8])
    assert one["geomean"] == pytest.approx(0.8) and one["ci95"] is None
    mirror = ratio_summary([2.0, 0.5])  # a ratio and its inverse average to 1, with an interval around it
    assert mirror["geomean"] == pytest.approx(1.0)
    low, high = mirror["ci95"]
    assert low * high == pytest.approx(1.0) and low < 0.5
    steady = ratio_summary([0.50, 0.52, 0.51, 0.49])
    assert 0.48 < steady["ci95"][0] < steady["geomean"] < steady["ci95"][1] < 0.53


def test_cpu_latency_with_synthetic_kv_repeats_breakdown_and_floor(tmp_path):
    out = tmp_path / "cpu"
    result = runner.invoke(app, [
        "bench", "latency", "--arch", "tiny-llama", "--contexts", "512", "--budget", "96", "--decode-steps", "2",
        "--warmup", "1", "--device", "cpu", "--synthetic-kv", "--repeats", "2", "--interval", "1",
        "--neighbors", "off", "--modes", "dense-gpu,tokenbutler-offload,streaming-offload", "--out", str(out),
        "--predictor-shape", "2:32:8",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "latency-tiny-llama-cpu.json").read_text())
    assert report["settings"]["synthetic_kv"] and report["settings"]["repeats"] == 2
    assert report["settings"]["predictor_shape"] == "2:32:8"
    rows = {row["mode"]: row for row in report["rows"]}
    assert set(rows) == {"dense-gpu", "tokenbutler-offload", "streaming-offload"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["round_medians_ms"]) == 2 and row["median_ms"] == min(row["round_medians_ms"])
        assert set(row["breakdown"]) == {"selection", "copy", "wait", "attention", "rest"}
        assert row["floor_ms"] > 0 and row["ratio_to_floor"] > 0
        # over the timed steps only, as the timings: the phases and the rest add up to their mean step
        assert row["breakdown_steps"] == "timed"
        assert sum(part["ms_per_step"] for part in row["breakdown"].values()) == pytest.approx(row["mean_ms"])
    markdown = (out / "latency-tiny-llama-cpu.md").read_text()
    # ratios round by round: each round's medians divided, against dense-gpu and (tokenbutler) streaming
    for mode, references in (("tokenbutler-offload", {"dense-gpu", "streaming-offload"}),
                             ("streaming-offload", {"dense-gpu"})):
        paired = rows[mode]["paired_ratios"]
        assert set(paired) == references
        for reference, summary in paired.items():
            by_round = [mine / theirs for mine, theirs in zip(rows[mode]["round_medians_ms"],
                                                              rows[reference]["round_medians_ms"])]
            assert summary["per_round"] == pytest.approx(by_round)
            low, high = summary["ci95"]
            assert min(by_round) <= summary["geomean"] <= max(by_round) and low <= summary["geomean"] <= high
    assert "paired_ratios" not in rows["dense-gpu"] and "| tokenbutler-offload (interval 1" in markdown
    assert "Ratios round by round" in markdown and "the ones to judge a target by" in markdown
    assert "every other round in reverse order" in markdown and rows["streaming-offload"]["round_order"] == "alternating"
    started = [line.split(": ", 1)[1].split(" ")[0] for line in result.output.splitlines() if ", round " in line]
    assert started == ["dense-gpu", "tokenbutler-offload", "streaming-offload"] + [
        "streaming-offload", "tokenbutler-offload", "dense-gpu"]  # the second round in reverse
    assert rows["tokenbutler-offload"]["breakdown"]["selection"]["ms_per_step"] > 0
    assert rows["dense-gpu"]["breakdown"]["selection"]["ms_per_step"] == 0
    # the floor reads tokenbutler's projected keys as the run stored them (auto: int8 or bfloat16 on the CPU)
    from offload_engine.memory import dtype_name
    from offload_engine.policies.tokenbutler import compact_key_dtype
    from tbrun_bench.archs import arch_config

    stored = compact_key_dtype("auto", torch.float32, torch.device("cpu"))
    assert rows["tokenbutler-offload"]["compact_key_dtype"] == dtype_name(stored)
    config = arch_config("tiny-llama")
    entry = 8 * stored.itemsize + (2 if stored == torch.int8 else 0)  # d' 8, and an int8 token's float16 scale
    rows_read = (config.num_hidden_layers - 1) * config.num_key_value_heads
    assert rows["tokenbutler-offload"]["scoring_bytes_per_step"] == rows_read * entry * 512
    assert "tokenbutler's projected keys as stored, " + rows["tokenbutler-offload"]["compact_key_dtype"] in markdown
    assert "| mode | selection | copy | wait | attention | rest |" in markdown and "synthetic-kv" in markdown
    assert "over the timed steps, as the timings" in markdown
    assert "a producer every 2 layers, hidden width 32, d' 8" in markdown


def test_cpu_latency_with_a_copy_thread_gives_every_mode_the_same_cores(tmp_path, one_thread, monkeypatch):
    """--copy-thread: the offload modes copy (tokenbutler also selects) on one more thread; dense-gpu runs
    the model on one more torch thread and native kernel thread instead (its decode attention is native); the
    report says so, and torch's thread count and the kernels' variable are restored. Only with one torch thread
    for the model (torch's loops on the copy thread would take more cores)."""
    from offload_engine import native

    monkeypatch.delenv(native.THREADS_VARIABLE, raising=False)
    out = tmp_path / "copy-thread"
    threads = torch.get_num_threads()
    assert threads == 1
    result = runner.invoke(app, [
        "bench", "latency", "--arch", "tiny-llama", "--contexts", "512", "--budget", "96", "--decode-steps", "2",
        "--warmup", "1", "--device", "cpu", "--synthetic-kv", "--interval", "1", "--neighbors", "off",
        "--modes", "dense-gpu,dense-offload,tokenbutler-offload", "--out", str(out), "--predictor-shape", "2:32:8",
        "--copy-thread",
    ])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads
    report = json.loads((out / "latency-tiny-llama-cpu.json").read_text())
    assert report["settings"]["copy_thread"]
    rows = {row["mode"]: row for row in report["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["dense-gpu"]["model_threads"] == threads + 1 and not rows["dense-gpu"]["copy_thread"]
    assert rows["dense-gpu"]["kernel_threads"] == threads + 1 and native.THREADS_VARIABLE not in os.environ
    for mode in ("dense-offload", "tokenbutler-offload"):
        assert rows[mode]["model_threads"] == threads and rows[mode]["copy_thread"]
        assert rows[mode]["kernel_threads"] == 1
        assert rows[mode]["breakdown"]["copy"]["ms_per_step"] == 0  # off the step's path
    text = " ".join((out / "latency-tiny-llama-cpu.md").read_text().split())
    assert "`--copy-thread`: every mode used the same cores" in text
    assert "ran the model on 2 torch threads and its native kernels on 2." in text
    from tbrun_bench.latency import LatencySettings, run_latency

    with pytest.raises(ConfigError, match="--copy-thread is for --device cpu"):
        LatencySettings(contexts=[512], device="cuda", copy_thread=True)
    torch.set_num_threads(2)
    try:
        with pytest.raises(ConfigError, match="tbrun --threads 1 bench latency"):
            run_latency(LatencySettings(contexts=[512], arch="tiny-llama", device="cpu", copy_thread=True), tmp_path)
    finally:
        torch.set_num_threads(threads)


def test_latency_cli_refuses_bad_options_clearly(tmp_path):
    result = runner.invoke(app, ["bench", "latency", "--arch", "no-such-arch", "--contexts", "256",
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no-such-arch" in result.output
    result = runner.invoke(app, ["bench", "latency", "--arch", "tiny-llama", "--neighbors", "maybe",
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--neighbors" in result.output
    result = runner.invoke(app, ["bench", "latency", "--arch", "tiny-llama", "--predictor-shape", "2:128",
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--predictor-shape" in result.output and "G:I:D" in result.output


def test_latency_predictor_shape_takes_query_heads_per_kv_head():
    from offload_engine.errors import ConfigError
    from tbrun_bench.latency import parse_predictor_shape, random_predictor

    assert parse_predictor_shape("2:128:16") == (2, 128, 16, None)
    assert parse_predictor_shape("2:128:16:1") == (2, 128, 16, 1)
    for bad in ("2:128:16:0", "2:128:16:1:1", "2:128:x"):
        with pytest.raises(ConfigError, match="G:I:D:Q"):
            parse_predictor_shape(bad)
    dims = build_random_model("tiny-llama", device="cpu").dims  # 4 query heads, 2 KV heads
    assert random_predictor(dims, "2:32:8:1").config.query_heads == dims.num_kv_heads
    assert random_predictor(dims, "2:32:8").config.query_heads == dims.num_heads
    with pytest.raises(ConfigError, match="must divide"):
        random_predictor(dims, "2:32:8:3")


def test_the_random_predictor_has_the_asked_sizes():
    from tbrun_bench.latency import random_predictor

    adapter = build_random_model("tiny-llama", device="cpu")
    predictor = random_predictor(adapter.dims, "2:32:8")
    assert (predictor.config.producer_every, predictor.config.hidden, predictor.config.dim) == (2, 32, 8)
    again = random_predictor(adapter.dims, "2:32:8")
    assert all(torch.equal(a, b) for a, b in zip(predictor.parameters(), again.parameters()))  # seeded


def test_gather_cli_times_the_cpu_method(tmp_path):
    result = runner.invoke(app, ["bench", "gather", "--context", "4096", "--budget", "256", "--repeats", "3",
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "gather-cpu.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["index"]
    assert report["rows"][0]["agrees_with_index"] is True
    assert (tmp_path / "gather-cpu.md").is_file()
    assert str(tmp_path) not in (tmp_path / "gather-cpu.json").read_text()


def test_overhead_pairs_each_runner_with_its_references_repetition_by_repetition():
    from tbrun_bench.overhead import paired_ratios

    by_repetition = {("tbrun", 7): [100.0, 120.0, None], ("transformers", 7): [110.0, 130.0, 140.0],
                     ("vllm", 7): [80.0, 90.0, 85.0], ("tbrun tokenbutler:10%", 7): [90.0, 96.0, 70.0],
                     ("tbrun streaming:10%", 7): [60.0, 80.0, 64.0]}
    pairs = paired_ratios(by_repetition, 7, ("tokenbutler:10%", "streaming:10%"))
    assert pairs["tbrun"]["transformers"]["per_round"] == pytest.approx([100 / 110, 120 / 130])  # skips a gap
    assert set(pairs["tbrun tokenbutler:10%"]) == {"tbrun", "vllm", "tbrun streaming:10%"}
    assert pairs["tbrun tokenbutler:10%"]["tbrun streaming:10%"]["per_round"] == pytest.approx([1.5, 1.2, 70 / 64])
    assert set(pairs["tbrun streaming:10%"]) == {"tbrun", "vllm"}  # not against itself


def test_overhead_measures_both_sides_on_a_tiny_model():
    adapter = build_random_model("tiny-llama", device="cpu")
    rows = measure(adapter, [64, 96], new_tokens=4, repeats=2, skip=1, seed=0, log=lambda _: None,
                   sparse=("streaming:75%",))
    assert [r["context"] for r in rows] == [64, 96]
    for row in rows:
        assert row["tbrun"]["steps"] == 2 * 2 and row["transformers"]["steps"] == 2 * 2
        assert row["ratio_median"] > 0 and row["same_tokens"] in (True, False)
        assert row["sparse"]["streaming:75%"]["steps"] == 2 * 2
    report = {"provenance": {"command": "x", "commit": "y", "date": "z"}, "machine": {"cpu": "c"},
              "settings": {"model": "tiny", "dtype": "fp32", "new_tokens": 4, "repeats": 2, "skip_steps": 1,
                           "timing_method": "t"}, "rows": rows}
    markdown = to_markdown(report)
    assert "| 64 |" in markdown and "| 96 | streaming:75% |" in markdown
    for row in rows:  # every tbrun runner profiled: its phases add up to its mean step, and its bytes are counted
        for timing in (row["tbrun"], row["sparse"]["streaming:75%"]):
            parts = timing["breakdown"]
            assert set(parts) == {"selection", "copy", "wait", "attention", "rest"}
            assert abs(sum(p["share"] for p in parts.values()) - 1.0) < 1e-6 and parts["attention"]["ms_per_step"] > 0
            # over the timed steps only (the first ``skip`` of each run left out), as the timings
            assert sum(p["ms_per_step"] for p in parts.values()) == pytest.approx(timing["mean_ms"])
            assert timing["breakdown_steps"] == "timed"
        assert row["tbrun"]["h2d_mib_per_step"] == 0.0 and row["transformers"].get("breakdown") is None
        assert row["sparse"]["streaming:75%"]["breakdown"]["selection"]["ms_per_step"] > 0
    assert "## Where tbrun's steps went" in markdown and "| 96 | tbrun dense |" in markdown
    assert "(the timed steps only:" in markdown
    for row in rows:  # ratios paired repetition by repetition: tbrun over transformers, streaming over tbrun dense
        pairs = row["paired_ratios"]
        assert set(pairs) == {"tbrun", "tbrun streaming:75%"} and set(pairs["tbrun"]) == {"transformers"}
        assert set(pairs["tbrun streaming:75%"]) == {"tbrun"}  # (no other streaming runner, no vLLM here)
        for summary in (pairs["tbrun"]["transformers"], pairs["tbrun streaming:75%"]["tbrun"]):
            assert len(summary["per_round"]) == 2 and summary["ci95"][0] <= summary["geomean"] <= summary["ci95"][1]
    assert "## Ratios paired by repetition" in markdown and "| 64 | tbrun streaming:75% | tbrun |" in markdown


def test_overhead_fills_random_kv_from_a_context_on_and_leaves_transformers_out_there():
    adapter = build_random_model("tiny-llama", device="cpu")
    rows = measure(adapter, [64, 96], new_tokens=4, repeats=1, skip=1, seed=0, log=lambda _: None,
                   sparse=("streaming:75%",), synthetic_from=96)
    real, synthetic = rows
    assert not real["synthetic_kv"] and real["transformers"]["steps"] == 2
    assert synthetic["synthetic_kv"] and synthetic["transformers"] is None and synthetic["ratio_median"] is None
    assert synthetic["tbrun"]["steps"] == 2 and synthetic["sparse"]["streaming:75%"]["ratio_to_transformers"] is None
    report = {"provenance": {"command": "x", "commit": "y", "date": "z"}, "machine": {"cpu": "c"},
              "settings": {"model": "tiny", "dtype": "fp32", "new_tokens": 4, "repeats": 1, "skip_steps": 1,
                           "timing_method": "t"}, "rows": rows}
    markdown = to_markdown(report)
    assert "Contexts 96: tbrun's KV filled with random keys" in markdown
    assert "| 96 | streaming:75% |" in markdown and "vLLM" not in markdown.split("## Sparse")[0]


def test_overhead_prefills_a_contexts_tile_once_and_every_tbrun_runner_replays_it(monkeypatch):
    from offload_engine import Engine
    from tbrun_bench.overhead import run_tbrun

    adapter = build_random_model("tiny-llama", device="cpu")
    recorded = []
    record = Engine.record_prefill
    monkeypatch.setattr(Engine, "record_prefill",
                        lambda self, ids, **k: recorded.append(len(ids)) or record(self, ids, **k))
    outputs = []
    monkeypatch.setattr("tbrun_bench.overhead.run_tbrun", lambda *a, **k: outputs.append((a, k)) or run_tbrun(*a, **k))
    rows = measure(adapter, [64, 96], new_tokens=4, repeats=2, skip=1, seed=0, log=lambda _: None,
                   sparse=("streaming:75%",), synthetic_from=96, synthetic_tile=32)
    assert recorded == [96]  # the tiled context only, once for its 2 runners x 2 repetitions
    replayed = [k for a, k in outputs if a[1] and len(a[1]) == 96]
    assert len(replayed) == 4 and all(k["prefill"] is not None for k in replayed)
    assert rows[1]["tile_prefill_s"] > 0 and "tile_prefill_s" not in rows[0]
    # (a replay is bit-identical to the runner's own tiled prefill: tests/test_memory_and_lifecycle.py)
    report = {"provenance": {"command": "x", "commit": "y", "date": "z"}, "machine": {"cpu": "c"},
              "settings": {"model": "tiny", "dtype": "fp32", "new_tokens": 4, "repeats": 2, "skip_steps": 1,
                           "timing_method": "t", "synthetic_kv_tile": 32, "synthetic_kv_tile_rope": TILE_ROPE},
              "rows": rows}
    assert "The tile was prefilled once per context" in to_markdown(report)


def test_latency_append_merges_contexts_from_separate_runs(tmp_path):
    common = ["bench", "latency", "--arch", "tiny-llama", "--budget", "96", "--decode-steps", "1", "--warmup", "0",
              "--modes", "dense-gpu,streaming-offload", "--interval", "4", "--neighbors", "off",
              "--device", "cpu", "--out", str(tmp_path)]
    assert runner.invoke(app, common + ["--contexts", "256"]).exit_code == 0
    result = runner.invoke(app, common + ["--contexts", "320", "--append"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "latency-tiny-llama-cpu.json").read_text())
    assert sorted({r["context"] for r in report["rows"]}) == [256, 320]
    assert [run["contexts"] for run in report["runs"]] == [[256], [320]]



def test_overhead_sparse_specs_take_an_optional_interval_key_dtype_and_a_labelled_predictor():
    from offload_engine.errors import ConfigError
    from tbrun_bench.overhead import sparse_selection

    default = sparse_selection("tokenbutler:10%").selection
    assert (default.interval, default.sinks, default.window) == (1, 4, DEFAULT_WINDOW)  # tbrun generate's
    chosen, predictor, keys = sparse_selection("tokenbutler:10%:4")
    assert (chosen.policy, chosen.interval, chosen.budget.fraction, predictor, keys) == ("tokenbutler", 4, 0.1, None,
                                                                                          "auto")
    chosen, _, keys = sparse_selection("tokenbutler:10%:1:bfloat16")
    assert (chosen.interval, keys) == (1, "bfloat16")
    for bad in ("tokenbutler:10%:x", "tokenbutler:10%:4:5", "tokenbutler:10%:1:int4", "tokenbutler:10%:1:int8:x"):
        with pytest.raises(ConfigError, match="POLICY:BUDGET"):
            sparse_selection(bad)
    chosen, predictor, _ = sparse_selection("critical(tokenbutler)@q1:10%", {"q1": "runs/pred-q1"})
    assert (chosen.policy, predictor) == ("critical(tokenbutler)", "runs/pred-q1")
    with pytest.raises(ConfigError, match="--predictor q2=DIR"):
        sparse_selection("tokenbutler@q2:10%", {"q1": "runs/pred-q1"})
    for other in ("quest@q1:10%", "quest:10%:1:int8"):
        with pytest.raises(ConfigError, match="only tokenbutler"):
            sparse_selection(other, {"q1": "runs/pred-q1"})


def test_overhead_reports_name_the_window_their_sparse_runners_had():
    from tbrun_bench.overhead import _window_note

    assert _window_note({}) == "sinks 4, window 32"  # reports from before the window followed the budget
    note = _window_note({"sinks": 4, "window": 128, "window_rule": "budget"})
    assert note.startswith("sinks 4, window up to 128 following the budget")
    for name, window in (("overhead_vllm_cpu_tiled", "window 32;"), ("overhead_vllm_cpu_default", "window up to 128")):
        report = json.loads((REPORTS / f"{name}.json").read_text())  # each renders as committed, with its window
        assert to_markdown(report) == (REPORTS / f"{name}.md").read_text() and window in to_markdown(report)


def test_overhead_times_a_labelled_predictor_and_records_it_without_its_path(tmp_path, capsys):
    """``--predictor q1=DIR`` with ``--sparse tokenbutler@q1:...``: that predictor's runner (here one query head
    per KV head) is timed beside the others, and the report names it by folder and hash only."""
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
    from tbrun_bench.overhead import describe_predictors, parse_args

    adapter = build_random_model("tiny-llama", device="cpu")
    dims = adapter.dims
    predictor = TokenButlerPredictor(PredictorConfig.for_model(dims, 2, 8, 32, query_heads=dims.num_kv_heads))
    folder = tmp_path / "pred-q1"
    save_checkpoint(folder, predictor, {"model_name": "tiny"})
    rows = measure(adapter, [256], new_tokens=4, repeats=1, skip=1, seed=0, log=lambda _: None,
                   sparse=("tokenbutler@q1:25%",), predictors={"q1": str(folder)})  # 64 tokens: past sinks + window
    timing = rows[0]["sparse"]["tokenbutler@q1:25%"]
    assert timing["steps"] == 2 and timing["breakdown"]["selection"]["ms_per_step"] > 0
    assert timing["h2d_mib_per_step"] > 0  # it selects, so what it selects is copied
    described = describe_predictors({"q1": str(folder)})
    assert described == {"q1": {"name": "pred-q1", "weights_sha256": json.loads((folder / "config.json").read_text())
                                ["weights_sha256"]}}
    assert str(tmp_path) not in json.dumps(described)
    for argv in (["--predictor", f"q1={tmp_path / 'nowhere'}"], ["--predictor", "q1"],
                 ["--sparse", "tokenbutler@q1:10%"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "predictor" in capsys.readouterr().err


def test_topk_speed_writes_the_three_methods_per_case(tmp_path, monkeypatch):
    from offload_engine import native
    from tbrun_bench import topk_speed

    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    monkeypatch.setattr(topk_speed, "CASES", [(3, 8192, 500), (2, 9000, 800)])
    topk_speed.main(["--calls", "2", "--warmup", "0", "--out", str(tmp_path / "topk")])
    report = json.loads((tmp_path / "topk.json").read_text())
    assert [(c["rows"], c["candidates"], c["keep"]) for c in report["cases"]] == [(3, 8192, 500), (2, 9000, 800)]
    assert all(c[method]["steps"] == 2 for c in report["cases"] for method in ("torch_topk", "numpy_partition", "native"))
    assert all(c["native_vs_torch"] > 0 and c["native_vs_numpy"] > 0 for c in report["cases"])
    assert "numpy cut + partition ms" in (tmp_path / "topk.md").read_text() and "commit" in report["provenance"]


def test_page_prefilter_speed_times_both_methods_per_context(tmp_path, monkeypatch):
    from offload_engine import native
    from tbrun_bench import page_prefilter_speed

    kernels = native.kernels()
    if kernels is None or not kernels.int8_quad_products:
        pytest.skip(f"the benchmark needs the native kernels with AVX512-VNNI: {native.status()}")
    monkeypatch.setattr(page_prefilter_speed, "CONTEXTS", (4096, 20000))
    monkeypatch.setattr(page_prefilter_speed, "PRODUCERS", 2)
    page_prefilter_speed.main(["--calls", "2", "--warmup", "1", "--out", str(tmp_path / "pages")])
    report = json.loads((tmp_path / "pages.json").read_text())
    small, large = report["cases"]
    assert small["kept_pages"] == 0 and large["kept_pages"] == 479  # at 4k more than half the pages: not applied
    assert large["ratio"] == pytest.approx(large["pages"]["median_ms"] / large["every_token"]["median_ms"])
    markdown = (tmp_path / "pages.md").read_text()
    assert "none: does not apply" in markdown and f"479 of {large['candidate_pages']}" in markdown


def test_selection_speed_writes_torch_and_the_native_key_dtypes_per_case(tmp_path, monkeypatch):
    from offload_engine import native
    from tbrun_bench import selection_speed

    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    monkeypatch.setattr(selection_speed, "CASES", [("tiny", 2, 3, 3, 16, 2000), ("odd d'", 1, 2, 2, 5, 700)])
    monkeypatch.setattr(selection_speed, "PRODUCERS", 3)
    monkeypatch.setattr(selection_speed, "NETWORKS", [("tiny network", 40, 24, 18)])
    selection_speed.main(["--calls", "2", "--warmup", "0", "--out", str(tmp_path / "selection")])
    report = json.loads((tmp_path / "selection.json").read_text())
    assert [c["tokens"] for c in report["cases"]] == [2000, 700]
    for case in report["cases"]:
        assert all(case[method]["steps"] == 2 for method in ("torch", "native", "native_bf16", "native_int8"))
        assert case["max_abs_difference"] < 1e-5 and case["bf16_max_abs_difference"] < 1e-5  # probabilities
        assert case["int8_max_abs_difference"] < 1e-5 and case["int8_vs_bf16"] > 0
        assert case["int8_quad_products"] == (native.kernels().int8_quad_products and case["dim"] % 4 == 0)
    [network] = report["query_networks"]
    assert network["torch"]["steps"] == network["native"]["steps"] == 2 and network["max_abs_difference"] < 1e-4
    markdown = (tmp_path / "selection.md").read_text()
    assert "native bf16 ms" in markdown and "native int8 ms" in markdown and "tiny network" in markdown
    assert "commit" in report["provenance"]


def test_the_topk_benchs_numpy_path_is_the_engines_fallback_and_returns_the_same_tokens():
    from offload_engine.selection import ranking
    from tbrun_bench.topk_speed import numpy_topk

    scores = torch.softmax(3 * torch.randn(2, 8192, generator=torch.Generator().manual_seed(0)), dim=-1)
    values, index = numpy_topk(scores, 500)
    expected = torch.topk(scores, 500, dim=-1).indices
    assert [set(row.tolist()) for row in index] == [set(row.tolist()) for row in expected]
    assert torch.equal(torch.from_numpy(values), scores.gather(-1, torch.from_numpy(index)))
    assert ranking.PREFILTER_MIN_CANDIDATES <= 8192  # these rows take the sampled cut


def test_attention_speed_writes_every_method_per_case_from_cold_copies(tmp_path, monkeypatch):
    from offload_engine import native
    from tbrun_bench import attention_speed

    monkeypatch.setattr(attention_speed, "SHAPES", {"tiny": (4, 2, 16)})
    monkeypatch.setattr(attention_speed, "LENGTHS", (64, 96))
    monkeypatch.setattr(attention_speed, "COLD_BYTES", 3 * 2 * 2 * 64 * 16 * 4)  # 3 copies at 64 tokens, 2 at 96
    attention_speed.main(["--calls", "2", "--warmup", "0", "--out", str(tmp_path / "attention")])
    report = json.loads((tmp_path / "attention.json").read_text())
    assert [(c["tokens"], c["masked"], c["copies"]) for c in report["cases"]] == [
        (64, True, 3), (64, False, 3), (96, True, 2), (96, False, 2)]
    assert all(c["fused"]["steps"] == 2 and c["grouped"]["steps"] == 2 and c["ratio"] > 0 for c in report["cases"])
    built = native.kernels() is not None
    assert all(("native" in c) == built and (c["native_ratio"] is not None) == built for c in report["cases"])
    text = (tmp_path / "attention.md").read_text()
    assert "native ms" in text and "came from memory" in text and "commit" in report["provenance"]


def test_report_commands_name_no_folder_of_this_machine(monkeypatch, tmp_path):
    from tbrun_bench import report

    inside = report.REPO_ROOT / "predictors" / "smollm2-135m-instruct"
    monkeypatch.setattr("sys.argv", ["x", "--predictor", str(inside), "--baseline", str(tmp_path / "old-predictor"),
                                     "--lengths", "1024:8"])
    monkeypatch.delenv("TBRUN_NATIVE", raising=False)
    monkeypatch.delenv("TBRUN_NATIVE_THREADS", raising=False)
    command = report.provenance("python -m tbrun_bench.predictor_report")["command"]
    assert command == ("python -m tbrun_bench.predictor_report --predictor predictors/smollm2-135m-instruct "
                       "--baseline old-predictor --lengths 1024:8")
    monkeypatch.setenv("TBRUN_NATIVE_THREADS", "2")  # changes what is measured: the command says so
    assert report.provenance("tbrun bench latency")["command"].startswith("TBRUN_NATIVE_THREADS=2 tbrun bench latency ")


def test_latency_runs_tokenbutler_with_and_without_the_page_prefilter_paired(tmp_path):
    """--page-prefilter 0,16: tokenbutler once per page setting (the others once), its policy built with the
    pages, and the prefiltered row's ratio to the same row without them paired by round."""
    from tbrun_bench.latency import LatencySettings, build_policy_for, variants

    settings = LatencySettings(contexts=[4096], modes=["streaming-offload", "tokenbutler-offload"], intervals=[1],
                               neighbors=[False], page_prefilters=[0, 16], device="cpu")
    assert [v.label for v in variants(settings)] == [
        "streaming-offload (interval 1, neighbors off)", "tokenbutler-offload (interval 1, neighbors off)",
        "tokenbutler-offload (interval 1, neighbors off, pages of 16)"]
    assert build_policy_for(variants(settings)[2], None, "2:32:8", "shipped").prefilter.page == 16
    with pytest.raises(ConfigError, match="page-prefilter"):
        LatencySettings(contexts=[4096], page_prefilters=[1], device="cpu")
    _assert_paired_with_its_own_mode(tmp_path / "pages", "--page-prefilter", "0,16", "page_prefilter", 16,
                                     "without the page prefilter")


def _assert_paired_with_its_own_mode(out: Path, option: str, values: str, key: str, value, reference: str,
                                     mode: str = "tokenbutler-offload") -> None:
    """``tbrun bench latency`` of ``mode`` at ``option values`` (off and on) on a tiny model, two rounds: both
    rows ran, and the row whose ``key`` is ``value`` has its ratio to the row without it paired round by round."""
    result = runner.invoke(app, [
        "bench", "latency", "--arch", "tiny-llama", "--contexts", "1024", "--budget", "96", "--decode-steps", "2",
        "--warmup", "1", "--device", "cpu", "--synthetic-kv", "--repeats", "2", "--interval", "1",
        "--neighbors", "off", "--modes", mode, option, values, "--out", str(out),
        "--predictor-shape", "2:32:8",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "latency-tiny-llama-cpu.json").read_text())
    rows = {row[key]: row for row in report["rows"]}
    assert set(rows) == {0, value} and all(row["status"] == "ok" for row in rows.values())
    paired = rows[value]["paired_ratios"][reference]
    assert paired["per_round"] == pytest.approx([a / b for a, b in zip(rows[value]["round_medians_ms"],
                                                                      rows[0]["round_medians_ms"])])
    assert f"ratio to the same {reference}" in (out / "latency-tiny-llama-cpu.md").read_text()


def test_latency_runs_the_scoring_modes_with_and_without_a_keep_bonus_paired(tmp_path):
    """--keep-bonus 0,0.5: every mode that scores once per bonus (streaming once), the engine's selection given the
    bonus, and the row with it paired by round with the same mode without it."""
    from tbrun_bench.latency import LatencySettings, engine_config, variants

    settings = LatencySettings(contexts=[4096], modes=["streaming-offload", "tokenbutler-offload",
                                                       "critical(tokenbutler)-offload"], intervals=[1],
                               neighbors=[False], keep_bonuses=[0.0, 0.5], device="cpu")
    assert [v.label for v in variants(settings)] == [
        "streaming-offload (interval 1, neighbors off)", "tokenbutler-offload (interval 1, neighbors off)",
        "tokenbutler-offload (interval 1, neighbors off, keep bonus 0.5)",
        "critical(tokenbutler)-offload (interval 1, neighbors off)",
        "critical(tokenbutler)-offload (interval 1, neighbors off, keep bonus 0.5)"]
    assert engine_config(variants(settings)[2], 4096, settings).selection.keep_bonus == 0.5
    for bad, message in (([-1.0], "keep-bonus must be a share"), ([], "keep-bonus needs"),
                         ([0.5], "does not combine with --page-prefilter")):
        with pytest.raises(ConfigError, match=message):
            LatencySettings(contexts=[4096], keep_bonuses=bad, page_prefilters=[16], device="cpu")
    for mode in ("tokenbutler-offload", "critical(tokenbutler)-offload"):  # a wrapped mode builds and runs too
        _assert_paired_with_its_own_mode(tmp_path / mode, "--keep-bonus", "0,0.5", "keep_bonus", 0.5,
                                         "without the keep bonus", mode)
    result = runner.invoke(app, ["bench", "latency", "--contexts", "1024", "--device", "cpu", "--keep-bonus", "x"])
    assert result.exit_code == 2 and "--keep-bonus 'x' is not a number" in result.output


def test_latency_runs_each_interval_above_one_again_with_refresh_layers():
    from tbrun_bench.latency import LatencySettings, engine_config, variants

    settings = LatencySettings(contexts=[4096], modes=["dense-gpu", "tokenbutler-offload"], intervals=[1, 4],
                               neighbors=[False], refresh_layers="20-23", device="cpu")
    labels = [v.label for v in variants(settings)]
    assert labels == ["dense-gpu", "tokenbutler-offload (interval 1, neighbors off)",
                      "tokenbutler-offload (interval 4, neighbors off)",
                      "tokenbutler-offload (interval 4, neighbors off, refresh 20-23)"]
    refreshed = engine_config(variants(settings)[-1], 4096, settings)
    assert refreshed.selection.refresh_layers == frozenset({20, 21, 22, 23})
    with pytest.raises(ConfigError, match="refresh-layers"):
        LatencySettings(contexts=[4096], refresh_layers="x", device="cpu")


def test_the_vllm_section_says_how_many_cores_its_steps_used():
    from tbrun_bench.overhead import _vllm_markdown

    row = {"context": 7680, "vllm": {"median_ms": 74.7, "p90_ms": 85.2, "prefill_s_median": 1.2},
           "tbrun_ratio_to_vllm": 1.74, "same_tokens_as_vllm": True,
           "sparse": {"streaming:10%": {"ratio_to_vllm": 0.92}}}
    report = {"rows": [row], "settings": {"vllm": {"vllm": "0.32.0", "enforce_eager": False, "cores_used": 1.013}}}
    text = _vllm_markdown(report)
    assert "process CPU time / wall time over its timed steps 1.01" in text and "| 7680 | 74.7 |" in text
    report["settings"]["vllm"]["cores_used"] = None  # no step timed: nothing claimed
    assert "wall time" not in _vllm_markdown(report)


def test_overhead_can_fill_long_contexts_with_a_repeated_real_prefix():
    adapter = build_random_model("tiny-llama", device="cpu")
    rows = measure(adapter, [96], new_tokens=4, repeats=1, skip=1, seed=0, log=lambda _: None,
                   sparse=("streaming:75%",), synthetic_from=96, synthetic_tile=32)
    assert rows[0]["synthetic_kv"] and rows[0]["tbrun"]["steps"] == 2
    report = {"provenance": {"command": "x", "commit": "y", "date": "z"}, "machine": {"cpu": "c"},
              "settings": {"model": "tiny", "dtype": "fp32", "new_tokens": 4, "repeats": 1, "skip_steps": 1,
                           "timing_method": "t", "synthetic_kv_tile": 32}, "rows": rows}
    assert "the real keys and values of the prompt's first 32 tokens, repeated" in to_markdown(report)
    assert "a scorer's copies tie" in to_markdown(report)  # a report of the fill before keys were turned
    report["settings"]["synthetic_kv_tile_rope"] = TILE_ROPE
    assert "turned by RoPE to the positions it fills" in to_markdown(report)


def test_page_bounds_hold_every_token_of_their_page_and_the_prefilter_report_runs(tiny_model_dir, tmp_path):
    """The page bound is >= the logit of each token of its page (Quest's bound on the compact keys), and
    bench/page_prefilter.py writes its paired report end to end on a tiny model."""
    from offload_engine.models import load_model
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
    from tbrun_bench import page_prefilter

    adapter = load_model(tiny_model_dir)
    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, 2, 8, 32))
    keys = torch.randn(adapter.dims.num_kv_heads, 37, 8)  # a last page left partial
    queries = torch.randn(5, predictor.config.query_heads, 8)
    logits = predictor.expand_heads(predictor.head_scores(queries, keys))
    for page in (1, 4, 16):
        bound = page_prefilter.bound_logits(predictor, queries, keys, page)
        assert (bound >= logits - 1e-5).all()
        assert page > 1 or torch.allclose(bound, logits, atol=1e-5)  # a page of one token: the logit itself
    assert not torch.allclose(page_prefilter.bound_logits(predictor, queries, keys, 16), logits)
    save_checkpoint(tmp_path / "pred", predictor, {"model_name": "tiny"})
    page_prefilter.main(["--predictor", str(tmp_path / "pred"), "--model", tiny_model_dir, "--corpus",
                         "stdlib:json/*.py", "--lengths", "64:2,48:1", "--pages", "4,64", "--factors", "1,100",
                         "--rows", "16", "--budget", "0.2", "--out", str(tmp_path / "pages")])
    whole = json.loads((tmp_path / "pages.json").read_text())
    assert whole["budget"] == 0.2 and "as built" in whole["rule"]
    report = whole["lengths"]["64"]
    assert len(report["per_sequence"]["engine"]) == 2
    # candidates of 100x the budget are every token: the engine's own selection, to the last digit
    assert report["minus_engine"]["P4 x100"]["mean"] == 0.0 and report["recall"]["P4 x100 share"]["mean"] == 1.0
    assert report["recall"]["P4 x1 share"]["mean"] < 1.0
    assert "minus engine, paired" in (tmp_path / "pages.md").read_text()


@pytest.mark.parametrize("options, message", [
    (dict(budget=0), "--budget must be at least 1 token"),
    (dict(intervals=[0]), "every prediction interval must be >= 1"),
    (dict(gather_method="foo"), "--gather-method 'foo' is not one of"),
    (dict(synthetic_kv_tile=64), "give it with --synthetic-kv"),
    (dict(synthetic_kv=True, synthetic_kv_tile=64), "random weights have none: give --model"),
    (dict(synthetic_kv=True, synthetic_kv_tile=600, model="m"), r"longer than the prompt at --contexts \[512\]"),
    (dict(predictor="shipped"), "a trained predictor needs the model it was trained for"),
    (dict(predictor="no/such/folder", model="m"), "is not random, shipped or a checkpoint folder"),
])
def test_latency_settings_refuse_values_no_mode_could_run(options, message):
    from tbrun_bench.latency import LatencySettings

    with pytest.raises(ConfigError, match=message):
        LatencySettings(**{"contexts": [512], "device": "cpu", **options})


@pytest.mark.parametrize("options, message", [
    (dict(budget=0), "--budget must be >= 1"), (dict(kv_heads=0), "--kv-heads must be >= 1"),
    (dict(head_dim=-1), "--head-dim must be >= 1"), (dict(repeats=0), "--repeats must be >= 1"),
    (dict(context=100, budget=200), "--budget 200 is above --context 100"),
])
def test_gather_settings_refuse_bad_sizes(options, message):
    from tbrun_bench.gather import GatherSettings

    with pytest.raises(ConfigError, match=message):
        GatherSettings(**{"device": "cpu", **options})


def _window_study_masks(selections, rows: torch.Tensor) -> dict:
    """``selections`` on seeded random attention and predictor logits of 6 heads in groups of 3 over 600 tokens, at
    query ``rows``, budget 50%."""
    from offload_engine.predictor import evaluation

    generator = torch.Generator().manual_seed(0)
    length = 600
    future = evaluation.causal_mask(rows, length)
    logits = torch.randn(6, len(rows), length, generator=generator)
    probs = torch.softmax(torch.randn(6, len(rows), length, generator=generator).masked_fill(future, float("-inf")), -1)
    return selections(probs, logits, rows, 0.5, 3, torch.Generator().manual_seed(1))


def test_the_window_study_masks_are_the_engine_rule_at_each_window(monkeypatch):
    """bench/window_study.py: ``engine_wW`` at the default window is ``tokenbutler_engine``'s mask, every method
    keeps the budget's count, and a wider window keeps the newer tokens; its table pairs by sequence."""
    from offload_engine.predictor import evaluation
    from tbrun_bench import window_study

    monkeypatch.setattr(window_study, "WINDOWS", (8, evaluation.ENGINE_WINDOW, 200))
    rows = torch.tensor([300, 450, 599])
    masks = _window_study_masks(window_study._selections_with_windows(evaluation._selections), rows)
    assert torch.equal(masks[f"engine_w{evaluation.ENGINE_WINDOW}"], masks["tokenbutler_engine"])
    counts = evaluation.budget_counts(rows, 0.5)
    for window in window_study.WINDOWS:
        assert torch.equal(masks[f"engine_w{window}"].sum(-1), counts.expand(6, -1))
    recent = lambda mask: int(mask[:, 2, 599 - 150:600].sum())  # noqa: E731
    assert recent(masks["engine_w8"]) < recent(masks["tokenbutler_engine"]) < recent(masks["engine_w200"])
    per_sequence = {"tokenbutler_engine": {"10%": [0.90, 0.92]}, "engine_w8": {"10%": [0.80, 0.83]},
                    "engine_w200": {"10%": [0.91, 0.94]}}
    table = window_study.window_table({"recall": {"4096": {"per_sequence": per_sequence}}})
    assert "| 200 | 0.925 [" in table and "+0.015 [" in table and "(2 of 2)" in table
    recorded = {"recall": {"4096": {"per_sequence": per_sequence}}, "engine_rule": {"window": 200}}
    # the recorded default's row is tokenbutler_engine's recall, with no difference cell
    assert "| 200 | 0.910 [0.783, 1.037] |\n" in window_study.window_table(recorded)


def test_the_committed_window_study_renders_from_its_json_as_committed():
    """bench/reports/predictor_window (run when the engine's window was 64 and not recorded): its tables come back
    from its JSON as committed, every window it measured in its rows."""
    from tbrun_bench import window_study

    report = json.loads((REPORTS / "predictor_window.json").read_text())
    table = window_study.window_table(report)
    assert table[table.index("### every row"):] in (REPORTS / "predictor_window.md").read_text()
    assert "| 128 |" in table and "| 64 | 0.947 [" in table
    shares = window_study.share_table(json.loads((REPORTS / "predictor_window_share.json").read_text()))
    assert shares[shares.index("### every row"):] in (REPORTS / "predictor_window_share.md").read_text()
    assert "| 0.4 |" in shares and "| 0.9 |" in shares


def test_the_window_share_study_masks_and_table(monkeypatch):
    """``window_study --shares``: share 0.5 is the engine's rule (``tokenbutler_engine``), every share keeps the
    budget's count, a smaller share keeps fewer recent tokens; its table pairs each share with 0.5 by sequence;
    the options are taken out of predictor_report's arguments and bad ones refused."""
    from offload_engine.predictor import evaluation
    from tbrun_bench import window_study

    rows = torch.tensor([300, 450, 599])
    selections = window_study._selections_with_windows(evaluation._selections, windows=(), shares=(0.25, 0.5, 0.9))
    masks = _window_study_masks(selections, rows)
    assert "engine_w0" not in masks and torch.equal(masks["engine_s50"], masks["tokenbutler_engine"])
    counts = evaluation.budget_counts(rows, 0.5)
    for share in ("engine_s25", "engine_s90"):
        assert torch.equal(masks[share].sum(-1), counts.expand(6, -1))
    recent = lambda mask: int(mask[:, 0, 300 - 127:301].sum())  # noqa: E731  (k = 151 at row 300: w 36 / 73 / 128)
    assert recent(masks["engine_s25"]) < recent(masks["tokenbutler_engine"]) < recent(masks["engine_s90"])
    per_sequence = {"tokenbutler_engine": {"10%": [0.90, 0.92]}, "engine_s25": {"10%": [0.91, 0.94]}}
    report = {"recall": {"1024": {"per_sequence": per_sequence}}}
    table = window_study.share_table(report)
    assert "| 0.25 | 0.925 [" in table and "+0.015 [" in table and "(2 of 2)" in table and "| 0.5 | 0.910 [" in table
    assert window_study.window_table(report) == ""  # no window width measured but the default
    argv = ["--predictor", "p", "--shares", "0.25,0.4", "--windows", "none", "--out", "x"]
    assert window_study._numbers(argv, "--shares", (), float) == (0.25, 0.4)
    assert window_study._numbers(argv, "--windows", (1,), int) == () and argv == ["--predictor", "p", "--out", "x"]
    with pytest.raises(SystemExit, match="--shares"):
        window_study.main(["--shares", "1.5", "--out", "x"])


def test_latency_times_a_trained_predictor_on_a_repeated_real_prefix(tiny_model_dir, tmp_path):
    """``--model DIR --predictor FOLDER --synthetic-kv-tile N``: the KV is a real N-token prefix's, repeated; the
    trained predictor selects; the report names it by folder and hash (no path of this machine) and describes
    the fill, without the random predictor's upper-bound note."""
    from offload_engine.models import load_model
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

    dims = load_model(tiny_model_dir).dims
    folder = tmp_path / "pred-tiny"
    save_checkpoint(folder, TokenButlerPredictor(PredictorConfig.for_model(dims, 2, 8, 32)), {"model_name": "tiny"})
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "bench", "latency", "--model", tiny_model_dir, "--contexts", "320", "--budget", "48", "--decode-steps", "2",
        "--warmup", "1", "--device", "cpu", "--synthetic-kv", "--synthetic-kv-tile", "64", "--predictor", str(folder),
        "--interval", "1", "--neighbors", "off", "--modes", "dense-gpu,tokenbutler-offload", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    stem = out / f"latency-{Path(tiny_model_dir).name}-cpu"
    report = json.loads(stem.with_suffix(".json").read_text())
    rows = {row["mode"]: row for row in report["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    weights = json.loads((folder / "config.json").read_text())["weights_sha256"]
    assert rows["tokenbutler-offload"]["predictor"] == f"pred-tiny (weights {weights[:8]})"
    assert report["settings"]["predictor"] == "pred-tiny" and report["settings"]["synthetic_kv_tile"] == 64
    assert str(tmp_path) not in json.dumps(report["settings"])
    # the floor reads the loaded predictor's d' (8), not --predictor-shape's default (16)
    stored = rows["tokenbutler-offload"]["compact_key_dtype"]
    entry = 8 * getattr(torch, stored).itemsize + (2 if stored == "int8" else 0)
    rows_read = (dims.num_layers - 1) * dims.num_kv_heads
    assert rows["tokenbutler-offload"]["scoring_bytes_per_step"] == rows_read * entry * 320
    markdown = stem.with_suffix(".md").read_text()
    assert "the real keys and values of the prompt's first 64 tokens, repeated" in markdown
    assert rows["dense-gpu"]["tile_prefill_s"] == rows["tokenbutler-offload"]["tile_prefill_s"] > 0  # one prefill
    assert "prefilled once per context" in markdown
    assert "tokenbutler's predictor the trained pred-tiny" in markdown
    assert "Random predictor weights redraw" not in markdown
    # a later --append with another predictor is refused rather than merged
    again = runner.invoke(app, ["bench", "latency", "--model", tiny_model_dir, "--contexts", "384", "--budget", "48",
                                "--decode-steps", "2", "--warmup", "1", "--device", "cpu", "--synthetic-kv",
                                "--synthetic-kv-tile", "64", "--predictor", "random", "--modes", "dense-gpu",
                                "--out", str(out), "--append"])
    assert again.exit_code == 2 and "made with different predictor;" in " ".join(again.output.split())
