"""``python -m tbrun_bench.eval_summary``: the runs of one task merged into one table (dense once, every
policy of every run, each row's sample set), a PNG written, dense rows that disagree between runs
flagged, and the paired differences: sign-flip p, one sample set per seed, points of other settings
kept apart. The runs are tiny fake ``results.json`` files with the structure ``tbrun eval`` writes."""

from __future__ import annotations

import json
import math
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
        "samples": [{"policy": r["policy"], "budget": r["budget"], "index": i, "score": r["metrics"]["accuracy"] / 100}
                    for r in summary for i in range(2)],
    }
    (root / name).mkdir()
    (root / name / "results.json").write_text(json.dumps(report))


def table_rows(markdown: str, section: str = "## niah, 2048 tokens", kind: str | None = None) -> list[list[str]]:
    """The cells of every table body row in ``markdown``'s ``section`` (up to the next heading); with
    ``kind``, only those of the points table (``"points"``, its last column ``samples``) or of the paired
    differences (``"paired"``)."""
    text = markdown.split(section + "\n", 1)[1].split("\n## ", 1)[0]
    rows, header = [], ""
    for line in text.splitlines():
        if line.startswith("| policy"):
            header = line
        elif line.startswith("| ") and not line.startswith("| ---"):
            is_kind = {None: True, "points": header.endswith("| samples |"),
                       "paired": header.startswith("| policy | budget | minus")}[kind]
            if is_kind:
                rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def point_rows(markdown: str, section: str = "## niah, 2048 tokens") -> dict[str, list[str]]:
    """Name -> the first row of that name in ``section`` (the points table comes first)."""
    rows: dict[str, list[str]] = {}
    for row in table_rows(markdown, section):
        rows.setdefault(row[0], row)
    return rows


def paired_rows(markdown: str, section: str = "## niah, 2048 tokens") -> dict[str, dict[str, str]]:
    """Paired differences: policy -> column header -> cell."""
    text = markdown.split(section + "\n", 1)[1].split("\n## ", 1)[0]
    header = [line for line in text.splitlines() if line.startswith("| policy | budget | minus")][0]
    names = [cell.strip() for cell in header.strip("|").split("|")]
    return {row[0]: dict(zip(names, row)) for row in table_rows(markdown, section, "paired")}


def write_scores(root: Path, name: str, date: str, scores: dict[str, list[float]], seed: int = 0,
                 samples: int | None = None, task: str = "niah", context: int = 2048, done: int | None = None,
                 config: dict | None = None, predictors: dict[str, str] | None = None, prefix: int | None = None,
                 model: str = "SmolLM2-135M-Instruct", extra_metrics: dict | None = None) -> None:
    """A run with per-sample values: ``scores`` maps a policy (dense at 100%, the others at 10%) to each
    sample's score (niah: the share of answers found; ppl: the mean log-loss of 100 tokens). ``done``:
    samples done of ``samples`` (a partial run); ``predictors``: policy -> sha256 letter; ``config``:
    settings that differ from the defaults; ``prefix``: a ppl run's prefix length."""
    count = len(next(iter(scores.values())))
    samples = count if samples is None else samples
    ppl = task == "ppl"
    records, summary = [], []
    for policy, values in scores.items():
        budget = "100%" if policy == "dense" else "10%"
        for i, v in enumerate(values):
            record = {"policy": policy, "budget": budget, "index": i}
            if ppl:
                record |= {"nll": 100 * v, "tokens": 100, "any_wrong": True, "token_error": 0.5, "prefix": prefix}
            else:
                record |= {"score": v, "correct": v == 1.0}
            records.append(record)
        if ppl:
            metrics = {"samples": len(values), "ppl": math.exp(sum(values) / len(values)), "token_error": 50.0}
        else:
            metrics = {"samples": len(values), "accuracy": 100 * sum(values) / len(values),
                       "all_correct": 100 * sum(v == 1.0 for v in values) / len(values)}
        summary.append({"policy": policy, "budget": budget, "metrics": metrics | (extra_metrics or {}), "seconds": 1.0})
    settings = {"sinks": 4, "window": 32, "interval": 1, "neighbors": 0, "neighbor_rule": "radius",
                "group_reduction": "mean"} | (config or {})
    points = [{"policy": "dense", "budget": "100%", "mode": "dense"}]
    for policy in scores:
        if policy != "dense":
            sha = (predictors or {}).get(policy)
            points.append({"policy": policy, "budget": "10%", **settings,
                           **({"predictor": {"path": f"predictors/{sha}", "sha256": sha * 64}} if sha else {})})
    primary = "ppl" if ppl else "accuracy"
    report = {
        "task": {"name": task, "summary": "a task", "primary": primary, "higher_is_better": not ppl},
        "provenance": {"command": f"tbrun eval --out {name}", "commit": "abc123", "date": date},
        "machine": MACHINE,
        "config": {"task": task, "policies": [p for p in scores if p != "dense"], "budgets": ["10%"],
                   "context": context, "samples": samples, "seed": seed, "model": None, "predictor": None,
                   "device": "cpu", "dtype": "fp32", **settings, "shared_prefill": True},
        "model": {"name": model, "dtype": "torch.float32", "dims": {"num_layers": 30}},
        "seconds": 12.0,
        "points": points,
        "summary": summary,
        "breakdown": {},
        "samples": records,
    }
    if done is not None:
        report["partial"] = {"samples_done": done}
    (root / name).mkdir()
    (root / name / "results.json").write_text(json.dumps(report))


