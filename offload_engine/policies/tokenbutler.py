"""TokenButler: a learned, query-aware predictor of token importance.

Akhauri et al., "TokenButler: Token Importance is Predictable" (arXiv 2503.07518, v2 form). At
each producer layer ``p`` (every G layers) a small network turns the current token's attention
input into importance queries for the layers ``p+1 .. p+G``; they score the compact projected-key
cache (``d'`` numbers per token, layer and KV head, kept on the device) so the selector can pick and
the prefetcher can start copying those layers' tokens ahead of their attention.

Layer 0 has no producer before it, so ``dense_layers()`` returns it: the engine keeps all its
tokens in the working set (with delta fetch only the token leaving the local window is copied
per step; see docs/predictor.md for the measurement behind this choice).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import native
from ..errors import ConfigError
from ..models import EMBEDDED_MODEL_NAME
from ..predictor.checkpoint import PredictorError, check_shape, load_checkpoint, resolve_checkpoint_dir
from ..predictor.network import PredictorConfig, TokenButlerPredictor, quantize_keys, seeded_random_predictor
from ..memory import dtype_name
from ..selection.pages import (QUAD_HEADS, QUAD_PAGE, PageBounds, PagePrefilter, PageScoring, native_block_dtype,
                               page_rows)
from ..selection.scores import GroupScores, NativeScoring, NetworkStep, native_rows
from .base import Candidates, Policy, PolicyContext

KEY_DTYPES = ("auto", "float32", "bfloat16", "int8")
# the longest cache the short-context predictor is taken for: paired on the same held-out sequences it selects
# better than the default one at 1,024 and 1,536 tokens, worse at 2,048 (bench/reports/predictor_short_context_paired.md)
SHORT_CONTEXT_TOKENS = 1536
GROUP_REDUCTIONS = ("mean", "max")
# Predictors shipped in the repository, by model name (the last part of a hub id or directory).
SHIPPED = {EMBEDDED_MODEL_NAME.lower(): "smollm2-135m-instruct"}
# ... and those trained for a prediction interval (``tbrun train-predictor --lookahead N``): by model
# name, then interval. A policy without a predictor given takes the one for its interval if shipped.
SHIPPED_FOR_INTERVAL = {EMBEDDED_MODEL_NAME.lower(): {4: "smollm2-135m-instruct-interval4"}}
# ... and those fine-tuned for short contexts: by model name, (the longest context they are taken for, the
# folder). At interval 1, a cache of at most that many tokens (the engine's --context, vLLM's max_model_len)
# takes it: the default predictor learned long-range attention, and a short cache's attention differs
# (docs/predictor.md, "Shipped for short contexts").
SHIPPED_FOR_SHORT_CONTEXT = {EMBEDDED_MODEL_NAME.lower(): (SHORT_CONTEXT_TOKENS, "smollm2-135m-instruct-1k")}


def shipped_predictors_dir() -> Path:
    """``$TBRUN_PREDICTORS`` or the repository's ``predictors/`` folder."""
    return Path(os.environ.get("TBRUN_PREDICTORS") or Path(__file__).resolve().parents[2] / "predictors")


def shipped_predictor_for(adapter, interval: int = 1, context: int | None = None) -> Path | None:
    """The shipped predictor directory for the adapter's model at prediction ``interval`` and a cache of
    ``context`` tokens (None: unknown, the default one), or None."""
    return shipped_predictor_named(str(getattr(adapter.config, "_name_or_path", "") or ""), interval, context)


def shipped_predictor_named(source: str, interval: int = 1, context: int | None = None) -> Path | None:
    """The shipped predictor for the model at ``source`` (hub id or directory; its last part, lower case,
    names it): the one trained for prediction ``interval`` (``--lookahead``) when that folder is
    there; at interval 1 with a cache of at most its ``context`` tokens, the one fine-tuned for short
    contexts when there is one; else the model's default one. None when nothing is shipped for the model."""
    name = Path(source.rstrip("/")).name.lower()
    trained = SHIPPED_FOR_INTERVAL.get(name, {}).get(interval)
    if trained is not None and (shipped_predictors_dir() / trained).is_dir():
        return shipped_predictors_dir() / trained
    longest, short = SHIPPED_FOR_SHORT_CONTEXT.get(name, (0, None))
    if interval == 1 and context is not None and context <= longest and (shipped_predictors_dir() / short).is_dir():
        return shipped_predictors_dir() / short
    return shipped_predictors_dir() / SHIPPED[name] if name in SHIPPED else None


