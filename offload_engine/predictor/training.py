"""Distillation of a TokenButler predictor from a frozen model (method.md section 1).

Teacher: the model's causal attention per layer and head, on sampled query rows. Student: the
predictor's softmax over the same rows. Loss: cross-entropy averaged over consumer layers and
heads. AdamW, cosine schedule with linear warm-up, gradient-norm clipping, batch 1.

Checkpoints go to ``out/checkpoints/step-NNNNNN`` (each written atomically, the last few kept);
``resume=True`` continues from the newest one. At the end the final predictor is published to
``out`` itself, and the held-out report (``evaluation.evaluate``) is written to ``out/report.json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ConfigError, TbrunError
from ..models import ModelAdapter
from . import checkpoint as ckpt
from .data import TokenSequences
from .evaluation import evaluate
from .network import PredictorConfig, TokenButlerPredictor, pool_query_heads, widen_hidden
from .teacher import (RowState, candidate_distillation_loss, distillation_loss, mixed_distillation_loss,
                      row_states, sample_rows, teacher_probs)
from .teacher_cache import TeacherCache, TeacherCacheMix


class TrainingError(TbrunError):
    """Training cannot go on (NaN loss, a resume that does not match, ...)."""


NEWER_OPTIONS = ("rope_pairs", "rope_base", "candidate_sinks", "candidate_window")  # left out of resume keys unless used


@dataclass(slots=True)
class TrainConfig:
    """Sizes and optimisation settings of one distillation run."""

    seq_len: int = 1024
    steps: int = 500
    producer_every: int = 4
    dim: int = 16
    hidden: int = 512
    rope_pairs: int = 0  # pairs of d' the predictor rotates by position (network.PredictorConfig)
    rope_base: float = 10000.0
    query_heads: int = 0  # the predictor's query heads (network.PredictorConfig.query_heads); 0: the model's
    candidate_sinks: int = 0  # with candidate_window: distil on the selector's candidates only
    candidate_window: int = 0  # (teacher.candidate_distillation_loss); 0 and 0: every position
    rows: int = 256  # sampled query rows per sequence (plus the last row)
    lookahead: int = 1  # teacher of a row: the mean attention of it and the next lookahead - 1 rows (teacher.row_states)
    lr: float = 1e-3
    warmup: float = 0.1  # fraction of steps with linear warm-up
    weight_decay: float = 0.0
    clip: float = 10.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    held_out: int = 8  # held-out sequences in the final report
    eval_rows: int = 64
    position_offsets: bool = True  # shift each sequence to a random start position (see train)
    seed: int = 0
    teacher_cache: str = ""  # identity of the teacher cache trained on ("" = teacher in the loop)
    data: str = ""  # digest of the training text's description (teacher in the loop; a cache pins its own)
    init: str = ""  # sha256 of the weights training started from ("": a random init)

    def __post_init__(self) -> None:
        for name in ("seq_len", "steps", "rows", "checkpoint_every", "keep_checkpoints", "eval_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.query_heads < 0:
            raise ConfigError(f"--query-heads must be >= 1 (or 0 for the model's), got {self.query_heads}.")
        if self.candidate_sinks < 0 or self.candidate_window < 0:
            raise ConfigError("--candidate-sinks and --candidate-window must be >= 0.")
        if not 0 <= 2 * self.rope_pairs <= self.dim:
            raise ConfigError(f"--rope-pairs {self.rope_pairs}: rotate between 0 and d'/2 = {self.dim // 2} pairs "
                              f"of the predictor's --dim {self.dim}.")
        if self.lookahead < 1:
            raise ConfigError(f"--lookahead must be >= 1, got {self.lookahead}.")
        if self.lookahead > 1 and (self.rope_pairs or self.candidates):
            raise ConfigError("--lookahead > 1 trains on the teacher's mixed keys: it cannot be combined with "
                              "--rope-pairs or --candidate-sinks/--candidate-window.")
        if self.seq_len < 4:
            raise ConfigError(f"--seq-len {self.seq_len} is too short to distil attention: use 256 or more.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}.")
        if not 0.0 <= self.warmup < 1.0 or not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError("warm-up must be in [0, 1) and the gradient clip positive and finite.")
        if self.held_out < 0:
            raise ConfigError(f"--held-out must be >= 0, got {self.held_out}.")

    @property
    def candidates(self) -> tuple[int, int] | None:
        """(sinks, window) the loss leaves out, or None to distil every position."""
        return (self.candidate_sinks, self.candidate_window) if self.candidate_sinks or self.candidate_window else None

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the run it continues."""
        keys = ("seq_len", "steps", "producer_every", "dim", "hidden", "rope_pairs", "rows", "lr", "warmup",
                "position_offsets", "seed", "teacher_cache")
        keys += ("rope_base", "candidate_sinks", "candidate_window")
        keys = tuple(key for key in keys if key not in NEWER_OPTIONS or self.rope_pairs or self.candidates)  # older runs resume
        keys += ("lookahead",) if self.lookahead > 1 else ()  # newer too: runs before it resume
        keys += ("query_heads",) if self.query_heads else ()
        keys += tuple(key for key in ("data", "init") if getattr(self, key))
        return {k: getattr(self, k) for k in keys}


