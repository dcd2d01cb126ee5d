"""Training text for distillation: plain text files, tokenized into fixed-length sequences.

Any ordinary prose or code works, because the predictor learns to imitate the model's own
attention on whatever it reads. Offline sources that exist on most machines: Python's standard
library sources and docs (``python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"``),
the packages in a virtual environment's ``site-packages``, ``/usr/share/doc``, or text the model
itself generated. Files are split into training and held-out sets by a hash of their path, so the
held-out report reads text the predictor never trained on.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex", ".c", ".h", ".toml", ".cfg", ".ini")
MAX_FILE_BYTES = 4 * 1024 * 1024
HELD_OUT_EVERY = 10  # one file in ten (by path hash) is held out
MIXES = ("sequences", "files")  # how sources take turns: sequence by sequence, or file by file


class DataError(ConfigError):
    """Training text is missing, empty or too short."""


@dataclass(slots=True)
class TokenSequences:
    """Tokenized text cut into sequences: ``train`` ``[N, T]`` and ``held_out`` ``[M, T]`` long."""

    train: torch.Tensor
    held_out: torch.Tensor
    files: int
    tokens: int


def collect_text_files(paths: list[str | Path], seed: int = 0) -> list[Path]:
    """Text files named in ``paths`` (files, or directories searched recursively).

    Each path's files are shuffled (seeded), then the paths are interleaved round-robin, so every
    ``--data`` argument contributes about as many files as the others whatever its size.
    """
    per_path: list[list[Path]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"--data {str(raw)!r} does not exist: pass text files or a directory of them.")
        if path.is_file():
            per_path.append([path])
            continue
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        random.Random(seed).shuffle(found)
        per_path.append(found)
    if not any(per_path):
        raise DataError(
            f"--data {', '.join(map(str, paths))} holds no text files ({', '.join(TEXT_SUFFIXES)}): "
            "point it at prose or code, e.g. Python's standard library directory or /usr/share/doc."
        )
    return _interleave(per_path)


def _interleave(lists: list[list[Path]]) -> list[Path]:
    """Round-robin over ``lists``, dropping repeats: [[a, b], [c]] -> [a, c, b]."""
    seen: set[Path] = set()
    out: list[Path] = []
    for index in range(max(map(len, lists))):
        for files in lists:
            if index < len(files) and files[index] not in seen:
                seen.add(files[index])
                out.append(files[index])
    return out


def describe_paths(paths: list[str | Path], seed: int = 0) -> list[dict]:
    """Local ``--data`` paths as a checkpoint records them: the name as given (no directories above
    it), file count and a content hash, never the machine's absolute path."""
    import hashlib

    out = []
    for raw in paths:
        files = collect_text_files([raw], seed)
        root = Path(raw).expanduser()
        base = root if root.is_dir() else root.parent
        digest = hashlib.sha256()
        for path in sorted(files):
            digest.update(path.relative_to(base).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        out.append({"name": root.name, "files": len(files), "sha256": digest.hexdigest()})
    return out


def read_text(path: Path) -> str:
    """A file's text, or '' for binary, unreadable or very large files."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return ""
        raw = path.read_bytes()
    except OSError:
        return ""
    if b"\x00" in raw[:4096]:
        return ""
    return raw.decode("utf-8", errors="ignore")


def is_held_out(name: str | Path) -> bool:
    return zlib.crc32(str(name).encode()) % HELD_OUT_EVERY == 0


def split_files(files: list[Path], names: dict[Path, str] | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): one in ``HELD_OUT_EVERY`` by a hash of the file's name (its
    portable ``names`` entry when given, else its path), at least one."""
    held = [f for f in files if is_held_out(names.get(f, f) if names else f)]
    if not held:
        held = files[-1:]
    chosen = set(held)
    return [f for f in files if f not in chosen], held


def _tokenize_until(files: list[Path], tokenizer, limit: int | None, separator: list[int]) -> list[int]:
    """Concatenate token ids of ``files`` (separated by ``separator``) until ``limit`` tokens (all of them
    when ``limit`` is None)."""
    ids: list[int] = []
    for path in files:
        text = read_text(path)
        if text.strip():
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.extend(separator)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def _cut(ids: list[int], seq_len: int, count: int) -> torch.Tensor:
    """At most ``count`` sequences ``[n, seq_len]`` from a token stream (the remainder dropped)."""
    n = min(count, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _source_groups(paths: list[str | Path], corpus, seed: int) -> tuple[list[list[Path]], dict[Path, str]]:
    """One file list per source (each ``--data`` path, then each corpus source) and every file's portable
    name (for the held-out split)."""
    groups = [collect_text_files([path], seed) for path in paths]
    names = _portable_names(paths, [path for group in groups for path in group], corpus)
    if corpus is not None:
        groups.extend(corpus.groups)
    return groups, names


def _sources(paths: list[str | Path], corpus, seed: int) -> tuple[list[Path], dict[Path, str]]:
    """All files of the sources in one list, the sources taking turns file by file (``mix="files"``)."""
    files = collect_text_files(paths, seed) if paths else []
    names = _portable_names(paths, files, corpus)
    if corpus is not None:
        files = _interleave([files, *corpus.groups]) if files else _interleave(corpus.groups)
    return files, names


def _portable_names(paths: list[str | Path], files: list[Path], corpus) -> dict[Path, str]:
    """Each of the ``--data`` ``files`` (as ``collect_text_files`` found them under ``paths``) named for the
    held-out split whatever the spelling of its path (``docs``, ``./docs``, ``/home/u/docs``): the folder's
    name and the path inside it, or a file's own name; and each corpus file's portable name."""
    roots = [Path(raw).expanduser() for raw in paths]
    names: dict[Path, str] = {}
    for path in files:
        root = next(root for root in roots if path == root or root in path.parents)
        names[path] = root.name if path == root else f"{root.resolve().name}/{path.relative_to(root).as_posix()}"
    return names | (corpus.names if corpus is not None else {})


def _source_split(files: list[Path], names: dict[Path, str] | None, tokenizer, seq_len: int, train_count: int,
                  held_out_count: int, separator: list[int], want_train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One source's (training ``[n, T]``, held-out ``[m, T]``) sequences.

    A source of ``HELD_OUT_EVERY`` or more files holds out whole files (by a hash of their name); a smaller
    one holds out the last tenth of its token stream, so what is held out depends only on the source,
    never on how many sequences a run asks for or how long they are.
    """
    if len(files) >= HELD_OUT_EVERY:
        train_files, held_files = split_files(files, names)
        train_ids = _tokenize_until(train_files, tokenizer, train_count * seq_len, separator) if want_train else []
        held_ids = _tokenize_until(held_files, tokenizer, held_out_count * seq_len, separator)
        return _cut(train_ids, seq_len, train_count), _cut(held_ids, seq_len, held_out_count)
    ids = _tokenize_until(files, tokenizer, None, separator)
    boundary = len(ids) - len(ids) // HELD_OUT_EVERY  # the same tokens held out at every --seq-len
    return _cut(ids[:boundary], seq_len, train_count), _cut(ids[boundary:], seq_len, held_out_count)


def _take_turns(blocks: list[torch.Tensor], count: int, seq_len: int) -> torch.Tensor:
    """Rows of ``blocks`` (each ``[n_i, T]``) round-robin, one per source in turn, up to ``count`` ``[<=count, T]``."""
    rows = [block[i] for i in range(max((b.shape[0] for b in blocks), default=0)) for block in blocks if i < block.shape[0]]
    rows = rows[:count]
    return torch.stack(rows) if rows else torch.empty(0, seq_len, dtype=torch.long)


def _separator(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _check_mix(mix: str) -> None:
    if mix not in MIXES:
        raise DataError(f"--mix {mix!r} is not one of {', '.join(MIXES)}: 'sequences' makes the sources take turns "
                        "sequence by sequence; 'files' (the first predictors' rule) file by file.")


def load_sequences(
    paths: list[str | Path], tokenizer, seq_len: int, train_count: int, held_out_count: int, seed: int = 0,
    corpus=None, mix: str = "sequences",
) -> TokenSequences:
    """Tokenize text into ``train_count`` training and ``held_out_count`` held-out sequences.

    ``mix="sequences"`` (default): each source (a ``--data`` path or a corpus source) is split and cut on
    its own, then the sources take turns sequence by sequence, so a source of one large file (the Python
    reference) cannot crowd out the others. ``mix="files"`` (the first predictors' rule): the sources take
    turns file by file in one token stream, which a single large first file fills alone.
    """
    _check_mix(mix)
    if mix == "files":
        return _load_file_mix(paths, tokenizer, seq_len, train_count, held_out_count, seed, corpus)
    groups, names = _source_groups(paths, corpus, seed)
    if not any(groups):
        raise DataError("the training text has no files: give --corpus PACKAGE:GLOB or --data FILE_OR_DIR.")
    separator = _separator(tokenizer)
    splits = [_source_split(files, names, tokenizer, seq_len, train_count, held_out_count, separator) for files in groups]
    train = _take_turns([split[0] for split in splits], train_count, seq_len)
    held_out = _take_turns([split[1] for split in splits], held_out_count, seq_len)
    if train.shape[0] == 0:
        raise DataError(
            f"the training text holds less than one sequence of --seq-len {seq_len} tokens per source: add more "
            "text or lower --seq-len."
        )
    files = len({path for files in groups for path in files})
    return TokenSequences(train=train, held_out=held_out, files=files,
                          tokens=int(train.numel() + held_out.numel()))


def _load_file_mix(paths, tokenizer, seq_len, train_count, held_out_count, seed, corpus) -> TokenSequences:
    files, names = _sources(paths, corpus, seed)
    separator = _separator(tokenizer)
    if len(files) >= HELD_OUT_EVERY:
        train_files, held_files = split_files(files, names)
        train_ids = _tokenize_until(train_files, tokenizer, train_count * seq_len, separator)
        held_ids = _tokenize_until(held_files, tokenizer, held_out_count * seq_len, separator)
    else:
        ids = _tokenize_until(files, tokenizer, (train_count + held_out_count) * seq_len, separator)
        held_len = min(held_out_count * seq_len, len(ids) // 10 // seq_len * seq_len)
        train_ids, held_ids = ids[: len(ids) - held_len], ids[len(ids) - held_len :]
    train = _cut(train_ids, seq_len, train_count)
    held_out = _cut(held_ids, seq_len, held_out_count)
    if train.shape[0] == 0:
        raise DataError(
            f"--data has {len(train_ids)} tokens of training text, less than one sequence of --seq-len "
            f"{seq_len}: add more text or lower --seq-len."
        )
    return TokenSequences(train=train, held_out=held_out, files=len(files), tokens=len(train_ids) + len(held_ids))


def load_held_out(paths: list[str | Path], tokenizer, seq_len: int, count: int, seed: int = 0,
                  corpus=None, mix: str = "sequences") -> torch.Tensor:
    """Only the held-out sequences ``[n <= count, seq_len]`` that ``load_sequences`` would hold out with the
    same ``mix`` (never trained on), e.g. for a report after training."""
    _check_mix(mix)
    separator = _separator(tokenizer)
    if mix == "sequences":
        groups, names = _source_groups(paths, corpus, seed)
        held = _take_turns([_source_split(files, names, tokenizer, seq_len, 0, count, separator, want_train=False)[1]
                            for files in groups], count, seq_len)
    else:
        files, names = _sources(paths, corpus, seed)
        if len(files) < HELD_OUT_EVERY:
            raise DataError(f"the training text has {len(files)} files; a separate held-out set needs "
                            f"{HELD_OUT_EVERY} or more.")
        held = _cut(_tokenize_until(split_files(files, names)[1], tokenizer, count * seq_len, separator), seq_len, count)
    if held.shape[0] == 0:
        raise DataError(f"the held-out part of the training text holds less than one sequence of {seq_len} tokens.")
    return held
