"""The frozen model as teacher: its attention per layer and head, on sampled query rows only.

``layer_states`` runs the model layer by layer and hands out one layer's attention input, queries
and keys at a time, so nothing ever holds every layer's ``T x T`` attention at once;
``teacher_probs`` computes the causal attention of the sampled rows only (``[H, R, T]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..attention import prefill_attention
from ..models import ModelAdapter


@dataclass(slots=True)
class LayerState:
    """One layer of a teacher pass: x ``[T, E]`` attention input; q ``[H, T, D]``, k ``[KvH, T, D]``
    post-RoPE, in the model's dtype."""

    layer: int
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


def layer_states(adapter: ModelAdapter, ids: torch.Tensor, offset: int = 0) -> Iterator[LayerState]:
    """Run the frozen model over ids ``[1, T]`` at positions ``offset .. offset+T-1``, yielding each
    layer's ``LayerState`` in order.

    With RoPE the attention depends on relative positions only, so ``offset`` leaves the teacher
    unchanged while the keys' rotation phases (which the predictor sees) move. Gradients are off
    for the model's computation only (the caller may train on what it gets).
    """
    with torch.no_grad():
        hidden = adapter.embed(ids.to(adapter.device))
        positions = torch.arange(offset, offset + ids.shape[1], device=hidden.device).unsqueeze(0)
        rope = adapter.rope(hidden, positions)
    for layer in range(adapter.dims.num_layers):
        with torch.no_grad():
            x = adapter.attention_input(layer, hidden)
            q, k, v = adapter.qkv(layer, x, rope)
            out = prefill_attention(q, k, v, adapter.scaling, q.shape[2], window=adapter.window(layer))
            following = adapter.finish_layer(layer, hidden, out)
        yield LayerState(layer, x[0], q[0], k[0])
        hidden = following


