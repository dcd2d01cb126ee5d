"""Decode latency per step of every KV mode, in one process, on the same prompt.

For each context length, each mode generates ``warmup + decode_steps`` tokens after a synthetic
prompt that fills the context; the warm-up steps are dropped. Modes:

- ``dense-gpu``: the whole KV on the compute device (``KVMode.DENSE_DEVICE``);
- ``dense-offload``: the KV in host memory, every layer's whole KV copied every step;
- ``<policy>-offload``: the KV in host memory, only the tokens the policy selects copied
  (``KVMode.SPARSE_OFFLOAD``), once per ``--interval`` value and ``--neighbors`` setting.

A mode that cannot run (not enough device or host memory, a policy that does not exist yet) is
reported with its reason, never dropped. The model is a real architecture with random weights
(``--arch``, see ``archs.py``) or a real checkpoint (``--model``).

The KV is the prompt's own (a prefill), random (``--synthetic-kv``), or, with a real checkpoint, a real
prefix's repeated (``--synthetic-kv-tile N``: the prompt's first N tokens prefilled and their keys and
values repeated to the context, each copy turned by RoPE to its positions: ``Engine._tiled_store``).
TokenButler's predictor is random with ``--predictor-shape``'s sizes (``--predictor random``: its
selections mean nothing and renew most of the budget at every step, so copies are an upper bound), or a
trained one (``--predictor shipped``, the one ``tbrun generate`` loads for the model and interval, or a
checkpoint folder), whose selections change from step to step as on real text where the KV is real.
"""

from __future__ import annotations

import gc
import json
import math
import os
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, native
from offload_engine.config import parse_layers
from offload_engine.cpu_cache.gather import ALL_METHODS, default_gather_method
from offload_engine.errors import ConfigError, TbrunError
from offload_engine.memory import dtype_name
from offload_engine.policies.tokenbutler import ProjectedKeyCache
from offload_engine.profiling import timed_breakdown
from offload_engine.selection.planner import keep_bonus_refusal

from .latency_report import NO_BONUS, NO_PAGES
from .report import machine_header, provenance, ratio_summary, summarize_ms

DENSE_MODES = {"dense-gpu": KVMode.DENSE_DEVICE, "dense-offload": KVMode.DENSE_OFFLOAD}
ALL_MODES = ("dense-gpu", "dense-offload", "tokenbutler-offload", "streaming-offload", "random-offload")
RANDOM_PREDICTOR, SHIPPED_PREDICTOR = "random", "shipped"  # --predictor's names; anything else is a folder
NEIGHBORS_ON = 1  # --neighbors on: also fetch the position after each selected one


class PolicyUnavailable(Exception):
    """The policy of a mode cannot be built in this checkout (reported, not raised)."""