@dataclass(slots=True)
class StepStats:
    """What the progress display shows after each step."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float
    grad_norm: float


@dataclass(slots=True)
class TrainResult:
    predictor: TokenButlerPredictor
    out_dir: Path
    report: dict = field(default_factory=dict)
    resumed_from: int = 0


def warmup_cosine(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up over ``warmup * steps``, then cosine to zero."""
    warm = max(1, int(round(warmup * steps))) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def distill_step(predictor: TokenButlerPredictor, adapter: ModelAdapter, ids: torch.Tensor, rows: torch.Tensor,
                 offset: int = 0, candidates: tuple[int, int] | None = None, lookahead: int = 1) -> float:
    """Accumulate the gradients of one sequence's loss with the teacher in the loop; return the loss.

    ids ``[1, T]`` at positions ``offset ..``, rows ``[R]``; ``lookahead``: see ``teacher.row_states``.
    """
    return distill_layers(predictor, row_states(adapter, ids, rows, offset, lookahead), rows, adapter.scaling, offset,
                          candidates=candidates)


def distill_layers(predictor: TokenButlerPredictor, states: Iterable[RowState], rows: torch.Tensor, scaling: float,
                   offset: int = 0, teacher_queries: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                   candidates: tuple[int, int] | None = None) -> float:
    """Accumulate the gradients of one sequence's loss from its teacher ``RowState`` stream (layer 0
    first, from the model or from a teacher cache); return the loss.

    rows ``[R]``: the positions of the sampled query rows within the sequence, which starts at position
    ``offset``. Each consumer layer's loss is back-propagated at once (into a detached copy of its
    producer's queries, flushed into the query network after the producer's last consumer), so one
    layer's ``[H, R, T]`` is alive at a time.

    A predictor that rotates by position (``rope_pairs``) cannot use the teacher's mixed keys (its keys
    turn with their position, so the sum over tokens no longer factors through the projection): it is
    trained on the teacher's rows themselves, from the state's queries or, for a teacher cache (which
    keeps the attention input ``x``), from ``teacher_queries(layer, x_rows) -> q [H, R, D]``. So is one
    distilled on the selector's candidates only (``candidates`` = (sinks, window) the engine keeps
    anyway; ``teacher.candidate_distillation_loss``).
    """
    config = predictor.config
    consumers = config.num_layers - 1
    scale = 1.0 / math.sqrt(config.dim)
    positional = config.uses_positions
    explicit = positional or candidates is not None  # the teacher's rows, not its mixed keys
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    total = 0.0
    for state in states:
        layer = state.layer
        if layer >= 1:
            rows_dev = rows.to(state.k.device)
            producer = config.producer_of(layer)
            queries, leaf = pending[producer]
            layer_queries = leaf[:, layer - producer - 1]  # [R, Hq, d']
            logits = predictor.head_scores(layer_queries, predictor.project_keys(layer, state.k, offset))
            if explicit:
                q = state.q if state.q is not None else _teacher_queries(teacher_queries, layer, state.x)
                probs = predictor.pool_heads(teacher_probs(q, state.k, rows_dev, scaling))  # [Hq, R, T]
                loss = (candidate_distillation_loss(probs, logits, rows_dev, *candidates) if candidates is not None
                        else distillation_loss(probs, logits, rows_dev)) / consumers
            else:
                mix = predictor.pool_heads(state.teacher_mix(rows_dev, scaling))  # [Hq, R, D]
                target = predictor.project_head_rows(layer, mix)  # [Hq, R, d']
                loss = mixed_distillation_loss(logits, layer_queries.transpose(0, 1), target, rows_dev, scale) / consumers
            loss.backward()
            total += loss.item()
            if layer == config.consumers(producer)[-1]:
                queries.backward(leaf.grad)
                del pending[producer]
        if predictor.is_producer(layer):
            positions = rows.to(state.x.device) + offset if positional else None
            queries = predictor.importance_queries(layer, state.x, positions)  # [R, G', Hq, d']
            pending[layer] = (queries, queries.detach().requires_grad_())
    return total


