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
