"""``tbrun eval`` end to end on a tiny random Llama: the harness drives the real engine for every
policy x budget, writes one run per directory (JSON, Markdown with dense on top, PNG), and
refuses bad input with a message that says what is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offload_engine.config import Budget
from offload_engine.errors import ConfigError
from offload_engine.evaluation.harness import EvalConfig, evaluate, load_for_eval, prepare_samples, run_points
from offload_engine.evaluation.report import RESULTS_FILE, check_output_dir
from tbrun_cli.main import app

runner = CliRunner()
CONTEXT = "256"


def run_cli(*args: str):
    return runner.invoke(app, ["eval", *args])


def flat(output: str) -> str:
    return " ".join(output.split())


def eval_args(model_dir: str, out: Path, *extra: str, policy: str = "streaming,quest", budget: str = "25%,50%"):
    return ["--task", "niah-single", "--policy", policy, "--budget", budget, "--context", CONTEXT,
            "--samples", "2", "--model", model_dir, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def report_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """One real eval run through the CLI (dense + 2 policies x 2 budgets, 2 samples)."""
    out = tmp_path_factory.mktemp("eval") / "niah"
    result = run_cli(*eval_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    return out


def test_eval_writes_json_markdown_and_plot(report_dir):
    assert sorted(p.name for p in report_dir.iterdir()) == ["plot.png", "report.md", "results.json"]
    assert (report_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_every_sample_of_every_point_is_recorded(report_dir):
    report = json.loads((report_dir / RESULTS_FILE).read_text())
    samples = report["samples"]
    assert len(samples) == (1 + 2 * 2) * 2
    points = [(r["policy"], r["budget"]) for r in report["summary"]]
    assert points == [("dense", "100%"), ("streaming", "25%"), ("streaming", "50%"), ("quest", "25%"), ("quest", "50%")]
    for record in samples:
        assert {"output", "score", "correct", "answers", "depth", "seconds", "stats"} <= record.keys()
        assert record["prompt_tokens"] + 32 <= int(CONTEXT)
        assert {"prefill_seconds", "ms_per_step", "h2d_bytes_per_step", "new_tokens"} <= record["stats"].keys()


def test_sparse_points_record_the_share_of_tokens_they_attended(report_dir):
    """Streaming at 25% of a ~220-token prompt attends its sinks + window + selection, below the whole
    cache; at 50% more; dense records nothing (it attends everything) and has no attended column."""
    report = json.loads((report_dir / RESULTS_FILE).read_text())
    shares = {(r["policy"], r["budget"]): r["metrics"].get("attended") for r in report["summary"]}
    assert shares[("dense", "100%")] is None
    assert all("attended" not in r for r in report["samples"] if r["policy"] == "dense")
    assert 0 < shares[("streaming", "25%")] < shares[("streaming", "50%")] < 100
    assert 0 < shares[("quest", "25%")] < 100
    assert "tokens attended, share of the cache (%)" in (report_dir / "report.md").read_text()


def test_report_records_command_commit_machine_and_config(report_dir):
    report = json.loads((report_dir / RESULTS_FILE).read_text())
    assert "--task niah-single" in report["provenance"]["command"]
    assert report["provenance"]["commit"]
    assert {"platform", "cpu cores", "host RAM"} <= report["machine"].keys()
    assert report["config"]["budgets"] == ["25%", "50%"] and report["config"]["context"] == int(CONTEXT)
    assert report["config"]["policies"] == ["streaming", "quest"]


def test_markdown_table_has_dense_on_top(report_dir):
    markdown = (report_dir / "report.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| policy | 25% | 50% | 100% |"
    assert table[2].startswith("| dense | - | - |")
    assert table[3].startswith("| streaming |") and table[4].startswith("| quest |")
    assert "tbrun eval --task niah-single" in markdown


def test_a_directory_holding_another_run_is_refused_and_left_alone(report_dir, tiny_model_dir):
    before = (report_dir / RESULTS_FILE).read_bytes()
    result = run_cli(*eval_args(tiny_model_dir, report_dir, budget="10%"))
    assert result.exit_code == 2
    assert "different run" in flat(result.output) and "--overwrite" in flat(result.output)
    assert (report_dir / RESULTS_FILE).read_bytes() == before


def test_the_same_run_may_be_rewritten_but_other_files_are_refused(report_dir, tmp_path):
    config = json.loads((report_dir / RESULTS_FILE).read_text())["config"]
    check_output_dir(report_dir, config, overwrite=False)  # the same run: allowed
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an eval report"):
        check_output_dir(tmp_path, config, overwrite=False)
    check_output_dir(tmp_path, config, overwrite=True)


def test_overwrite_replaces_the_run_whole(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    result = run_cli(*eval_args(tiny_model_dir, out, "--overwrite", "--samples", "1", policy="random", budget="50%"))
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    report = json.loads((out / RESULTS_FILE).read_text())
    assert {r["policy"] for r in report["samples"]} == {"dense", "random"} and len(report["samples"]) == 2


@pytest.mark.parametrize("args, message", [
    (("--task", "needle"), "valid tasks: niah, niah-single"),
    (("--policy", "quest,magic"), "'magic' is not a policy; valid policies: "),
    (("--policy", "critical(magic)"), "'magic' is not a policy"),
    (("--policy", "quest,critical(critical(quest))"), "wraps critical in critical"),
    (("--policy", "critical(dense)"), "attends every token, as dense does"),
    (("--budget", "0%"), "outside (0, 100%]"),
    (("--budget", "10%,150%"), "outside (0, 100%]"),
    (("--samples", "0"), "--samples must be at least 1"),
    (("--context", "1k"), "longer than the model's 512 positions"),
    (("--device", "cuda"), "no CUDA GPU"),
    (("--policy", "tokenbutler", "--predictor", "/no/such/predictor"), "/no/such/predictor"),
])
def test_bad_input_exits_2_with_a_message(tiny_model_dir, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda is valid here")
    base = dict(zip(eval_args(tiny_model_dir, tmp_path / "out")[::2], eval_args(tiny_model_dir, tmp_path / "out")[1::2]))
    base.update(dict(zip(args[::2], args[1::2])))
    result = run_cli(*[item for pair in base.items() for item in pair])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert not (tmp_path / "out").exists()


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        EvalConfig(task="niah", policies=["qest"], budgets=[Budget.parse("10%")])
    for name in ("dense", "quest", "h2o", "snapkv", "streaming", "random", "oracle", "critical(<base>)"):
        assert name in str(info.value)


def test_dense_is_the_first_point_once():
    config = EvalConfig(task="niah", policies=["quest", "dense", "quest"], budgets=[Budget.parse("10%")] * 2)
    assert [(p.policy, p.budget_label) for p in run_points(config)] == [("dense", "100%"), ("quest", "10%")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    config = EvalConfig(task="niah-single", policies=["streaming"], budgets=[Budget.parse("100%")], context=256,
                        samples=1, model=tiny_model_dir)
    return load_for_eval(config)


@pytest.mark.parametrize("task, context", [("ppl", 160), ("niah-single", 256)])
def test_a_budget_of_every_token_scores_like_dense(tiny, tiny_model_dir, task, context):
    config = EvalConfig(task=task, policies=["random", "quest"], budgets=[Budget.parse("100%")], context=context,
                        samples=8 if task == "ppl" else 1, model=tiny_model_dir)
    results = evaluate(config, tiny, prepare_samples(config, tiny.tokenizer))[:3]  # the first sample
    dense, *sparse = results
    assert [r["policy"] for r in results] == ["dense", "random", "quest"]
    for record in sparse:
        if task == "ppl":
            assert record["tokens"] == dense["tokens"] > 0
            assert record["nll"] == pytest.approx(dense["nll"], rel=1e-4)
        else:
            assert record["output"] == dense["output"]


def test_ppl_prefix_moves_where_scoring_starts_and_is_refused_where_it_cannot_apply(tiny, tiny_model_dir):
    """``--ppl-prefix``: the prompt of every passage (the rest scored), recorded in the config; below the shortest
    prompt the budgets allow, at the context, or on a task without perplexity: refused before anything loads."""
    def config(**overrides):
        return EvalConfig(**({"task": "ppl", "policies": ["streaming"], "budgets": [Budget.parse("50%")],
                              "context": 160, "samples": 8, "model": tiny_model_dir} | overrides))

    default, chosen = config(), config(ppl_prefix=100)
    assert default.shortest_prompt() == 2 * default.fixed_tokens() < 100  # 50%: twice sinks + the narrowest window
    assert chosen.to_dict()["ppl_prefix"] == 100 and default.to_dict()["ppl_prefix"] is None
    for sample in prepare_samples(chosen, tiny.tokenizer):
        assert len(sample.forced.prompt_ids) == 100 and len(sample.forced.target_ids) == 60
    assert len(prepare_samples(default, tiny.tokenizer)[0].forced.prompt_ids) == 64  # the task's own least prefix
    for bad, message in ((10, "at least 40"), (160, "below --context 160")):
        with pytest.raises(ConfigError, match=message):
            config(ppl_prefix=bad)
    with pytest.raises(ConfigError, match="has no perplexity"):
        config(task="niah-single", context=256, samples=1, ppl_prefix=100)


def test_coref_is_scored_teacher_forced_and_by_generation(tiny, tiny_model_dir):
    config = EvalConfig(task="coref", policies=["h2o"], budgets=[Budget.parse("50%")], context=384, samples=1,
                        model=tiny_model_dir)
    samples = prepare_samples(config, tiny.tokenizer)
    for record in evaluate(config, tiny, samples):
        assert {"score", "correct", "output", "token_error", "any_wrong", "nll", "forced_predicted"} <= record.keys()
        assert record["tokens"] == len(samples[0].forced.target_ids)
        assert 0.0 <= record["token_error"] <= 1.0
        assert torch.isfinite(torch.tensor(record["nll"]))


def test_each_tokenbutler_point_records_the_predictor_of_its_interval():
    """Without --predictor a point at interval 4 runs (and records) the shipped interval-4 predictor, a
    point at interval 1 the default one; the run's resume key names both."""
    from types import SimpleNamespace

    from offload_engine.evaluation.harness import RunPoint, point_settings, tokenbutler_weights_sha

    embedded = SimpleNamespace(config=SimpleNamespace(_name_or_path="/cache/tbrun/models/SmolLM2-135M-Instruct"),
                               dtype=torch.float32, device=torch.device("cpu"))
    config = EvalConfig(task="niah", policies=["tokenbutler", "tokenbutler[interval=4,neighbor_rule=runs]"],
                        budgets=[Budget.parse("10%")])
    every, fourth = (point_settings(config, embedded, RunPoint(spec, config.budgets[0])) for spec in config.policies)
    assert every["predictor"]["path"].endswith("predictors/smollm2-135m-instruct")
    assert fourth["predictor"]["path"].endswith("predictors/smollm2-135m-instruct-interval4")
    assert every["predictor"]["sha256"] != fourth["predictor"]["sha256"]
    assert tokenbutler_weights_sha(config, embedded) == f"{every['predictor']['sha256']}+{fourth['predictor']['sha256']}"