def summarize(root: Path) -> str:
    main([str(root)])
    return (root / SUMMARY_MD).read_text()


def test_runs_of_one_task_merge_into_one_table_with_dense_once(tmp_path):
    write_run(tmp_path, "niah-tokenbutler", "tokenbutler", 100.0, "2026-11-23 13:00:00 +0000", free_gib="20.1")
    write_run(tmp_path, "niah", "quest", 100.0, "2026-11-23 12:00:00 +0000")
    markdown = summarize(tmp_path)
    rows = table_rows(markdown, kind="points")
    assert [row[0] for row in rows] == ["dense", "quest", "tokenbutler"]  # dense first, then the older run's
    assert rows[0] == ["dense", "-", "-", "100.0", "seed 0 x2"]
    assert rows[2] == ["tokenbutler", "50.0", "50.0", "-", "seed 0 x2"]
    assert "| policy | 10% | 50% | 100% | samples |" in markdown
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
    assert "differ on 2 of the 2 samples both ran" in flagged[0]  # per sample
    assert [row[0] for row in table_rows(markdown, kind="points")].count("dense") == 1


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
    assert table_rows(markdown, "## niah, 4096 tokens")[0] == ["dense", "-", "-", "90.0 [80.0, 100.0]", "seed 0 x2"]
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
    rows = {row[0]: row for row in table_rows(markdown, kind="paired")}
    assert rows["oracle"][2] == "+0.0 (identical on all 4)"  # no interval that reads as certain
    assert rows["oracle"][4] == "+25.0 [-54.5, +104.5] (4; 1 differ; p 1)"
    assert rows["tokenbutler"][3].startswith("-25.0 [") and rows["tokenbutler"][4] == "-"
    assert rows["quest"][2] == "-100.0 (all 4 differ by -100.0; p 0.12)"  # 4 pairs: p >= 2/16, never bold
    assert not rows["quest"][4].startswith("**")


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
    rows = {row[0]: row for row in table_rows(markdown, kind="paired")}
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
    cells = {row[0]: row for row in table_rows(markdown, kind="points")}
    assert cells["tokenbutler"][1:] == ["50.0", "-", "seed 1 x6"]  # the 6-sample run's 3 of 6, not 75.0
    paired = {row[0]: row for row in table_rows(markdown, kind="paired")}
    cell = paired["tokenbutler"][3].strip("*")  # minus oracle: 4 misses in 10 pairs of two seeds
    assert cell.startswith("-40.0 [") and "(10 of seed 0 x4 + seed 1 x6; 4 differ; p 0.12)" in cell


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
    rows = {row[0]: row for row in table_rows(markdown, kind="paired")}
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


OLD, NEW = "2026-11-23 12:00:00 +0000", "2026-11-24 12:00:00 +0000"


