"""The reproducible training corpus: sources named by package and glob, recorded by name, version
and content hash, the same sequences in every process, no local paths in what is recorded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from offload_engine.predictor.corpus import CorpusSource, resolve_corpus
from offload_engine.predictor.data import DataError, load_sequences

from tiny_models import tiny_tokenizer

SPECS = ["stdlib:json/*.py", "stdlib:pydoc_data/topics.py"]


def sequences_digest(specs: list[str]) -> str:
    corpus = resolve_corpus(specs, seed=3)
    data = load_sequences([], tiny_tokenizer(), 64, 12, 2, seed=3, corpus=corpus)
    return hashlib.sha256(torch.cat([data.train.flatten(), data.held_out.flatten()]).numpy().tobytes()).hexdigest()


def test_a_corpus_is_recorded_by_package_version_and_hash_never_a_path():
    described = resolve_corpus(SPECS).describe()
    assert [d["source"] for d in described] == SPECS
    assert all(d["package"] == "stdlib" and d["version"].startswith("python-") and d["files"] > 0 for d in described)
    assert all(len(d["sha256"]) == 64 for d in described)
    text = json.dumps(described)
    assert "/" not in text.replace("json/*.py", "").replace("pydoc_data/topics.py", "")  # no directories of this machine
    assert resolve_corpus(SPECS).describe() == described  # stable


def test_the_same_sequences_in_two_processes():
    code = ("import sys; sys.path.insert(0, 'tests'); from test_corpus import sequences_digest, SPECS; "
            "print(sequences_digest(SPECS))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
               for seed in (1, 2)}
    assert len(outputs) == 1 and outputs.pop() == sequences_digest(SPECS)


@pytest.mark.parametrize("spec, message", [
    ("no-colon", "is not PACKAGE:GLOB"),
    ("stdlib:/etc/*", "inside the package"),
    ("stdlib:../*", "inside the package"),
    ("surely_not_a_package_xyz:*.py", "no installed package"),
    ("stdlib:json/*.nothing", "matches no text files"),
])
def test_bad_sources_are_refused_with_what_to_do(spec, message):
    with pytest.raises(DataError, match=message):
        resolve_corpus([spec])


def test_installed_packages_resolve_by_name():
    source = CorpusSource.parse("typer:*.py")
    assert source.version() != "unknown" and source.files()


def test_the_held_out_set_of_a_corpus_is_what_training_held_out():
    """predictor_report reads load_held_out: it must be the text training never saw."""
    from offload_engine.predictor.data import load_held_out

    corpus = resolve_corpus([*SPECS, "stdlib:email/*.py"], seed=3)  # >= 10 files: held out by name
    trained = load_sequences([], tiny_tokenizer(), 64, 12, 2, seed=3, corpus=corpus)
    held = load_held_out([], tiny_tokenizer(), 64, 2, seed=3, corpus=corpus)
    assert held.shape == (2, 64)
    assert torch.equal(held, trained.held_out)
    train_rows = {tuple(row.tolist()) for row in trained.train}
    assert not any(tuple(row.tolist()) in train_rows for row in held)


# ------------------------------------------------------------------- how sources take turns
def _two_sources(tmp_path):
    """A source of one large file (like the Python reference) and a source of eight small ones (nine
    files in all: fewer than ten, so no file is held out by a hash of its temporary path)."""
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "reference.txt").write_text("The river runs past the old hill. " * 400)
    (tmp_path / "small").mkdir()
    for i in range(8):
        (tmp_path / "small" / f"m{i}.py").write_text(f"def function_{i}(value):\n    return value * {i}\n" * 30)
    return [tmp_path / "big", tmp_path / "small"]


def _from(row: torch.Tensor, tokenizer) -> str:
    text = tokenizer.decode(row)
    return "big" if "river" in text else "small" if "def function" in text else "?"


def test_sources_take_turns_sequence_by_sequence_and_one_large_file_does_not_fill_them_all(tmp_path):
    tokenizer = tiny_tokenizer()
    paths = _two_sources(tmp_path)
    mixed = load_sequences(paths, tokenizer, 64, 8, 2)
    assert [_from(row, tokenizer) for row in mixed.train] == ["big", "small"] * 4
    assert {_from(row, tokenizer) for row in mixed.held_out} == {"big", "small"}  # the report sees both kinds
    by_files = load_sequences(paths, tokenizer, 64, 8, 2, mix="files")  # the first predictors' rule
    assert [_from(row, tokenizer) for row in by_files.train] == ["big"] * 8
    with pytest.raises(DataError, match="--mix 'lines' is not one of"):
        load_sequences(paths, tokenizer, 64, 8, 2, mix="lines")


def test_a_small_sources_held_out_tail_does_not_depend_on_how_much_a_run_trains_on(tmp_path):
    from offload_engine.predictor.data import load_held_out

    tokenizer = tiny_tokenizer()
    (tmp_path / "one.txt").write_text(" ".join(f"Line {i} of the only file." for i in range(1500)))
    paths = [tmp_path / "one.txt"]  # fewer than ten files: held out by the tail of its token stream
    few, many = (load_sequences(paths, tokenizer, 64, count, 2) for count in (3, 500))
    assert few.held_out.shape[0] == 2 and torch.equal(few.held_out, many.held_out)
    assert torch.equal(load_held_out(paths, tokenizer, 64, 2), few.held_out)
    train_text = " ".join(tokenizer.decode(row) for row in many.train)
    held_text = tokenizer.decode(few.held_out[0])
    assert "Line 1499" not in train_text and held_text.split("Line ")[1].split()[0] not in {
        t.split()[0] for t in train_text.split("Line ")[1:]}


def test_corpus_files_of_other_names_count_when_they_are_text(tmp_path):
    from offload_engine.predictor.corpus import is_text_file

    (tmp_path / "news.cor").write_text("Hundreds of people have been forced to vacate their homes. " * 10)
    (tmp_path / "vectors.bin").write_bytes(b"plain bytes without a nul")
    (tmp_path / "table.dat").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "latin1.cor").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 50)
    assert is_text_file(tmp_path / "news.cor")
    assert not is_text_file(tmp_path / "vectors.bin")  # a binary suffix is never read as text
    assert not is_text_file(tmp_path / "table.dat") and not is_text_file(tmp_path / "latin1.cor")


def test_the_held_out_files_of_a_data_folder_do_not_depend_on_how_its_path_is_spelled(tmp_path, monkeypatch):
    from offload_engine.predictor.data import _source_groups, split_files

    folder = tmp_path / "text"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        (folder / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(f"text {i}\n")
    monkeypatch.chdir(tmp_path)
    held = []
    for spelling in ("text", "./text", str(folder), str(folder) + "/"):
        [files], names = _source_groups([spelling], None, seed=0)
        held.append(sorted(path.resolve().relative_to(folder).as_posix() for path in split_files(files, names)[1]))
    assert held[0] and all(other == held[0] for other in held[1:]), held
