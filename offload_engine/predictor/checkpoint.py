"""Predictor checkpoints: a directory holding safetensors weights and a JSON config beside them.

Layout of a checkpoint directory::

    config.json            format, predictor sizes, the model shape and name it was trained for,
                           training data and steps, the commit, and the weights' sha256
    predictor.safetensors  the weights (float32)
    train_state.pt         optional: optimizer, schedule and RNG state to resume training

Every write goes to a temporary directory beside the target, then is renamed into place, so a
killed process leaves either the old checkpoint or the new one, never a mixture. Loading verifies
the sha256 in ``config.json`` against the weights, so a torn or edited checkpoint is refused with a
clear message rather than producing silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import TbrunError
from ..files import replace_directory
from ..machine import REPO_ROOT, commit_at_start
from ..models import ModelDims
from .network import PredictorConfig, TokenButlerPredictor, describe_shape

FORMAT = "tbrun-tokenbutler-predictor"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "predictor.safetensors"
STATE_NAME = "train_state.pt"


class PredictorError(TbrunError):
    """A predictor checkpoint is missing, damaged, or made for another model."""


def save_checkpoint(
    directory: str | Path,
    predictor: TokenButlerPredictor,
    meta: dict | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write a complete checkpoint to ``directory`` atomically (replacing one that is there).

    ``meta``: free-form facts to keep in ``config.json`` (model name, data, steps, command ...).
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in predictor.state_dict().items()}
        save_file(weights, str(staging / WEIGHTS_NAME))
        if train_state is not None:
            torch.save(train_state, staging / STATE_NAME)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "predictor": predictor.config.to_dict(),
            "model_shape": predictor.config.model_shape(),
            "parameters": predictor.num_parameters(),
            "weights_sha256": _sha256(staging / WEIGHTS_NAME),
            "commit": meta.get("commit") if meta and "commit" in meta else current_commit(),
            **{k: v for k, v in (meta or {}).items() if k != "commit"},
        }
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _fsync_dir(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_config(directory: str | Path) -> dict:
    """The ``config.json`` of a checkpoint, checked for format; raises ``PredictorError``."""
    path = Path(directory)
    if not path.is_dir():
        raise PredictorError(f"predictor {str(path)!r} does not exist or is not a directory.")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise PredictorError(
            f"predictor {str(path)!r} has no {CONFIG_NAME}: it is not a tbrun predictor checkpoint, or a "
            "save was interrupted. Point --predictor at a directory written by `tbrun train-predictor`."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictorError(f"predictor {str(path)!r}: {CONFIG_NAME} is corrupted ({exc}).") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PredictorError(f"predictor {str(path)!r}: {CONFIG_NAME} is not a {FORMAT} config.")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise PredictorError(
            f"predictor {str(path)!r} has format version {config['format_version']}; this tbrun reads "
            f"up to {FORMAT_VERSION}: upgrade tbrun."
        )
    return config


def load_checkpoint(
    directory: str | Path, dims: ModelDims | None = None, device: str | torch.device = "cpu"
) -> tuple[TokenButlerPredictor, dict]:
    """Load a predictor (float32, eval mode) and its config; check it fits ``dims`` when given.

    ``directory``: a checkpoint, or a training output directory (see ``resolve_checkpoint_dir``).
    """
    path = resolve_checkpoint_dir(directory)
    config = read_config(path)
    if dims is not None:
        check_shape(config, dims, path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise PredictorError(f"predictor {str(path)!r} has no {WEIGHTS_NAME}: the checkpoint is incomplete.")
    if _sha256(weights_path) != config.get("weights_sha256"):
        raise PredictorError(
            f"predictor {str(path)!r}: {WEIGHTS_NAME} does not match the checksum in {CONFIG_NAME}; the "
            "checkpoint is corrupted or half-written. Use an earlier checkpoint or retrain."
        )
    try:
        predictor = TokenButlerPredictor(PredictorConfig(**config["predictor"]))
        state = load_file(str(weights_path))
        predictor.load_state_dict(state)
    except (SafetensorError, RuntimeError, TypeError, KeyError) as exc:
        raise PredictorError(f"predictor {str(path)!r} could not be loaded: {exc}") from None
    return predictor.to(device).eval(), config


def load_train_state(directory: str | Path) -> dict:
    """The training state saved beside a checkpoint's weights."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise PredictorError(f"checkpoint {str(directory)!r} has no training state to resume from.")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_shape(config: dict, dims: ModelDims, where: Path | str = "predictor") -> None:
    """Refuse a checkpoint whose model shape differs from ``dims``, naming both shapes."""
    want = PredictorConfig.for_model(dims).model_shape()
    have = config.get("model_shape", {})
    if have != want:
        trained = config.get("model_name") or "another model"
        raise PredictorError(
            f"predictor {str(where)!r} was trained for {trained} ({describe_shape(have) if have else '?'}) "
            f"but the model has {describe_shape(want)}: train one for this model with "
            "`tbrun train-predictor`."
        )


def current_commit() -> str:
    """The git commit of the source tree (``-dirty`` if modified) when this process first asked (at this
    module's import, before any model loads or teacher cache is built: a commit made during a training
    of hours is not the code that trained), or ``'unknown'``."""
    return commit_at_start(str(REPO_ROOT))


current_commit()  # asked at import: see above


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Flush the staged files to disk before the rename makes them visible."""
    for child in path.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete training checkpoints ``out_dir/checkpoints/step-NNNNNN``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / CONFIG_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A predictor directory, or a training output directory whose final predictor is missing
    (an interrupted run): then its latest complete checkpoint."""
    path = Path(path).expanduser()
    if (path / CONFIG_NAME).is_file():
        return path
    latest = checkpoint_dirs(path)
    if latest:
        return latest[-1]
    return path  # read_config explains what is wrong


def publish(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Copy a checkpoint's weights and config (not its training state) into ``out_dir``.

    Each file is replaced atomically, weights first and config last; the config carries the
    weights' checksum, so a process killed in between leaves a directory that loading refuses
    clearly, while ``out_dir/checkpoints`` still holds the complete checkpoint.
    """
    src, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        handle, temp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        os.close(handle)
        shutil.copyfile(src / name, temp)
        os.chmod(temp, 0o644)  # mkstemp makes it private
        os.replace(temp, out / name)
    return out