def test_each_tokenbutler_point_records_the_dtype_its_compact_keys_are_stored_in():
    """``tokenbutler[key_dtype=...]`` sets how the compact keys are stored (a setting that changes what is
    selected); every tokenbutler point records the dtype it ran with, ``auto`` as it resolved on this machine
    (``compact_key_dtype``: int8 or bfloat16 for a float32 model on the CPU, per the kernels); a key dtype for
    another policy, or an unknown one, is refused."""
    from types import SimpleNamespace

    from offload_engine import native
    from offload_engine.evaluation.harness import RunPoint, point_settings
    from offload_engine.policies import build_policy

    model = SimpleNamespace(config=SimpleNamespace(_name_or_path="/cache/tbrun/models/SmolLM2-135M-Instruct"),
                            dtype=torch.float32, device=torch.device("cpu"))
    specs = ["tokenbutler", "critical(tokenbutler)[key_dtype=bfloat16]", "tokenbutler[key_dtype=float32]", "quest"]
    config = EvalConfig(task="niah", policies=specs, budgets=[Budget.parse("10%")])
    recorded = [point_settings(config, model, RunPoint(spec, config.budgets[0])).get("key_dtype") for spec in specs]
    kernels = native.kernels()
    auto = "float32" if kernels is None else "int8" if kernels.int8_quad_products else "bfloat16"
    assert recorded == [auto, "bfloat16", "float32", None]
    built = build_policy("critical(tokenbutler)", **config.policy_options(specs[1]))  # as build_engine makes it
    assert built.base.key_dtype == "bfloat16"
    for bad in ("quest[key_dtype=int8]", "tokenbutler[key_dtype=int4]"):
        with pytest.raises(ConfigError, match="key_dtype"):
            EvalConfig(task="niah", policies=[bad], budgets=[Budget.parse("10%")])