def cached_step(predictor: TokenButlerPredictor, cache: TeacherCache | TeacherCacheMix, index: int, rows: int,
                scaling: float, generator: torch.Generator, adapter: ModelAdapter | None = None,
                candidates: tuple[int, int] | None = None) -> float:
    """``distill_layers`` on shard ``index`` of a teacher cache, on ``rows`` of its cached rows (drawn
    with ``generator``, the last row always kept) or all of them if it holds no more. A predictor that
    rotates by position needs ``adapter`` (the teacher's queries are recomputed from the cached ``x``)."""
    shard = cache.load(index)
    pick = subsample_rows(shard.rows.numel(), rows, generator)
    positions = shard.rows if pick is None else shard.rows[pick]
    device = predictor.key_proj.device
    recompute = None
    if predictor.config.uses_positions or candidates is not None:
        if adapter is None:
            raise ValueError("a predictor with rope_pairs, or distilled on candidates, trains on a teacher cache "
                             "only with the model (adapter): it recomputes the teacher's rows")
        recompute = functools.partial(teacher_queries_from_x, adapter, positions + shard.offset)
    return distill_layers(predictor, shard.states(pick, device), positions, scaling, shard.offset, recompute,
                          candidates)


def teacher_queries_from_x(adapter: ModelAdapter, positions: torch.Tensor, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The model's post-RoPE queries ``[H, R, D]`` of attention inputs x ``[R, E]`` at absolute ``positions`` ``[R]``."""
    with torch.no_grad():
        x = x.to(adapter.device, adapter.dtype).unsqueeze(0)
        rope = adapter.rope(x, positions.to(adapter.device).unsqueeze(0))
        q, _, _ = adapter.qkv(layer, x, rope)
    return q[0]


def _teacher_queries(recompute, layer: int, x: torch.Tensor) -> torch.Tensor:
    if recompute is None:
        raise ValueError("the teacher's rows are needed: give states with q, or teacher_queries")
    return recompute(layer, x)


def subsample_rows(cached: int, wanted: int, generator: torch.Generator) -> torch.Tensor | None:
    """Indices of ``wanted`` of ``cached`` rows plus the last one, sorted; None to take them all."""
    if wanted + 1 >= cached:
        return None
    chosen = torch.randperm(cached - 1, generator=generator)[:wanted].sort().values
    return torch.cat([chosen, torch.tensor([cached - 1])])


def check_init_shape(have: PredictorConfig, want: PredictorConfig) -> None:
    """Refuse an ``--init`` predictor whose shape is not this run's. Two differences are taken (``adapt_init``):
    more query heads than this run's (it starts from their means) and a narrower query MLP (widened)."""
    if (replace(have, query_heads=want.query_heads, hidden=want.hidden) != want or have.query_heads % want.query_heads
            or have.hidden > want.hidden):
        raise TrainingError(f"--init is a predictor of another shape ({have}) than this run's ({want}): give the "
                            "same --producer-every, --dim and --rope-pairs, --hidden no smaller and --query-heads no "
                            "more than its own (dividing them), or another --init.")


def adapt_init(start: TokenButlerPredictor, shape: PredictorConfig) -> TokenButlerPredictor:
    """``start`` (checked by ``check_init_shape``) made into a predictor of ``shape``: its query heads pooled
    (``pool_query_heads``), then its query MLPs widened (``widen_hidden``)."""
    return widen_hidden(pool_query_heads(start, shape.query_heads), shape.hidden)


def train(
    adapter: ModelAdapter,
    data: TokenSequences,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    meta: dict | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    cache: TeacherCache | TeacherCacheMix | None = None,
    init_from: TokenButlerPredictor | None = None,
) -> TrainResult:
    """Distil a predictor for ``adapter``'s model; checkpoints and report in ``out_dir``.

    The teacher is the model itself, run on ``data.train`` at every step, or, with ``cache``, the
    stored teacher outputs of ``cache`` (epoch after epoch over its shards, each epoch in its own
    seeded order); ``data.held_out`` feeds the final report either way. ``init_from``: a predictor
    of the same shape to start from (fine-tuning) instead of a random init.
    """
    out = Path(out_dir)
    if cache is None:
        _check_sequences(adapter, data, config)
    elif cache.lookahead != config.lookahead:
        raise ConfigError(f"the teacher cache holds targets of --lookahead {cache.lookahead}, not "
                          f"{config.lookahead}: pass --lookahead {cache.lookahead} or build another cache.")
    torch.manual_seed(config.seed)
    shape = PredictorConfig.for_model(adapter.dims, config.producer_every, config.dim, config.hidden, config.rope_pairs,
                                      config.rope_base, config.query_heads or None)
    predictor = TokenButlerPredictor(shape).to(adapter.device)
    if init_from is not None:
        check_init_shape(init_from.config, shape)
        predictor.load_state_dict(adapt_init(init_from, shape).state_dict())
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup))
    check_out_dir(out, resume)
    start = _restore(out, config, predictor, optimizer, schedule) if resume else 0
    meta = {"commit": ckpt.current_commit(), **(meta or {}), "train": asdict(config)}  # the commit trained from
    order = None if cache is not None else torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(config.seed))
    last_good = ckpt.checkpoint_dirs(out)[-1] if start else None
    for step in range(start, config.steps):
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        predictor.train()
        if cache is None:
            ids = data.train[order[step % len(order)]].unsqueeze(0)
            rows = sample_rows(config.seq_len, config.rows, generator)
            offset = random_offset(adapter, config, generator)
            loss = distill_step(predictor, adapter, ids, rows, offset, config.candidates, config.lookahead)
        else:
            loss = cached_step(predictor, cache, epoch_order(len(cache), step, config.seed), config.rows,
                               adapter.scaling, generator, adapter, config.candidates)
        norm = float(torch.nn.utils.clip_grad_norm_(predictor.parameters(), config.clip))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingError(_nan_message(step + 1, loss, norm, last_good))
        optimizer.step()
        schedule.step()
        if on_step is not None:
            elapsed = time.perf_counter() - began
            on_step(StepStats(step + 1, config.steps, loss, schedule.get_last_lr()[0], config.seq_len / elapsed, norm))
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            last_good = _save_step(out, step + 1, predictor, optimizer, schedule, config, meta)
    predictor.eval()
    report = evaluate(predictor, adapter, data.held_out, rows=config.eval_rows, seed=config.seed) if len(data.held_out) else {}
    final = last_good if last_good is not None else _save_step(out, config.steps, predictor, optimizer, schedule, config, meta)
    ckpt.publish(final, out)
    if report:
        write_json_atomic(out / "report.json", report)
    return TrainResult(predictor, out, report, start)