def test_a_few_differing_samples_are_not_bold_though_the_t_interval_excludes_0(tmp_path):
    """16 of 20 pairs equal and 4 better by 25 points: the t interval [+0.2, +9.8] excludes 0, but the exact
    sign-flip test gives p = 2/2^4 = 0.125, so the cell is not bold; with 6 such pairs p = 0.031: bold."""
    base = [1.0, 0.75, 0.5, 0.0] * 5
    better4 = [min(1.0, v + 0.25) if i < 4 else v for i, v in enumerate([0.5] * 20)]
    better6 = [0.75 if i < 6 else 0.5 for i in range(20)]
    write_scores(tmp_path, "run", OLD, {"dense": base, "oracle": [0.5] * 20, "tokenbutler": better4,
                                         "quest": better6})
    markdown = summarize(tmp_path)
    rows = paired_rows(markdown)
    assert rows["tokenbutler"]["minus oracle"] == "+5.0 [+0.2, +9.8] (20; 4 differ; p 0.12)"
    assert rows["quest"]["minus oracle"] == "**+7.5 [+2.0, +13.0] (20; 6 differ; p 0.031)**"
    assert "exact paired sign-flip test" in markdown and "5 differing pairs: p >= 0.0625" in markdown


def test_equal_differences_print_without_an_interval_and_zero_is_never_bold(tmp_path):
    """Every pair equal: ``identical on all n``, never bold; every pair differing by one amount: that
    amount, bold only if the exact test says so (4 pairs: p 0.125; 6: 0.031)."""
    write_scores(tmp_path, "four", OLD, {"dense": [1.0] * 4, "oracle": [0.5] * 4, "tokenbutler": [0.5] * 4,
                                          "quest": [0.25] * 4})
    write_scores(tmp_path, "six", NEW, {"dense": [1.0] * 6, "oracle": [0.5] * 6, "tokenbutler": [0.75] * 6},
                 context=4096)
    markdown = summarize(tmp_path)
    rows = paired_rows(markdown)
    assert rows["tokenbutler"]["minus oracle"] == "+0.0 (identical on all 4)"
    assert rows["quest"]["minus oracle"] == "-25.0 (all 4 differ by -25.0; p 0.12)"  # not bold
    assert rows["quest"]["minus tokenbutler"] == "-25.0 (all 4 differ by -25.0; p 0.12)"
    six = paired_rows(markdown, "## niah, 4096 tokens")
    assert six["tokenbutler"]["minus oracle"] == "**+25.0 (all 6 differ by +25.0; p 0.031)**"
    assert "[+0.0, +0.0]" not in markdown and "[-25.0, -25.0]" not in markdown


def test_runs_of_one_seed_and_other_sample_counts_pool_one_sample_set_per_seed(tmp_path):
    """Seed 0 with 4 and with 6 samples draw near-duplicate samples: a pair is taken over one of them (the
    one with more shared samples), not 10 "independent" pairs; another seed pools in, and the cell says
    which sets it is on."""
    write_scores(tmp_path, "x4", OLD, {"dense": [1.0] * 4, "oracle": [1.0] * 4, "tokenbutler": [1.0, 0.0, 0.0, 1.0]})
    write_scores(tmp_path, "x6", NEW, {"dense": [1.0] * 6, "oracle": [1.0] * 6, "tokenbutler": [1.0, 0.0] * 3})
    markdown = summarize(tmp_path)
    cell = paired_rows(markdown)["tokenbutler"]["minus oracle"]
    assert cell.startswith("-50.0 [") and cell.endswith("(6; 3 differ; p 0.25)")  # not (10)
    assert "2 sample sets (`seed 0 x4`, `seed 0 x6`); a cell on other samples than `seed 0 x6` names" in markdown
    assert "a cell pools at most one set per seed" in markdown
    write_scores(tmp_path, "seed1", "2026-11-25 12:00:00 +0000",
                 {"dense": [1.0] * 4, "oracle": [1.0] * 4, "tokenbutler": [0.0] * 4}, seed=1)
    cell = paired_rows(summarize(tmp_path))["tokenbutler"]["minus oracle"]
    assert "(10 of seed 0 x6 + seed 1 x4; 7 differ; p 0.016)" in cell  # other seeds: other samples


