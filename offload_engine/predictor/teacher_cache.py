"""The teacher, run once: what distillation needs of the frozen model, stored in on-disk shards.

Training with the teacher in the loop runs the whole model forward for every optimizer step
(seconds per step at 2k-8k tokens on a CPU). The predictor only ever reads, per layer, the
attention input of the sampled query rows, their queries and every token's post-RoPE keys; from
q and k the teacher's attention rows are recomputed exactly (``teacher.teacher_probs``), so storing
the ``[H, R, T]`` probabilities is not needed: the loss only reads the teacher's rows applied to the
keys, ``sum_t P[h, r, t] k_t`` (``teacher.teacher_mixed_keys``, ``D`` numbers per row and head).
One shard per sequence::

    DIR/manifest.json             format, model name and shape, sequence length, rows, dtype, data
    DIR/seq-000000.safetensors    rows [R] int64; x [L, R, E]; mixed [L-1, H, R, D]; k [L-1, KvH, T, D]

(``x`` at every layer, so one cache serves predictors with any producer spacing; ``mixed`` and ``k``
for the consumer layers ``1 .. L-1``; safetensors metadata holds the sequence's position offset.)
Each shard is written to a temporary file and renamed, so an interrupted build resumes at the
first missing shard and never leaves a torn one. Reading a shard returns the same ``RowState``
stream ``teacher.row_states`` yields (with the teacher already mixed into the keys), so the
training step is one function for both sources.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, TbrunError
from ..models import ModelAdapter
from .teacher import RowState, row_states

FORMAT = "tbrun-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TeacherCacheError(TbrunError):
    """A teacher cache is missing, damaged or made for another model or sequence length."""


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """What a cache holds; two caches with the same spec and data are interchangeable."""

    model_name: str
    model_shape: dict
    seq_len: int
    rows: int  # sampled query rows per sequence (plus the last row)
    dtype: str = "float16"
    position_offsets: bool = True
    seed: int = 0
    lookahead: int = 1  # the teacher of a row is the mean attention of the next ``lookahead`` rows (teacher.row_states)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--cache-dtype {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        if self.lookahead < 1:
            raise ConfigError(f"--lookahead must be >= 1, got {self.lookahead}.")
        if self.seq_len < 4 or self.rows < 1:
            raise ConfigError(f"a teacher cache needs --seq-len >= 4 and --rows >= 1, got {self.seq_len} and {self.rows}.")


def spec_record(spec: CacheSpec) -> dict:
    """The manifest's ``spec``: every field, but ``lookahead`` only when it is not 1 (so the caches built
    before it existed keep their identity and are still recognised as the same build)."""
    record = asdict(spec)
    if record["lookahead"] == 1:
        del record["lookahead"]
    return record


def shard_name(index: int) -> str:
    return f"seq-{index:06d}.safetensors"


def shard_path(directory: Path, index: int) -> Path:
    return directory / shard_name(index)


def sequence_tensors(states: Iterator[RowState], rows: torch.Tensor, dtype: torch.dtype, scale: float
                     ) -> dict[str, torch.Tensor]:
    """One sequence's shard tensors from the teacher's ``RowState`` stream (layer 0 first); ``scale``
    is the model's attention scaling."""
    xs, mixed, ks = [], [], []
    for state in states:
        xs.append(state.x.to("cpu", dtype))
        if state.layer >= 1:
            mixed.append(state.teacher_mix(rows.to(state.k.device), scale).to("cpu", dtype))
            ks.append(state.k.to("cpu", dtype))
    return {"rows": rows.to("cpu", torch.long).contiguous(), "x": torch.stack(xs).contiguous(),
            "mixed": torch.stack(mixed).contiguous(), "k": torch.stack(ks).contiguous()}


