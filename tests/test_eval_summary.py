"""``python -m tbrun_bench.eval_summary``: the runs of one task merged into one table (dense once, every
policy of every run), a PNG written, and dense rows that disagree between runs flagged. The runs are
tiny fake ``results.json`` files with the structure ``tbrun eval`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tbrun_bench.eval_summary import SUMMARY_MD, SUMMARY_PNG, main

MACHINE = {"platform": "Linux", "cpu": "x86_64", "cpu cores": "2", "host RAM": "23.5 GiB (21.5 GiB available)",
           "python": "3.11.7", "torch": "2.13.0+cpu", "cuda": "not available"}


def point(policy: str, budget: str, accuracy: float) -> dict:
    """One ``summary`` row of a results.json."""
    metrics = {"samples": 2, "accuracy": accuracy, "all_correct": accuracy}
    return {"policy": policy, "budget": budget, "metrics": metrics, "seconds": 1.5}


def write_run(root: Path, name: str, policy: str, dense: float, date: str, free_gib: str = "21.5",
              context: int = 2048, intervals: bool = False) -> None:
    """A niah run of dense + ``policy`` at 10% and 50% into ``root/name/results.json``."""
    budgets = ["10%", "50%"]
    summary = [point("dense", "100%", dense)] + [point(policy, b, 50.0) for b in budgets]
    if intervals:
        for row in summary:
            row["intervals"] = {"accuracy": [row["metrics"]["accuracy"] - 10.0, min(100.0, row["metrics"]["accuracy"] + 10.0)]}
    report = {
        "task": {"name": "niah", "summary": "needle in a haystack, the four RULER variants in turn",
                 "primary": "accuracy", "higher_is_better": True},
        "provenance": {"command": f"tbrun eval --task niah --policy {policy} --out {name}", "commit": "abc123",
                       "date": date},
        "machine": {**MACHINE, "host RAM": f"23.5 GiB ({free_gib} GiB available)"},
        "config": {"task": "niah", "policies": [policy], "budgets": budgets, "context": context, "samples": 2,
                   "seed": 0, "model": None, "predictor": None, "device": "cpu", "dtype": "fp32", "sinks": 4,
                   "window": 32, "interval": 1, "neighbors": 0},
        "model": {"name": "/models/SmolLM2-135M-Instruct", "dtype": "torch.float32", "dims": {"num_layers": 30}},
        "seconds": 12.0,
        "summary": summary,
        "breakdown": {},
        "samples": [{"policy": r["policy"], "budget": r["budget"], "index": 0, "score": 1.0} for r in summary],
    }
    (root / name).mkdir()
    (root / name / "results.json").write_text(json.dumps(report))


def table_rows(markdown: str, section: str = "## niah, 2048 tokens") -> list[list[str]]:
    """The cells of every table body row in ``markdown``'s ``section`` (up to the next heading)."""
    text = markdown.split(section, 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| policy", "| ---"))]


def summarize(root: Path) -> str:
    main([str(root)])
    return (root / SUMMARY_MD).read_text()


def test_runs_of_one_task_merge_into_one_table_with_dense_once(tmp_path):
    write_run(tmp_path, "niah-tokenbutler", "tokenbutler", 100.0, "2026-11-23 13:00:00 +0000", free_gib="20.1")
    write_run(tmp_path, "niah", "quest", 100.0, "2026-11-23 12:00:00 +0000")
    markdown = summarize(tmp_path)
    rows = table_rows(markdown)
    assert [row[0] for row in rows] == ["dense", "quest", "tokenbutler"]  # dense first, then the older run's
    assert rows[0] == ["dense", "-", "-", "100.0"] and rows[2] == ["tokenbutler", "50.0", "50.0", "-"]
    assert "| policy | 10% | 50% | 100% |" in markdown
    assert "`niah`: `tbrun eval --task niah --policy quest --out niah`" in markdown
    assert "disagree" not in markdown
    assert markdown.count("- cpu cores: 2") == 1 and "same machine" in markdown  # free memory is not the machine
    assert "python -m tbrun_bench.eval_summary" in markdown
    assert (tmp_path / SUMMARY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_rows_that_disagree_are_flagged(tmp_path):
    write_run(tmp_path, "niah", "quest", 100.0, "2026-11-23 12:00:00 +0000")
    write_run(tmp_path, "niah-tokenbutler", "tokenbutler", 50.0, "2026-11-23 13:00:00 +0000")
    markdown = summarize(tmp_path)
    assert "Runs disagree" in markdown
    flagged = [line for line in markdown.splitlines() if line.startswith("- dense @ 100%")]
    assert len(flagged) == 1 and "`niah` has accuracy 100.0" in flagged[0]
    assert "`niah-tokenbutler` has accuracy 50.0" in flagged[0]
    assert [row[0] for row in table_rows(markdown)].count("dense") == 1


def test_a_run_still_being_written_is_ignored(tmp_path):
    write_run(tmp_path, "niah", "quest", 100.0, "2026-11-23 12:00:00 +0000")
    (tmp_path / ".niah.partial-x").mkdir()
    (tmp_path / ".niah.partial-x" / "results.json").write_text("{")
    markdown = summarize(tmp_path)
    assert "summary of 1 run, 1 task" in markdown and "Skipped" not in markdown


def test_a_folder_without_runs_exits_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no tbrun eval run under" in capsys.readouterr().err


def test_runs_at_other_contexts_get_their_own_table_and_a_column_at_a_glance(tmp_path):
    write_run(tmp_path, "niah-2k", "quest", 100.0, "2026-11-23 12:00:00 +0000", intervals=True)
    write_run(tmp_path, "niah-4k", "quest", 90.0, "2026-11-23 13:00:00 +0000", context=4096, intervals=True)
    markdown = summarize(tmp_path)
    assert "Runs disagree" not in markdown and "differ in settings" not in markdown
    assert table_rows(markdown, "## niah, 4096 tokens")[0] == ["dense", "-", "-", "90.0 [80.0, 100.0]"]
    glance = table_rows(markdown, "## At a glance")
    assert "| policy | niah 2k @ 10% | niah 2k @ 50% | niah 4k @ 10% | niah 4k @ 50% |" in markdown
    assert glance[0] == ["dense", "100.0 [90.0, 100.0]", "100.0 [90.0, 100.0]", "90.0 [80.0, 100.0]",
                         "90.0 [80.0, 100.0]"]
    assert glance[1][0] == "quest" and glance[1][1] == "50.0 [40.0, 60.0]"


def test_points_are_compared_pair_by_pair_with_the_oracle_and_tokenbutler(tmp_path):
    write_run(tmp_path, "niah", "quest", 100.0, "2026-11-23 12:00:00 +0000")
    path = tmp_path / "niah" / "results.json"
    report = json.loads(path.read_text())
    scores = {"dense": [1, 1, 1, 1], "oracle": [1, 1, 1, 1], "tokenbutler": [1, 1, 0, 1], "quest": [0, 0, 0, 0]}
    report["config"]["samples"] = 4
    report["summary"] = [point("dense", "100%", 75.0), point("oracle", "10%", 75.0), point("tokenbutler", "10%", 50.0),
                         point("quest", "10%", 0.0)]
    report["samples"] = [{"policy": p, "budget": "100%" if p == "dense" else "10%", "index": i, "score": float(s)}
                         for p, values in scores.items() for i, s in enumerate(values)]
    path.write_text(json.dumps(report))
    markdown = summarize(tmp_path)
    assert "| policy | budget | minus dense | minus oracle | minus tokenbutler |" in markdown
    rows = {row[0]: row for row in table_rows(markdown) if len(row) == 5}
    assert rows["oracle"][2] == "+0.0 [+0.0, +0.0] (4)" and rows["oracle"][4].startswith("+25.0 [")
    assert rows["tokenbutler"][3].startswith("-25.0 [") and rows["tokenbutler"][4] == "-"
    assert rows["quest"][2] == "**-100.0 [-100.0, -100.0] (4)**"  # the interval excludes 0: bold
    assert not rows["quest"][4].startswith("**")  # -75 over 4 pairs, but they vary: the interval holds 0


def test_two_predictors_tokenbutler_rows_stand_side_by_side_and_pair_up(tmp_path):
    """Runs with different predictors: each predictor's points are named by its hash, not merged into
    one row (nor flagged as a disagreement), and the paired columns compare with the oldest run's."""
    scores = {"old": [1, 0, 0, 1], "new": [1, 1, 1, 1]}
    for name, date in (("old", "2026-11-23 12:00:00 +0000"), ("new", "2026-11-24 12:00:00 +0000")):
        write_run(tmp_path, name, "tokenbutler", 100.0, date)
        path = tmp_path / name / "results.json"
        report = json.loads(path.read_text())
        sha = ("a" if name == "old" else "b") * 64
        report["config"]["samples"] = 4
        report["summary"] = [point("dense", "100%", 100.0), point("tokenbutler", "10%", 25.0 * sum(scores[name]))]
        report["points"] = [{"policy": "dense", "budget": "100%", "predictor": None},
                            {"policy": "tokenbutler", "budget": "10%",
                             "predictor": {"path": f"predictors/{name}", "sha256": sha}}]
        report["samples"] = [{"policy": "dense", "budget": "100%", "index": i, "score": 1.0} for i in range(4)]
        report["samples"] += [{"policy": "tokenbutler", "budget": "10%", "index": i, "score": float(s)}
                              for i, s in enumerate(scores[name])]
        path.write_text(json.dumps(report))
    markdown = summarize(tmp_path)
    assert "`@aaaaaaaa` = `predictors/old` (old)" in markdown and "`@bbbbbbbb` = `predictors/new` (new)" in markdown
    assert "Runs disagree" not in markdown
    assert "| policy | budget | minus dense | minus oracle | minus tokenbutler @aaaaaaaa |" in markdown
    rows = {row[0]: row for row in table_rows(markdown) if len(row) == 5}
    assert rows["tokenbutler @bbbbbbbb"][4].startswith("+50.0 [")  # new minus old, pair by pair
    assert rows["tokenbutler @aaaaaaaa"][4] == "-"


def test_runs_of_other_samples_pool_in_the_paired_differences_and_the_larger_run_gives_the_cell(tmp_path):
    """A second seed with more samples: its cells are shown (not the older run's), no disagreement is
    flagged (other samples), and each paired difference runs over the samples of both runs."""
    runs = {"small": (0, [1, 0, 1, 1], [1, 1, 1, 1]), "large": (1, [1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1])}
    for name, (seed, tokenbutler, oracle) in runs.items():
        date = "2026-11-23 12:00:00 +0000" if name == "small" else "2026-11-24 12:00:00 +0000"
        write_run(tmp_path, name, "tokenbutler", 100.0, date)
        path = tmp_path / name / "results.json"
        report = json.loads(path.read_text())
        count = len(tokenbutler)
        report["config"].update(seed=seed, samples=count, policies=["oracle", "tokenbutler"], budgets=["10%"])
        report["summary"] = [point("dense", "100%", 100.0)] + [
            {**point(policy, "10%", 100.0 * sum(scores) / count), "metrics": {"samples": count,
             "accuracy": 100.0 * sum(scores) / count, "all_correct": 100.0 * sum(scores) / count}}
            for policy, scores in (("oracle", oracle), ("tokenbutler", tokenbutler))]
        report["samples"] = [{"policy": "dense", "budget": "100%", "index": i, "score": 1.0} for i in range(count)]
        report["samples"] += [{"policy": policy, "budget": "10%", "index": i, "score": float(v)}
                              for policy, scores in (("oracle", oracle), ("tokenbutler", tokenbutler))
                              for i, v in enumerate(scores)]
        path.write_text(json.dumps(report))
    markdown = summarize(tmp_path)
    assert "Runs disagree" not in markdown
    cells = {row[0]: row for row in table_rows(markdown) if len(row) == 3}
    assert cells["tokenbutler"][1] == "50.0"  # the 6-sample run's 3 of 6, not the 4-sample run's 75.0
    paired = {row[0]: row for row in table_rows(markdown) if len(row) == 5}
    cell = paired["tokenbutler"][3].strip("*")  # minus oracle: 4 misses in 10 pairs
    assert cell.startswith("-40.0 [") and cell.endswith("(10)")


def test_versus_adds_a_paired_column_only_where_its_point_exists(tmp_path):
    """``--versus 'tokenbutler @bbbbbbbb'``: every point is also paired with that one at its budget;
    a named point no run has gives no column."""
    scores = {"old": [1, 0, 0, 1], "new": [1, 1, 1, 1]}
    for name, date in (("old", "2026-11-23 12:00:00 +0000"), ("new", "2026-11-24 12:00:00 +0000")):
        write_run(tmp_path, name, "tokenbutler", 100.0, date)
        path = tmp_path / name / "results.json"
        report = json.loads(path.read_text())
        report["config"]["samples"] = 4
        report["summary"] = [point("dense", "100%", 100.0), point("tokenbutler", "10%", 25.0 * sum(scores[name]))]
        report["points"] = [{"policy": "dense", "budget": "100%", "predictor": None},
                            {"policy": "tokenbutler", "budget": "10%",
                             "predictor": {"path": f"predictors/{name}", "sha256": ("a" if name == "old" else "b") * 64}}]
        report["samples"] = [{"policy": "dense", "budget": "100%", "index": i, "score": 1.0} for i in range(4)]
        report["samples"] += [{"policy": "tokenbutler", "budget": "10%", "index": i, "score": float(s)}
                              for i, s in enumerate(scores[name])]
        path.write_text(json.dumps(report))
    main([str(tmp_path), "--versus", "tokenbutler @bbbbbbbb", "--versus", "tokenbutler @cccccccc"])
    markdown = (tmp_path / SUMMARY_MD).read_text()
    assert ("| policy | budget | minus dense | minus oracle | minus tokenbutler @aaaaaaaa | minus tokenbutler @bbbbbbbb |"
            in markdown) and "@cccccccc" not in markdown.split("## Machines")[0].split("- command")[1].split("\n", 1)[1]
    rows = {row[0]: row for row in table_rows(markdown) if len(row) == 6}
    assert rows["tokenbutler @aaaaaaaa"][5].startswith("-50.0 [")  # old minus new, pair by pair
    assert rows["tokenbutler @bbbbbbbb"][5] == "-"  # not with itself
    assert "--versus 'tokenbutler @bbbbbbbb'" in markdown  # the command that made it
    main([str(tmp_path), "--versus", "tokenbutler @aaaaaaaa", "--versus", "tokenbutler @bbbbbbbb"])
    header = [line for line in (tmp_path / SUMMARY_MD).read_text().splitlines() if line.startswith("| policy | budget | minus")]
    assert header and all(line.count("minus tokenbutler @aaaaaaaa") == 1 for line in header)  # the usual column, once


def test_the_summary_names_the_machine_it_was_merged_on_and_each_runs_machine(tmp_path):
    write_run(tmp_path, "a", "tokenbutler", 60.0, "2026-12-01 10:00:00 +0000")
    markdown = summarize(tmp_path)
    header = markdown.split("## At a glance", 1)[0]
    merged_on = [line for line in header.splitlines() if line.startswith("- merged on: ")]
    assert len(merged_on) == 1 and "cores" in merged_on[0] and "GiB RAM" in merged_on[0]
    assert "## Machine" in markdown and "- cpu: x86_64" in markdown.split("## Machine", 1)[1]