@dataclass(slots=True)
class LatencySettings:
    """What one latency run measures; validated at construction."""

    contexts: list[int]
    arch: str | None = "llama-3.1-8b"
    model: str | None = None
    modes: list[str] = field(default_factory=lambda: list(ALL_MODES))
    budget: int = 2048
    intervals: list[int] = field(default_factory=lambda: [1, 4])
    neighbors: list[bool] = field(default_factory=lambda: [False, True])
    decode_steps: int = 64
    warmup: int = 8
    device: str = "cuda"
    gather_method: str | None = None
    seed: int = 0
    synthetic_kv: bool = False  # fill the KV with random values instead of running the prefill
    repeats: int = 1  # rounds over every variant of a context; each row keeps its fastest round
    predictor_shape: str = "4:512:16"  # G:I:d' of tokenbutler's random-weight predictor (the reference sizes)
    predictor: str = RANDOM_PREDICTOR  # tokenbutler's: random (predictor_shape), shipped, or a checkpoint folder
    synthetic_kv_tile: int = 0  # with synthetic_kv and a real model: repeat a real N-token prefix's KV
    refresh_layers: str = ""  # also run each interval > 1 with these layers selecting at every step
    # CPU: offload modes copy (and tokenbutler selects) on one more thread; dense-gpu, which copies nothing,
    # gets one more torch thread instead, so that every mode uses the same cores
    copy_thread: bool = False
    page_prefilters: list[int] = field(default_factory=lambda: [0])  # tokenbutler's page sizes (0: none)
    keep_bonuses: list[float] = field(default_factory=lambda: [0.0])  # the scoring modes' top-k hysteresis (0: none)

    def __post_init__(self) -> None:
        parse_layers(self.refresh_layers)
        if self.copy_thread and torch.device(self.device).type != "cpu":
            raise ConfigError("--copy-thread is for --device cpu (on CUDA copies have a stream of their own): "
                              "drop it, or add --device cpu.")
        unknown = [m for m in self.modes if m not in DENSE_MODES and not m.endswith("-offload")]
        if unknown:
            raise ConfigError(f"--modes {', '.join(unknown)}: use dense-gpu, dense-offload or <policy>-offload.")
        if self.decode_steps < 1 or self.warmup < 0:
            raise ConfigError("--decode-steps must be >= 1 and --warmup >= 0.")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}.")
        if not self.page_prefilters or any(page < 0 or page == 1 for page in self.page_prefilters):
            raise ConfigError(f"--page-prefilter {self.page_prefilters}: page sizes of at least 2 tokens, or 0 for none.")
        if not self.keep_bonuses:
            raise ConfigError("--keep-bonus needs at least one value (0: none).")
        for bonus in self.keep_bonuses:
            SelectionConfig(keep_bonus=bonus)  # its range, refused here
        if any(bonus and pages for bonus in self.keep_bonuses for pages in self.page_prefilters):
            raise ConfigError("--keep-bonus does not combine with --page-prefilter: run them in separate commands.")
        parse_predictor_shape(self.predictor_shape)
        self._check_real_model_options()
        if not self.contexts or not self.intervals or not self.neighbors:
            raise ConfigError("--contexts, --interval and --neighbors each need at least one value.")
        if any(interval < 1 for interval in self.intervals):
            raise ConfigError(f"--interval {self.intervals}: every prediction interval must be >= 1.")
        if self.budget < 1:
            raise ConfigError(f"--budget must be at least 1 token, got {self.budget}.")
        if self.gather_method is not None and self.gather_method not in ALL_METHODS:
            raise ConfigError(f"--gather-method {self.gather_method!r} is not one of {', '.join(ALL_METHODS)}.")
        steps = self.new_tokens
        small = [c for c in self.contexts if c <= steps]
        if small:
            raise ConfigError(f"--contexts {small} leave no room for a prompt before {steps} new tokens.")

    def _check_real_model_options(self) -> None:
        """``--synthetic-kv-tile`` and a trained ``--predictor`` need a real checkpoint's weights."""
        if self.synthetic_kv_tile < 0 or (self.synthetic_kv_tile and not self.synthetic_kv):
            raise ConfigError(f"--synthetic-kv-tile {self.synthetic_kv_tile}: a count of tokens >= 1 whose real KV "
                              "fills the cache instead of random values; give it with --synthetic-kv.")
        if self.synthetic_kv_tile and self.model is None:
            raise ConfigError("--synthetic-kv-tile repeats a real prefix's keys and values so that selections change "
                              "as on real text; random weights have none: give --model (e.g. --model embedded).")
        if self.predictor != RANDOM_PREDICTOR and self.model is None:
            raise ConfigError(f"--predictor {self.predictor}: a trained predictor needs the model it was trained for: "
                              "give --model (e.g. --model embedded), or use --predictor random with --arch.")
        if self.predictor not in (RANDOM_PREDICTOR, SHIPPED_PREDICTOR) and not Path(self.predictor).is_dir():
            raise ConfigError(f"--predictor {self.predictor!r} is not random, shipped or a checkpoint folder "
                              "(`tbrun train-predictor --out DIR`).")
        short = [c for c in self.contexts if self.synthetic_kv_tile > c - self.new_tokens]
        if short:
            raise ConfigError(f"--synthetic-kv-tile {self.synthetic_kv_tile} is longer than the prompt at --contexts "
                              f"{short} ({self.new_tokens} new tokens): lower the tile or raise the contexts.")

    @property
    def new_tokens(self) -> int:
        """Tokens generated per run: the first comes from prefill, then one per decode step."""
        return self.warmup + self.decode_steps + 1