@dataclass(slots=True)
class RowState:
    """What the student needs of one layer, on the sampled query rows only: x ``[R, E]`` (the
    attention input), k ``[KvH, T, D]`` (post-RoPE, all tokens), and the teacher as either q
    ``[H, R * lookahead, D]`` (each row's query and those of the ``lookahead - 1`` rows after it,
    ``ahead_rows``) or, already applied to the keys, ``mixed_keys`` ``[H, R, D]``
    (``teacher_mixed_keys``). Layer 0 (no consumer) may carry x only."""

    layer: int
    x: torch.Tensor
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    mixed_keys: torch.Tensor | None = None
    lookahead: int = 1

    def teacher_mix(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """``[H, R, D]`` float32: the teacher's attention rows applied to the keys."""
        if self.mixed_keys is not None:
            return self.mixed_keys.float()
        return teacher_mixed_keys(self.q, self.k, rows, scale, self.lookahead)


def ahead_rows(rows: torch.Tensor, length: int, lookahead: int) -> torch.Tensor:
    """Each row followed by the ``lookahead - 1`` rows after it (the last row repeats at the end of
    the sequence): rows ``[R]`` -> ``[R * lookahead]``, row-major (``r, r+1, .., r+N-1, r', ..``)."""
    grown = rows.unsqueeze(1) + torch.arange(lookahead, device=rows.device)
    return grown.clamp(max=length - 1).flatten()


def row_states(adapter: ModelAdapter, ids: torch.Tensor, rows: torch.Tensor, offset: int = 0,
               lookahead: int = 1) -> Iterator[RowState]:
    """``layer_states`` cut to the query rows ``rows`` ``[R]``: one ``RowState`` per layer, in order.

    ``lookahead`` N > 1: the teacher of row ``r`` becomes the mean attention of rows ``r .. r+N-1``
    over the tokens up to ``r`` (``teacher_mixed_keys``), what a selection made at ``r`` and reused
    for N steps is asked to cover.
    """
    for state in layer_states(adapter, ids, offset):
        on_device = rows.to(state.x.device)
        queries = ahead_rows(on_device, ids.shape[1], lookahead)
        yield RowState(state.layer, state.x[on_device], state.q[:, queries], state.k, lookahead=lookahead)


def sample_rows(length: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Query rows to distil on: up to ``count`` from the last half of the sequence plus the last row.

    Returns ``[R]`` long, sorted ascending, distinct.
    """
    start, last = length // 2, length - 1
    pool = torch.arange(start, last)
    if count < pool.numel():
        pool = pool[torch.randperm(pool.numel(), generator=generator)[:count]]
    return torch.cat([pool.sort().values, torch.tensor([last])])


def causal_mask(rows: torch.Tensor, length: int) -> torch.Tensor:
    """``[R, T]`` bool, True where key position ``t`` is in the future of query row ``rows[r]``."""
    return torch.arange(length, device=rows.device).unsqueeze(0) > rows.unsqueeze(1)


def teacher_logits(q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """The model's attention logits of sampled rows, future masked with ``-inf``.

    q_rows ``[H, R, D]``, k ``[KvH, T, D]``, rows ``[R]`` -> ``[H, R, T]`` float32.
    """
    heads, n_rows = q_rows.shape[0], q_rows.shape[1]
    kvh = k.shape[0]
    grouped = q_rows.float().reshape(kvh, heads // kvh * n_rows, -1)  # [KvH, G*R, D]
    logits = torch.matmul(grouped, k.float().transpose(-1, -2)) * scale  # [KvH, G*R, T]
    logits = logits.view(heads, n_rows, k.shape[1])
    return logits.masked_fill(causal_mask(rows.to(k.device), k.shape[1]), float("-inf"))


def teacher_probs(q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(teacher_logits)``: ``[H, R, T]`` float32, zero in the future."""
    return torch.softmax(teacher_logits(q_rows, k, rows, scale), dim=-1)


def teacher_mixed_keys(q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float,
                       lookahead: int = 1) -> torch.Tensor:
    """``sum_t P[h, r, t] k[kv(h), t]``: each sampled row's attention applied to the keys.

    q_rows ``[H, R, D]``, k ``[KvH, T, D]`` -> ``[H, R, D]`` float32. This is all of the teacher
    that the distillation loss needs (``mixed_distillation_loss``): ``D`` numbers per row and head
    instead of ``T``.

    ``lookahead`` N > 1: q_rows ``[H, R * N, D]`` holds the queries of rows ``r .. r+N-1`` of every
    row (``ahead_rows``), and ``P[h, r]`` is the mean over them of their attention restricted to
    the tokens up to ``r`` (each renormalised there: the later tokens sit in the window); near the
    sequence's end, over the rows that exist (``ahead_rows`` repeats the last one in their place).
    Mixing is linear in ``P``, so this is the mean of those rows' mixed keys.
    """
    base = rows.repeat_interleave(lookahead) if lookahead > 1 else rows
    probs = teacher_probs(q_rows, k, base, scale)  # [H, R * N, T], zero after each row's base r
    heads, n_rows, length = probs.shape
    kvh = k.shape[0]
    mixed = torch.matmul(probs.view(kvh, heads // kvh * n_rows, length), k.float())  # [KvH, G*R*N, D]
    mixed = mixed.view(heads, n_rows // lookahead, lookahead, -1)
    if lookahead == 1:
        return mixed[:, :, 0]
    # rows past the sequence's end are the last row repeated (``ahead_rows``): only the rows that exist count
    exists = (rows.unsqueeze(1) + torch.arange(lookahead, device=rows.device) < length).to(mixed.dtype)  # [R, N]
    return (mixed * exists[None, :, :, None]).sum(dim=2) / exists.sum(dim=1)[None, :, None]


def mixed_distillation_loss(student_logits: torch.Tensor, queries: torch.Tensor, projected_mix: torch.Tensor,
                            rows: torch.Tensor, scale: float) -> torch.Tensor:
    """``distillation_loss`` without touching the teacher's ``[H, R, T]``, averaged over heads and rows.

    With logits ``s_t = q' . k'_t * scale`` and ``k'_t = k_t W``, the cross-entropy of the teacher's row
    ``P`` against ``softmax(s)`` is ``logsumexp_t s_t - sum_t P_t s_t`` and
    ``sum_t P_t s_t = q' . (sum_t P_t k_t) W * scale``. student_logits ``[H, R, T]`` unmasked; queries
    ``[H, R, d']``; projected_mix ``[H, R, d']`` = the teacher's mixed keys through the key projection.
    """
    future = causal_mask(rows.to(student_logits.device), student_logits.shape[-1])
    normaliser = torch.logsumexp(student_logits.float().masked_fill(future, float("-inf")), dim=-1)  # [H, R]
    expected = (queries.float() * projected_mix.float()).sum(-1) * scale  # [H, R]
    return (normaliser - expected).mean()


def distillation_loss(teacher: torch.Tensor, student_logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``-sum_t P log P_hat`` averaged over heads and rows.

    teacher ``[H, R, T]`` probabilities; student_logits ``[H, R, T]`` unmasked -> scalar float32.
    """
    future = causal_mask(rows.to(student_logits.device), student_logits.shape[-1])
    log_p = torch.log_softmax(student_logits.float().masked_fill(future, float("-inf")), dim=-1)
    return -(teacher * log_p.masked_fill(future, 0.0)).sum(-1).mean()


def candidate_mask(rows: torch.Tensor, length: int, sinks: int, window: int) -> torch.Tensor:
    """``[R, T]`` bool, True where key ``t`` is one the selector chooses among for query row ``rows[r]``:
    past the first ``sinks`` tokens and before the row's last ``window`` tokens (those the engine keeps
    anyway), ``sinks <= t <= rows[r] - window``."""
    positions = torch.arange(length, device=rows.device).unsqueeze(0)
    return (positions >= sinks) & (positions <= rows.unsqueeze(1) - window)


def candidate_distillation_loss(teacher: torch.Tensor, student_logits: torch.Tensor, rows: torch.Tensor,
                                sinks: int, window: int) -> torch.Tensor:
    """``distillation_loss`` over the selector's candidates only: the teacher's rows renormalised over
    ``candidate_mask``, the student's softmax over the same positions. The engine keeps the sinks and
    the window whatever the predictor says, so this spends the predictor on ranking the rest (the
    attention mass next to the query, which a predictor with ``rope_pairs`` learns readily, would
    otherwise crowd out far tokens such as a needle). Rows without candidates are left out.

    teacher ``[H, R, T]`` probabilities; student_logits ``[H, R, T]`` unmasked -> scalar float32.
    """
    keep = candidate_mask(rows.to(student_logits.device), student_logits.shape[-1], sinks, window)  # [R, T]
    has = keep.any(dim=-1)
    target = teacher * keep
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-20)
    log_p = torch.log_softmax(student_logits.float().masked_fill(~keep, float("-inf")), dim=-1)
    per_row = -(target * log_p.masked_fill(~keep, 0.0)).sum(-1)  # [H, R]
    return per_row[:, has].mean()
