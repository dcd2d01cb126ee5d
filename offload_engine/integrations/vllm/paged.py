"""Decode-time selection over a paged KV cache, for a batch of sequences at once. Pure torch.

vLLM keeps each layer's KV in blocks: ``key_cache``, ``value_cache`` ``[num_blocks, KvH, bs, D]``;
a sequence's position ``p`` lives in slot ``block_table[b, p // bs] * bs + p % bs``. This module
turns a decode batch into per-sequence slot tables, scores candidates with tbrun's policies
(the math from ``offload_engine.policies``), takes the top-k under tbrun's budget arithmetic
(``offload_engine.selection.Selector``) and attends sinks + window + the selection.

Policy state that must follow the KV (TokenButler's projected keys, Quest's page bounds,
CriticalKV's value norms) is kept *by slot* beside vLLM's blocks (``SlotState``): written when a
token's K/V is written, at the same slot, so it follows vLLM's allocation, freeing, prefix sharing
and reuse of blocks with no bookkeeping of its own.

Shapes: ``B`` decode sequences, ``H`` query heads, ``KvH`` KV heads, ``G = H / KvH``, ``D`` head
dim, ``L`` the longest sequence of the batch, ``N`` attended positions per (sequence, KV head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import native
from ...policies.critical import attention_like, value_norms
from ...policies.quest import page_scores
from ...selection.ranking import PAD
from ...selection.selector import Selector

NEG_INF = float("-inf")


# -- the decode batch ------------------------------------------------------------------------------
@dataclass(slots=True)
class DecodeBatch:
    """The decode sequences of one forward pass (shared by every layer of it)."""

    rows: torch.Tensor  # [B] long: each sequence's row in the query tensor
    lengths: torch.Tensor  # [B] long: tokens cached, the current one included (its position is length - 1)
    slots: torch.Tensor  # [B, L] long: slot of each position, -1 past the length
    fixed: torch.Tensor  # [B, S + W] long: sink and window positions, -1 where there are none
    candidate: torch.Tensor  # [B, L] bool: positions in [lo, hi) (the policy's candidates)
    keep: torch.Tensor  # [B] long: candidates each sequence keeps per KV head
    most: int  # max(keep)
    all_fit: bool  # every sequence keeps every candidate (nothing to score)

    @property
    def size(self) -> int:
        return self.rows.shape[0]


def slot_table(block_table: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_table ``[B, blocks]``, lengths ``[B]`` -> slots ``[B, L]`` long (-1 past each length)."""
    longest = int(lengths.max())
    positions = torch.arange(longest, device=lengths.device)
    blocks = block_table[:, : -(-longest // block_size)].long()
    slots = blocks[:, positions // block_size] * block_size + positions % block_size
    return torch.where(positions < lengths.unsqueeze(1), slots, torch.full_like(slots, PAD))


def decode_batch(rows: torch.Tensor, lengths: torch.Tensor, block_table: torch.Tensor, block_size: int,
                 selector: Selector) -> DecodeBatch:
    """The decode rows' slot tables, sinks, windows and candidates under ``selector``'s budget.

    rows ``[B]`` (query rows), lengths ``[B]`` (cached tokens incl. the current), block_table ``[B, blocks]``.
    """
    config = selector.config
    slots = slot_table(block_table, lengths, block_size)
    positions = torch.arange(slots.shape[1], device=lengths.device)
    found = [selector.candidates(1, int(n) - 1) for n in lengths.tolist()]  # layer 1: not a dense layer
    lo = torch.tensor([c.lo for c in found], device=lengths.device)
    hi = torch.tensor([c.hi for c in found], device=lengths.device)
    keep = torch.tensor([c.keep for c in found], device=lengths.device)
    candidate = (positions >= lo.unsqueeze(1)) & (positions < hi.unsqueeze(1))
    sinks = torch.arange(config.sinks, device=lengths.device).expand(len(found), -1)
    sinks = torch.where(sinks < lengths.unsqueeze(1), sinks, torch.full_like(sinks, PAD))
    window = hi.unsqueeze(1) + torch.arange(config.window, device=lengths.device)
    window = torch.where(window < lengths.unsqueeze(1), window, torch.full_like(window, PAD))
    return DecodeBatch(rows=rows, lengths=lengths, slots=slots, fixed=torch.cat([sinks, window], dim=1),
                       candidate=candidate, keep=keep, most=int(keep.max()) if found else 0,
                       all_fit=all(c.fits for c in found))


def sub_batch(batch: DecodeBatch, which: torch.Tensor) -> DecodeBatch:
    """The sequences ``which`` ``[b]`` of a batch (for scoring only the ones that predict this step)."""
    keep = batch.keep[which]
    return DecodeBatch(rows=batch.rows[which], lengths=batch.lengths[which], slots=batch.slots[which],
                       fixed=batch.fixed[which], candidate=batch.candidate[which], keep=keep,
                       most=int(keep.max()) if keep.numel() else 0, all_fit=batch.all_fit)


class SelectionReuse:
    """``interval``: a sequence's selection is predicted every ``interval`` engine steps and reused between.

    Kept per layer by the slot of the token decoded at that step (unique to a live sequence); the next
    step finds it by the slot of the position before its own. A sequence with none (its first decode
    step, or one after a prediction step was skipped) predicts. Reused positions that have entered the
    window since are dropped (the window attends them anyway).
    """

    def __init__(self, interval: int):
        self.interval, self.step = interval, -1
        self.kept: dict[int, dict[int, torch.Tensor]] = {}  # layer -> {slot: positions [KvH, k]}
        self.kept_at: dict[int, int] = {}  # layer -> the step its kept selections were made at
        self._part: tuple[tuple, DecodeBatch] | None = None  # (step, rows) -> the sub-batch that predicts them

    def next_step(self) -> None:
        self.step += 1

    def select(self, layer: int, batch: DecodeBatch, predict) -> torch.Tensor:
        """Selected positions ``[B, KvH, k]`` (-1 padding); ``predict(part)`` selects for a sub-batch."""
        if self.interval <= 1:
            return predict(batch)
        # only the last step's: older ones may be keyed by slots that another sequence holds now (steps in
        # between where the layer did not select, every sequence fitting its budget or prefilling)
        previous = self.kept.get(layer, {}) if self.kept_at.get(layer) == self.step - 1 else {}
        kept = {}
        prior = batch.slots.gather(1, (batch.lengths - 2).clamp(min=0).unsqueeze(1)).squeeze(1).tolist()
        reused = [previous.get(slot) if self.step % self.interval else None for slot in prior]
        fresh = [b for b, old in enumerate(reused) if old is None]
        if fresh:
            predicted = predict(self._sub_batch(batch, fresh))
            for i, b in enumerate(fresh):
                reused[b] = predicted[i]
        width = max(p.shape[-1] for p in reused)
        selected = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=PAD) for p in reused])
        current = batch.slots.gather(1, (batch.lengths - 1).unsqueeze(1)).squeeze(1).tolist()
        for b, slot in enumerate(current):
            kept[slot] = selected[b]
        self.kept[layer], self.kept_at[layer] = kept, self.step
        outside = ~batch.candidate.gather(1, selected.clamp(min=0).flatten(1)).view_as(selected)
        return selected.masked_fill(outside, PAD)

    def _sub_batch(self, batch: DecodeBatch, rows: list[int]) -> DecodeBatch:
        """The sub-batch of ``rows``, one object per step and rows: the layers of a step that predict for the
        same sequences share it, so a scorer's per-batch work (TokenButler's query network, once per
        producer) is done once, not once per consumer layer."""
        key = (self.step, tuple(rows))
        if self._part is None or self._part[0] != key:
            self._part = (key, sub_batch(batch, torch.tensor(rows, device=batch.rows.device)))
        return self._part[1]