def test_ppl_samples_of_other_prefixes_are_other_samples(tmp_path):
    """A ppl sample's prefix depends on the run's budgets: passages of one seed and index scored after
    other prefixes do not pair, and runs that ran them do not disagree."""
    write_scores(tmp_path, "p100", OLD, {"dense": [2.0] * 8, "oracle": [2.1] * 8}, task="ppl", context=1024, prefix=100)
    write_scores(tmp_path, "p200", NEW, {"dense": [2.5] * 8, "tokenbutler": [2.5 + 0.01 * i for i in range(8)]},
                 task="ppl", context=1024, prefix=200)
    markdown = summarize(tmp_path)
    section = "## ppl, 1024 tokens"
    rows = paired_rows(markdown, section)
    assert rows["tokenbutler"]["minus oracle"] == "-"  # no common sample
    assert rows["tokenbutler"]["minus dense"].startswith("**+3.6% [")  # against the dense of its own prefix
    assert "(8 of seed 0 x8 prefix 200; 7 differ; p 0.016)" in rows["tokenbutler"]["minus dense"]
    assert "Runs disagree" not in markdown
    points = {row[0]: row[-1] for row in table_rows(markdown, section, "points")}
    assert points == {"dense": "seed 0 x8 prefix 100", "oracle": "seed 0 x8 prefix 100",
                      "tokenbutler": "seed 0 x8 prefix 200"}


def test_points_of_other_run_wide_settings_are_other_points(tmp_path):
    """Two runs' tokenbutler with other --window values: two rows named by the setting that differs, not
    one point pooled (nor a disagreement); dense, which has no window, is one point."""
    write_scores(tmp_path, "w32", OLD, {"dense": [1.0, 0.0, 1.0, 1.0], "tokenbutler": [1.0, 0.0, 0.0, 1.0],
                                         "quest": [0.0] * 4})
    write_scores(tmp_path, "w64", NEW, {"dense": [1.0, 0.0, 1.0, 1.0], "tokenbutler": [1.0, 0.0, 1.0, 1.0]},
                 config={"window": 64})
    markdown = summarize(tmp_path)
    rows = point_rows(markdown)
    assert list(rows) == ["dense", "tokenbutler (--window 32)", "quest", "tokenbutler (--window 64)"]
    assert rows["tokenbutler (--window 32)"][1] == "50.0" and rows["tokenbutler (--window 64)"][1] == "75.0"
    assert "Runs disagree" not in markdown and "other run-wide selection settings" in markdown
    paired = paired_rows(markdown)
    assert paired["tokenbutler (--window 64)"]["minus tokenbutler (--window 32)"].startswith("+25.0 [")
    assert paired["tokenbutler (--window 32)"]["minus dense"].startswith("-25.0 [")  # 4 pairs, not 8
    assert "(4; 1 differ; p 1)" in paired["tokenbutler (--window 32)"]["minus dense"]


@pytest.mark.parametrize("key, recorded, unrecorded", [("key_dtype", "int8", "unrecorded"),
                                                      ("window_rule", "budget", "fixed")])
def test_points_of_another_recorded_setting_or_none_recorded_are_other_points(tmp_path, key, recorded, unrecorded):
    """A run whose points record a setting and an older one whose points do not: two rows, never pooled. The
    compact key dtype (the older run's keys were stored as its machine chose then) and the window rule (before
    the window followed the budget it was fixed)."""
    write_scores(tmp_path, "old", OLD, {"dense": [1.0, 0.0, 1.0, 1.0], "tokenbutler": [1.0, 0.0, 0.0, 1.0]})
    write_scores(tmp_path, "new", NEW, {"dense": [1.0, 0.0, 1.0, 1.0], "tokenbutler": [1.0, 0.0, 1.0, 1.0]},
                 config={key: recorded})
    flag = "--" + key.replace("_", "-")
    rows = point_rows(summarize(tmp_path))
    assert list(rows) == ["dense", f"tokenbutler ({flag} {unrecorded})", f"tokenbutler ({flag} {recorded})"]
    assert rows[f"tokenbutler ({flag} {recorded})"][1] == "75.0"


def test_runs_of_another_model_get_their_own_section(tmp_path):
    """Runs of one task and context with another model are not merged: a section (and glance columns)
    per model, named by it."""
    write_scores(tmp_path, "small", OLD, {"dense": [1.0] * 4, "tokenbutler": [1.0, 0.0, 0.0, 1.0]})
    write_scores(tmp_path, "large", NEW, {"dense": [0.0] * 4, "tokenbutler": [0.0] * 4}, model="SmolLM2-360M-Instruct")
    markdown = summarize(tmp_path)
    assert "Runs disagree" not in markdown
    small = table_rows(markdown, "## niah, 2048 tokens, SmolLM2-135M-Instruct (torch.float32)", "points")
    large = table_rows(markdown, "## niah, 2048 tokens, SmolLM2-360M-Instruct (torch.float32)", "points")
    assert [row[:3] for row in small] == [["dense", "-", "100.0"], ["tokenbutler", "50.0", "-"]]
    assert [row[:3] for row in large] == [["dense", "-", "0.0"], ["tokenbutler", "0.0", "-"]]
    assert "niah 2k SmolLM2-360M-Instruct (torch.float32) @ 10%" in markdown  # its own column at a glance