def shard_bytes(spec: CacheSpec, heads: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of one shard: x ``[L, R, E]``, mixed ``[L-1, H, R, D]``, k ``[L-1, KvH, T, D]`` (R rows + the last)."""
    shape = spec.model_shape
    layers, rows = shape["num_layers"], spec.rows + 1
    items = layers * rows * shape["hidden_size"] + (layers - 1) * head_dim * (heads * rows + kv_heads * spec.seq_len)
    return items * DTYPES[spec.dtype].itemsize


def check_disk(directory: Path, needed: int) -> None:
    """Refuse a build whose shards would not fit on the disk, before the model runs once."""
    free = shutil.disk_usage(directory).free
    if needed > 0.95 * free:
        raise TeacherCacheError(
            f"the teacher cache needs about {needed / 2**30:.1f} GiB in {directory}, and {free / 2**30:.1f} GiB are free: "
            "use fewer --sequences, fewer --cache-rows, --cache-dtype float16, or another folder."
        )


def write_shard(path: Path, tensors: dict[str, torch.Tensor], offset: int) -> None:
    """Write one shard atomically (temporary file in the same folder, then a rename)."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata={"offset": str(offset)})
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def build_teacher_cache(
    adapter: ModelAdapter,
    sequences: torch.Tensor,
    directory: str | Path,
    spec: CacheSpec,
    draw_rows: Callable[[int], tuple[torch.Tensor, int]],
    data: dict | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> "TeacherCache":
    """Run the teacher over ``sequences`` ``[N, T]`` once, a shard each; resume where a build stopped.

    ``draw_rows(i)`` -> (rows ``[R]``, position offset) for sequence ``i`` (seeded by the caller, so a
    resumed build draws what the first one would have). ``on_shard(done, total)`` reports progress.
    A folder holding a cache of another spec is refused, never overwritten.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec_record(spec), "data": data or {},
                "sequences": int(sequences.shape[0]), "sequences_sha256": sequences_digest(sequences)}
    _claim(out, manifest)
    dtype = DTYPES[spec.dtype]
    total = int(sequences.shape[0])
    missing = sum(not shard_path(out, i).exists() for i in range(total))
    check_disk(out, missing * shard_bytes(spec, adapter.dims.num_heads, adapter.dims.num_kv_heads, adapter.dims.head_dim))
    for index in range(total):
        path = shard_path(out, index)
        rows, offset = draw_rows(index)
        if not path.exists():
            states = row_states(adapter, sequences[index].unsqueeze(0), rows, offset, spec.lookahead)
            write_shard(path, sequence_tensors(states, rows, dtype, adapter.scaling), offset)
        if on_shard is not None:
            on_shard(index + 1, total)
    return TeacherCache.open(out)


def sequences_digest(sequences: torch.Tensor) -> str:
    """sha256 of the token ids ``[N, T]`` a cache is built from (int64, row-major)."""
    import hashlib

    return hashlib.sha256(sequences.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _claim(out: Path, manifest: dict) -> None:
    """Write the manifest of a new cache, or check that the one in ``out`` is the same cache."""
    path = out / MANIFEST
    if path.exists():
        found = _read_manifest(path)
        # the build first (model, sequence length, rows, ...: what the user sees), then the text it was cut from
        if found.get("spec") != manifest["spec"] or found.get("sequences") != manifest["sequences"]:
            raise TeacherCacheError(
                f"{out} holds a teacher cache of another build ({_describe(found)}), not {_describe(manifest)}: "
                "choose another --teacher-cache folder, or delete that one to rebuild it."
            )
        other_text = found.get("sequences_sha256", manifest["sequences_sha256"]) != manifest["sequences_sha256"]
        if other_text:
            raise TeacherCacheError(
                f"{out} holds a teacher cache built from other training text (another --corpus, --data, --mix, --recall or "
                "--seed): choose another --teacher-cache folder, or delete that one to rebuild it."
            )
        return
    handle, temp = tempfile.mkstemp(prefix=".manifest.", dir=out)
    with os.fdopen(handle, "w") as stream:
        json.dump(manifest, stream, indent=2)
        stream.write("\n")
    os.replace(temp, path)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TeacherCacheError(f"{path} is not a readable teacher-cache manifest ({error}): rebuild the cache.") from error
    if manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{path} is not a tbrun teacher cache (format {manifest.get('format')!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherCacheError(f"{path} is teacher-cache format {manifest.get('format_version')}, this tbrun reads "
                                f"{FORMAT_VERSION}: rebuild the cache.")
    return manifest


def _describe(manifest: dict) -> str:
    spec = manifest.get("spec", {})
    ahead = f", lookahead {spec['lookahead']}" if spec.get("lookahead", 1) != 1 else ""
    return (f"model {spec.get('model_name')}, {manifest.get('sequences')} sequences of {spec.get('seq_len')} tokens, "
            f"{spec.get('rows')} rows, {spec.get('dtype')}{ahead}")


def cache_identity(cache: "TeacherCache") -> str:
    """A short name of a cache's build (spec, sequences and the digest of their tokens), recorded by the training
    run that uses it (a resumed run must train on the same cache)."""
    import hashlib

    identity = {"spec": cache.manifest["spec"], "sequences": len(cache)}
    if "sequences_sha256" in cache.manifest:  # the text it was built from: two corpora are two caches
        identity["sequences_sha256"] = cache.manifest["sequences_sha256"]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cache.spec.model_name}-{len(cache)}x{cache.spec.seq_len}-{digest}"


@dataclass(slots=True)
class CachedSequence:
    """One shard in memory: rows ``[R]``, x ``[L, R, E]``, mixed ``[L-1, H, R, D]``, k ``[L-1, KvH, T, D]``."""

    rows: torch.Tensor
    offset: int
    x: torch.Tensor
    mixed: torch.Tensor
    k: torch.Tensor

    def states(self, pick: torch.Tensor | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Iterator[RowState]:
        """The ``RowState`` stream of this sequence, layer 0 first, restricted to row indices ``pick``
        (indices into ``rows``; all rows when None), as ``dtype`` on ``device``."""
        index = slice(None) if pick is None else pick
        for layer in range(self.x.shape[0]):
            x = self.x[layer, index].to(device, dtype)
            if layer == 0:
                yield RowState(0, x)
                continue
            yield RowState(layer, x, k=self.k[layer - 1].to(device, dtype),
                           mixed_keys=self.mixed[layer - 1][:, index].to(device, dtype))


class TeacherCache:
    """A finished (or growing) cache folder: ``len(cache)`` shards, read one at a time."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self.spec = CacheSpec(**manifest["spec"])

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        """Whether ``directory`` holds a finished cache: a readable manifest and every shard it names. A build
        that stopped has its manifest (written first) but not every shard: running its command again finishes it."""
        path = Path(directory)
        try:
            manifest = _read_manifest(path / MANIFEST)
        except TeacherCacheError:
            return False
        return all(shard_path(path, i).exists() for i in range(int(manifest.get("sequences", 0))))

    @classmethod
    def open(cls, directory: str | Path) -> "TeacherCache":
        path = Path(directory)
        if not (path / MANIFEST).exists():
            raise TeacherCacheError(f"{path} holds no teacher cache ({MANIFEST} missing): build one with "
                                    "`tbrun train-predictor --teacher-cache DIR --corpus ...`.")
        cache = cls(path, _read_manifest(path / MANIFEST))
        missing = [i for i in range(len(cache)) if not shard_path(path, i).exists()]
        if missing:
            raise TeacherCacheError(f"{path} misses {len(missing)} of its {len(cache)} shards (first: "
                                    f"{shard_name(missing[0])}): run the same command again to finish building it.")
        return cache

    @property
    def lookahead(self) -> int:
        return self.spec.lookahead

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    def __len__(self) -> int:
        return int(self.manifest["sequences"])

    def check_model(self, model_name: str, model_shape: dict, seq_len: int | None = None) -> None:
        """Refuse a cache made for another model or sequence length (before any training)."""
        spec = self.spec
        if spec.model_shape != model_shape or spec.model_name != model_name:
            raise TeacherCacheError(
                f"the teacher cache in {self.directory} was made for {spec.model_name} ({spec.model_shape}), not for "
                f"{model_name} ({model_shape}): build a cache for this model in another folder."
            )
        if seq_len is not None and seq_len != spec.seq_len:
            raise TeacherCacheError(
                f"the teacher cache in {self.directory} holds sequences of {spec.seq_len} tokens, not --seq-len "
                f"{seq_len}: pass --seq-len {spec.seq_len} or build another cache."
            )

    def load(self, index: int) -> CachedSequence:
        path = shard_path(self.directory, index)
        try:
            with safe_open(str(path), framework="pt") as shard:
                offset = int(shard.metadata().get("offset", "0"))
                tensors = {name: shard.get_tensor(name) for name in ("rows", "x", "mixed", "k")}
        except (OSError, SafetensorError) as error:
            raise TeacherCacheError(f"{path} cannot be read ({error}): delete it and run the build again.") from error
        return CachedSequence(offset=offset, **tensors)

    def describe(self) -> dict:
        """What a training run records of the cache: its spec, size, identity and training text (its corpus by
        name, version and hash, and the command that built it)."""
        return {"spec": self.manifest["spec"], "sequences": len(self), "id": cache_identity(self),
                "data": self.manifest.get("data", {})}

    def bytes_on_disk(self) -> int:
        return sum(shard_path(self.directory, i).stat().st_size for i in range(len(self)))


class TeacherCacheMix:
    """Several complete teacher caches of one model trained on as one (``--teacher-cache A --teacher-cache
    B``): shard ``i`` of the mix is shard ``i - start`` of the cache it falls in, so an epoch's random order
    (``training.epoch_order``) takes turns between the caches' lengths and position rules, e.g. 1k
    sequences at position 0 and 4k sequences at random offsets in one run."""

    def __init__(self, caches: list[TeacherCache]):
        if len(caches) < 2:
            raise ConfigError("a mix of teacher caches needs two or more; train on a single cache as it is.")
        first = caches[0]
        for cache in caches[1:]:
            cache.check_model(first.spec.model_name, first.spec.model_shape)
            if cache.spec.lookahead != first.spec.lookahead:
                raise TeacherCacheError(
                    f"the teacher caches in {first.directory} and {cache.directory} hold targets of --lookahead "
                    f"{first.spec.lookahead} and {cache.spec.lookahead}: mix caches of one lookahead.")
        self.caches = caches
        self.starts = [0]
        for cache in caches:
            self.starts.append(self.starts[-1] + len(cache))

    @property
    def lookahead(self) -> int:
        return self.caches[0].lookahead

    @property
    def seq_len(self) -> int:
        """The longest sequence in the mix."""
        return max(cache.spec.seq_len for cache in self.caches)

    def __len__(self) -> int:
        return self.starts[-1]

    def check_model(self, model_name: str, model_shape: dict, seq_len: int | None = None) -> None:
        for cache in self.caches:
            cache.check_model(model_name, model_shape)

    def load(self, index: int) -> CachedSequence:
        if not 0 <= index < len(self):
            raise IndexError(f"shard {index} of a mix of {len(self)}")
        which = bisect.bisect_right(self.starts, index) - 1
        return self.caches[which].load(index - self.starts[which])

    def describe(self) -> list[dict]:
        """Each cache's ``TeacherCache.describe``, in order (recorded by the training run)."""
        return [cache.describe() for cache in self.caches]

    def bytes_on_disk(self) -> int:
        return sum(cache.bytes_on_disk() for cache in self.caches)