# -- top-k and attention ---------------------------------------------------------------------------
def select_top(scores: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
    """scores ``[B, KvH, L]`` -> each sequence's top-``keep[b]`` candidates ``[B, KvH, most]`` (-1 padding).

    Non-candidates never win; rows of a sequence keeping fewer than ``most`` are padded.
    """
    if batch.most == 0:
        return scores.new_empty(*scores.shape[:2], 0, dtype=torch.long)
    scores = scores.masked_fill(~batch.candidate.unsqueeze(1), NEG_INF)
    values, index = torch.topk(scores, min(batch.most, scores.shape[-1]), dim=-1)  # sorted: rank = column
    rank = torch.arange(index.shape[-1], device=index.device)
    taken = (rank < batch.keep.view(-1, 1, 1)) & ~torch.isneginf(values)
    return torch.where(taken, index, torch.full_like(index, PAD))


def every_position(batch: DecodeBatch, kv_heads: int) -> torch.Tensor:
    """All cached positions of each sequence ``[B, KvH, L]`` (-1 past the length): a dense layer."""
    return torch.where(batch.slots >= 0, torch.arange(batch.slots.shape[1], device=batch.slots.device),
                       PAD).unsqueeze(1).expand(-1, kv_heads, -1)


def attended_positions(batch: DecodeBatch, selected: torch.Tensor) -> torch.Tensor:
    """Sinks + window + selected: ``[B, KvH, S + W + k]`` positions, -1 padding."""
    fixed = batch.fixed.unsqueeze(1).expand(-1, selected.shape[1], -1)
    return torch.cat([fixed, selected], dim=-1)


def dim_major(cache: torch.Tensor) -> torch.Tensor:
    """A ``[blocks, KvH, bs, D]`` cache whose blocks hold ``[D, bs]`` (vLLM CPU's "vec" keys), seen as
    ``[blocks, KvH, D, bs]`` without a copy."""
    blocks, heads, block_size, dim = cache.shape
    return cache.as_strided((blocks, heads, dim, block_size), (cache.stride(0), cache.stride(1), block_size, 1),
                            cache.storage_offset())


def blocks_touched(positions: torch.Tensor, block_size: int) -> tuple[int, int]:
    """(attended positions, distinct ``block_size``-token blocks they fall in), summed over rows.

    positions ``[B, KvH, N]`` (-1 padding). What a block-granular transfer of this selection would
    move, against the token-granular one (docs/vllm.md, "Selection and vLLM's KV offloading").
    """
    valid = positions >= 0
    spare = int(positions.max()) // block_size + 1 if positions.numel() else 0  # a column for padding
    blocks = torch.where(valid, positions // block_size, spare)
    touched = torch.zeros(*positions.shape[:-1], spare + 1, dtype=torch.bool, device=positions.device)
    touched.scatter_(-1, blocks, True)
    return int(valid.sum()), int(touched[..., :spare].sum())


def gather_paged(cache: torch.Tensor, slots: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """cache ``[blocks, KvH, bs, D]``, slots ``[B, KvH, N]`` (-1 allowed) -> ``[B, KvH, N, D]``.

    ``transposed``: the blocks hold ``[D, bs]`` (see ``dim_major``).
    """
    block_size = cache.shape[2]
    safe = slots.clamp(min=0)
    heads = torch.arange(cache.shape[1], device=slots.device).view(1, -1, 1)
    if transposed:  # advanced indices around a slice: their broadcast dims come first -> [B, KvH, N, D]
        return dim_major(cache)[safe // block_size, heads, :, safe % block_size]
    return cache[safe // block_size, heads, safe % block_size]


def sparse_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            batch: DecodeBatch, positions: torch.Tensor, scale: float,
                            keys_transposed: bool = False) -> torch.Tensor:
    """Attention of each sequence's query over its attended positions only.

    query ``[B, H, D]``; positions ``[B, KvH, N]`` (-1 padding) -> output ``[B, H, D]`` in the query
    dtype (softmax in float32). ``keys_transposed``: key blocks hold ``[D, bs]`` (``dim_major``).
    On the CPU each sequence attends through the engine's native kernel where it is built and applies
    (``native.SelectionKernels.decode_attention``), else all of them through two batched matmuls.
    """
    count, heads, dim = query.shape
    kv_heads = key_cache.shape[1]
    slots = torch.gather(batch.slots, 1, positions.clamp(min=0).flatten(1)).view_as(positions)
    valid = (positions >= 0) & (slots >= 0)  # [B, KvH, N]
    keys = gather_paged(key_cache, slots, keys_transposed).float()  # [B, KvH, N, D]
    values = gather_paged(value_cache, slots).float()
    kernels = native.kernels() if query.device.type == "cpu" else None
    if kernels is not None and count:
        rows = []
        for b in range(count):  # the sequences' tensors share shape, dtype and device: one declines, all do
            row = kernels.decode_attention(query[b].float(), keys[b], values[b], valid[b], scale)
            if row is None:
                break
            rows.append(row)
        else:
            return torch.stack(rows).to(query.dtype)
    grouped = query.float().view(count, kv_heads, heads // kv_heads, dim)  # [B, KvH, G, D]
    logits = torch.matmul(grouped, keys.transpose(-1, -2)) * scale  # [B, KvH, G, N]
    logits = logits.masked_fill(~valid.unsqueeze(2), NEG_INF)
    weights = torch.softmax(logits, dim=-1)
    return torch.matmul(weights, values).view(count, heads, dim).to(query.dtype)


# -- policy state kept by slot ---------------------------------------------------------------------
class SlotState:
    """One tensor per layer, indexed by vLLM slot (or slot // page for page summaries), made on first use."""

    def __init__(self):
        self.tensors: dict[int, torch.Tensor] = {}

    def get(self, layer: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            fill: float = 0.0) -> torch.Tensor:
        tensor = self.tensors.get(layer)
        if tensor is None:
            tensor = self.tensors[layer] = torch.full(shape, fill, dtype=dtype, device=device)
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class Scorer:
    """A policy's scoring over paged state. ``write`` sees every token's K/V (prefill and decode)."""

    kind = "logit"  # what scores mean for CriticalKV: "logit" or "mass"

    def dense_layers(self, num_layers: int) -> frozenset[int]:
        return frozenset()

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, num_slots: int) -> None:
        """key, value ``[T, KvH, D]`` written at slots ``[T]`` (all >= 0) of ``num_slots``."""

    def score(self, layer: int, query: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """query ``[B, H, D]`` -> scores ``[B, KvH, L]`` float32 (only candidates are read)."""
        raise NotImplementedError

    @property
    def state_bytes(self) -> int:
        return 0


class DenseScorer(Scorer):
    """Every layer attends every token: the selection path at full budget (the exactness reference)."""

    def dense_layers(self, num_layers: int) -> frozenset[int]:
        return frozenset(range(num_layers))


class StreamingScorer(Scorer):
    """Recency: the candidates nearest the window (StreamingLLM's sinks + window, grown by the budget)."""

    def score(self, layer, query, batch):
        """The same recency scores for every KV head: ``[B, 1, L]`` (broadcast by the caller)."""
        recency = torch.arange(batch.slots.shape[1], device=query.device, dtype=torch.float32)
        return recency.expand(batch.size, 1, -1)


class QuestScorer(Scorer):
    """Quest page bounds, pages of ``page_size`` slots (aligned to positions as blocks are to slots).

    State per layer: ``kmin``, ``kmax`` ``[num_slots / page_size, KvH, D]``; a page is reset when its
    first slot is written (a block handed to a new sequence starts at slot 0 of its pages).
    """

    def __init__(self, scale: float, page_size: int = 16):
        self.scale, self.page_size = scale, page_size
        self.low, self.high = SlotState(), SlotState()

    def write(self, layer, key, value, slots, num_slots):
        pages_total = num_slots // self.page_size
        shape = (pages_total, key.shape[1], key.shape[2])
        low = self.low.get(layer, shape, key.dtype, key.device, float("inf"))
        high = self.high.get(layer, shape, key.dtype, key.device, float("-inf"))
        pages = slots // self.page_size
        fresh = pages[slots % self.page_size == 0]
        low[fresh], high[fresh] = float("inf"), float("-inf")
        index = pages.view(-1, 1).expand(-1, shape[1] * shape[2])
        flat = key.reshape(key.shape[0], -1).to(low.dtype)
        low.view(pages_total, -1).scatter_reduce_(0, index, flat, "amin")
        high.view(pages_total, -1).scatter_reduce_(0, index, flat, "amax")

    def score(self, layer, query, batch):
        count, heads, dim = query.shape
        starts = batch.slots[:, :: self.page_size]  # [B, P] slot of each page's first position
        pages = (starts.clamp(min=0) // self.page_size)
        low = self.low.tensors[layer][pages].float().transpose(1, 2)  # [B, KvH, P, D]
        high = self.high.tensors[layer][pages].float().transpose(1, 2)
        kv_heads = low.shape[1]
        bound = page_scores(query.reshape(count * heads, dim), low.reshape(count * kv_heads, -1, dim),
                            high.reshape(count * kv_heads, -1, dim)).view(count, kv_heads, -1) * self.scale
        page_of = torch.arange(batch.slots.shape[1], device=query.device) // self.page_size
        return bound[:, :, page_of]

    @property
    def state_bytes(self):
        return self.low.nbytes + self.high.nbytes


class TokenButlerScorer(Scorer):
    """TokenButler: importance queries from the producer's attention input, projected keys by slot.

    ``hidden(producer)`` must give the producer layer's attention input of the decode rows ``[B, E]``
    (the plugin records it with a forward pre-hook). Group reduction "mean" (the policy's default):
    each query head's softmax over the sequence's cached tokens (current one excluded), averaged
    over the KV group. Projected keys: ``[num_slots, KvH, d']`` per consumer layer, model dtype.
    """

    kind = "mass"

    def __init__(self, predictor, hidden):
        self.predictor, self.hidden = predictor, hidden
        self.keys = SlotState()
        self._queries: dict[int, torch.Tensor] = {}
        self._step = None

    def dense_layers(self, num_layers):
        return frozenset({0})

    @torch.no_grad()
    def write(self, layer, key, value, slots, num_slots):
        if layer == 0:
            return
        c = self.predictor.config
        cache = self.keys.get(layer, (num_slots, c.num_kv_heads, c.dim), key.dtype, key.device)
        projected = self.predictor.project_unrotated(layer, key.transpose(0, 1))  # [KvH, T, d'], turned when scored
        cache[slots] = projected.transpose(0, 1).to(cache.dtype)

    @torch.no_grad()
    def score(self, layer, query, batch):
        c = self.predictor.config
        producer = c.producer_of(layer)
        if self._step is not batch:  # one MLP call per producer and step, shared by its consumers
            self._step, self._queries = batch, {}
        if producer not in self._queries:
            self._queries[producer] = self.predictor.importance_queries(producer, self.hidden(producer, batch), 0)
        queries = self._queries[producer][:, layer - producer - 1]  # [B, Hq, d']
        keys = self.keys.tensors[layer][batch.slots.clamp(min=0)].float()  # [B, L, KvH, d']
        if c.uses_positions:  # q'(p) . k'(t) = q' . k' turned by t - p: the query stays at 0
            distance = torch.arange(keys.shape[1], device=keys.device) - (batch.lengths - 1).unsqueeze(1)  # [B, L]
            keys = self.predictor.rotate(keys, distance.unsqueeze(-1))
        grouped = queries.float().view(batch.size, c.num_kv_heads, c.query_group, c.dim)
        logits = torch.einsum("bkgd,blkd->bkgl", grouped, keys) / math.sqrt(c.dim)  # [B, KvH, g, L]
        cached = (batch.slots >= 0) & (torch.arange(batch.slots.shape[1], device=query.device)
                                       < (batch.lengths - 1).unsqueeze(1))
        logits = logits.masked_fill(~cached.view(batch.size, 1, 1, -1), NEG_INF)
        return torch.softmax(logits, dim=-1).mean(dim=2)

    @property
    def state_bytes(self):
        return self.keys.nbytes


class CriticalScorer(Scorer):
    """CriticalKV over any base scorer: ``(A + eps) * ||v W_O||_1`` after the base's top ``alpha * keep``.

    ``output_projection(layer)`` gives ``W_O`` as ``[H, D, E]``. Value norms ``[num_slots, KvH]`` per layer.
    """

    kind = "mass"

    def __init__(self, base: Scorer, output_projection, alpha: float = 0.5, eps: float = 1e-4):
        self.base, self.output_projection, self.alpha, self.eps = base, output_projection, alpha, eps
        self.norms = SlotState()

    def dense_layers(self, num_layers):
        return self.base.dense_layers(num_layers)

    @torch.no_grad()
    def write(self, layer, key, value, slots, num_slots):
        self.base.write(layer, key, value, slots, num_slots)
        norms = self.norms.get(layer, (num_slots, key.shape[1]), torch.float32, key.device)
        norms[slots] = value_norms(value.transpose(0, 1), self.output_projection(layer)).transpose(0, 1)

    def score(self, layer, query, batch):
        scores = self.base.score(layer, query, batch).masked_fill(~batch.candidate.unsqueeze(1), NEG_INF)
        attention = attention_like(scores, self.base.kind)
        norms = self.norms.tensors[layer][batch.slots.clamp(min=0)].transpose(1, 2)  # [B, KvH, L]
        second = (attention + self.eps) * norms
        first = first_stage(scores, (self.alpha * batch.keep.float()).long())
        top = second.amax(dim=-1, keepdim=True)
        return torch.where(first, top + 1.0 + attention, second).masked_fill(torch.isneginf(scores), NEG_INF)

    @property
    def state_bytes(self):
        return self.norms.nbytes + self.base.state_bytes


def first_stage(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The top ``counts[b]`` scores of every row of sequence ``b``: ``[B, KvH, L]`` -> bool ``[B, KvH, L]``."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    most = min(int(counts.max()) if counts.numel() else 0, scores.shape[-1])
    if most > 0:
        values, index = torch.topk(scores, most, dim=-1)
        taken = (torch.arange(most, device=scores.device) < counts.view(-1, 1, 1)) & ~torch.isneginf(values)
        mask.scatter_(-1, index, taken)
    return mask