def test_a_tokenbutler_point_at_a_short_context_records_the_short_context_predictor():
    """Without --predictor, --context up to SHORT_CONTEXT_TOKENS runs (and records) the predictor shipped for
    short contexts at interval 1; interval 4 keeps its own; a longer context the default one."""
    from types import SimpleNamespace

    from offload_engine.evaluation.harness import RunPoint, point_settings
    from offload_engine.policies.tokenbutler import SHIPPED_FOR_SHORT_CONTEXT, SHORT_CONTEXT_TOKENS

    embedded = SimpleNamespace(config=SimpleNamespace(_name_or_path="/cache/tbrun/models/SmolLM2-135M-Instruct"),
                               dtype=torch.float32, device=torch.device("cpu"))
    _, short = SHIPPED_FOR_SHORT_CONTEXT["smollm2-135m-instruct"]
    recorded = {}
    for context in (SHORT_CONTEXT_TOKENS, SHORT_CONTEXT_TOKENS + 1):
        config = EvalConfig(task="ppl", policies=["tokenbutler", "tokenbutler[interval=4,neighbor_rule=runs]"],
                            budgets=[Budget.parse("10%")], context=context)
        recorded[context] = [point_settings(config, embedded, RunPoint(spec, config.budgets[0]))["predictor"]["path"]
                             for spec in config.policies]
    assert recorded[SHORT_CONTEXT_TOKENS][0].endswith(f"predictors/{short}")
    assert recorded[SHORT_CONTEXT_TOKENS + 1][0].endswith("predictors/smollm2-135m-instruct")
    assert all(paths[1].endswith("predictors/smollm2-135m-instruct-interval4") for paths in recorded.values())