@dataclass(frozen=True, slots=True)
class Variant:
    """One line of the report: a mode, and for sparse modes its interval and neighbour setting."""

    mode: str
    interval: int | None = None
    neighbors: bool | None = None
    refresh: str = ""  # layers that select at every step (``parse_layers``), with interval > 1
    pages: int = 0  # tokenbutler's page prefilter: pages of this many tokens (0: none)
    keep_bonus: float = 0.0  # the top-k's hysteresis (``SelectionConfig.keep_bonus``)

    @property
    def policy(self) -> str | None:
        return None if self.mode in DENSE_MODES else self.mode.removesuffix("-offload")

    @property
    def label(self) -> str:
        if self.policy is None:
            return self.mode
        refresh = f", refresh {self.refresh}" if self.refresh else ""
        pages = f", pages of {self.pages}" if self.pages else ""
        bonus = f", keep bonus {self.keep_bonus:g}" if self.keep_bonus else ""
        return (f"{self.mode} (interval {self.interval}, neighbors {'on' if self.neighbors else 'off'}{refresh}{pages}"
                f"{bonus})")


def variants(settings: LatencySettings) -> list[Variant]:
    """Dense modes once each; sparse modes once per (interval, neighbors), tokenbutler once per page setting and
    every mode a keep bonus applies to once per bonus."""
    out: list[Variant] = []
    for mode in settings.modes:
        if mode in DENSE_MODES:
            out.append(Variant(mode))
            continue
        pages = settings.page_prefilters if mode == "tokenbutler-offload" else [0]
        # a mode the bonus does not apply to (streaming, wrapped or not: keep_bonus_refusal) runs without it
        name = _scoring_policy(mode.removesuffix("-offload"))
        bonuses = [b for b in settings.keep_bonuses if keep_bonus_refusal(b, name, False) is None] or [0.0]
        out += [Variant(mode, i, n, pages=p, keep_bonus=b)
                for i in settings.intervals for n in settings.neighbors for p in pages for b in bonuses]
        if settings.refresh_layers:
            out += [Variant(mode, i, n, settings.refresh_layers, p, b)
                    for i in settings.intervals if i > 1 for n in settings.neighbors for p in pages for b in bonuses]
    return out


