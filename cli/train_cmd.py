"""`tbrun train-predictor`: distil a TokenButler predictor for a model from plain text."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .common import user_errors

HELP = """Distil a TokenButler token-importance predictor for a model (the model stays frozen).

The predictor learns to imitate the model's own attention, so any ordinary prose or code works as
--data, and nothing needs a network. Text found on most machines: Python's standard library
(`python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"`: sources with docstrings,
plus pydoc_data/topics.py, the language reference as prose), a virtual environment's
site-packages, /usr/share/doc, or text the model itself generated with `tbrun generate`.
--data takes files or directories (searched for .txt .md .rst .py and similar); one file in ten is
held out for the final report.

Writes OUT/config.json and OUT/predictor.safetensors (use OUT as --predictor), checkpoints in
OUT/checkpoints (resume with --resume), and the held-out report OUT/report.json.
"""

LOG_EVERY_S = 30.0  # without a terminal (nohup, CI) print a progress line this often


def register(app: typer.Typer) -> None:
    """Add the ``train-predictor`` command to the ``tbrun`` app."""
    app.command("train-predictor", help=HELP)(user_errors(train_predictor))


def train_predictor(
    out: Path = typer.Option(..., "--out", help="Directory for the predictor, checkpoints and report."),
    data: list[Path] = typer.Option([], "--data", help="Text file or directory; repeat for more."),
    corpus: list[str] = typer.Option([], "--corpus", help="PACKAGE:GLOB text shipped with an installed package, "
                                     "recorded by name, version and hash (reproducible anywhere), e.g. "
                                     "stdlib:pydoc_data/topics.py or transformers:models/llama/*.py; repeat for more."),
    mix: str = typer.Option("sequences", "--mix", help="How the sources take turns: 'sequences' (each source cut on "
                            "its own, one sequence each in turn) or 'files' (file by file in one stream, the first "
                            "predictors' rule, where one large first file can fill every sequence)."),
    recall: float = typer.Option(0.0, "--recall", help="Fraction of each training sequence overwritten by copies of "
                                 "earlier spans of 8-64 tokens, so the teacher shows far, narrow lookups (what a "
                                 "needle needs) and not only the local attention plain text is full of; 0: off."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local path; default: the embedded SmolLM2-135M-Instruct."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per training sequence (default 1024, or a "
                                          "complete --teacher-cache's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (one sequence each); default 500. "
                                        "With --teacher-cache: --sequences x --epochs."),
    teacher_caches: list[Path] = typer.Option([], "--teacher-cache", help="Run the model once per training "
                                              "sequence and keep what distillation needs in this folder (built, "
                                              "or resumed, or reused if complete), then train on it for --epochs "
                                              "with only the predictor in the loop. Repeat to train on several "
                                              "complete caches in one run, taking turns shard by shard (e.g. 1k "
                                              "sequences at position 0 and 4k at random offsets)."),
    sequences_count: Optional[int] = typer.Option(None, "--sequences", help="With --teacher-cache: training sequences "
                                                  "to cache (default 200; a complete cache's own count)."),
    epochs: int = typer.Option(1, "--epochs", help="With --teacher-cache: passes over the cached sequences."),
    cache_rows: Optional[int] = typer.Option(None, "--cache-rows", help="Query rows cached per sequence (default "
                                             "2 x --rows; each step trains on --rows of them)."),
    cache_dtype: str = typer.Option("float16", "--cache-dtype", help="float16, bfloat16 or float32."),
    cache_only: bool = typer.Option(False, "--cache-only", help="Build (or finish) the --teacher-cache and stop; "
                                    "later runs with other predictor sizes train on it."),
    producer_every: int = typer.Option(4, "--producer-every", help="G: a producer every G layers."),
    dim: int = typer.Option(16, "--dim", help="d': size of importance queries and projected keys."),
    hidden: int = typer.Option(512, "--hidden", help="I: inner width of the query MLP."),
    query_heads: int = typer.Option(0, "--query-heads", help="The predictor's query heads (0: the model's). Down to "
                                    "one per KV head, each stands for a block of its group's heads and learns their "
                                    "mean attention: one product per token to score and no softmax to rank. With "
                                    "--init of more heads, starts from their means."),
    rope_pairs: int = typer.Option(0, "--rope-pairs", help="Pairs of the d' dimensions the predictor rotates by "
                                   "token position (its own RoPE), so it can rank by distance at any position; at "
                                   "most d'/2. Off by default: it raised held-out recall but lost needles on niah "
                                   "(docs/predictor.md)."),
    rope_base: float = typer.Option(10000.0, "--rope-base", help="The slowest of the --rope-pairs turns has a wavelength "
                                    "of 2 pi x base^((r-1)/r) tokens: keep it above the longest context, or distances "
                                    "past it alias with near ones."),
    candidate_sinks: int = typer.Option(0, "--candidate-sinks", help="With --candidate-window: distil only on the "
                                        "positions the selector chooses among, past these first tokens ..."),
    candidate_window: int = typer.Option(0, "--candidate-window", help="... and before each row's last this many "
                                         "(the sinks and window the engine keeps anyway); 0 and 0: every position."),
    rows: int = typer.Option(256, "--rows", help="Query rows distilled per sequence (plus the last)."),
    lookahead: int = typer.Option(1, "--lookahead", help="N: distil each row on the mean attention of it and the N-1 "
                                  "rows after it (over the tokens up to it), what a selection reused for "
                                  "--interval N steps must cover; 1: the row's own attention. Recorded in a "
                                  "--teacher-cache, which then serves only that N."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints."),
    held_out: int = typer.Option(8, "--held-out", help="Held-out sequences for the final report."),
    position_offsets: bool = typer.Option(True, "--position-offsets/--no-position-offsets",
                                          help="Start each sequence at a random position, so the predictor "
                                               "works at every context length the model supports."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this predictor's weights (same shape) instead "
                                        "of a random init: fine-tune it, e.g. on longer sequences after shorter ones. A --hidden "
                                        "wider than its own widens it (new units start silent); --query-heads fewer "
                                        "than its own pools them."),
) -> None:
    import torch

    from offload_engine.machine import portable_word
    from offload_engine.models import EMBEDDED_MODEL_NAME, load_model
    from offload_engine.predictor.checkpoint import check_shape, load_checkpoint
    from offload_engine.predictor.corpus import resolve_corpus
    from offload_engine.predictor.data import MIXES, DataError, TokenSequences, describe_paths, load_sequences
    from offload_engine.predictor.recall import RecallSpans, add_recall_spans
    from offload_engine.predictor.teacher_cache import DTYPES as CACHE_DTYPES
    from offload_engine.predictor.network import PredictorConfig
    from offload_engine.predictor.training import TrainConfig, check_init_shape, check_out_dir, check_seq_len, train

    console = Console(stderr=True)
    if not cache_only:
        check_out_dir(out, resume)  # a file, or an earlier run's predictor or checkpoints: before anything loads
    if device != "cpu" and not device.startswith("cuda"):
        raise DataError(f"--device {device!r}: use cpu or cuda (cuda:N).")
    cache_mix = _open_mix(teacher_caches, data, corpus, cache_only)  # several caches: checked before the model loads
    teacher_cache = teacher_caches[0] if len(teacher_caches) == 1 else None
    if cache_mix is not None:
        seq_len = cache_mix.seq_len
    elif _complete_cache(teacher_caches[0] if teacher_caches else None):
        seq_len, sequences_count = _complete_cache_shape(teacher_caches[0], seq_len, sequences_count)
    seq_len = 1024 if seq_len is None else seq_len
    sequences_count = 200 if sequences_count is None else sequences_count
    if cache_mix is None and not data and not corpus and not _complete_cache(teacher_cache):
        raise DataError("give training text: --corpus PACKAGE:GLOB (reproducible, e.g. stdlib:pydoc_data/topics.py) "
                        "and/or --data FILE_OR_DIR.")
    if mix not in MIXES:
        raise DataError(f"--mix {mix!r} is not one of {', '.join(MIXES)}.")
    resolved = resolve_corpus(corpus, seed) if corpus else None  # refuses a bad spec before the model loads
    start, start_config = load_checkpoint(init) if init is not None else (None, None)  # a bad --init: before the model
    spans = RecallSpans(fraction=recall)
    steps = _steps(steps, teacher_cache is not None or cache_mix is not None,
                   sequences_count if cache_mix is None else len(cache_mix), epochs)
    if cache_only and teacher_cache is None:
        raise DataError("--cache-only builds a --teacher-cache: name its folder.")
    if cache_dtype not in CACHE_DTYPES:
        raise DataError(f"--cache-dtype {cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}.")
    config = TrainConfig(seq_len=seq_len, steps=steps, producer_every=producer_every, dim=dim, hidden=hidden,
                         rope_pairs=rope_pairs, query_heads=query_heads,
                         rope_base=rope_base, candidate_sinks=candidate_sinks, candidate_window=candidate_window,
                         rows=rows, lookahead=lookahead, lr=lr, checkpoint_every=checkpoint_every,
                         held_out=held_out, position_offsets=position_offsets, seed=seed,
                         init=start_config["weights_sha256"] if start_config else "")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    adapter = load_model(model, dtype=dtype, device=device, progress=console.print)
    check_seq_len(adapter, seq_len)
    shape = PredictorConfig.for_model(adapter.dims, producer_every, dim, hidden, rope_pairs, rope_base,
                                      query_heads or None)  # a bad --query-heads: before any teacher pass
    if start is not None:  # before any teacher pass: the same shape as this run's predictor, for this model
        check_shape(start_config, adapter.dims, init)
        check_init_shape(start.config, shape)
    if adapter.tokenizer is None:
        raise typer.BadParameter(f"model {model!r} has no tokenizer to read --data with.", param_hint="--model")
    train_count = sequences_count if teacher_cache else steps
    if data or corpus:
        with console.status("reading and tokenizing --data"):
            sequences = load_sequences(data, adapter.tokenizer, seq_len, train_count, held_out, seed, corpus=resolved,
                                       mix=mix)
            sequences.train = add_recall_spans(sequences.train, spans, seed)[0]  # held-out text stays as written
        if teacher_cache is not None:
            _check_enough_sequences(int(sequences.train.shape[0]), sequences_count, seq_len)
        console.print(f"data: {sequences.files} files, {sequences.train.shape[0]} training and "
                      f"{sequences.held_out.shape[0]} held-out sequences of {seq_len} tokens")
    else:  # a complete cache and no text: train on the cache, no held-out report
        sequences = TokenSequences(torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.long), 0, 0)
    meta = {
        "model_name": portable_word(model) if model else EMBEDDED_MODEL_NAME,
        "model": portable_word(model) if model else "embedded",
        "init": {"name": portable_word(str(init)), "weights_sha256": start_config["weights_sha256"]} if init else None,
        # the text this run read; None when it read none (complete caches alone: their own text is recorded
        # under "teacher_cache", and the --mix / --recall defaults would misname it)
        "data": {"corpus": resolved.describe() if resolved else [], "paths": describe_paths(data, seed),
                 "files": sequences.files, "mix": mix, "recall": spans.describe(),
                 "train_sequences": int(sequences.train.shape[0]), "held_out_sequences": int(sequences.held_out.shape[0])}
        if data or corpus else None,
        "command": shlex.join(["tbrun", "train-predictor", *map(portable_word, sys.argv[sys.argv.index("train-predictor") + 1:])])
        if "train-predictor" in sys.argv else None,
    }
    if teacher_cache is None and cache_mix is None:  # the text itself is trained on: a resumed run reads the same
        config.data = text_digest(meta["data"])
    cache = None
    if cache_mix is not None:
        cache_mix.check_model(meta["model_name"], PredictorConfig.for_model(adapter.dims).model_shape())
        cache = cache_mix
        config.teacher_cache = "+".join(part["id"] for part in cache_mix.describe())
        meta["teacher_cache"] = {"mix": cache_mix.describe(), "sequences": len(cache_mix), "id": config.teacher_cache}
    if teacher_cache is not None:
        cache = _teacher_cache(console, adapter, teacher_cache, sequences, config, meta, cache_rows or 2 * rows, cache_dtype)
        # with the text the cache was built from: a run on a complete cache alone reads no --corpus itself, and
        # the checkpoint must still say what it was trained on
        meta["teacher_cache"] = cache.describe()
        config.teacher_cache = meta["teacher_cache"]["id"]
        if cache_only:
            return
    with _progress(console) as (progress, on_step):
        result = train(adapter, sequences, config, out, resume=resume, meta=meta, on_step=on_step, cache=cache,
                       init_from=start)
        progress.stop()
    _print_report(console, result.report, result.predictor.num_parameters(), adapter)
    console.print(f"predictor written to {out} (use --predictor {out})")


def text_digest(data: dict) -> str:
    """A short digest of what the training text is (corpus sources, files, mix, recall spans, count)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _steps(steps: int | None, cached: bool, sequences: int, epochs: int) -> int:
    """Optimizer steps: --steps (default 500), or ``sequences`` x --epochs over a teacher cache (or a
    mix of caches, whose sequences are all of theirs)."""
    from offload_engine.errors import ConfigError

    if not cached:
        return 500 if steps is None else steps
    if steps is not None:
        raise ConfigError("with --teacher-cache the steps are the cached sequences x --epochs: drop --steps.")
    if sequences < 1 or epochs < 1:
        raise ConfigError(f"--sequences and --epochs must be >= 1, got {sequences} and {epochs}.")
    return sequences * epochs