class ProjectedKeyCache:
    """The compact key cache of consumer layers ``1 .. L-1``, stored ``[L-1, KvH, d', capacity]``.

    Dimension-major (each of the ``d'`` numbers of every token in one row): scoring is then a
    ``[g, d'] x [d', m]`` product over contiguous rows, 1.3x faster on the CPU than over token-major
    ``[m, d']`` keys read transposed (measured cold, 14 producers a step, 7.5k and 32k tokens; not
    measured on a GPU). ``dtype`` int8: keys stored as int8 codes with one float16 scale per (layer, KV
    head, token) (``d' + 2`` bytes per entry instead of ``2 d'`` in bfloat16 or ``4 d'`` in float32).
    """

    def __init__(self, layers: int, kv_heads: int, capacity: int, dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.int8 = dtype == torch.int8
        storage, scales = self.layout(layers, kv_heads, capacity, dim, dtype, device)
        self._storage = torch.zeros(storage, dtype=dtype, device=device)
        self.keys = self._storage[..., :capacity]  # [L-1, KvH, d', capacity] view
        self.scales = None if scales is None else torch.zeros(scales, dtype=torch.float16, device=device)

    @staticmethod
    def layout(layers: int, kv_heads: int, capacity: int, dim: int, dtype: torch.dtype, device: torch.device
               ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The shapes of the keys' storage and of the int8 codes' float16 scales (None for other dtypes)."""
        # rows padded a cache line past a multiple of 4 KiB: at a power-of-two capacity the d' rows a
        # scoring kernel streams side by side would fall in the same CPU cache sets (the kernel's logits
        # 2.3x slower at 32k, measured on an AMD EPYC)
        padded = padded_row_length(capacity, dtype) if device.type == "cpu" else capacity
        return (layers, kv_heads, dim, padded), ((layers, kv_heads, capacity) if dtype == torch.int8 else None)

    @classmethod
    def bytes_needed(cls, layers: int, kv_heads: int, capacity: int, dim: int, dtype: torch.dtype,
                     device: torch.device) -> int:
        """Bytes a cache of these arguments allocates (``nbytes``), before making it."""
        storage, scales = cls.layout(layers, kv_heads, capacity, dim, dtype, device)
        return math.prod(storage) * dtype.itemsize + (0 if scales is None else math.prod(scales) * 2)

    @property
    def nbytes(self) -> int:
        return self._storage.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    @staticmethod
    def entry_bytes(dtype: torch.dtype, dim: int) -> int:
        """Bytes one token's key takes in one KV head's row, as a scoring pass reads them: ``d'`` values of
        ``dtype``, and for int8 codes the token's float16 scale (``d' + 2``)."""
        return dim * dtype.itemsize + (2 if dtype == torch.int8 else 0)

    def write(self, layer: int, start: int, keys: torch.Tensor) -> None:
        """keys ``[KvH, T, d']`` of consumer ``layer`` at positions ``start .. start+T-1``."""
        end = start + keys.shape[1]
        if not self.int8:
            self.keys[layer - 1, :, :, start:end] = keys.transpose(-1, -2).to(self.keys.dtype)
            return
        quantized, self.scales[layer - 1, :, start:end] = quantize_keys(keys)
        self.keys[layer - 1, :, :, start:end] = quantized.transpose(-1, -2)

    def write_token(self, layer: int, position: int, keys: torch.Tensor) -> None:
        """keys ``[KvH, d']`` of consumer ``layer`` at one ``position``: ``write`` of a decode step, in one copy."""
        if self.int8:
            self.write(layer, position, keys.unsqueeze(1))
            return
        self.keys[layer - 1, :, :, position].copy_(keys)

    def read(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        """Projected keys of positions ``[lo, hi)``: ``[KvH, hi-lo, d']`` (dequantised if int8)."""
        keys = self.keys[layer - 1, :, :, lo:hi].transpose(-1, -2)
        if not self.int8:
            return keys
        return keys.float() * self.scales[layer - 1, :, lo:hi].float().unsqueeze(-1)

    def of_layers(self, layers: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole capacity of consumer ``layers``: keys ``[Lg, KvH, d', capacity]`` as stored and, for int8
        codes, their scales ``[Lg, KvH, capacity]`` (else None); views."""
        rows = slice(layers.start - 1, layers.stop - 1)
        return self.keys[rows], None if self.scales is None else self.scales[rows]

    def columns(self, layers: range, lo: int, hi: int) -> torch.Tensor:
        """Keys of consumer ``layers`` at positions ``[lo, hi)`` as stored: ``[Lg, KvH, d', m]``
        (int8 codes when quantised; ``scales`` has their factors)."""
        return self.keys[layers.start - 1 : layers.stop - 1, :, :, lo:hi]


def compact_key_dtype(key_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the compact cache stores projected keys in, for the policy's ``key_dtype``.

    ``"auto"`` is the model's dtype, except a float32 model on the CPU with the native kernels built: int8
    there where the CPU has AVX512-VNNI, else bfloat16. Scoring is the CPU selection's largest cost, and it
    reads every cached key at every step. With VNNI the kernel multiplies int8 codes by the query quantised to
    int8 in integer quad products, 64 an instruction, from 18 bytes a token and KV head at d' = 16 (bfloat16:
    32): less selection a step in the engine, side by side with bfloat16 keys
    (bench/reports/overhead_vllm_cpu_tiled.md, the ``:1:bfloat16`` runner; the kernel alone:
    bench/reports/selection_cpu.md), the same held-out recall (``tokenbutler_int8`` in
    bench/reports/predictor_key_dtype.md: keys and query quantised) and niah answers
    (bench/reports/eval/niah-4k-int8-keys). Without VNNI bfloat16 keys: half the bytes of float32,
    multiplied in pairs with AVX512-BF16 (else widened as read);
    int8 keys there are no faster, their codes widened too (docs/predictor.md, "int8 projected keys").
    Without the kernels torch would convert the keys on every call, so they stay in the model's dtype.
    """
    if key_dtype in ("float32", "bfloat16"):
        return getattr(torch, key_dtype)
    if key_dtype == "int8":
        return torch.int8
    kernels = native.kernels() if model_dtype == torch.float32 and device.type == "cpu" else None
    if kernels is not None:
        return torch.int8 if kernels.int8_quad_products else torch.bfloat16
    return model_dtype


def padded_row_length(capacity: int, dtype: torch.dtype) -> int:
    """A row length of at least ``capacity`` elements whose bytes are one 64-byte cache line past a multiple
    of 4 KiB, so that rows read side by side start in different cache sets (rows a multiple of 4 KiB apart
    share one set and evict each other). At most 4 KiB + 64 bytes more per row; rows under 4 KiB are left
    as they are."""
    size = torch.empty((), dtype=dtype).element_size()
    if capacity * size < 4096:
        return capacity
    return (-(-capacity * size // 4096) * 4096 + 64) // size


@dataclass
class TokenButlerPolicy(Policy):
    """Scores for a producer's consumer layers from its importance queries and the compact cache.

    ``predictor_path``: a checkpoint directory (from ``tbrun train-predictor``); ``predictor``:
    an in-memory predictor (tests); with neither, the predictor shipped for the model, if any.
    ``random_weights``: a randomly initialised predictor of the model's shape with the reference
    sizes (G=4, d'=16, I=512), for latency measurements only (its selections mean nothing).
    ``key_dtype``: how the compact cache stores projected keys. ``"auto"``: the model dtype, but for a
    float32 model on the CPU where the native kernels are built int8 (AVX512-VNNI) or bfloat16
    (``compact_key_dtype``);
    ``"float32"`` / ``"bfloat16"``: that dtype; ``"int8"``: quantised, one scale per token and head.
    ``group_reduction`` (GQA): ``"mean"`` ranks a KV head's tokens by the mean over its query heads of
    the predicted attention probabilities (each head's softmax over every cached token), ``"max"`` by
    the largest query-head logit (the reference's rule). Mean recalls more of the true attention
    (docs/predictor.md); with one query head per KV head (``--query-heads`` at training) both rank
    alike, and the logits are ranked as they are (no softmax: ``score_kind`` "logit").
    ``page_prefilter``: pages of that many tokens ranked by their compact keys' bounds before tokens are
    scored, the tokens of ``prefilter_factor`` times the budget's worth of the best pages then scored as
    without it (``selection/pages.py``); 0: every candidate scored.
    """

    predictor_path: str | None = None
    predictor: TokenButlerPredictor | None = None
    random_weights: bool = False
    key_dtype: str = "auto"
    group_reduction: str = "mean"
    page_prefilter: int = 0
    prefilter_factor: float = 4.0

    name: ClassVar[str] = "tokenbutler"
    prefill_reads: ClassVar[frozenset[str]] = frozenset()  # neither x nor q at prefill
    plans_ahead: ClassVar[bool] = True
    supports_rewind: ClassVar[bool] = True  # projected keys are per token

    def __post_init__(self) -> None:
        if self.random_weights and (self.predictor is not None or self.predictor_path is not None):
            raise ConfigError("tokenbutler: random_weights excludes a predictor or predictor_path.")
        if self.group_reduction not in GROUP_REDUCTIONS:
            raise ConfigError(f"tokenbutler group_reduction must be one of {GROUP_REDUCTIONS}, got {self.group_reduction!r}.")
        if self.key_dtype not in KEY_DTYPES:
            raise ConfigError(f"tokenbutler key_dtype must be one of {KEY_DTYPES}, got {self.key_dtype!r}.")
        self.prefilter: PagePrefilter | None = None
        if self.page_prefilter:
            try:
                self.prefilter = PagePrefilter(self.page_prefilter, float(self.prefilter_factor))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"tokenbutler {error} (page_prefilter 0 turns it off).") from None
        self.pages: PageBounds | None = None
        self.cache: ProjectedKeyCache | None = None
        self._queries: dict[int, torch.Tensor] = {}  # producer -> its latest queries [G', H, d']
        self._native_mlps: dict[int, tuple] = {}  # producer -> its query network's modules (native_query_mlps)
        self._bound_mlps: dict[int, native.BoundQueryMLP] = {}  # producer -> its network on the native kernel
        # what answers, for a run's statistics: a checkpoint's folder and weights hash (set when loaded)
        self.predictor_source = "random weights (seeded)" if self.random_weights else (
            "given in memory" if self.predictor is not None else "")
        self.stored_key_dtype: torch.dtype | None = None  # what key_dtype resolved to (set by bind)

    @property
    def by_max(self) -> bool:
        """Whether rows rank by their largest query-head logit: the "max" rule, or one query head per KV head
        (where the mean of one softmax ranks as its logits do)."""
        return self.group_reduction == "max" or (self.predictor is not None and self.predictor.config.query_group == 1)

    @property
    def score_kind(self) -> str:
        """What the scores are, for wrappers (critical): "logit" when ranked ``by_max``, else "mass" (the
        group's mean predicted probabilities)."""
        return "logit" if self.by_max else "mass"

    def prepare(self, ctx: PolicyContext) -> None:
        """The predictor loaded (and checked against the model) and the compact keys' dtype decided: what sizes
        the state, before anything is allocated."""
        self.ctx = ctx
        if self.predictor is None:
            self.predictor = self._load(ctx)
        check_shape({"model_shape": self.predictor.config.model_shape()}, ctx.dims,
                    self.predictor_path or "the given predictor")
        self.stored_key_dtype = compact_key_dtype(self.key_dtype, ctx.dtype, ctx.device)

    def state_bytes(self) -> int:
        """The compact key cache and, with the page prefilter, its page bounds; and the predictor's weights where
        ``bind`` moves them to the device (they are loaded on the CPU)."""
        ctx, c = self.ctx, self.predictor.config
        total = ProjectedKeyCache.bytes_needed(c.num_layers - 1, c.num_kv_heads, ctx.capacity, c.dim,
                                               self.stored_key_dtype, ctx.device)
        moved = (p for p in self.predictor.parameters() if p.device.type != ctx.device.type)
        total += sum(p.numel() * p.element_size() for p in moved)
        if self.prefilter is not None:
            total += PageBounds.bytes_needed(*self._page_arguments(ctx))
        return total

    def bind(self, ctx: PolicyContext) -> None:
        self.prepare(ctx)  # again, cheap: the predictor is loaded once
        self.predictor = self.predictor.to(ctx.device).eval()
        c, stored = self.predictor.config, self.stored_key_dtype
        self.cache = ProjectedKeyCache(c.num_layers - 1, c.num_kv_heads, ctx.capacity, c.dim, stored, ctx.device)
        if self.prefilter is not None:
            layers, heads, dim, capacity, prefilter, padded, blocks = self._page_arguments(ctx)
            self.pages = PageBounds(layers, heads, dim, capacity, prefilter, ctx.device, padded, blocks)
        self._queries = {}
        self._native_mlps = native_query_mlps(self.predictor)
        self._bound_mlps = {}
        self._decode_projections = None  # (position, projection, its version, key_projections_at(position), writer)

    def _page_arguments(self, ctx: PolicyContext) -> tuple:
        """``PageBounds``' arguments but the device: (layers, KV heads, d', capacity, prefilter, row length, block
        dtype). Refuses pages the CPU kernel cannot take where it is what selects."""
        c, stored = self.predictor.config, self.stored_key_dtype
        blocks = native_block_dtype(stored, ctx.device, c.dim, c.query_group, self.prefilter)
        if blocks is None and ctx.device.type == "cpu" and native.kernels() is not None and stored in (
                torch.float32, torch.bfloat16, torch.int8):  # the native selection runs, but not with these pages
            raise ConfigError(
                f"--page-prefilter {self.prefilter.page} with {dtype_name(stored)} compact keys: the CPU kernel "
                f"takes int8 keys' pages of {QUAD_PAGE} only, with AVX512-VNNI, d' a multiple of 4 and at most "
                f"{QUAD_HEADS} query heads per KV head (here d' {c.dim}, {c.query_group} heads); use "
                f"--page-prefilter {QUAD_PAGE} or --key-dtype bfloat16 (the torch form would score every token "
                "anyway, slower than no prefilter).")
        pages = -(-ctx.capacity // self.prefilter.page)
        padded = padded_row_length(pages, torch.float32) if ctx.device.type == "cpu" else pages
        return c.num_layers - 1, c.num_kv_heads, c.dim, ctx.capacity, self.prefilter, padded, blocks

    def _load(self, ctx: PolicyContext) -> TokenButlerPredictor:
        if self.random_weights:
            return seeded_random_predictor(PredictorConfig.for_model(ctx.dims))
        path = self.predictor_path
        if path is None:
            shipped = (shipped_predictor_for(ctx.adapter, ctx.interval, ctx.capacity) if ctx.adapter is not None
                       else shipped_predictor_named(ctx.model_source, ctx.interval, ctx.capacity))
            if shipped is None:
                raise PredictorError(
                    "--policy tokenbutler needs a predictor for this model: pass --predictor DIR (train one with "
                    f"`tbrun train-predictor`); shipped predictors exist for: {', '.join(SHIPPED)}."
                )
            path = str(shipped)
        predictor, config = load_checkpoint(path, ctx.dims)
        loaded = resolve_checkpoint_dir(path)  # a training run's folder: its latest checkpoint
        self.predictor_source = f"{loaded.name} (weights {str(config.get('weights_sha256'))[:8]})"
        return predictor

    def release(self) -> None:
        self.cache = None
        self.pages = None
        self._queries = {}
        self._native_mlps = {}
        self._bound_mlps = {}
        self._decode_projections = None

    def dense_layers(self) -> frozenset[int]:
        """Layer 0 has no producer ahead of it: all its tokens stay resident."""
        return frozenset({0})

    def is_producer(self, layer: int) -> bool:
        return self.predictor is not None and self.predictor.is_producer(layer)

    def served_by(self, producer: int) -> range:
        return self.predictor.config.consumers(producer) if self.is_producer(producer) else range(0)

    def rewind(self, length: int) -> None:
        """Projected keys past ``length`` are rewritten before they are read; the producers' queries
        belong to the sequence that is gone; so do the page bounds past ``length``."""
        self._queries = {}
        if self.pages is not None:
            self.pages.forget(length)

    def observe_prefill(self, layer, x, q, k, v) -> None:
        self.observe_extend(layer, 0, x, q, k, v)

    @torch.no_grad()
    def observe_extend(self, layer, start, x, q, k, v) -> None:
        if layer >= 1:
            self.cache.write(layer, start, self.predictor.project_keys(layer, k, start))
            if self.pages is not None:
                self.pages.forget(start)

    def observe_decode(self, layer, position, x, q, k, v) -> None:
        """k ``[KvH, D]``: the new token's key, projected with the step's rotation folded in (``_projections_at``).
        Under no_grad only where gradients are on (the engine decodes in inference mode; the decorator's own cost
        was ~5% of a tokenbutler step's selection, at every layer)."""
        if layer < 1:
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._write_decode_key(layer, position, k)
        else:
            self._write_decode_key(layer, position, k)

    def _write_decode_key(self, layer: int, position: int, k: torch.Tensor) -> None:
        projections, writer = self._projections_at(position)
        if writer is not None and writer(layer - 1, position, k):  # the native call (a float32 key on the CPU)
            return
        projected = torch.matmul(k.unsqueeze(1).to(self.predictor.key_proj.dtype), projections[layer - 1])  # [KvH, 1, d']
        self.cache.write_token(layer, position, projected.squeeze(1))

    def _projections_at(self, position: int) -> tuple[torch.Tensor, "native.BoundKeyWriter | None"]:
        """``predictor.key_projections_at(position)``, made at the step's first layer and kept for its others
        (remade if the predictor's projection was replaced since, or changed in place through autograd's
        view of it; an inference tensor, made under ``torch.inference_mode``, counts no versions and is
        taken as it is), and the native writer of keys through them into the compact cache where there is
        one (``SelectionKernels.bind_key_writer``: float32 projections, a float32, bfloat16 or int8 cache on the CPU),
        kept from step to step while they are the same memory."""
        proj = self.predictor.key_proj
        version = None if proj.is_inference() else proj._version
        held = self._decode_projections
        if held is None or held[0] != position or held[1] is not proj or held[2] != version:
            projections = self.predictor.key_projections_at(position)
            writer = held[4] if held is not None else None
            kernels, keys, scales = native.kernels(), self.cache.keys, self.cache.scales
            if kernels is None:
                writer = None
            elif writer is None or not writer.matches(projections, keys, scales):
                writer = kernels.bind_key_writer(projections, keys, scales)
            # the projection itself is held (compared by identity): its memory cannot be reused by another
            self._decode_projections = (position, proj, version, projections, writer)
        return self._decode_projections[3], self._decode_projections[4]

    @torch.no_grad()
    def plan(self, layer: int, x: torch.Tensor, candidates: Candidates, only: range | None = None,
             describe: bool = False) -> tuple[range, torch.Tensor | GroupScores]:
        """At producer ``layer``: x ``[E]`` -> (its consumer layers, or ``only`` of them, and their
        scores ``[Lg, KvH, n]`` float32; with ``describe``, their ``GroupScores``, not yet computed).

        One MLP call for the importance queries of every consumer (kept for ``score``), one batched
        matmul against the compact keys of the layers scored, one group reduction: no loop over
        layers or heads.
        """
        served = self.predictor.config.consumers(layer)
        layers = served if only is None else only
        if layers.step != 1 or (len(layers) and (layers.start < served.start or layers.stop > served.stop)):
            raise ValueError(f"tokenbutler: producer {layer} serves layers {served.start}-{served.stop - 1}, "
                             f"not {list(layers)}")
        self._queries[layer] = self._importance_queries(layer, x, candidates.position)  # [Lg, Hq, d']
        first = layers.start - served.start
        return layers, self._group_scores(layers, self._queries[layer][first : first + len(layers)], candidates,
                                          describe)

    def _importance_queries(self, producer: int, x: torch.Tensor, position: int) -> torch.Tensor:
        """x ``[E]`` -> ``[Lg, Hq, d']``: the predictor's queries, through the native kernel where it applies
        (``native_query_mlps``), else the predictor itself. The weights are those the predictor's modules hold
        at every call: a bound kernel call is made again when a parameter was replaced or moved since."""
        modules = self._native_mlps.get(producer)
        if modules is None or x.dim() != 1 or native.kernels() is None:
            return self.predictor.importance_queries(producer, x, position)
        c = self.predictor.config
        out = self._bound_mlp(producer, modules)(x if x.dtype == torch.float32 and x.is_contiguous()
                                                 else x.to(torch.float32).contiguous())
        return out.view(len(c.consumers(producer)), c.query_heads, c.dim)

    def _bound_mlp(self, producer: int, modules: tuple) -> "native.BoundQueryMLP":
        """The producer's query network bound to the native kernel, bound again if its weights changed."""
        norm, first, second = modules
        bound = self._bound_mlps.get(producer)
        params = norm._parameters  # (Module.__getattr__ costs more than the check, at every producer and step)
        if bound is None or not bound.matches(params["weight"], params.get("bias"), norm.eps,
                                              first._parameters["weight"], second._parameters["weight"]):
            bound = self._bound_mlps[producer] = native.kernels().bind_query_mlp(
                norm.weight, norm.bias, float(norm.eps), first.weight, second.weight)
        return bound

    @property
    def _query_scale(self) -> float:
        """1/sqrt(d'), folded into the few queries (``_group_scores``, ``native_scoring``), not applied to the
        ``[Lg, KvH, g, m]`` logits."""
        return 1.0 / math.sqrt(self.predictor.config.dim)

    def native_scoring(self, producer: int) -> NativeScoring | None:
        """``plan(producer, ..., describe=True)``'s scores bound once (``NativeScoring``), where the native kernels
        score them: a CPU compact cache whose consumer rows sit at one stride, and the native query network."""
        c = self.predictor.config if self.predictor is not None else None
        if c is None or self.cache is None or producer not in self._native_mlps or native.kernels() is None:
            return None
        layers = c.consumers(producer)
        keys, scales = self.cache.of_layers(layers)  # as _group_scores describes them
        # the check GroupScores makes at every step, made once
        rows = native_rows(torch.empty(len(layers), c.num_kv_heads, c.query_group, c.dim), keys, scales)
        if rows is None:
            return None
        _, row_keys, row_scales = rows
        scale, shape = self._query_scale, (len(layers) * c.num_kv_heads, c.query_group, c.dim)
        pages = None
        if self.pages is not None:
            pages = page_rows(self.pages.of_layers(layers.start - 1, len(layers)), self.prefilter)
            if pages is None:
                return None

        def queries(x: torch.Tensor, position: int) -> torch.Tensor:
            self._queries[producer] = raw = self._importance_queries(producer, x, position)  # [Lg, Hq, d']
            self._refresh_pages(position)
            return (raw * scale).view(shape)

        modules, raw_shape = self._native_mlps[producer], (len(layers), c.query_heads, c.dim)

        def before(position: int, raw: torch.Tensor) -> None:  # the selection runs the network: raw is its output
            self._queries[producer] = raw.view(raw_shape)
            self._refresh_pages(position)

        network = NetworkStep(lambda: self._bound_mlp(producer, modules), scale, before)
        return NativeScoring(layers, queries, row_keys, "max" if self.by_max else "mean", row_scales, pages, network)

    def _refresh_pages(self, tokens: int) -> None:
        """The page bounds of every page complete within the first ``tokens`` (no-op without the prefilter)."""
        if self.pages is not None and tokens // self.prefilter.page > self.pages.complete:
            self.pages.refresh(self.cache.keys, self.cache.scales, tokens)

    @torch.no_grad()
    def score(self, layer: int, q: torch.Tensor | None, candidates: Candidates) -> torch.Tensor:
        """Consumer ``layer``'s scores from its producer's latest queries: ``[KvH, n]`` float32.

        ``q`` (the model's own query) is not used: the prediction was made at the producer.
        """
        producer = self.predictor.config.producer_of(layer)
        if producer not in self._queries:
            raise RuntimeError(f"tokenbutler: layer {layer} scored before its producer {producer} planned")
        index = layer - producer - 1
        queries = self._queries[producer][index : index + 1]  # [1, Hq, d']
        return self._group_scores(range(layer, layer + 1), queries, candidates)[0]

    def _group_scores(self, layers: range, queries: torch.Tensor, candidates: Candidates,
                      describe: bool = False) -> torch.Tensor | GroupScores:
        """Scores of consecutive consumer ``layers`` from their queries ``[Lg, Hq, d']`` -> ``[Lg, KvH, n]``.

        ``by_max``: the largest query-head logit of each KV group (``score_kind`` "logit"; with one query
        head per KV head its logits). Else the group's mean predicted attention probability (``score_kind``
        "mass"), each head's softmax running over every cached token (sinks and window included), so heads
        that look elsewhere weigh less in their group's ranking. ``describe``: the scores as a
        ``GroupScores`` (not computed; the selection may fuse them with its top-k).
        """
        c = self.predictor.config
        lo, hi = candidates.lo, candidates.hi
        if hi <= lo:
            return torch.empty(len(layers), c.num_kv_heads, 0, device=queries.device)
        reduction = "max" if self.by_max else "mean"
        # the softmax of the mean rule runs over every cached token (consumers have not written t yet): the
        # first `position` of the cache's columns, given whole ([Lg, KvH, d', capacity]: one layout at every step)
        keys, scales = self.cache.of_layers(layers)
        grouped = queries.reshape(len(layers), c.num_kv_heads, c.query_group, c.dim) * self._query_scale
        pages = None
        if self.pages is not None:
            self._refresh_pages(candidates.position)
            pages = PageScoring(self.pages.of_layers(layers.start - 1, len(layers)), self.prefilter,
                                min(candidates.keep, candidates.count))
        described = GroupScores(grouped, keys, lo, hi, reduction, scales, tokens=candidates.position, pages=pages)
        return described if describe else described.compute()


def native_query_mlps(predictor: TokenButlerPredictor) -> dict[int, tuple]:
    """Per producer, the modules of its query network (``LayerNorm``, first ``Linear``, second ``Linear``)
    for the native kernel (``SelectionKernels.bind_query_mlp``, which checks their weights are float32 on the
    CPU when the policy binds them; ``_bound_mlp`` binds again when a parameter was replaced or moved), where
    the native kernels are built and the predictor is a float32 one on the CPU without rotation; else empty (the torch path). One decode token's queries take 0.2 ms in torch with
    the weights out of the caches (as every step leaves them), tens of microseconds in the kernel."""
    kernels = native.kernels()
    if (kernels is None or predictor.key_proj.device.type != "cpu" or predictor.key_proj.dtype != torch.float32
            or predictor.config.uses_positions):
        return {}
    out = {}
    for index, producer in enumerate(predictor.config.producers):  # queries[i] is producers[i]'s network
        norm, first, _, second = predictor.queries[index]
        out[producer] = (norm, first, second)
    return out