def epoch_order(shards: int, step: int, seed: int) -> int:
    """The shard step ``step`` trains on: epoch ``step // shards`` visits every shard once, in an
    order drawn from ``(seed, epoch)``, so a resumed run continues the same sequence of shards."""
    epoch, position = divmod(step, shards)
    order = torch.randperm(shards, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(order[position])


def random_offset(adapter: ModelAdapter, config: TrainConfig, generator: torch.Generator) -> int:
    """A start position in ``[0, max_positions - seq_len]`` (0 without ``position_offsets``).

    RoPE attention depends on relative positions only, so the teacher is the same at any offset,
    but the rotation phases of the keys the predictor projects are not. Trained at offset 0 only,
    a predictor learns the phases of positions ``0 .. seq_len`` and fails beyond them (recall at
    10% fell from 0.87 to 0.42 when the same text was shifted by 3072 positions); random offsets
    make it rely on what is position-independent, so it holds at any context the model supports.
    """
    room = adapter.dims.max_positions - config.seq_len
    if not config.position_offsets or room <= 0:
        return 0
    return int(torch.randint(0, room + 1, (1,), generator=generator))


def cache_draw(adapter: ModelAdapter, config: TrainConfig, cache_rows: int) -> Callable[[int], tuple[torch.Tensor, int]]:
    """What a teacher cache stores of sequence ``i``: ``cache_rows`` sampled query rows (plus the
    last) and a position offset, drawn from ``(seed, i)`` so a resumed build draws the same."""
    def draw(index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        return sample_rows(config.seq_len, cache_rows, generator), random_offset(adapter, config, generator)
    return draw


def check_seq_len(adapter: ModelAdapter, seq_len: int) -> None:
    """Refuse training sequences longer than the model's positions."""
    if seq_len > adapter.dims.max_positions:
        raise ConfigError(
            f"--seq-len {seq_len} is longer than the model supports ({adapter.dims.max_positions} "
            "positions): lower --seq-len."
        )


def _check_sequences(adapter: ModelAdapter, data: TokenSequences, config: TrainConfig) -> None:
    check_seq_len(adapter, config.seq_len)
    if data.train.shape[1] != config.seq_len:
        raise ConfigError(f"training sequences have length {data.train.shape[1]}, not --seq-len {config.seq_len}.")


def _nan_message(step: int, loss: float, norm: float, last_good: Path | None) -> str:
    kept = f"the last good checkpoint is kept at {last_good}" if last_good else "no checkpoint was written yet"
    return (
        f"training stopped at step {step}: the loss is {loss} and the gradient norm {norm} (not finite); "
        f"{kept}. Resume with --resume (the run is deterministic, so check the data) or lower --lr."
    )


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse, before the model loads, an --out that is a file or that holds an earlier run's checkpoints
    (without --resume) or a finished predictor: training would overwrite it."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file: give a folder for the predictor (new, or an earlier run's "
                            "to --resume).")
    if resume:
        return
    if ckpt.checkpoint_dirs(out):
        raise TrainingError(
            f"{out} already holds checkpoints of an earlier run: pass --resume to continue it, or choose "
            "another --out."
        )
    if out.is_dir() and any((out / name).exists() for name in (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME)):
        raise TrainingError(f"{out} already holds a trained predictor, which this run would overwrite: choose "
                            "another --out (or move that one away).")


def _restore(out: Path, config: TrainConfig, predictor, optimizer, schedule) -> int:
    """Load the newest checkpoint in ``out`` into the training objects; return its step."""
    found = ckpt.checkpoint_dirs(out)
    if not found:
        raise TrainingError(f"--resume: {out} holds no checkpoint to resume from; drop --resume to start afresh.")
    loaded, saved = ckpt.load_checkpoint(found[-1], device=next(predictor.parameters()).device)
    state = ckpt.load_train_state(found[-1])
    if state.get("resume_key") != config.resume_key():
        raise TrainingError(
            f"--resume: {found[-1]} was made with {state.get('resume_key')}, but this run asks for "
            f"{config.resume_key()}: use the same options, or another --out."
        )
    if loaded.config != predictor.config:
        raise TrainingError(f"--resume: {found[-1]} is a predictor of another shape; use another --out.")
    predictor.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"])


def _save_step(out: Path, step: int, predictor, optimizer, schedule, config: TrainConfig, meta: dict) -> Path:
    """Write ``out/checkpoints/step-NNNNNN`` atomically and drop the oldest beyond ``keep_checkpoints``."""
    state = {"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "resume_key": config.resume_key()}
    path = ckpt.save_checkpoint(out / "checkpoints" / f"step-{step:06d}", predictor, {**meta, "steps": step}, state)
    for old in ckpt.checkpoint_dirs(out)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(payload, stream, indent=2)
        stream.write("\n")
    os.replace(temp, path)
