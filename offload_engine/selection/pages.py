"""The page prefilter: Quest's page bound over the compact keys, so that a step scores the tokens of the best
pages only.

At long contexts the CPU selection is bound by its logits: every cached token's compact key against every
query head at every step (bench/README.md, "Where selection stands on a CPU"). For a page of ``page`` tokens
with per-dimension maxima ``hi`` and minima ``lo`` of their compact keys (as scored: int8 codes times their
scales), no token of the page has a logit above ``q+ . hi + q- . lo`` (``q+``, ``q-`` the query's positive
and negative parts): one product of ``2 d'`` per page instead of ``page`` of ``d'``. A row (a layer and KV
head) then

1. ranks its complete pages by those bounds under its own rule (the mean over the query heads of each
   head's softmax over every complete page, or the largest head's bound),
2. keeps the ``ceil(factor * keep / page)`` best of the pages that hold candidates,
3. scores the candidates of those pages (and those of an incomplete page, which has no bound yet) as it
   scores every candidate without the prefilter; under the mean rule each head's softmax runs over them and
   the tokens always attended (sinks and window) instead of over every cached token,
4. and keeps the top ``keep`` of them.

A row applies it only where it pays: ``keep`` at least one page, and the kept pages at most half of the
pages that hold candidates (``PagePrefilter.kept_pages``); else, and where fewer candidates than ``keep``
came out, it scores every candidate as before. The native kernel (``tbrun_select_rows`` with bounds) and
``prefiltered_scores`` here select alike (tests/test_page_prefilter.py). What it costs in recall:
bench/reports/page_prefilter.md (pages of 16, 4 x the budget: about one point at 4k-8k tokens).

``PageBounds`` keeps the bounds of a compact key cache, ``[L, KvH, 2 d', pages]`` float32, the ``d'`` maxima
rows then the ``d'`` minima rows (dimension-major, as the keys), and on the CPU each complete page's keys
again as a block ``[L, KvH, pages, d', page]`` (int8 codes with their scales ``[L, KvH, pages, page]``): in the
cache's dimension-major rows a page of 16 int8 keys is 16 bytes of each of ``d'`` rows, and the native
kernel's gather of a quarter of the pages from there read most of every row's cache lines in scattered order,
slower than scoring every token (measured at 32k); from the blocks a page is a few lines in a row. Both are
derived from the cache: ``refresh(tokens)`` computes the pages completed since, from the cache as stored, so
every write path (prefill, prefix reuse, decode, native or torch) is covered by one call before they are
read; ``forget(length)`` drops the pages a rewind or a rewrite from ``length`` invalidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import native

# tokens per step of PageBounds.refresh: its float32 temporary is [L, KvH, d', REFRESH_TOKENS]
REFRESH_TOKENS = 4096
# int8 pages the native kernel scores in place (selection.cpp, QUAD_PAGE and QUAD_PAGE_HEADS): pages of this
# many tokens, at most this many query heads per KV head
QUAD_PAGE, QUAD_HEADS = 16, 16


@dataclass(frozen=True, slots=True)
class PagePrefilter:
    """The prefilter's setting: pages of ``page`` tokens; the tokens of ``factor`` times the budget's worth of
    pages scored. bench/reports/page_prefilter.md measured pages of 8-32 at 2x and 4x."""

    page: int = 16
    factor: float = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.page, int) or self.page < 2:
            raise ValueError(f"page prefilter: pages of {self.page!r} tokens; give an integer of at least 2")
        if not self.factor >= 1.0:
            raise ValueError(f"page prefilter: factor {self.factor!r} would score fewer tokens than it keeps; "
                             "give at least 1")

    def kept_pages(self, tokens: int, lo: int, hi: int, keep: int) -> int:
        """How many pages of candidates ``[lo, hi)`` a row keeps at a step of ``tokens`` cached tokens that
        selects ``keep`` of them; 0 where the prefilter does not apply (``keep`` under one page, or the kept
        pages more than half of the complete pages that hold candidates)."""
        first, last = lo // self.page, min(-(-hi // self.page), tokens // self.page)
        kept = math.ceil(self.factor * keep / self.page)
        return kept if keep >= self.page and 2 * kept <= last - first else 0


class PageBounds:
    """The page bounds of a compact key cache: ``bounds`` ``[L, KvH, 2 d', pages]`` float32 (page ``p``'s
    per-dimension maxima at ``[..., :d', p]``, minima at ``[..., d':, p]``; rows ``row_length`` apart, at least
    ``pages``: a caller may pad them, as the compact cache pads its own), and with a ``key_dtype`` (the cache's;
    ``native_block_dtype``) each page's keys for the native kernel, ``blocks`` ``[L, KvH, pages, d', page]``, or
    for int8 codes ``[L, KvH, pages, d' / 4, page, 4]`` (each token's dims in fours, as the kernel's quad
    products take them) with ``block_scales`` ``[L, KvH, pages, page]`` float16; all valid for the first
    ``complete`` pages."""

    def __init__(self, layers: int, kv_heads: int, dim: int, capacity: int, prefilter: PagePrefilter,
                 device: torch.device, row_length: int | None = None, key_dtype: torch.dtype | None = None):
        self.prefilter, self.dim = prefilter, dim
        self.pages = -(-capacity // prefilter.page)
        made = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in
                self.layout(layers, kv_heads, dim, capacity, prefilter, row_length, key_dtype).items()}
        self._storage = made["storage"]
        self.bounds = self._storage[..., : self.pages]
        self.blocks, self.block_scales = made.get("blocks"), made.get("block_scales")
        # int8 keys: the bounds as int8 codes too, rounded outwards (a bound stays a bound), 16 pages a block as
        # the keys' blocks are, for the kernel's quad products; `bounds` then holds those codes times their scale
        self.bound_codes, self.bound_blocks = made.get("bound_codes"), made.get("bound_blocks")
        self.bound_scales = made.get("bound_scales")
        self.complete = 0

    @staticmethod
    def layout(layers: int, kv_heads: int, dim: int, capacity: int, prefilter: PagePrefilter,
               row_length: int | None = None, key_dtype: torch.dtype | None = None
               ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a ``PageBounds`` of these arguments allocates."""
        pages = -(-capacity // prefilter.page)
        length = pages if row_length is None else row_length
        if length < pages:
            raise ValueError(f"row_length {length} holds fewer than the {pages} pages of {capacity} tokens")
        tensors = {"storage": ((layers, kv_heads, 2 * dim, length), torch.float32)}
        rows = (layers, kv_heads, pages)
        if key_dtype is not None:
            block = (dim // 4, prefilter.page, 4) if key_dtype == torch.int8 else (dim, prefilter.page)
            tensors["blocks"] = (rows + block, key_dtype)
        if key_dtype == torch.int8:
            groups = -(-pages // QUAD_PAGE)
            tensors["block_scales"] = (rows + (prefilter.page,), torch.float16)
            tensors["bound_codes"] = ((layers, kv_heads, 2 * dim, groups * QUAD_PAGE), torch.int8)
            tensors["bound_blocks"] = ((layers, kv_heads, groups, 2 * dim // 4, QUAD_PAGE, 4), torch.int8)
            tensors["bound_scales"] = ((layers, kv_heads, groups * QUAD_PAGE), torch.float16)
        return tensors

    @classmethod
    def bytes_needed(cls, *args, **kwargs) -> int:
        """Bytes a ``PageBounds(*args, **kwargs)`` allocates (its arguments but the device), before making it."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in cls.layout(*args, **kwargs).values())

    @property
    def nbytes(self) -> int:
        held = (self._storage, self.blocks, self.block_scales, self.bound_codes, self.bound_blocks, self.bound_scales)
        return sum(t.nbytes for t in held if t is not None)

    def of_layers(self, first: int, count: int) -> "LayerPages":
        """Bounds (and blocks) of ``count`` layers of the cache's from the ``first``-th, views."""
        span = slice(first, first + count)
        return LayerPages(*(None if t is None else t[span] for t in (
            self.bounds, self.blocks, self.block_scales, self.bound_blocks, self.bound_scales)))

    def forget(self, length: int) -> None:
        """Pages past the first ``length`` tokens are no longer valid (a rewind, or keys written again from
        ``length``)."""
        self.complete = min(self.complete, length // self.prefilter.page)

    @torch.no_grad()
    def refresh(self, keys: torch.Tensor, scales: torch.Tensor | None, tokens: int) -> None:
        """Bounds of the pages completed within the first ``tokens`` tokens since the last call, from the cache
        as stored: keys ``[L, KvH, d', capacity]`` (int8 codes with ``scales`` ``[L, KvH, capacity]``, or float)."""
        page = self.prefilter.page
        target = min(tokens, keys.shape[-1]) // page
        step = max(1, REFRESH_TOKENS // page)
        for first in range(self.complete, target, step):
            last = min(target, first + step)
            values = keys[..., first * page : last * page].float()
            if scales is not None:
                values = values * scales[..., first * page : last * page].float().unsqueeze(-2)
            values = values.unflatten(-1, (last - first, page))  # [L, KvH, d', pages, page]
            highest, lowest = values.amax(-1), values.amin(-1)
            if self.bound_codes is not None:
                highest, lowest = self._quantise_bounds(highest, lowest, first, last)
            self.bounds[:, :, : self.dim, first:last] = highest
            self.bounds[:, :, self.dim :, first:last] = lowest
            if self.blocks is not None:
                stored = keys[..., first * page : last * page].unflatten(-1, (last - first, page))  # [.., d', n, P]
                if self.block_scales is not None:  # int8: [.., n, d' / 4, P, 4], each token's 4 dims together
                    stored = stored.unflatten(2, (self.dim // 4, 4)).permute(0, 1, 4, 2, 5, 3)
                else:
                    stored = stored.transpose(2, 3)
                self.blocks[:, :, first:last] = stored
            if self.block_scales is not None:
                self.block_scales[:, :, first:last] = scales[..., first * page : last * page].unflatten(
                    -1, (last - first, page))
        self.complete = max(self.complete, target)

    def _quantise_bounds(self, highest: torch.Tensor, lowest: torch.Tensor, first: int, last: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages ``[first, last)``' bounds ``[L, KvH, d', n]`` as int8 codes with one float16 scale a page, the
        maxima rounded up and the minima down, into the bound codes, blocks and scales; -> the bounds the codes
        stand for (what both the kernel and the torch form rank pages by)."""
        extent = torch.maximum(highest.abs(), lowest.abs()).amax(2)  # [L, KvH, n]
        # the scale rounded up to float16 (its rounding at most 2^-11), so no code passes 127
        scale = (extent / 127 * (1 + 2**-10)).clamp(min=2**-14).half()
        factor = scale.float().unsqueeze(2)
        high = torch.ceil(highest / factor).clamp(-127, 127)
        low = torch.floor(lowest / factor).clamp(-127, 127)
        self.bound_codes[:, :, : self.dim, first:last] = high.to(torch.int8)
        self.bound_codes[:, :, self.dim :, first:last] = low.to(torch.int8)
        self.bound_scales[:, :, first:last] = scale
        a, b = first // QUAD_PAGE, -(-last // QUAD_PAGE)  # the blocks of 16 pages those pages are in
        codes = self.bound_codes[..., a * QUAD_PAGE : b * QUAD_PAGE].unflatten(-1, (b - a, QUAD_PAGE))
        self.bound_blocks[:, :, a:b] = codes.unflatten(2, (2 * self.dim // 4, 4)).permute(0, 1, 4, 2, 5, 3)
        return high * factor, low * factor


def native_block_dtype(key_dtype: torch.dtype, device: torch.device, dim: int, group: int,
                       prefilter: PagePrefilter) -> torch.dtype | None:
    """The dtype of the blocks ``PageBounds`` keeps for the native kernel's prefilter, or None where that kernel
    does not take it (not on the CPU, no kernels built, or int8 codes where its quad products do not run: they
    need pages of 16, ``d'`` a multiple of 4 and at most 16 query heads per KV head); then the torch path
    prefilters."""
    kernels = native.kernels() if device.type == "cpu" else None
    if kernels is None or key_dtype not in (torch.float32, torch.bfloat16, torch.int8):
        return None
    if key_dtype == torch.int8 and not (kernels.int8_quad_products and prefilter.page == QUAD_PAGE
                                        and dim % 4 == 0 and group <= QUAD_HEADS):
        return None
    return key_dtype


@dataclass(frozen=True, slots=True)
class LayerPages:
    """``PageBounds`` of some layers, views: ``bounds`` ``[Lg, KvH, 2 d', pages]`` and, where kept, ``blocks``,
    ``block_scales``, ``bound_blocks`` and ``bound_scales`` (shapes as ``PageBounds``' with ``Lg`` layers)."""

    bounds: torch.Tensor
    blocks: torch.Tensor | None = None
    block_scales: torch.Tensor | None = None
    bound_blocks: torch.Tensor | None = None
    bound_scales: torch.Tensor | None = None

    def layers(self, first: int, count: int) -> "LayerPages":
        span = slice(first, first + count)
        return LayerPages(*(None if t is None else t[span] for t in (
            self.bounds, self.blocks, self.block_scales, self.bound_blocks, self.bound_scales)))


@dataclass(frozen=True, slots=True)
class PageScoring:
    """What a ``GroupScores`` needs to prefilter: its layers' pages (``LayerPages``, refreshed up to the step's
    tokens), the setting, and the ``keep`` the step selects."""

    pages: LayerPages
    prefilter: PagePrefilter
    keep: int

    @property
    def bounds(self) -> torch.Tensor:
        return self.pages.bounds

    def layers(self, first: int, count: int) -> "PageScoring":
        return PageScoring(self.pages.layers(first, count), self.prefilter, self.keep)


def bound_logits(queries: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Each complete page's bound per query head: queries ``[..., g, d']``, bounds ``[..., 2 d', pages]`` ->
    ``[..., g, pages]`` float32 (``q+ . max + q- . min``)."""
    split = torch.cat([queries.clamp(min=0), queries.clamp(max=0)], dim=-1).float()
    return torch.matmul(split, bounds.float())


def prefiltered_scores(queries: torch.Tensor, logits_of, m: int, lo: int, hi: int, reduction: str,
                       pages: PageScoring) -> torch.Tensor | None:
    """The prefilter's scores ``[Lg, KvH, hi - lo]`` (float32; candidates not scored are ``-inf``), or None where
    no row applies it (the caller scores every candidate). queries ``[Lg, KvH, g, d']`` (scale folded in);
    ``logits_of(span)``: the rows' logits ``[Lg, KvH, g, len(span)]`` of the tokens of ``span`` (a slice). A
    row whose kept pages hold fewer than ``keep`` candidates gets its scores without the prefilter, as the
    kernel does."""
    prefilter, keep = pages.prefilter, pages.keep
    kept = prefilter.kept_pages(m, lo, hi, keep)
    if kept == 0:
        return None
    page, complete = prefilter.page, m // prefilter.page
    first, last = lo // page, min(-(-hi // page), complete)
    bounds = bound_logits(queries, pages.bounds[..., :complete])  # [Lg, KvH, g, complete]
    if reduction == "mean":
        page_scores = torch.softmax(bounds, dim=-1).mean(dim=-2)
    else:
        page_scores = bounds.amax(dim=-2)
    chosen = page_scores[..., first:last].topk(kept, dim=-1).indices + first  # [Lg, KvH, kept]
    picked = torch.zeros(*chosen.shape[:-1], -(-m // page), dtype=torch.bool, device=chosen.device)
    picked.scatter_(-1, chosen, True)
    picked[..., complete:] = True  # incomplete pages: no bound, always candidates
    in_pages = picked.repeat_interleave(page, dim=-1)[..., :m]  # [Lg, KvH, m]
    positions = torch.arange(m, device=chosen.device)
    candidate = in_pages & (positions >= lo) & (positions < hi)
    logits = logits_of(slice(0, m))
    full = full_scores(logits, lo, hi, reduction)
    if reduction == "mean":
        scored = candidate | (positions < lo) | (positions >= hi)
        masked = logits.masked_fill(~scored.unsqueeze(-2), float("-inf"))
        scores = torch.softmax(masked, dim=-1).mean(dim=-2)[..., lo:hi]
    else:
        scores = full.clone()
    scores = scores.masked_fill(~candidate[..., lo:hi], float("-inf"))
    enough = candidate.sum(-1, keepdim=True) >= keep  # [Lg, KvH, 1]
    return torch.where(enough, scores, full)


def full_scores(logits: torch.Tensor, lo: int, hi: int, reduction: str) -> torch.Tensor:
    """Scores of candidates ``[lo, hi)`` from every cached token's logits ``[..., g, m]``: the mean over heads of
    each head's softmax over all ``m``, or the largest head's logit."""
    if reduction == "max":
        return logits[..., lo:hi].amax(dim=-2)
    return torch.softmax(logits, dim=-1).mean(dim=-2)[..., lo:hi]


@dataclass(frozen=True, slots=True)
class PageRows:
    """Pages as the native selection reads them, one row per row of keys: ``bounds`` ``[R, 2 d', pages]`` float32
    (pages contiguous), ``blocks`` ``[R, pages, d', page]`` of the keys' dtype and, for int8 keys,
    ``block_scales`` ``[R, pages, page]`` float16 (views of ``PageBounds``' tensors), and the setting."""

    bounds: torch.Tensor
    blocks: torch.Tensor
    block_scales: torch.Tensor | None
    prefilter: PagePrefilter
    bound_blocks: torch.Tensor | None = None
    bound_scales: torch.Tensor | None = None


def page_rows(layer: LayerPages, prefilter: PagePrefilter) -> PageRows | None:
    """Some layers' pages as the native selection's rows, or None (no blocks, or not CPU tensors the kernel
    reads: then the native selection takes no prefilter, and the caller the torch path)."""
    if layer.blocks is None:
        return None
    bounds, rest = layer.bounds, (layer.blocks, layer.block_scales, layer.bound_blocks, layer.bound_scales)
    if bounds.device.type != "cpu" or bounds.dtype != torch.float32 or bounds.stride(-1) != 1:
        return None
    lg, kvh, dims, count = bounds.shape
    for t in (bounds,) + rest:  # rows at one stride, each row's own contiguous (bounds: pages contiguous)
        if t is not None and ((lg > 1 and t.stride(0) != kvh * t.stride(1)) or (t is not bounds and not t[0, 0].is_contiguous())):
            return None
    blocks, block_scales, bound_blocks, bound_scales = (None if t is None else t.flatten(0, 1) for t in rest)
    return PageRows(bounds.reshape(lg * kvh, dims, count), blocks, block_scales, prefilter, bound_blocks,
                    bound_scales)