def _check_enough_sequences(found: int, asked: int, seq_len: int) -> None:
    """Refuse a teacher cache the text cannot fill: its steps (``asked`` x --epochs) were fixed from --sequences,
    and a cache of fewer sequences would train more epochs than asked and never resume under the same command."""
    from offload_engine.predictor.data import DataError

    if found < asked:
        raise DataError(f"the training text gives {found} sequences of {seq_len} tokens, fewer than --sequences "
                        f"{asked}: pass --sequences {found} (or fewer), add text (--corpus, --data), or shorten --seq-len.")


def _open_mix(directories: list[Path], data: list[Path], corpus: list[str], cache_only: bool):
    """A ``TeacherCacheMix`` of two or more complete caches, or None for zero or one ``--teacher-cache``."""
    from offload_engine.predictor.data import DataError
    from offload_engine.predictor.teacher_cache import TeacherCache, TeacherCacheMix

    if len(directories) < 2:
        return None
    if cache_only or data or corpus:
        raise DataError("several --teacher-cache train on complete caches only: build each with its own "
                        "`--teacher-cache DIR --corpus ... --cache-only` run, then train on them without "
                        "--corpus, --data or --cache-only (held-out recall: python -m tbrun_bench.predictor_report).")
    if len({directory.resolve() for directory in directories}) < len(directories):
        raise DataError("the same --teacher-cache is named twice: name each cache once.")
    for directory in directories:
        if not _complete_cache(directory):
            raise DataError(f"{directory} is not a complete teacher cache: build it first with its own "
                            f"`--teacher-cache {directory} --corpus ... --cache-only` run.")
    return TeacherCacheMix([TeacherCache.open(directory) for directory in directories])


