"""Training text that every machine can get offline, named by package, version and content hash.

A corpus is a list of sources ``PACKAGE:GLOB``: files of an installed package (or of Python's
standard library, ``stdlib``), for example ``stdlib:pydoc_data/topics.py`` (the language reference,
as prose), ``stdlib:json/*.py``, ``transformers:models/llama/*.py`` or
``gensim:test/test_data/lee_background.cor`` (300 news articles; ``pip install gensim==4.4.0``). A
fresh machine gets the same files by installing the same package version from the registry; a checkpoint records each source
as ``{"source", "package", "version", "files", "sha256"}`` (sha256 over the sorted relative paths
and their contents), never a local path, so anyone can check they rebuilt the same corpus.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import importlib.util
import platform
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .data import TEXT_SUFFIXES, DataError

STDLIB = "stdlib"
BINARY_SUFFIXES = (".pyc", ".so", ".bz2", ".gz", ".zip", ".npy", ".npz", ".bin", ".pkl", ".pt")


def is_text_file(path: Path) -> bool:
    """A known text suffix, or UTF-8 text without NUL bytes in its first 4 KiB (data files that packages
    ship under other names, e.g. gensim's ``test/test_data/lee_background.cor``, news prose)."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        return True
    if path.suffix.lower() in BINARY_SUFFIXES:
        return False
    try:
        with path.open("rb") as stream:
            head = stream.read(4096)
    except OSError:
        return False
    if not head or b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class CorpusSource:
    """One ``PACKAGE:GLOB`` source."""

    package: str
    pattern: str

    @classmethod
    def parse(cls, spec: str) -> "CorpusSource":
        package, sep, pattern = spec.partition(":")
        if not sep or not package.strip() or not pattern.strip():
            raise DataError(f"--corpus {spec!r} is not PACKAGE:GLOB: write for example stdlib:pydoc_data/topics.py "
                            "or transformers:models/llama/*.py.")
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise DataError(f"--corpus {spec!r}: the glob must stay inside the package (no absolute path, no '..').")
        return cls(package.strip(), pattern.strip())

    @property
    def spec(self) -> str:
        return f"{self.package}:{self.pattern}"

    def root(self) -> Path:
        """Where the package's files are on this machine."""
        if self.package == STDLIB:
            return Path(sysconfig.get_paths()["stdlib"])
        found = importlib.util.find_spec(self.package)
        if found is None or not found.submodule_search_locations:
            raise DataError(f"--corpus {self.spec!r}: no installed package {self.package!r}; install it "
                            f"(pip install {self.package}) or name another one.")
        return Path(list(found.submodule_search_locations)[0])

    def version(self) -> str:
        if self.package == STDLIB:
            return f"python-{platform.python_version()}"
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def files(self) -> list[Path]:
        """The source's text files, sorted by relative path."""
        root = self.root()
        found = sorted(p for p in root.glob(self.pattern) if p.is_file() and is_text_file(p))
        if not found:
            raise DataError(f"--corpus {self.spec!r} matches no text files ({', '.join(TEXT_SUFFIXES)}, or UTF-8 "
                            f"text of another name) in {self.package} {self.version()}: check the glob.")
        return found


@dataclass(slots=True)
class Corpus:
    """Resolved sources: per source its files (in a seeded order) and their portable names."""

    sources: list[CorpusSource]
    groups: list[list[Path]]
    names: dict[Path, str]  # file -> "package/relative/path", the same on every machine

    def describe(self) -> list[dict]:
        """What a checkpoint records: package, version, file count and content hash per source."""
        out = []
        for source, files in zip(self.sources, self.groups):
            digest = hashlib.sha256()
            for path in sorted(files, key=self.names.__getitem__):
                digest.update(self.names[path].encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            out.append({"source": source.spec, "package": source.package, "version": source.version(),
                        "files": len(files), "sha256": digest.hexdigest()})
        return out


def resolve_corpus(specs: list[str], seed: int = 0) -> Corpus:
    """``PACKAGE:GLOB`` specs -> a ``Corpus``; each source's files shuffled by ``seed`` (by name, so the
    order is the same on every machine and in every process)."""
    if not specs:
        raise DataError("--corpus needs at least one PACKAGE:GLOB source.")
    sources = [CorpusSource.parse(spec) for spec in specs]
    groups, names = [], {}
    for source in sources:
        root = source.root()
        files = source.files()
        for path in files:
            names[path] = f"{source.package}/{path.relative_to(root).as_posix()}"
        files = sorted(files, key=names.__getitem__)
        random.Random(seed).shuffle(files)
        groups.append(files)
    return Corpus(sources, groups, names)