def test_a_predictor_record_names_the_folder_portably_with_its_weights_hash():
    """What reports write of a predictor: the repository-relative folder and its weights' sha256 (as its
    checkpoint config records it); nothing for no folder."""
    import json

    from offload_engine.evaluation.harness import predictor_record
    from offload_engine.policies.tokenbutler import shipped_predictors_dir

    folder = shipped_predictors_dir() / "smollm2-135m-instruct-1k"
    record = predictor_record(folder)
    assert record["path"] == "predictors/smollm2-135m-instruct-1k"
    assert record["sha256"] == json.loads((folder / "config.json").read_text())["weights_sha256"]
    assert predictor_record(None) is None


def test_a_predictor_record_of_a_training_run_hashes_the_checkpoint_the_policy_loads(tmp_path, llama_adapter):
    """A training --out whose final predictor is not written yet: the policy loads its latest checkpoint, and
    the report must name those weights (it named none, so a resumed eval could mix checkpoints unnoticed)."""
    import hashlib

    from offload_engine.evaluation.harness import predictor_record
    from offload_engine.predictor.checkpoint import WEIGHTS_NAME, save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

    run = tmp_path / "run"
    for step in (2, 4):
        torch.manual_seed(step)
        save_checkpoint(run / "checkpoints" / f"step-{step:06d}",
                        TokenButlerPredictor(PredictorConfig.for_model(llama_adapter.dims, 2, 4, 8)))
    latest = run / "checkpoints" / "step-000004" / WEIGHTS_NAME
    assert predictor_record(run)["sha256"] == hashlib.sha256(latest.read_bytes()).hexdigest()


