"""``tbrun info``'s Triton and gather-method lines, and ``bench/gpu_first_run.sh`` run against
stand-in commands (a real run needs a GPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offload_engine.cpu_cache import gather
from offload_engine.machine import describe_machine, portable_word, triton_status
from tbrun_cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def test_triton_problem_names_a_missing_compiler_or_headers(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    assert gather.triton_problem() is None  # this machine has both (the dev set-up)
    monkeypatch.setattr(gather.shutil, "which", lambda name: None)
    assert "no C compiler" in gather.triton_problem() and "no C compiler" in triton_status()
    monkeypatch.undo()
    monkeypatch.setattr(gather.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert "no Python headers" in gather.triton_problem()


def test_info_says_whether_triton_works_and_which_gather_method_runs_and_why():
    machine = describe_machine()
    assert machine["triton"].startswith(("3.", "no:"))
    assert machine["gather method"].startswith("index: no CUDA device")
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0 and "gather method" in result.output and "triton" in result.output


FAKE_PYTHON = """#!/usr/bin/env bash
# -c: the CUDA check passes; -m pytest: the GPU tests fail
if [ "$1" = "-c" ]; then exit 0; fi
echo "1 failed, 9 passed"; exit 1
"""
FAKE_TBRUN = """#!/usr/bin/env bash
echo "tbrun $*" >> "$(dirname "$0")/calls"
case "$*" in *"--contexts 256k"*) echo "out of memory"; exit 3 ;; esac
exit 0
"""


@pytest.fixture
def fake_venv(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("tbrun", FAKE_TBRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path / "venv"


def test_first_run_script_runs_every_step_and_says_which_failed(fake_venv, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "VENV": str(fake_venv), "OUT": str(out)}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_first_run.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 1
    summary = run.stdout[run.stdout.index("=== summary"):]
    lines = dict(line.split(None, 1) for line in summary.splitlines()[1:8])
    assert lines["info"] == "ok" and lines["bench-gather"] == "ok" and lines["latency-128k"] == "ok"
    assert lines["gpu-tests"] == "FAILED (exit 1)" and lines["latency-256k"] == "FAILED (exit 3)"
    calls = (fake_venv / "bin" / "calls").read_text().splitlines()
    assert calls[0] == "tbrun info"
    latency = [c for c in calls if "latency" in c]
    assert [c.split("--contexts ")[1].split()[0] for c in latency] == ["32k", "64k", "128k", "256k"]
    assert "--append" not in latency[0] and all("--append" in c for c in latency[1:])
    assert "out of memory" in (out / "first-run-logs" / "latency-256k.log").read_text()


def test_first_run_script_refuses_a_machine_without_a_gpu(fake_venv, tmp_path):
    (fake_venv / "bin" / "python").write_text("#!/usr/bin/env bash\nif [ \"$1\" = -c ]; then exit 1; fi\necho 2.13\n")
    env = {**os.environ, "VENV": str(fake_venv), "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_first_run.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "no CUDA GPU" in run.stdout


def test_reports_name_the_commit_checked_out_when_the_run_began(tmp_path):
    import subprocess

    from offload_engine.machine import commit_at_start, git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "one")
    first = commit_at_start(str(tmp_path))
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "two")
    assert git_commit(str(tmp_path)) != first  # a commit made while the run went on
    assert commit_at_start(str(tmp_path)) == first


def test_reports_being_written_do_not_make_the_commit_dirty_but_code_does(tmp_path):
    import subprocess

    from offload_engine.machine import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "bench" / "reports" / "eval").mkdir(parents=True)
    (tmp_path / "bench" / "reports" / "eval" / "progress.jsonl").write_text("{}\n")
    (tmp_path / "engine.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    (tmp_path / "bench" / "reports" / "eval" / "progress.jsonl").write_text("{}\n{}\n")  # another run's progress
    assert not git_commit(str(tmp_path)).endswith("-dirty")
    (tmp_path / "engine.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)).endswith("-dirty")


# ------------------------------------------------------------------------------- CPU threads
def test_cpu_threads_follow_the_option_then_the_environment_then_the_free_cores(monkeypatch):
    from offload_engine import machine

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.choose_cpu_threads(2) == (2, "--threads")
    assert machine.choose_cpu_threads(None)[0] == 3
    with pytest.raises(ValueError, match="at least 1"):
        machine.choose_cpu_threads(0)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 4)
    for utilisation, busy, threads in ((0.0, 0, 4), (10.0, 0, 4), (24.0, 1, 3), (50.0, 2, 2), (100.0, 4, 1)):
        monkeypatch.setattr(machine.psutil, "cpu_percent", lambda interval, u=utilisation: u)
        chosen, why = machine.choose_cpu_threads(None)
        assert chosen == threads and why == f"auto: 4 usable cores, {busy} busy with other processes"


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5", "\u00b2"])
def test_an_omp_num_threads_that_is_not_a_thread_count_is_refused_not_ignored(monkeypatch, value):
    from offload_engine import machine

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS={value!r}.*whole number >= 1 or unset it"):
        machine.choose_cpu_threads(None)
    assert machine.choose_cpu_threads(2) == (2, "--threads")  # --threads overrides it
    monkeypatch.setenv("OMP_NUM_THREADS", " ")  # set but empty: as if unset
    assert machine.choose_cpu_threads(None)[1].startswith("auto")


def test_tbrun_refuses_a_bad_omp_num_threads_in_one_line_with_exit_code_2(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")
    refused = CliRunner().invoke(app, ["info"])
    assert refused.exit_code == 2, refused.output
    assert "OMP_NUM_THREADS='abc'" in refused.output and "Traceback" not in refused.output
    assert "whole number >= 1" in " ".join(refused.output.split())  # rich wraps


def test_tbrun_refuses_zero_threads_and_info_says_how_many(tiny_model_dir):
    refused = CliRunner().invoke(app, ["--threads", "0", "info"])
    assert refused.exit_code == 2 and "--threads 0" in refused.output
    shown = CliRunner().invoke(app, ["info", "--model", tiny_model_dir])  # $OMP_NUM_THREADS=1 in the suite
    assert shown.exit_code == 0 and "1 ($OMP_NUM_THREADS)" in shown.output


def test_tbrun_refuses_a_native_thread_count_that_is_not_a_number_before_any_command(monkeypatch):
    monkeypatch.setenv("TBRUN_NATIVE_THREADS", "all")
    refused = CliRunner().invoke(app, ["info"])
    assert refused.exit_code == 2 and "TBRUN_NATIVE_THREADS='all'" in refused.output


def test_a_recorded_command_names_no_absolute_path_even_after_an_equals_sign(tmp_path):
    for word in (str(tmp_path / "out"), f"--out={tmp_path / 'out'}", f"--teacher-cache={tmp_path}/cache"):
        recorded = portable_word(word)
        assert str(tmp_path) not in recorded and recorded.rstrip("/").endswith(("out", "cache")), recorded
    assert portable_word("--lr=3e-4") == "--lr=3e-4" and portable_word("plain") == "plain"
