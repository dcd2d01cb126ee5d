"""The engine: prefill layer by layer, then decode token by token through a KV backend.

The engine owns no KV tensor. For each sequence it builds the backend of the configured mode
(dense on device, dense offload, sparse offload), drives it layer by layer, and closes it when
the sequence ends, on success, error or Ctrl-C alike, so pinned host memory never leaks.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from . import native
from .attention import decode_attention, prefill_attention
from .backends.base import KVBackend
from .backends.dense_device import DenseDeviceKV
from .backends.dense_offload import DenseOffloadKV
from .backends.sparse_offload import SparseOffloadKV
from .config import EngineConfig, KVMode, SamplingConfig, check_refresh_layers
from .errors import ConfigError, DeviceUnavailableError
from .memory import dtype_name
from .models import ModelAdapter
from .policies import build_policy
from .policies.base import Policy, shared_prefill_observations
from .profiling import PhaseClock, timed_breakdown
from .selection.planner import check_keep_bonus
from .sampling import sample_next
from .stats import GenerationStats, peak_device_bytes, peak_host_bytes

TokenCallback = Callable[[int], None]
ProgressCallback = Callable[[int, int], None]


@dataclass(slots=True)
class GenerationResult:
    """Generated ``token_ids`` (prompt excluded), their ``text``, and how they were made."""

    token_ids: list[int]
    text: str
    prompt_ids: list[int]
    finish_reason: str  # "eos", "length", "context" or "interrupted"
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass(slots=True)
class ContinuationScore:
    """Teacher-forced scoring of a continuation.

    ``logprobs [N]`` float32, ``predicted [N]`` long (greedy choice at each position), and
    ``logits [N, V]`` float32 when asked for with ``keep_logits``.
    """

    logprobs: torch.Tensor
    predicted: torch.Tensor
    logits: torch.Tensor | None = None
    attended_share: float | None = None  # with EngineConfig.count_attended, sparse offload only


def resolve_device(name: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> a device, refusing CUDA where there is none."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("--device cuda was asked for but this machine has no CUDA GPU: use --device cpu.")
    return device


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of ``text``, wrapped in the tokenizer's chat template when ``chat`` and it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]
    return list(tokenizer(text)["input_ids"])


@dataclass(slots=True)
class PrefillLayer:
    """One layer's prompt tensors as the backend received them: x ``[T, E]``, q ``[H, T, D]``,
    k, v ``[KvH, T, D]`` (q and k post-RoPE)."""

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass(slots=True)
class PrefillRecord:
    """A dense prefill of ``prompt``, kept so that any mode and policy can start from it.

    The prefill does not depend on the policy (it is dense), so ``Engine.generate`` and
    ``Engine.score_continuation`` given ``prefill=record`` hand the recorded tensors of each layer to
    a fresh backend (which replays every policy's ``observe_prefill``) instead of running the model.
    ``logits [V]``: the last prompt position's. ``observations``: what policies derived from the
    tensors (SnapKV's observation-window vote, H2O's accumulated prompt attention), computed by the
    first policy that needs them and reused by the others (``policies.base.shared_prefill``).
    """

    prompt: tuple[int, ...]
    layers: list[PrefillLayer]
    logits: torch.Tensor
    seconds: float
    observations: dict = field(default_factory=dict)
    # a tile's record (``synthetic_kv_tile``): each layer's k (and q, once a replay reads it) before RoPE, made
    # at the first replay (``Engine._tiled_store``), KvH D (H D) numbers per token and layer, kept per replaying
    # adapter, dtype, device and prefill chunk (``Engine._tile_owner``): another engine never reads them
    tile_before_rope: dict = field(default_factory=dict)
    # a tile's record, per replaying engine (``Engine._tile_owner``) and length: each layer's k turned by RoPE to
    # its positions and v repeated, ``[KvH, length, D]`` each, kept from the first replay of that length where
    # host memory allows (``tile_fill_fits``), so that the next modes and rounds copy them instead of turning
    # and repeating the tile again (30% of a fill, profiled at 64k)
    tile_filled: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the recorded tensors (and of a tile's q and k before RoPE and its filled k and v, once
        replayed)."""
        recorded = sum(t.nbytes for layer in self.layers for t in (layer.x, layer.q, layer.k, layer.v))
        kept = [t for kind in (self.tile_before_rope, self.tile_filled) for layers in kind.values()
                for pair in layers.values() for t in pair if t is not None]
        return recorded + sum(t.nbytes for t in kept)


# A tile's filled k and v of one length are kept only while host memory has this many times their bytes free:
# room for the replaying backend's own cache of the same size, its copies, and the rest of the process.
TILE_FILL_HEADROOM = 3


def tile_fill_fits(layers: int, kv_heads: int, length: int, head_dim: int, itemsize: int, available: int) -> bool:
    """Whether a tile's k and v filled to ``length`` for ``layers`` layers (``2 * layers * kv_heads * length *
    head_dim * itemsize`` bytes) may be kept with ``available`` bytes of host memory free."""
    return TILE_FILL_HEADROOM * 2 * layers * kv_heads * length * head_dim * itemsize <= available


class _RecordingKV(KVBackend):
    """A backend that keeps each layer's prefill tensors (for ``Engine.record_prefill``)."""

    def __init__(self) -> None:
        self.layers: list[PrefillLayer] = []

    def prefill_layer(self, layer, x, q, k, v):
        self.layers.append(PrefillLayer(x, q, k, v))


class Engine:
    """Generation with the KV cache where ``config.mode`` puts it. Batch size 1."""

    def __init__(self, adapter: ModelAdapter, config: EngineConfig, policy: Policy | None = None,
                 gather_method: str | None = None):
        self.adapter, self.config = adapter, config
        self.device = resolve_device(config.device)
        if adapter.device.type != self.device.type:
            raise ConfigError(f"the model is on {adapter.device} but the engine was asked for {self.device}: "
                              "load the model on the same device.")
        positions = adapter.dims.max_positions
        if config.context > positions and not config.allow_rope_scaling:
            raise ConfigError(
                f"--context {config.context} is longer than the {positions} positions the model was trained "
                "for: lower --context, or opt in to RoPE extrapolation with --allow-rope-scaling."
            )
        check_refresh_layers(config.selection.refresh_layers, adapter.dims.num_layers)
        self.policy = None
        if config.mode is KVMode.SPARSE_OFFLOAD:
            self.policy = policy if policy is not None else build_policy(config.selection.policy)
            check_keep_bonus(config.selection.keep_bonus, self.policy)
        self.gather_method = gather_method
        self.eos_ids = _eos_ids(adapter)
        if self.device.type == "cpu":
            native.kernels()  # built now (once per machine, seconds), not in the middle of the first decode step

    @property
    def policy_name(self) -> str:
        if self.policy is None:
            return "dense"
        return getattr(self.policy, "label", self.policy.name)  # wrappers: "critical(quest)"

    @property
    def predictor_source(self) -> str:
        """The predictor that selects (a checkpoint's folder and weights hash), or "" for a policy without one;
        a wrapper's (critical) is its base's."""
        return getattr(self._scoring_policy, "predictor_source", "")

    @property
    def compact_key_dtype(self) -> str:
        """How the predictor's compact cache stores projected keys (``int8``, ``bfloat16``, ``float32``) once the
        backend has bound the policy, or "" for a policy without one."""
        stored = getattr(self._scoring_policy, "stored_key_dtype", None)
        return dtype_name(stored) if stored is not None else ""

    @property
    def _scoring_policy(self) -> Policy | None:
        """The policy that scores: a wrapper's (critical) base, else the policy itself (None for dense)."""
        return getattr(self.policy, "base", self.policy)

    # ------------------------------------------------------------------------------ public
    def record_prefill(self, prompt_ids) -> PrefillRecord:
        """Run the model's dense prefill of ``prompt_ids`` once and keep every layer's tensors.

        Pass the record as ``prefill=`` to ``generate`` / ``score_continuation`` of any engine on the
        same model (any mode, any policy): they then skip the model's prefill and give exactly the
        results of a normal run. Holds ``(E + (H + 2 KvH) D) * T`` numbers per layer.
        With ``synthetic_kv_tile`` N set, records the prompt's first N tokens only: replayed, they are repeated
        to the prompt's length as that engine's own prefill repeats them (one prefill of the tile for every
        mode of a timing run, instead of one each); the first replay adds the tile's k (and q, where a policy
        reads it) before RoPE, up to ``(H + KvH) D * N`` numbers per layer (``PrefillRecord.tile_before_rope``),
        on the record's device.
        """
        prompt = self._check_prompt(prompt_ids)
        tile = self.config.synthetic_kv_tile
        if self.config.synthetic_kv and not tile:
            raise ConfigError("record_prefill needs the real prompt's KV, not --synthetic-kv.")
        prompt = prompt[:tile] if tile else prompt
        recorder, stats = _RecordingKV(), GenerationStats()
        with torch.inference_mode():
            logits = self._model_prefill(prompt, recorder, stats, None, tile=0)
        return PrefillRecord(tuple(prompt), recorder.layers, logits, stats.prefill_seconds)

    def generate(self, prompt_ids, sampling: SamplingConfig | None = None, on_token: TokenCallback | None = None,
                 on_prefill: ProgressCallback | None = None, prefill: PrefillRecord | None = None) -> GenerationResult:
        """Generate after ``prompt_ids`` (list of ints or 1-D tensor); Ctrl-C returns what was made.

        ``prefill``: a ``record_prefill`` of the same prompt, replayed instead of running the model.
        """
        sampling = sampling or SamplingConfig()
        prompt = self._check_prompt(prompt_ids)
        _check_record(prefill, prompt, self.config.synthetic_kv_tile)
        stats = GenerationStats(mode=self.config.mode.value, policy=self.policy_name, prompt_tokens=len(prompt))
        generated: list[int] = []
        reason = "length"
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        clock = PhaseClock(self.config.profile, self.device)
        backend = self._new_backend(clock)
        try:
            with torch.inference_mode():
                logits = self._prefill(prompt, backend, stats, on_prefill, prefill)
                reason = self._decode_loop(prompt, logits, backend, sampling, generator, generated, stats, on_token,
                                           clock)
        except KeyboardInterrupt:
            reason, stats.interrupted = "interrupted", True
        finally:
            try:
                stats.h2d_bytes = backend.h2d_bytes_per_step()[: len(stats.decode_ms)]
                stats.attended_share = backend.attended_share()
                stats.notes = list(backend.notes)
                if self.config.profile:
                    stats.step_phases_ms = clock.steps_ms()
                    stats.breakdown = timed_breakdown([(stats.step_phases_ms, stats.decode_ms)], skip=0)
            finally:
                backend.close()  # whatever happened above: the KV and the copy thread are freed
        stats.new_tokens = len(generated)
        stats.predictor = self.predictor_source  # known once the backend has bound the policy
        stats.compact_keys = self.compact_key_dtype
        stats.peak_host_bytes = peak_host_bytes()
        stats.peak_device_bytes = peak_device_bytes(self.device)
        return GenerationResult(generated, self._decode_text(generated), prompt, reason, stats)

    def score_continuation(self, prompt_ids, target_ids, keep_logits: bool = False,
                           prefill: PrefillRecord | None = None) -> ContinuationScore:
        """Log-probability of each target token given the prompt and the targets before it.

        Every target after the first is fed through a decode step (teacher forcing), so the
        scores reflect the configured mode and policy at every position. ``prefill``: a
        ``record_prefill`` of ``prompt_ids``, replayed instead of running the model.
        """
        prompt = self._check_prompt(list(prompt_ids) + list(target_ids)[:-1])[: len(prompt_ids)]
        _check_record(prefill, prompt, self.config.synthetic_kv_tile)
        targets = [int(t) for t in target_ids]
        logprobs, predicted, kept = [], [], []
        backend = self._new_backend()
        try:
            with torch.inference_mode():
                logits = self._prefill(prompt, backend, GenerationStats(), None, prefill)
            with torch.inference_mode(), self.decode_threads():
                on_device = torch.tensor(targets, device=self.device)  # one copy, not one per step
                cursor = DecodeCursor(on_device[0], len(prompt), self.device)
                for i, target in enumerate(targets):
                    log_softmax = torch.log_softmax(logits, dim=-1)
                    logprobs.append(log_softmax[target])
                    predicted.append(torch.argmax(logits))
                    if keep_logits:
                        kept.append(logits.float().cpu())
                    if i + 1 < len(targets):
                        logits = self._decode_step(cursor, backend)
                        backend.end_step()
                        cursor.advance(on_device[i + 1])
            attended = backend.attended_share()
        finally:
            backend.close()
        return ContinuationScore(torch.stack(logprobs).float().cpu(), torch.stack(predicted).cpu(),
                                 torch.stack(kept) if keep_logits else None, attended)

    # -------------------------------------------------------------------------- internals
    def _check_prompt(self, prompt_ids) -> list[int]:
        prompt = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
        if not prompt:
            raise ConfigError("the prompt is empty: pass some text.")
        if len(prompt) >= self.config.context:
            raise ConfigError(
                f"the prompt has {len(prompt)} tokens, which does not leave room for an answer within "
                f"--context {self.config.context}: raise --context or shorten the prompt."
            )
        return prompt

    def _new_backend(self, clock: PhaseClock | None = None) -> KVBackend:
        dims, dtype, capacity = self.adapter.dims, self.adapter.dtype, self.config.context
        if self.config.mode is KVMode.DENSE_DEVICE:
            return DenseDeviceKV(dims, capacity, dtype, self.device)
        if self.config.mode is KVMode.DENSE_OFFLOAD:
            return DenseOffloadKV(dims, capacity, dtype, self.device, clock, copy_thread=self.config.copy_thread)
        return SparseOffloadKV(self.adapter, capacity, self.config.selection, self.policy, self.device,
                               self.gather_method, clock, count_attended=self.config.count_attended,
                               copy_thread=self.config.copy_thread)

    def _prefill(self, prompt: list[int], backend: KVBackend, stats: GenerationStats,
                 on_prefill: ProgressCallback | None, record: PrefillRecord | None = None) -> torch.Tensor:
        """Fill ``backend`` with the prompt: from ``record`` if given, else by running the model."""
        if record is None:
            return self._model_prefill(prompt, backend, stats, on_prefill)
        return self._replay_prefill(record, backend, stats, on_prefill, len(prompt))

    def _replay_prefill(self, record: PrefillRecord, backend: KVBackend, stats: GenerationStats,
                        on_prefill: ProgressCallback | None, length: int) -> torch.Tensor:
        """Hand ``record``'s tensors to ``backend`` layer by layer (its policy observes them as in a
        normal prefill, sharing derived observations through the record); returns its logits ``[V]``.
        With ``synthetic_kv_tile``: the record is the tile's, repeated to the prompt's ``length`` as
        ``_model_prefill`` repeats it (observations shared among replays of that length only)."""
        start = time.perf_counter()
        self.adapter.reset_rope()  # as a model prefill does (a dynamic RoPE then grows as the decode goes on)
        layers = self.adapter.dims.num_layers
        if len(record.layers) != layers:
            raise ConfigError(f"the prefill record has {len(record.layers)} layers, the model {layers}: "
                              "record it with an engine on the same model.")
        store, observations = backend.prefill_layer, record.observations
        if self.config.synthetic_kv_tile:
            before_rope = record.tile_before_rope.setdefault(self._tile_owner(), {})
            store = self._tiled_store(backend, self.config.synthetic_kv_tile, length, before_rope,
                                      self._tile_fill(record, length))
            self.adapter.reset_rope()  # the tiled store's table may have grown a dynamic RoPE past the prefix
            observations = record.observations.setdefault(("tiled to", length), {})
        with shared_prefill_observations(observations):
            for layer, t in enumerate(record.layers):
                stats.prefill_peak_kv_bytes = max(stats.prefill_peak_kv_bytes,
                                                  backend.device_kv_bytes() + t.k.nbytes + t.v.nbytes)
                store(layer, t.x, t.q, t.k, t.v)
                if on_prefill is not None:
                    on_prefill(layer + 1, layers)
        stats.prefill_seconds = time.perf_counter() - start
        return record.logits

    def _model_prefill(self, prompt: list[int], backend: KVBackend, stats: GenerationStats,
                       on_prefill: ProgressCallback | None, tile: int | None = None) -> torch.Tensor:
        """Run the prompt layer by layer; returns the last position's logits ``[V]``.

        Only the current layer's K and V of the prompt are on the device at a time (plus what
        the backend keeps there), and no layer's KV is ever read back from the host. ``tile``: the
        config's ``synthetic_kv_tile`` unless given (0: the prompt itself, for ``record_prefill``).
        """
        start = time.perf_counter()
        self.adapter.reset_rope()  # a sequence from position 0: no RoPE state from the one before
        tile = self.config.synthetic_kv_tile if tile is None else tile
        if self.config.synthetic_kv and not self.config.synthetic_kv_tile:
            return self._synthetic_prefill(len(prompt), backend, stats, start)
        store = backend.prefill_layer
        adapter, chunk = self.adapter, self.config.prefill_chunk
        if tile:  # the real prefix's tensors, repeated to the prompt's length and turned to their positions
            store = self._tiled_store(backend, tile, len(prompt))
            prompt = prompt[:tile]
            self.adapter.reset_rope()  # the tiled store's table may have grown a dynamic RoPE past the prefix
        ids = torch.tensor([prompt], device=self.device)
        hidden = adapter.embed(ids)  # [1, T, E]
        rope = adapter.rope(hidden, torch.arange(len(prompt), device=self.device).unsqueeze(0))
        for layer in range(adapter.dims.num_layers):
            x = adapter.attention_input(layer, hidden)
            q, k, v = _chunked_qkv(adapter, layer, x, rope, chunk)
            stats.prefill_peak_kv_bytes = max(stats.prefill_peak_kv_bytes,
                                              backend.device_kv_bytes() + k.nbytes + v.nbytes)
            store(layer, x[0], q[0], k[0], v[0])
            out = prefill_attention(q, k, v, adapter.scaling, chunk, window=adapter.window(layer))
            hidden = _chunked_finish(adapter, layer, hidden, out, chunk)
            if on_prefill is not None:
                on_prefill(layer + 1, adapter.dims.num_layers)
        logits = adapter.logits(hidden[:, -1:])[0, -1]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the prefill time covers the queued work
        stats.prefill_seconds = time.perf_counter() - start
        return logits

    def _tile_fill(self, record: PrefillRecord, length: int) -> dict | None:
        """The dict keeping ``record``'s tile filled to ``length`` for this engine (``PrefillRecord.tile_filled``),
        made at the first replay of that length if host memory allows (``tile_fill_fits``; on the CPU, where the
        kept tensors live); None (nothing kept, every replay fills again) where it does not."""
        owner = (self._tile_owner(), length)
        if owner in record.tile_filled:
            return record.tile_filled[owner]
        dims, device = self.adapter.dims, self.device
        if device.type != "cpu" or not record.layers:
            return None
        head_dim, itemsize = record.layers[0].k.shape[-1], record.layers[0].k.element_size()
        if not tile_fill_fits(len(record.layers), dims.num_kv_heads, length, head_dim, itemsize,
                              psutil.virtual_memory().available):
            return None
        return record.tile_filled.setdefault(owner, {})

    def _tiled_store(self, backend: KVBackend, tile: int, length: int, before_rope: dict | None = None,
                     filled: dict | None = None):
        """``backend.prefill_layer`` for a real ``tile``-token prefix stored ``length`` positions long:
        position ``t`` holds position ``t mod tile``'s x and v, and its q and k before RoPE turned by ``t``'s
        RoPE, as that text repeated would give them in layer 0 (and so each copy sits at its own distance
        from the decode's queries, and a scorer of post-RoPE keys sees no two copies alike).

        Only what the backend reads is built (``prefill_reads``): x or q it does not read are zeros with no
        memory behind them, as in ``_synthetic_prefill`` (a timing fill; at 128k a layer's q and x are 0.6 GB
        on the embedded model). ``before_rope``: a dict kept across calls for one tile (a replayed record's,
        ``PrefillRecord.tile_before_rope``, this engine's part) holding each layer's k before RoPE, and q where a
        replay has read it, so that every replay does not project the tile again. ``filled``: a dict kept across
        calls for one tile, length and engine (``Engine._tile_fill``) holding each layer's k turned and v repeated
        to ``length``, handed to the backend as they are (a backend's prefill copies what it keeps, never writes
        its inputs), so that a replay turns and repeats the tile only where no earlier replay of that length did."""
        adapter, chunk, device = self.adapter, self.config.prefill_chunk, self.device
        reads = backend.prefill_reads
        probe = torch.zeros(1, 1, 1, device=device, dtype=adapter.dtype)  # rope() reads only its dtype and device
        cos, sin = adapter.rope(probe, torch.arange(length, device=device).unsqueeze(0))  # [R, length, D]

        def turned(layer: int, q_pre: torch.Tensor | None, k_pre: torch.Tensor):
            """q (or None), k ``[1, heads, tile, D]`` before RoPE -> ``[1, heads, length, D]``, each position
            turned by its own RoPE, copy after copy of the tile (slices, no gather)."""
            k_all = k_pre.new_empty(1, k_pre.shape[1], length, k_pre.shape[-1])
            q_all = None if q_pre is None else q_pre.new_empty(1, q_pre.shape[1], length, q_pre.shape[-1])
            for first in range(0, length, tile):  # the copy of the tile at positions [first, first + tile)
                for start in range(first, min(first + tile, length), chunk):
                    end = min(start + chunk, first + tile, length)
                    source = slice(start - first, end - first)
                    q_part = k_pre[:, :1, source] if q_pre is None else q_pre[:, :, source]  # (one head if unread)
                    q_turned, k_all[:, :, start:end] = adapter.apply_rope(
                        layer, q_part, k_pre[:, :, source], (cos[:, start:end], sin[:, start:end]))
                    if q_all is not None:
                        q_all[:, :, start:end] = q_turned
            return q_all, k_all

        def store(layer: int, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            cached = None if before_rope is None else before_rope.get(layer)
            if cached is None or ("q" in reads and cached[0] is None):
                q_pre, k_pre, _ = _chunked_qkv(adapter, layer, x.unsqueeze(0), None, chunk)  # [1, heads, tile, D]
                cached = (q_pre if "q" in reads else None, k_pre)  # q kept only once a replay reads it
                if before_rope is not None:
                    before_rope[layer] = cached
            q_pre, k_pre = cached if "q" in reads else (None, cached[1])
            kept = None if filled is None else filled.get(layer)
            if kept is not None and q_pre is None:
                q_all, (keys, values) = None, kept
            else:  # the tile turned (q with k, in one call), v repeated unless an earlier replay kept it
                q_all, k_all = turned(layer, q_pre, k_pre)
                keys = k_all[0]
                values = kept[1] if kept is not None else repeat_positions(v, 1, length)
                if filled is not None and kept is None:
                    filled[layer] = (keys, values)
            queries = (q_all[0] if q_all is not None
                       else k_pre.new_zeros(()).expand(adapter.dims.num_heads, length, k_pre.shape[-1]))
            inputs = repeat_positions(x, 0, length) if "x" in reads else x.new_zeros(()).expand(length, x.shape[-1])
            backend.prefill_layer(layer, inputs, queries, keys, values)
        return store

    def _tile_owner(self) -> tuple:
        """What a tile's projections before RoPE depend on besides the record: the replaying model, its dtype
        and device, and the prefill chunk (the projections' rounding)."""
        return id(self.adapter.model), str(self.adapter.dtype), str(self.device), self.config.prefill_chunk

    def _synthetic_prefill(self, length: int, backend: KVBackend, stats: GenerationStats, start: float) -> torch.Tensor:
        """Timing runs: every layer gets the same random K/V ``[KvH, T, D]`` (drawn once) instead of the
        prompt's; x and q are zero views with no memory behind them. Returns zero logits ``[V]``."""
        dims, dtype = self.adapter.dims, self.adapter.dtype
        generator = torch.Generator(device=self.device).manual_seed(0)
        shape = (dims.num_kv_heads, length, dims.head_dim)
        k = torch.randn(shape, generator=generator, device=self.device, dtype=dtype)
        v = torch.randn(shape, generator=generator, device=self.device, dtype=dtype)
        x = torch.zeros(dims.hidden_size, device=self.device, dtype=dtype).expand(length, -1)
        q = torch.zeros(dims.num_heads, 1, dims.head_dim, device=self.device, dtype=dtype).expand(-1, length, -1)
        for layer in range(dims.num_layers):
            backend.prefill_layer(layer, x, q, k, v)
        stats.prefill_seconds = time.perf_counter() - start
        return torch.zeros(dims.vocab_size, device=self.device)

    def _decode_step(self, cursor: "DecodeCursor", backend: KVBackend,
                     clock: PhaseClock | None = None) -> torch.Tensor:
        """Feed the cursor's token at its position through every layer; returns the next logits ``[V]``.

        Token and position live on the device: nothing in a step waits for the host.
        """
        adapter, clock = self.adapter, clock or PhaseClock()
        hidden = adapter.embed(cursor.ids)  # [1, 1, E]
        rope = adapter.rope(hidden, cursor.position_ids)
        backend.begin_step(cursor.position)
        for layer in range(adapter.dims.num_layers):
            x, q, k, v = adapter.decode_input(layer, hidden, rope)  # x [1, 1, E]; q [1, H, 1, D]; k, v [1, KvH, 1, D]
            kv = backend.decode_layer(layer, cursor.position, x[0, 0], q[0, :, 0], k[0, :, 0], v[0, :, 0])
            with clock.phase("attention"):
                out = decode_attention(q[0, :, 0], kv.keys, kv.values, kv.valid, adapter.scaling)  # [H, D]
            backend.end_layer(layer)
            hidden = adapter.finish_layer(layer, hidden, out.view(1, -1, 1, out.shape[-1]))
        return adapter.logits(hidden)[0, -1]

    def _decode_loop(self, prompt, logits, backend, sampling, generator, generated, stats, on_token,
                     clock: PhaseClock) -> str:
        """Sample, stream and feed back tokens until EOS, the token limit or the context end (on the CPU inside
        ``decode_threads``)."""
        with self.decode_threads():
            stats.decode_kv_bytes = backend.device_kv_bytes()
            next_token = sample_next(logits, sampling, generator)
            token = int(next_token)
            cursor = DecodeCursor(next_token, len(prompt), self.device)
            while True:
                generated.append(token)
                if on_token is not None:
                    on_token(token)
                if token in self.eos_ids and not sampling.ignore_eos:
                    return "eos"
                if len(generated) >= sampling.max_new_tokens:
                    return "length"
                if cursor.position >= self.config.context:
                    return "context"
                start = time.perf_counter()
                logits = self._decode_step(cursor, backend, clock)
                next_token = sample_next(logits, sampling, generator)
                token = int(next_token)  # the step's one host sync: the token is streamed and checked for EOS
                stats.decode_ms.append(1000.0 * (time.perf_counter() - start))
                clock.end_step()
                backend.end_step()
                if len(stats.decode_ms) == 1:  # staging buffers exist from the first step on
                    stats.decode_kv_bytes = backend.device_kv_bytes()
                cursor.advance(next_token)

    def decode_threads(self):
        """A context for decode steps: on the CPU ``native.decode_threads`` (the kernels on the cores torch has,
        torch on one), elsewhere nothing."""
        return native.decode_threads() if self.device.type == "cpu" else contextlib.nullcontext()

    def _decode_text(self, ids: list[int]) -> str:
        tokenizer = self.adapter.tokenizer
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""


class DecodeCursor:
    """The token being fed and its position, on the device (``ids [1, 1]``, ``position_ids [1, 1]``)
    and, for the position, on the host too, so no step copies a Python number to the device."""

    def __init__(self, token: torch.Tensor, position: int, device: torch.device):
        self.ids = token.view(1, 1)
        self.position = position
        self.position_ids = torch.full((1, 1), position, dtype=torch.long, device=device)

    def advance(self, token: torch.Tensor) -> None:
        """Feed ``token`` (0-d, on the device) at the next position."""
        self.ids = token.view(1, 1)
        self.position += 1
        self.position_ids += 1


def _check_record(record: PrefillRecord | None, prompt: list[int], tile: int = 0) -> None:
    """A prefill record must be of the very prompt being run (with ``tile``: of its first ``tile`` tokens)."""
    if record is None:
        return
    if tile and record.prompt != tuple(prompt[:tile]):
        raise ConfigError(f"the prefill record is not of this prompt's first {tile} tokens (--synthetic-kv-tile): "
                          "record it with an engine of the same tile on this prompt.")
    if not tile and record.prompt != tuple(prompt):
        raise ConfigError(f"the prefill record is of another prompt ({len(record.prompt)} tokens, this one has "
                          f"{len(prompt)}): record the prompt being run.")


def repeat_positions(tensor: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """``tensor`` repeated along its positions ``dim`` and cut to ``length`` positions: x ``[N, E]``
    (dim 0) or v ``[KvH, N, D]`` (dim 1) -> the same with ``length`` positions, position ``t`` holding
    position ``t mod N`` (a synthetic KV cache of real text's values; q and k are turned to their
    positions as well: ``Engine._tiled_store``)."""
    count = tensor.shape[dim]
    if count >= length:
        return tensor.narrow(dim, 0, length)
    times = [1] * tensor.dim()
    times[dim] = -(-length // count)
    return tensor.repeat(*times).narrow(dim, 0, length)


def _chunked_qkv(adapter: ModelAdapter, layer: int, x: torch.Tensor, rope, chunk: int):
    """``adapter.qkv`` over token chunks of x ``[1, T, E]``, concatenated along tokens."""
    length = x.shape[1]
    if length <= chunk:
        return adapter.qkv(layer, x, rope)
    def part(s: int):
        return None if rope is None else (rope[0][:, s:s + chunk], rope[1][:, s:s + chunk])

    parts = [adapter.qkv(layer, x[:, s:s + chunk], part(s)) for s in range(0, length, chunk)]
    return tuple(torch.cat(tensors, dim=2) for tensors in zip(*parts))


def _chunked_finish(adapter: ModelAdapter, layer: int, hidden: torch.Tensor, out: torch.Tensor, chunk: int):
    """``adapter.finish_layer`` over token chunks: hidden ``[1, T, E]``, out ``[1, H, T, D]``."""
    length = hidden.shape[1]
    if length <= chunk:
        return adapter.finish_layer(layer, hidden, out)
    return torch.cat([adapter.finish_layer(layer, hidden[:, s:s + chunk], out[:, :, s:s + chunk])
                      for s in range(0, length, chunk)], dim=1)


def _eos_ids(adapter: ModelAdapter) -> set[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    sources = [getattr(adapter.model, "generation_config", None), adapter.config, adapter.tokenizer]
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