def test_a_complete_run_is_preferred_to_a_partial_one_of_the_same_samples(tmp_path):
    """An older run stopped after 2 of 4 samples and a newer complete one: the table shows the complete
    one; they agree on the 2 samples both ran, so no disagreement; a per-sample difference is flagged."""
    write_scores(tmp_path, "partial", OLD, {"dense": [1.0, 0.0], "tokenbutler": [1.0, 0.0]}, samples=4, done=2)
    write_scores(tmp_path, "complete", NEW, {"dense": [1.0, 0.0, 1.0, 1.0], "tokenbutler": [1.0, 0.0, 0.0, 0.0]})
    markdown = summarize(tmp_path)
    rows = point_rows(markdown)
    assert rows["dense"][:3] == ["dense", "-", "75.0"] and rows["tokenbutler"][:2] == ["tokenbutler", "25.0"]
    assert rows["dense"][-1] == "seed 0 x4"  # not the partial run's "seed 0 x4 (2 done)"
    assert "Runs disagree" not in markdown  # 75.0 of 4 and 50.0 of 2: the same on the 2 both ran
    (tmp_path / "partial").rename(tmp_path / ".gone")
    write_scores(tmp_path, "partial", OLD, {"dense": [1.0, 1.0], "tokenbutler": [1.0, 0.0]}, samples=4, done=2)
    markdown = summarize(tmp_path)
    flagged = [line for line in markdown.splitlines() if line.startswith("- dense @ 100%")]
    assert len(flagged) == 1 and "differ on 1 of the 2 samples both ran" in flagged[0]
    assert "the table shows `complete`'s" in flagged[0]


def test_runs_agree_to_float32_rounding_and_despite_extra_metrics(tmp_path):
    """Perplexity 3.309042 and 3.309050 (float32 sums), and a run that also recorded ``attended``: no
    disagreement; a real difference still is one."""
    nll = [math.log(3.309042)] * 8
    write_scores(tmp_path, "a", OLD, {"dense": nll, "tokenbutler": nll}, task="ppl", context=1024, prefix=360)
    write_scores(tmp_path, "b", NEW, {"dense": [math.log(3.309050)] * 8, "tokenbutler": nll}, task="ppl",
                 context=1024, prefix=360, extra_metrics={"attended": 12.5})
    assert "Runs disagree" not in summarize(tmp_path)
    for name in ("a", "b"):  # without per-sample records: the primary metric of the two
        report = json.loads((tmp_path / name / "results.json").read_text())
        report["samples"] = []
        (tmp_path / name / "results.json").write_text(json.dumps(report))
    assert "Runs disagree" not in summarize(tmp_path)
    (tmp_path / "b").rename(tmp_path / ".b")
    write_scores(tmp_path, "c", NEW, {"dense": [math.log(3.4)] * 8}, task="ppl", context=1024, prefix=360)
    assert "Runs disagree" in summarize(tmp_path)


def test_each_row_names_its_sample_set_and_the_glance_notes_mixed_columns(tmp_path):
    """A 4-sample run and a newer 6-sample run of dense and the oracle: their rows come from the 6-sample
    run, tokenbutler's from the 4-sample one; each row says so, and so does the glance table."""
    write_scores(tmp_path, "x4", OLD, {"dense": [1.0] * 4, "oracle": [1.0] * 4, "tokenbutler": [1.0, 0.0, 0.0, 1.0]})
    write_scores(tmp_path, "x6", NEW, {"dense": [1.0] * 6, "oracle": [1.0, 0.0] * 3})
    markdown = summarize(tmp_path)
    rows = {row[0]: row[-1] for row in table_rows(markdown, kind="points")}
    assert rows == {"dense": "seed 0 x6", "oracle": "seed 0 x6", "tokenbutler": "seed 0 x4"}
    assert "- niah 2k @ 10%: tokenbutler on `seed 0 x4`; the other rows on `seed 0 x6`" in markdown