def test_an_out_folder_under_a_file_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import offload_engine.evaluation.harness as harness

    monkeypatch.setattr(harness, "load_for_eval", lambda config: pytest.fail("the model loaded"))
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    result = run_cli(*eval_args(tiny_model_dir, afile / "sub"))
    assert result.exit_code == 2 and "is a file, not a directory" in flat(result.output), result.output
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("minutes", ["-1", "0", "nan", "inf", "-inf"])
def test_a_max_minutes_that_is_not_a_positive_finite_time_is_refused_before_the_model_loads(
        tiny_model_dir, tmp_path, monkeypatch, minutes):
    import offload_engine.evaluation.harness as harness

    monkeypatch.setattr(harness, "load_for_eval", lambda config: pytest.fail("the model loaded"))
    result = run_cli(*eval_args(tiny_model_dir, tmp_path / "out", "--max-minutes", minutes))
    assert result.exit_code == 2, result.output
    assert f"--max-minutes {minutes}: give a number of minutes above 0" in flat(result.output)
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_resumed_run_names_the_commits_its_earlier_samples_were_measured_at(tiny_model_dir, tmp_path, monkeypatch):
    """A run finished in a later session reported only that session's commit, so samples measured by other
    code passed as this one's; the report now says how many were resumed and at which commits."""
    import offload_engine.evaluation.harness as harness
    from offload_engine.evaluation.report import PROGRESS_FILE

    out = tmp_path / "niah"
    args = ["eval", "--task", "niah-single", "--policy", "quest", "--budget", "25%", "--context", "256", "--samples",
            "3", "--model", tiny_model_dir, "--out", str(out)]
    monkeypatch.setattr(harness, "run_commit", lambda: "a" * 40)
    assert runner.invoke(app, [*args, "--max-minutes", "1e-6"]).exit_code == 0  # one sample, at commit a...
    header = json.loads((out / PROGRESS_FILE).read_text().splitlines()[0])
    assert header["commits"] == ["a" * 40]
    monkeypatch.setattr(harness, "run_commit", lambda: "b" * 40)
    result = runner.invoke(app, args)  # the rest at commit b...
    assert result.exit_code == 0, result.output
    report = json.loads((out / RESULTS_FILE).read_text())
    assert report["provenance"]["resumed"] == {"samples": 1, "commits": ["a" * 40]}
    assert f"1 sample resumed from an interrupted run at `{'a' * 40}`" in (out / "report.md").read_text()
    fresh = runner.invoke(app, [*args[:-1], str(tmp_path / "fresh")])
    assert fresh.exit_code == 0 and "resumed" not in json.loads((tmp_path / "fresh" / RESULTS_FILE).read_text())["provenance"]


def test_a_progress_file_from_before_a_setting_was_added_still_resumes(tiny_model_dir, tmp_path):
    """A run interrupted by a version whose config had no ``ppl_prefix`` resumes under this one (the setting's
    absence meant what its default means) instead of starting over."""
    from offload_engine.evaluation.report import PROGRESS_FILE

    out = tmp_path / "niah"
    args = ["eval", "--task", "niah-single", "--policy", "quest", "--budget", "25%", "--context", "256", "--samples",
            "3", "--model", tiny_model_dir, "--out", str(out)]
    assert runner.invoke(app, [*args, "--max-minutes", "1e-6"]).exit_code == 0  # one sample done
    lines = (out / PROGRESS_FILE).read_text().splitlines()
    header = json.loads(lines[0])
    del header["config"]["ppl_prefix"]  # as the older version wrote it
    (out / PROGRESS_FILE).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / RESULTS_FILE).read_text())["provenance"]["resumed"]["samples"] == 1


def test_the_settings_table_shows_the_dtype_of_each_tokenbutler_points_compact_keys():
    from offload_engine.evaluation.report import settings_table

    lines = settings_table([{"policy": "dense", "budget": "100%", "mode": "dense"},
                            {"policy": "quest", "budget": "10%", "sinks": 4, "window": 32},
                            {"policy": "tokenbutler", "budget": "10%", "sinks": 4, "window": 32, "group_reduction": "mean",
                             "key_dtype": "int8"}])
    header, *rows = [line for line in lines if line.startswith("| ") and not line.startswith("| ---")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    column = [cell.strip() for cell in header.strip("|").split("|")].index("key_dtype")
    assert [row[column] for row in cells] == ["-", "-", "int8"]


def test_the_settings_table_shows_keep_bonus_and_refresh_layers_only_in_runs_that_set_them():
    from offload_engine.evaluation.report import settings_table

    def table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
        header, *rows = [line for line in settings_table(points)
                         if line.startswith("| ") and not line.startswith("| ---")]
        return ([cell.strip() for cell in header.strip("|").split("|")],
                [[cell.strip() for cell in row.strip("|").split("|")] for row in rows])

    plain = [{"policy": "dense", "budget": "100%", "mode": "dense"},
             {"policy": "tokenbutler", "budget": "10%", "sinks": 4, "window": 32}]
    header, _ = table(plain)
    assert "keep_bonus" not in header and "refresh_layers" not in header  # older runs' tables unchanged
    header, rows = table(plain + [{"policy": "tokenbutler[keep_bonus=0.25,interval=4]",
                                   "budget": "10%", "sinks": 4, "window": 32, "interval": 4, "keep_bonus": 0.25,
                                   "refresh_layers": [1, 5]}])
    bonus, refresh = header.index("keep_bonus"), header.index("refresh_layers")
    assert [row[bonus] for row in rows] == ["-", "0", "0.25"]  # dense: does not apply; selecting: none is 0
    assert [row[refresh] for row in rows] == ["-", "-", "1 5"]