def _complete_cache_shape(directory: Path, seq_len: int | None, sequences: int | None) -> tuple[int, int]:
    """(sequence length, sequences) of training on the complete teacher cache in ``directory``: the cache's own.
    A different --sequences is refused (a complete cache is not extended; steps are its sequences x --epochs);
    a different --seq-len is kept, to be refused with the cache's when it is opened."""
    from offload_engine.predictor.data import DataError
    from offload_engine.predictor.teacher_cache import TeacherCache

    cache = TeacherCache.open(directory)
    if sequences is not None and sequences != len(cache):
        raise DataError(f"{directory} is a complete teacher cache of {len(cache)} sequences, not --sequences "
                        f"{sequences}: drop --sequences (each epoch visits its {len(cache)}), or build another cache.")
    return (cache.seq_len if seq_len is None else seq_len), len(cache)


def _complete_cache(directory: Path | None) -> bool:
    """Whether ``directory`` is a finished teacher cache (a stopped build is finished by the build path)."""
    from offload_engine.predictor.teacher_cache import TeacherCache

    return directory is not None and TeacherCache.is_complete(directory)


def _teacher_cache(console: Console, adapter, directory: Path, sequences, config, meta: dict, cache_rows: int,
                   cache_dtype: str):
    """Open the teacher cache in ``directory`` if it is complete, else build (or finish) it with a
    progress bar; refuse one made for another model or sequence length."""
    from offload_engine.predictor.network import PredictorConfig
    from offload_engine.predictor.teacher_cache import CacheSpec, TeacherCache, build_teacher_cache
    from offload_engine.predictor.training import cache_draw

    shape = PredictorConfig.for_model(adapter.dims).model_shape()
    spec = CacheSpec(model_name=meta["model_name"], model_shape=shape, seq_len=config.seq_len, rows=cache_rows,
                     dtype=cache_dtype, position_offsets=config.position_offsets, seed=config.seed,
                     lookahead=config.lookahead)
    if sequences.train.shape[0] == 0:
        cache = TeacherCache.open(directory)
        cache.check_model(meta["model_name"], shape, config.seq_len)
        return cache
    data = {key: meta["data"][key] for key in ("corpus", "paths", "mix", "recall")} | {"command": meta["command"]}
    progress = Progress(TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("cache", total=int(sequences.train.shape[0]))
        cache = build_teacher_cache(adapter, sequences.train, directory, spec, cache_draw(adapter, config, cache_rows),
                                    data=data, on_shard=lambda done, total: progress.update(task, completed=done))
    cache.check_model(meta["model_name"], shape, config.seq_len)
    console.print(f"teacher cache: {len(cache)} sequences, {cache.bytes_on_disk() / 2**30:.2f} GiB in {directory}")
    return cache


class _progress:
    """A rich progress bar (loss, tokens/s, ETA); plain log lines when not on a terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.last_log = 0.0
        self.tokens_per_s = None

    def __enter__(self):
        self.progress.start()
        return self.progress, self.on_step

    def __exit__(self, *exc):
        self.progress.stop()

    def on_step(self, stats) -> None:
        tps = stats.tokens_per_s
        self.tokens_per_s = tps if self.tokens_per_s is None else 0.9 * self.tokens_per_s + 0.1 * tps
        if self.task is None:
            self.task = self.progress.add_task("train", total=stats.steps, completed=stats.step - 1, loss=stats.loss, tps=tps)
        self.progress.update(self.task, completed=stats.step, loss=stats.loss, tps=self.tokens_per_s)
        now = time.monotonic()
        if not self.console.is_terminal and (now - self.last_log >= LOG_EVERY_S or stats.step == stats.steps):
            self.last_log = now
            self.console.print(f"step {stats.step}/{stats.steps} loss {stats.loss:.4f} lr {stats.lr:.2e} "
                               f"grad-norm {stats.grad_norm:.2f} {self.tokens_per_s:.0f} tok/s")


def _print_report(console: Console, report: dict, parameters: int, adapter) -> None:
    model_parameters = sum(p.numel() for p in adapter.model.parameters())
    console.print(f"predictor: {parameters:,} parameters, {100 * parameters / model_parameters:.2f}% of the model")
    if not report:
        console.print("no held-out text: no report (give --data more files or more text; on a complete teacher "
                      "cache without text: python -m tbrun_bench.predictor_report --predictor OUT ...).")
        return
    table = Table(title=f"held-out recall of oracle top-k attention mass (loss {report['loss']:.4f})")
    table.add_column("method")
    for budget in report["budgets"]:
        table.add_column(budget, justify="right")
    for method, values in report["recall"].items():
        table.add_row(method, *(f"{values[b]:.3f}" for b in report["budgets"]))
    console.print(table)
