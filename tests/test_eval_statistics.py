"""``tbrun eval`` with statistical power: one prefill per sample shared by every point (the same
results as separate runs), policy variants, 95% intervals, resumable runs, reports without local paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offload_engine.config import Budget
from offload_engine.engine import Engine
from offload_engine.errors import ConfigError
from offload_engine.evaluation import harness
from offload_engine.evaluation.harness import (EvalConfig, PolicyVariant, evaluate, load_for_eval, prepare_samples,
                                               run_points, split_policies, spread_order)
from offload_engine.evaluation.report import PROGRESS_FILE, RESULTS_FILE, metric_cell
from offload_engine.evaluation.scoring import intervals, ppl_interval, t95, wilson_interval
from tbrun_cli.main import app

POLICIES = ["oracle", "quest", "snapkv", "h2o", "streaming", "random", "critical(h2o)",
            "quest[interval=4,neighbor_rule=runs]", "streaming[window=16,sinks=0]"]
VOLATILE = ("seconds", "prefill_seconds", "stats")  # timings differ run to run


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    config = EvalConfig(task="niah-single", policies=["streaming"], budgets=[Budget.parse("100%")], context=256,
                        samples=1, model=tiny_model_dir)
    return load_for_eval(config)


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture
def prefill_calls(monkeypatch) -> list[int]:
    """The number of prompt tokens of every model prefill run (recorded or not)."""
    calls: list[int] = []
    original = Engine._model_prefill

    def counted(self, prompt, *args, **options):
        calls.append(len(prompt))
        return original(self, prompt, *args, **options)

    monkeypatch.setattr(Engine, "_model_prefill", counted)
    return calls


@pytest.mark.parametrize("task, context", [("niah-single", 256), ("coref", 384), ("ppl", 192)])
def test_shared_prefill_gives_the_results_of_separate_runs_and_prefills_once_per_prompt(
        tiny, tiny_model_dir, prefill_calls, task, context):
    samples = 8 if task == "ppl" else 2

    def run(shared: bool) -> list[dict]:
        config = EvalConfig(task=task, policies=POLICIES, budgets=[Budget.parse("25%")], context=context,
                            samples=samples, model=tiny_model_dir, shared_prefill=shared, sinks=2, window=8)
        return evaluate(config, tiny, prepare_samples(config, tiny.tokenizer))

    separate = run(False)
    points = 1 + len(POLICIES)
    prompts_per_sample = 2 if task == "coref" else 1  # coref: the generation prompt and the forced one
    assert len(prefill_calls) == samples * points * prompts_per_sample  # every point prefills
    prefill_calls.clear()
    shared = run(True)
    assert len(prefill_calls) == samples * prompts_per_sample
    assert stable(shared) == stable(separate)
    assert len({json.dumps(r.get("output", r.get("nll"))) for r in shared}) > 1  # the points differ


def test_perplexity_needs_eight_passages_for_its_interval():
    with pytest.raises(ConfigError, match="--samples 8"):
        EvalConfig(task="ppl", policies=["quest"], budgets=[Budget.parse("10%")], context=1024, samples=7)
    assert EvalConfig(task="ppl", policies=["quest"], budgets=[Budget.parse("10%")], context=1024, samples=8)


def test_policy_variants_are_split_parsed_and_checked():
    specs = split_policies("quest, critical(tokenbutler),tokenbutler[interval=4,neighbor_rule=runs]")
    assert specs == ["quest", "critical(tokenbutler)", "tokenbutler[interval=4,neighbor_rule=runs]"]
    variant = PolicyVariant.parse(specs[2])
    assert variant.base == "tokenbutler" and variant.selection_overrides() == {"interval": 4, "neighbor_rule": "runs"}
    config = EvalConfig(task="niah", policies=specs, budgets=[Budget.parse("10%")])
    assert config.selection(Budget.parse("10%"), specs[2]).interval == 4
    assert config.selection(Budget.parse("10%"), specs[0]).interval == 1
    assert config.policy_options(specs[1]) == {"group_reduction": "mean"}
    assert [p.policy for p in run_points(config)] == ["dense", *specs]
    for bad in ("quest[interval=x]", "quest[speed=2]", "quest[group_reduction=mean]", "tokenbutler[group_reduction=min]",
                "quest[window=-1]", "quest[sinks=1.5]"):
        with pytest.raises(ConfigError, match="--policy"):
            EvalConfig(task="niah", policies=[bad], budgets=[Budget.parse("10%")])


def test_a_variant_may_keep_its_own_sinks_and_window(tiny):
    """``quest[window=64,sinks=2]``: that point's selection keeps 2 sinks and 64 recent tokens, the others the
    run's; a budget too small for a variant's sinks and narrowest window is refused naming the variant, before any
    sample runs."""
    specs = ["quest", "quest[window=64,sinks=2]"]
    config = EvalConfig(task="niah-single", policies=specs, budgets=[Budget.parse("10%")], context=256, window=8)
    assert PolicyVariant.parse(specs[1]).selection_overrides() == {"window": 64, "sinks": 2}
    ours, run_wide = config.selection(Budget.parse("10%"), specs[1]), config.selection(Budget.parse("10%"), specs[0])
    assert (ours.sinks, ours.window, run_wide.sinks, run_wide.window) == (2, 64, 4, 8)
    assert config.fixed_tokens() == 18  # the variant's floor: 2 sinks + the narrowest window, 16 (the run's: 4 + 8)
    wide = EvalConfig(task="niah-single", policies=["quest", "quest[window=200]"], budgets=[Budget.parse("10%")],
                      context=256, window=8, samples=1)
    prepare_samples(wide, tiny.tokenizer)  # a wide window narrows to the budget: only the sinks and 16 tokens must fit
    too_many = EvalConfig(task="niah-single", policies=["quest", "quest[sinks=40]"], budgets=[Budget.parse("10%")],
                          context=256, window=8, samples=1)
    with pytest.raises(ConfigError, match=r"--policy quest\[sinks=40\]: .*--sinks 40 \+ the narrowest window 8"):
        prepare_samples(too_many, tiny.tokenizer)


def test_wilson_and_t_intervals():
    low, high = wilson_interval(12, 20)
    assert (round(low, 1), round(high, 1)) == (38.7, 78.1)  # the textbook Wilson interval of 12/20
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 100.0
    assert 0 < wilson_interval(0, 20)[1] < 20
    assert t95(1) == pytest.approx(12.706) and t95(7) == pytest.approx(2.365) and t95(120) == pytest.approx(1.98, abs=0.01)
    losses, tokens = [2.0, 2.2, 1.9, 2.1, 2.05, 1.95, 2.15, 2.0], [100] * 8
    low, high = ppl_interval([l * t for l, t in zip(losses, tokens)], tokens)
    mean = sum(losses) / 8
    assert low < math.exp(mean) < high
    assert math.log(high) - mean == pytest.approx(mean - math.log(low))  # symmetric in log space
    assert ppl_interval([2.0], [10]) is None
    got = intervals([{"score": 1.0, "correct": True}, {"score": 0.5, "correct": False}])
    assert got["accuracy"] == pytest.approx(list(wilson_interval(1.5, 2)))


def test_cells_show_the_interval():
    assert metric_cell(60.0, "accuracy", [38.66, 78.12]) == "60.0 [38.7, 78.1]"
    assert metric_cell(8.517, "ppl", [8.1, 8.93]) == "8.52 [8.10, 8.93]"
    assert metric_cell(60.0, "accuracy") == "60.0"


def eval_args(model_dir: str, out: Path, samples: int = 3) -> list[str]:
    return ["eval", "--task", "niah-single", "--policy", "quest,quest[interval=2,neighbor_rule=runs]",
            "--budget", "25%", "--context", "256", "--samples", str(samples), "--model", model_dir, "--out", str(out)]


def test_an_interrupted_run_resumes_from_its_progress_file(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "niah"
    original = harness.evaluate_one
    seen: list[int] = []

    def interrupted_after_two(engines, adapter, sample, *args):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(sample.index)
        return original(engines, adapter, sample, *args)

    monkeypatch.setattr(harness, "evaluate_one", interrupted_after_two)
    result = CliRunner().invoke(app, eval_args(tiny_model_dir, out))
    assert result.exit_code != 0 and not (out / RESULTS_FILE).exists()
    lines = (out / PROGRESS_FILE).read_text().splitlines()
    assert len(lines) == 1 + 2  # header + two finished samples

    seen.clear()
    monkeypatch.setattr(harness, "evaluate_one", lambda engines, adapter, sample, *args:
                        seen.append(sample.index) or original(engines, adapter, sample, *args))
    result = CliRunner().invoke(app, eval_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    assert seen == [2]  # only the sample the interrupted run had not finished
    report = json.loads((out / RESULTS_FILE).read_text())
    assert sorted({r["index"] for r in report["samples"]}) == [0, 1, 2]
    assert len(report["samples"]) == 3 * 3
    assert not (out / PROGRESS_FILE).exists()


def test_a_progress_file_of_another_run_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "niah"
    out.mkdir()
    (out / PROGRESS_FILE).write_text(json.dumps({"config": {"task": "vt"}}) + "\n")
    result = CliRunner().invoke(app, eval_args(tiny_model_dir, out))
    assert result.exit_code == 2 and "--overwrite" in " ".join(result.output.split())


def test_results_record_every_selection_setting_and_no_local_path(tiny_model_dir, tmp_path):
    out = tmp_path / "niah"
    result = CliRunner().invoke(app, eval_args(tiny_model_dir, out, samples=2))
    assert result.exit_code == 0, result.output
    report = json.loads((out / RESULTS_FILE).read_text())
    variant = report["points"][2]
    assert variant["policy"] == "quest[interval=2,neighbor_rule=runs]"
    expected = {"sinks": 4, "window": 128, "window_rule": "budget", "interval": 2, "neighbors": 0,
                "neighbor_rule": "runs"}
    assert expected.items() <= variant.items()
    assert report["points"][1]["interval"] == 1
    text = (out / RESULTS_FILE).read_text() + (out / "report.md").read_text()
    assert str(tmp_path) not in text and tiny_model_dir not in text
    low, high = report["summary"][1]["intervals"]["accuracy"]
    assert 0 <= low <= report["summary"][1]["metrics"]["accuracy"] <= high <= 100
    assert metric_cell(report["summary"][1]["metrics"]["accuracy"], "accuracy", [low, high]) in (out / "report.md").read_text()


def test_samples_run_in_an_order_whose_prefixes_spread_over_the_sweep():
    for count in (1, 2, 3, 8, 20, 33):
        order = spread_order(count)
        assert sorted(order) == list(range(count))
    first = spread_order(20)[:4]
    assert max(first) >= 15 and min(first) == 0  # a quarter of the run already spans the depths


def test_a_run_stopped_by_max_minutes_reports_what_it_has_and_finishes_later(tiny_model_dir, tmp_path):
    out = tmp_path / "niah"
    result = CliRunner().invoke(app, [*eval_args(tiny_model_dir, out), "--max-minutes", "1e-6"])  # 60 µs
    assert result.exit_code == 0, result.output
    report = json.loads((out / RESULTS_FILE).read_text())
    assert report["partial"] == {"samples_done": 1} and len(report["samples"]) == 3  # one sample, three points
    assert "Partial run: 1 of 3 samples" in (out / "report.md").read_text()
    assert "--max-minutes" not in report["provenance"]["command"]
    assert (out / PROGRESS_FILE).is_file()
    result = CliRunner().invoke(app, eval_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / RESULTS_FILE).read_text())
    assert "partial" not in report and len(report["samples"]) == 3 * 3 and not (out / PROGRESS_FILE).exists()


def test_paired_difference_is_the_mean_difference_with_a_t_interval():
    from offload_engine.evaluation.scoring import paired_difference, t95

    mean, low, high = paired_difference([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0])
    half = t95(3) * math.sqrt(1 / 3) / 2  # differences 1, 0, 0, 1: sd sqrt(1/3)
    assert mean == pytest.approx(0.5) and (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert paired_difference([3.0, 5.0], [1.0, 3.0]) == (2.0, 2.0, 2.0)  # the same gap on every sample
    assert paired_difference([1.0], [0.0]) is None
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([1.0, 2.0], [1.0])


def test_sample_values_are_on_the_summary_scale():
    from offload_engine.evaluation.scoring import sample_value

    record = {"score": 0.5, "correct": False, "any_wrong": True, "token_error": 0.25, "nll": 6.0, "tokens": 3}
    assert [sample_value(record, m) for m in ("accuracy", "all_correct", "forced_accuracy", "token_error", "ppl")] \
        == [50.0, 0.0, 0.0, 25.0, 2.0]


def test_a_run_is_not_finished_with_other_predictor_weights(tmp_path):
    from offload_engine.evaluation.tasks import Sample

    config = {"task": "niah", "policies": ["tokenbutler"], "predictor": "predictors/p"}
    log = harness.ProgressLog(tmp_path, config, {}, predictor_sha256="a" * 64)
    log.add(Sample("niah", 0, (1, 2), ("x",), 4), [{"policy": "tokenbutler", "score": 1.0}])
    assert list(harness.read_progress(tmp_path, config, "a" * 64)) == [0]  # the same weights: resumed
    with pytest.raises(ConfigError, match="mix two predictors"):
        harness.read_progress(tmp_path, config, "b" * 64)
    header = json.loads((tmp_path / PROGRESS_FILE).read_text().splitlines()[0])
    del header["predictor_sha256"]  # a file from before the hash was recorded: taken as it is
    lines = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    (tmp_path / PROGRESS_FILE).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert list(harness.read_progress(tmp_path, config, "b" * 64)) == [0]


def test_a_run_is_not_finished_with_the_compact_keys_stored_another_way(tmp_path):
    """``auto`` stores tokenbutler's compact keys as the CPU's kernels take them (int8 or bfloat16): a run begun
    on one machine is not finished on another that stores them otherwise."""
    from offload_engine.evaluation.tasks import Sample

    config = {"task": "niah", "policies": ["tokenbutler"], "predictor": "predictors/p"}
    log = harness.ProgressLog(tmp_path, config, {}, "a" * 64, key_dtypes={"tokenbutler": "int8"})
    log.add(Sample("niah", 0, (1, 2), ("x",), 4), [{"policy": "tokenbutler", "score": 1.0}])
    assert list(harness.read_progress(tmp_path, config, "a" * 64, {"tokenbutler": "int8"})) == [0]
    with pytest.raises(ConfigError, match="compact keys stored as .*int8.*bfloat16"):
        harness.read_progress(tmp_path, config, "a" * 64, {"tokenbutler": "bfloat16"})


def test_sign_flip_p_is_exact_for_few_differing_samples():
    """Ties drop out; with k differing pairs all one way p = 2 / 2^k: 4 of +25 among 16 zeros 0.125 (which
    a t interval calls significant), 5 0.0625, 6 0.03125; mixed signs against a hand count and against
    every sign pattern of arbitrary floats."""
    import itertools

    from offload_engine.evaluation.scoring import sign_flip_p

    assert sign_flip_p([25.0] * 4 + [0.0] * 16) == 0.125
    assert sign_flip_p([25.0] * 5 + [0.0] * 15) == 0.0625
    assert sign_flip_p([25.0] * 6 + [0.0] * 14) == 0.03125
    assert sign_flip_p([-25.0] * 6) == 0.03125  # two-sided
    # 25 (s1 + s2 + s3 + s4) + 50 s5 at least 100 away from 0: 5 of 16 patterns of s1..s4 for each s5
    assert sign_flip_p([25.0, 25.0, 25.0, -25.0, 50.0, 0.0, 0.0]) == 5 / 16
    assert sign_flip_p([0.0] * 5) == 1.0 and sign_flip_p([]) == 1.0
    floats = [0.31, -0.12, 0.05, 0.44, 0.2, -0.07, 0.15, -0.021]
    hits = sum(abs(sum(s * d for s, d in zip(signs, floats))) >= abs(sum(floats)) - 1e-12
               for signs in itertools.product((1, -1), repeat=len(floats)))
    assert sign_flip_p(floats) == pytest.approx(hits / 2 ** len(floats))


def test_sign_flip_p_past_the_exact_limit_counts_on_a_grid_or_draws_with_a_fixed_seed():
    from offload_engine.evaluation.scoring import SIGN_FLIP_DRAWS, sign_flip_p

    assert sign_flip_p([25.0] * 21 + [0.0] * 19) == pytest.approx(2 / 2 ** 21)  # exact on the 25-point grid
    grid = [25.0, -25.0, 50.0, 25.0, 75.0, -50.0, 25.0, 25.0, 100.0, -25.0, 25.0, 25.0]
    assert sign_flip_p(grid, exact_limit=0) == pytest.approx(sign_flip_p(grid))  # grid count == enumeration
    irrational = [math.sqrt(i + 2) * (-1 if i % 3 == 0 else 1) for i in range(12)]
    drawn = sign_flip_p(irrational, exact_limit=0)  # no grid: random sign patterns
    assert drawn == sign_flip_p(irrational, exact_limit=0)  # a fixed seed: the same p every time
    assert drawn == pytest.approx(sign_flip_p(irrational), abs=0.01) and drawn >= 1 / (SIGN_FLIP_DRAWS + 1)


def test_compare_paired_decides_significance_by_the_exact_test_not_the_t_interval():
    from offload_engine.evaluation.scoring import compare_paired

    few = compare_paired([75.0] * 4 + [50.0] * 16, [50.0] * 20)  # 4 of 20 better by 25 points
    assert (few.mean, few.pairs, few.differing, few.p) == (5.0, 20, 4, 0.125)
    assert few.low > 0 and not few.significant  # the t interval excludes 0; the test does not reject
    six = compare_paired([75.0] * 6 + [50.0] * 14, [50.0] * 20)
    assert six.significant and six.p == 0.03125 and not six.constant
    same = compare_paired([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same.constant and same.differing == 0 and same.p == 1.0 and not same.significant
    shift = compare_paired([75.0] * 4, [50.0] * 4)
    assert shift.constant and shift.differing == 4 and not shift.significant  # p = 2/16
    assert compare_paired([75.0] * 6, [50.0] * 6).significant and compare_paired([1.0], [0.0]) is None