def synthetic_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """``length`` uniformly random token ids (the same for every mode of a context)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def parse_predictor_shape(text: str) -> tuple[int, int, int, int | None]:
    """``"G:I:D"`` or ``"G:I:D:Q"`` -> (producer every G layers, hidden width I, d' = D, Q query heads per KV
    head or None for the model's), each >= 1."""
    parts = text.split(":")
    try:
        every, hidden, dim, *rest = (int(part) for part in parts)
    except ValueError:
        every = hidden = dim = 0
        rest = []
    per_kv = rest[0] if len(rest) == 1 else None
    if len(parts) not in (3, 4) or min(every, hidden, dim, 1 if per_kv is None else per_kv) < 1:
        raise ConfigError(f"--predictor-shape {text!r}: write G:I:D (a producer every G layers, hidden width I, "
                          "d' = D) or G:I:D:Q (Q query heads per KV head), e.g. 4:512:16 (the reference sizes), "
                          "2:128:16 (the shipped SmolLM2 predictor) or 2:128:16:1 (one query head per KV head).")
    return every, hidden, dim, per_kv


def random_predictor(dims, shape: str):
    """A seeded random-weight predictor of the model's shape and ``shape`` ``"G:I:D[:Q]"``: its selections
    mean nothing, its cost is the shipped one's when the sizes match."""
    from offload_engine.predictor.network import PredictorConfig, seeded_random_predictor

    every, hidden, dim, per_kv = parse_predictor_shape(shape)
    if per_kv is not None and dims.num_heads // dims.num_kv_heads % per_kv:
        raise ConfigError(f"--predictor-shape {shape!r}: Q = {per_kv} query heads per KV head must divide the model's "
                          f"{dims.num_heads // dims.num_kv_heads} heads per KV head.")
    query_heads = dims.num_kv_heads * per_kv if per_kv is not None else None
    return seeded_random_predictor(PredictorConfig.for_model(dims, every, dim, hidden, query_heads=query_heads)).eval()


def _scoring_policy(name: str) -> str:
    """The policy that scores in a mode's policy (``critical(tokenbutler)``: tokenbutler); a name that is no
    policy as it is (its mode is reported unavailable when it runs: ``build_policy_for``)."""
    from offload_engine.policies import parse_policy_spec

    try:
        return parse_policy_spec(name)[1]
    except TbrunError:
        return name


def build_policy_for(variant: Variant, adapter, predictor_shape: str = "4:512:16", predictor: str = RANDOM_PREDICTOR):
    """The policy object of a sparse variant, or ``PolicyUnavailable`` with the reason. TokenButler's predictor:
    random weights of ``predictor_shape``, the shipped one for the model and the variant's interval (``shipped``:
    loaded as ``tbrun generate`` loads it), or a checkpoint folder."""
    from offload_engine.policies import build_policy, parse_policy_spec

    name = variant.policy
    try:
        _, innermost = parse_policy_spec(name)  # critical(tokenbutler): the options go to tokenbutler
    except TbrunError as exc:
        raise PolicyUnavailable(f"offload_engine.policies cannot build {name!r} in this checkout: {exc}") from None
    options = {}
    if innermost == "tokenbutler" and predictor == RANDOM_PREDICTOR:
        options = {"predictor": random_predictor(adapter.dims, predictor_shape)}
    elif innermost == "tokenbutler" and predictor != SHIPPED_PREDICTOR:
        options = {"predictor_path": predictor}
    if variant.pages:
        options["page_prefilter"] = variant.pages
    try:
        return build_policy(name, **options)
    except (TypeError, TbrunError) as exc:
        raise PolicyUnavailable(f"build_policy({name!r}, **{options}) failed: {exc}") from None


def engine_config(variant: Variant, context: int, settings: LatencySettings) -> EngineConfig:
    """The engine's config for one variant at one context (RoPE scaling allowed: timing only).

    Every run is profiled (per-phase breakdown): on the CPU that is a few timer reads per layer.
    """
    common = dict(context=context, device=settings.device, allow_rope_scaling=True, profile=True,
                  synthetic_kv=settings.synthetic_kv, synthetic_kv_tile=settings.synthetic_kv_tile)
    if variant.policy is None:
        copies = settings.copy_thread and DENSE_MODES[variant.mode] is KVMode.DENSE_OFFLOAD
        return EngineConfig(mode=DENSE_MODES[variant.mode], copy_thread=copies, **common)
    common["copy_thread"] = settings.copy_thread
    selection = SelectionConfig(policy=variant.policy, budget=Budget(tokens=settings.budget),
                                interval=variant.interval, neighbors=NEIGHBORS_ON if variant.neighbors else 0,
                                refresh_layers=variant.refresh, keep_bonus=variant.keep_bonus)
    return EngineConfig(mode=KVMode.SPARSE_OFFLOAD, selection=selection, **common)


def record_tile(adapter, context: int, prompt: list[int], settings: LatencySettings):
    """The real prefill of the prompt's first ``synthetic_kv_tile`` tokens, made once for every variant of a
    context (``Engine.record_prefill``: each replays it, repeated to the context, as its own prefill would)."""
    config = EngineConfig(context=context, device=settings.device, allow_rope_scaling=True, synthetic_kv=True,
                          synthetic_kv_tile=settings.synthetic_kv_tile)
    return Engine(adapter, config).record_prefill(prompt)


def run_variant(adapter, variant: Variant, context: int, prompt: list[int], settings: LatencySettings,
                prefill=None) -> dict:
    """Generate once and summarise the timed steps; a failure becomes a row with its reason. ``prefill``: the
    tile's ``record_tile``, replayed instead of a prefill."""
    row = {"context": context, "mode": variant.mode, "label": variant.label, "interval": variant.interval,
           "neighbors": variant.neighbors, "refresh_layers": variant.refresh, "page_prefilter": variant.pages,
           "keep_bonus": variant.keep_bonus,
           "status": "ok", "reason": ""}
    device = torch.device(settings.device)
    threads = torch.get_num_threads()
    kernel_variable = os.environ.get(native.THREADS_VARIABLE)
    try:
        policy = (build_policy_for(variant, adapter, settings.predictor_shape, settings.predictor)
                  if variant.policy else None)
        config = engine_config(variant, context, settings)
        engine = Engine(adapter, config, policy=policy, gather_method=settings.gather_method)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if settings.copy_thread and not config.copy_thread:  # the core the copy thread would take: the model's
            torch.set_num_threads(threads + 1)  # (its decode runs the native kernels on them: native.decode_threads)
            if kernel_variable is not None:  # a count set by hand: raised to the cores, as before
                os.environ[native.THREADS_VARIABLE] = str(max(threads + 1, native.kernel_threads()))
        row.update(model_threads=torch.get_num_threads(), copy_thread=config.copy_thread,
                   kernel_threads=native.decode_kernel_threads())
        result = engine.generate(prompt, SamplingConfig(max_new_tokens=settings.new_tokens, ignore_eos=True),
                                 prefill=prefill)
        row.update(measurements(result.stats, adapter, context, settings, variant, predictor_dim(engine.policy)))
    except PolicyUnavailable as exc:
        row.update(status="unavailable", reason=str(exc))
    except (TbrunError, torch.OutOfMemoryError, MemoryError) as exc:
        row.update(status="cannot run", reason=f"{type(exc).__name__}: {exc}".strip())
    except Exception as exc:  # keep measuring the other modes; the traceback goes to stderr
        traceback.print_exc()
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    finally:
        torch.set_num_threads(threads)
        if kernel_variable is None:
            os.environ.pop(native.THREADS_VARIABLE, None)
        else:
            os.environ[native.THREADS_VARIABLE] = kernel_variable
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def predictor_dim(policy) -> int | None:
    """d' of the predictor that selected (a wrapper's base's), or None for a policy without one."""
    predictor = getattr(getattr(policy, "base", policy), "predictor", None)
    return predictor.config.dim if predictor is not None else None


def measurements(stats, adapter, context: int, settings: LatencySettings, variant: Variant,
                 dim: int | None = None) -> dict:
    """Per-step timing and traffic of the timed (post-warm-up) steps of one generation; ``dim``: d' of the
    predictor that ran (None: ``--predictor-shape``'s)."""
    timed = stats.decode_ms[settings.warmup:]
    moved = stats.h2d_bytes[settings.warmup:]
    bytes_per_step = sum(moved) / len(moved) if moved else 0.0
    summary = summarize_ms(timed)
    kv_total = adapter.dims.kv_bytes_per_token(adapter.dtype) * context
    fragment = 2 * adapter.dims.head_dim * torch.empty((), dtype=adapter.dtype).element_size()
    full_budget = settings.budget * adapter.dims.num_layers * adapter.dims.num_kv_heads * fragment
    out = summary | {
        "prefill_s": stats.prefill_seconds,
        "h2d_bytes_per_step": bytes_per_step,
        "h2d_gbps_over_step": bytes_per_step / (summary["median_ms"] / 1000.0) / 1e9 if timed else math.nan,
        "kv_total_bytes": kv_total,
        "kv_on_device_bytes": stats.decode_kv_bytes,
        "kv_on_device_share": stats.decode_kv_bytes / kv_total,
        "peak_device_bytes": stats.peak_device_bytes,
        "gather_method": None,
        "breakdown": (None if stats.breakdown is None  # an unprofiled run
                      else timed_breakdown([(stats.step_phases_ms, stats.decode_ms)], settings.warmup)),
        "breakdown_steps": "timed",  # reports before 2026-12-07 (no such key): every decode step, warm-up included
    }
    out |= traffic_floor(adapter, context, settings, variant, bytes_per_step, stats.compact_keys, dim)
    if stats.predictor:
        out["predictor"] = stats.predictor  # a checkpoint's folder name and weights hash, or "random weights"
    if stats.compact_keys:
        out["compact_key_dtype"] = stats.compact_keys
    if variant.policy is not None:
        out["gather_method"] = settings.gather_method or default_gather_method(settings.device)
        out["full_budget_bytes_per_step"] = full_budget
        out["delta_fetch_saving"] = 1.0 - bytes_per_step / full_budget if full_budget else math.nan
    return out


def traffic_floor(adapter, context: int, settings: LatencySettings, variant: Variant, copied: float,
                  compact_keys: str = "", dim: int | None = None) -> dict:
    """Bytes a step must move through memory, at the least, on average, and what they take at the
    measured rate.

    Weights (read once: ``ModelAdapter.decode_weight_bytes``, a GGUF model's blocks where attached), the KV
    attention reads (dense: all of it; sparse: sinks + window + the
    budget per selecting layer, and every token of the policy's dense layers), the policy's
    per-token scoring state read on prediction steps (TokenButler's compact key cache, Quest's page
    bounds; once every ``interval`` steps), and every copied byte twice on the CPU (read from the
    host store, written to the working set; dense offload copies the whole KV). On CUDA the copies
    cross the bus instead: see the bus columns; this floor is the device-memory side only. Compare
    it with the mean step (a prediction step and the steps reusing it), not the median. ``compact_keys``: the
    dtype TokenButler's compact cache stored (``GenerationStats.compact_keys``; the model's dtype if ""); ``dim``:
    the predictor's d' (None: ``--predictor-shape``'s).
    """
    dims = adapter.dims
    element = torch.empty((), dtype=adapter.dtype).element_size()
    per_token_layer = dims.num_kv_heads * 2 * dims.head_dim * element  # K and V of one token, one layer
    weights = adapter.decode_weight_bytes()  # a GGUF model's blocks where the CPU's decode reads those
    cpu_copies = 2.0 * copied if torch.device(settings.device).type == "cpu" else 0.0
    if variant.policy is None:
        kv_read = per_token_layer * dims.num_layers * context
    else:
        dense = 1 if variant.policy == "tokenbutler" else 0  # tokenbutler keeps layer 0 whole
        attended = min(context, settings.budget * (2 if variant.neighbors else 1))
        kv_read = per_token_layer * ((dims.num_layers - dense) * attended + dense * context)
    dim = dim if dim is not None else parse_predictor_shape(settings.predictor_shape)[2]
    keys = getattr(torch, compact_keys) if compact_keys else None
    scoring = policy_metadata_bytes(variant.policy, dims, context, element, dim, keys) / (variant.interval or 1)
    floor = weights + kv_read + cpu_copies + scoring
    rate = read_gbps(settings.device)
    return {"floor_bytes_per_step": floor, "floor_ms": floor / (rate * 1e9) * 1000.0, "memory_read_gbps": rate,
            "scoring_bytes_per_step": scoring}


def policy_metadata_bytes(policy: str | None, dims, context: int, element: int, dim: int = 16,
                          compact_keys: torch.dtype | None = None) -> float:
    """Per-step reads of a policy's scoring state over the whole context (``element``: the model's KV element
    size; ``compact_keys``: the dtype TokenButler's projected keys are stored in, None: ``element`` bytes)."""
    if policy == "tokenbutler":  # projected keys of layers 1..L-1 (d' = 16 in the reference and shipped sizes)
        entry = ProjectedKeyCache.entry_bytes(compact_keys, dim) if compact_keys is not None else dim * element
        return (dims.num_layers - 1) * dims.num_kv_heads * context * entry
    if policy == "quest":  # per-page min and max keys, pages of 16
        return dims.num_layers * dims.num_kv_heads * (context / 16) * 2 * dims.head_dim * element
    return 0.0


_READ_GBPS: dict[str, float] = {}


def read_gbps(device: str) -> float:
    """Memory read rate of ``device`` now (best of 5 sums over 1 GiB), measured once per process."""
    if device not in _READ_GBPS:
        import time

        buffer = torch.ones(2**28, dtype=torch.float32, device=device)
        best = math.inf
        for _ in range(5):
            if buffer.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            buffer.sum().item()
            best = min(best, time.perf_counter() - start)
        _READ_GBPS[device] = buffer.nbytes / best / 1e9
        del buffer
    return _READ_GBPS[device]


def add_ratios(rows: list[dict]) -> None:
    """Speed-up over dense-offload and ratio to dense-gpu, within each context."""
    for row in rows:
        same = {r["mode"]: r for r in rows if r["context"] == row["context"] and r["status"] == "ok"}
        mine = row.get("median_ms", math.nan)
        offload = same.get("dense-offload", {}).get("median_ms", math.nan)
        gpu = same.get("dense-gpu", {}).get("median_ms", math.nan)
        row["speedup_vs_dense_offload"] = offload / mine if row["status"] == "ok" else math.nan
        row["ratio_to_dense_gpu"] = mine / gpu if row["status"] == "ok" else math.nan
        row["ratio_to_floor"] = row["mean_ms"] / row["floor_ms"] if row["status"] == "ok" else math.nan


def memcpy_peak_gbps(device: torch.device) -> float | None:
    """The pinned host-to-device copy rate measured now (CUDA), for the achieved-GB/s column."""
    if device.type != "cuda":
        return None
    from offload_engine.machine import measure_h2d_gbps

    return measure_h2d_gbps(size_bytes=512 * 2**20, repeats=5)


def load_adapter(settings: LatencySettings):
    """The model: a random-weight architecture, or a real checkpoint with ``--model``."""
    from .archs import build_random_model, default_dtype

    if settings.model is not None:
        from offload_engine.models import load_model

        return load_model(settings.model, dtype=default_dtype(settings.device), device=settings.device)
    return build_random_model(settings.arch, device=settings.device, seed=settings.seed)


def run_latency(settings: LatencySettings, out_dir: Path, log=print, append: bool = False) -> dict:
    """Measure every variant at every context; write JSON + Markdown + PNG after each context.

    With ``append``, rows of other contexts already in the report at ``out_dir`` are kept, so
    contexts can be measured by separate commands (each context still in one process) and end
    up in one report and one plot.
    """
    from .latency_report import write_report

    device = torch.device(settings.device)
    if settings.copy_thread and torch.get_num_threads() != 1:
        # torch's parallel loops on the copy thread would take a team of that many threads too
        raise ConfigError(f"--copy-thread compares every mode on the same cores with one torch thread for the "
                          f"model (torch has {torch.get_num_threads()}): run `tbrun --threads 1 bench latency ...`.")
    stem = report_stem(settings)
    earlier_rows, earlier_runs = previous_report(out_dir / f"{stem}.json", settings) if append else ([], [])
    adapter = load_adapter(settings)
    run = provenance() | {"contexts": settings.contexts, "memcpy_peak_gbps_before": memcpy_peak_gbps(device),
                          "memcpy_peak_gbps_after": None}
    rows: list[dict] = []
    for index, context in enumerate(settings.contexts):
        prompt = synthetic_prompt(adapter.dims.vocab_size, context - settings.new_tokens, settings.seed + context)
        tile = record_tile(adapter, context, prompt, settings) if settings.synthetic_kv_tile else None
        if tile is not None:
            log(f"{context} tokens: the {settings.synthetic_kv_tile}-token tile prefilled in {tile.seconds:.1f} s")
        rounds: list[list[dict]] = []  # each in the order of variants(settings)
        for round_index in range(settings.repeats):  # interleaved: every variant once per round
            runs = list(enumerate(variants(settings)))
            results: list[dict] = [{}] * len(runs)
            # every other round in reverse, so that no mode always runs right after the same one (or first)
            for index, variant in runs if round_index % 2 == 0 else reversed(runs):
                log(f"{context} tokens, round {round_index + 1}/{settings.repeats}: {variant.label} ...")
                results[index] = run_variant(adapter, variant, context, prompt, settings, tile)
                log(f"  {_one_line(results[index])}")
            rounds.append(results)
        context_rows = [fastest_round(list(tries)) for tries in zip(*rounds)]
        add_paired_ratios(context_rows, rounds)
        for row in context_rows if tile is not None else ():
            row["tile_prefill_s"] = tile.seconds
        rows += context_rows
        del tile
        gc.collect()
        if index == len(settings.contexts) - 1:
            run["memcpy_peak_gbps_after"] = memcpy_peak_gbps(device)
        finish_rows(rows, run)
        report = assemble(settings, adapter, device, run, earlier_runs, earlier_rows + rows)
        report["files"] = write_report(report, out_dir, stem)  # after every context: a cut run keeps its data
    return report


def fastest_round(tries: list[dict]) -> dict:
    """The round with the lowest median of one variant (on a shared machine, load only slows a
    round down), with every round's median kept beside it."""
    ok = [row for row in tries if row["status"] == "ok"]
    best = min(ok, key=lambda row: row["median_ms"]) if ok else tries[0]
    return best | {"round_medians_ms": [row.get("median_ms") for row in tries]}


def paired_reference(row: dict, rows: list[dict]) -> dict[str, int]:
    """What a row's per-round ratios compare it with: index in ``rows`` (one round's, in variant order) of
    dense-gpu, and for a sparse mode other than streaming, of streaming-offload at the same interval,
    neighbour rule and refresh layers (what the same budget costs when nothing is scored); for a row with the
    page prefilter, of the same mode without it (``NO_PAGES``); with a keep bonus, without it (``NO_BONUS``)."""
    out = {}
    same = lambda a, b: (a["interval"], a["neighbors"], a["refresh_layers"]) == (  # noqa: E731
        b["interval"], b["neighbors"], b["refresh_layers"])
    for index, other in enumerate(rows):
        if other is row:
            continue
        if other["mode"] == "dense-gpu":
            out["dense-gpu"] = index
        elif (other["mode"] == "streaming-offload" and row["interval"] is not None
              and row["mode"] != "streaming-offload" and same(other, row)):
            out["streaming-offload"] = index
        elif (row.get("page_prefilter") and other["mode"] == row["mode"] and not other.get("page_prefilter")
              and same(other, row)):
            out[NO_PAGES] = index
        elif (row.get("keep_bonus") and other["mode"] == row["mode"] and not other.get("keep_bonus")
              and not other.get("page_prefilter") and same(other, row)):
            out[NO_BONUS] = index
    return out


def add_paired_ratios(context_rows: list[dict], rounds: list[list[dict]]) -> None:
    """Each row's ratios to its references (``paired_reference``) round by round: the two ran in the same round
    (every other round in reverse order), so load that drifts over minutes hits both alike, and the spread of the
    ratios over rounds gives the interval. ``paired_ratios`` {reference: ``ratio_summary``}, only where both ran
    in at least one round; ``round_order`` says how the rounds ran."""
    for index, row in enumerate(context_rows):
        paired = {}
        for reference, other in paired_reference(rounds[0][index], rounds[0]).items():
            ratios = [one[index]["median_ms"] / one[other]["median_ms"] for one in rounds
                      if one[index]["status"] == "ok" and one[other]["status"] == "ok"]
            if ratios:
                paired[reference] = ratio_summary(ratios)
        if paired:
            row["paired_ratios"] = paired
            row["round_order"] = "alternating"  # reports before 2026-12-07 05:00 (no such key): the same every round


def finish_rows(rows: list[dict], run: dict) -> None:
    """Ratios within each context, and the achieved rate against this run's memcpy peak."""
    add_ratios(rows)
    peaks = [p for p in (run["memcpy_peak_gbps_before"], run["memcpy_peak_gbps_after"]) if p is not None]
    for row in rows:
        gbps = row.get("h2d_gbps_over_step", math.nan)
        row["memcpy_peak_gbps"] = max(peaks) if peaks else None
        row["fraction_of_memcpy_peak"] = gbps / max(peaks) if peaks and row["status"] == "ok" else math.nan


def assemble(settings: LatencySettings, adapter, device: torch.device, run: dict, earlier_runs: list[dict],
             rows: list[dict]) -> dict:
    """The report: the latest run's provenance and settings, every run's command, all rows."""
    return {
        "benchmark": "latency",
        "provenance": {key: run[key] for key in ("command", "commit", "date")},
        "runs": earlier_runs + [run],
        "machine": machine_header(device),
        "settings": recorded_settings(settings) | {"new_tokens_per_run": settings.new_tokens,
                                                   "neighbors_on_radius": NEIGHBORS_ON,
                                                   "dtype": dtype_name(adapter.dtype),
                                                   "weights": adapter.weights_text(),
                                                   "model_dims": asdict(adapter.dims)},
        "pinned_memcpy_peak_gbps": {"before": run["memcpy_peak_gbps_before"], "after": run["memcpy_peak_gbps_after"]},
        "rows": sorted(rows, key=lambda r: r["context"]),
    }


SAME_SETUP = ("arch", "model", "device", "budget", "decode_steps", "warmup", "gather_method", "predictor_shape",
              "copy_thread", "predictor", "synthetic_kv_tile")
# settings older reports do not record: what they ran with
ADDED_LATER = {"copy_thread": False, "predictor": RANDOM_PREDICTOR, "synthetic_kv_tile": 0}


def recorded_settings(settings: LatencySettings) -> dict:
    """The settings as a report records them: a predictor folder by its name, never a path of this machine."""
    recorded = asdict(settings)
    if settings.predictor not in (RANDOM_PREDICTOR, SHIPPED_PREDICTOR):
        recorded["predictor"] = Path(settings.predictor).resolve().name
    return recorded


def previous_report(path: Path, settings: LatencySettings) -> tuple[list[dict], list[dict]]:
    """Rows of other contexts and the runs of an existing report made with the same set-up."""
    if not path.is_file():
        return [], []
    previous = json.loads(path.read_text())
    mine = recorded_settings(settings)
    earlier = previous.get("settings", {})
    differs = [key for key in SAME_SETUP if earlier.get(key, ADDED_LATER.get(key)) != mine[key]]
    if differs:
        raise ConfigError(f"--append: {path} was made with different {', '.join(differs)}; "
                          "use another --out, or run without --append to replace it.")
    rows = [row for row in previous.get("rows", []) if row["context"] not in settings.contexts]
    runs = [run for run in previous.get("runs", []) if set(run.get("contexts", [])) - set(settings.contexts)]
    return rows, runs


def report_stem(settings: LatencySettings) -> str:
    """``latency-<arch or model>-<device type>``."""
    arch = settings.arch or ""
    name = Path(settings.model).name if settings.model else (Path(arch).stem if arch.endswith(".json") else arch)
    return f"latency-{name}-{torch.device(settings.device).type}"


def _one_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    return (f"median {row['median_ms']:.2f} ms/step, p90 {row['p90_ms']:.2f}, prefill {row['prefill_s']:.2f} s, "
            f"{row['h2d_bytes_per_step'] / 2**20:.1f} MiB/step to the device")

