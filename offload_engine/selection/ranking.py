"""Scores into sorted positions: top-k and the two neighbour rules.

Every function works row-wise on the last dimension, so the same call serves one layer
(``[KvH, n]``) or a whole producer group (``[Lg, KvH, n]``) at once. Positions are absolute,
long, ascending within a row, with ``-1`` padding last.
"""

from __future__ import annotations

import math

import torch

PAD = -1


def topk_positions(scores: torch.Tensor, keep: int, lo: int, ordered: bool = True) -> torch.Tensor:
    """Top-``keep`` candidates per row, as absolute positions.

    scores ``[..., n]`` (candidate ``j`` is position ``lo + j``) -> positions ``[..., min(keep, n)]``
    long, ``-1`` where the score was ``-inf`` (never selected); ascending with padding last when
    ``ordered`` (the neighbour rules need it; residency does not, and the sort costs as much as the
    top-k itself).
    """
    keep = min(keep, scores.shape[-1])
    if keep <= 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    values, index = topk_unsorted(scores, keep)
    positions = torch.where(torch.isneginf(values), torch.full_like(index, PAD), index + lo)
    return sort_with_padding_last(positions) if ordered else positions


# On CPU, torch.topk's per-row selection costs about as much as scoring the compact keys at long
# context; a sampled threshold cuts the rows down first (see topk_unsorted). Outside these sizes the
# plain top-k is as fast or faster (bench/reports/topk_cpu.md: equal at 8k candidates and
# at a 10% share of 32k).
SAMPLED_TOPK_MIN_CANDIDATES = 16384
SAMPLED_TOPK_MAX_SHARE = 0.07  # keep / n at most
SAMPLE_STRIDE = 8
SAMPLE_MARGIN = 1.1


def topk_unsorted(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, keep, dim=-1, sorted=False)``: (values, indices) ``[..., keep]``, exact.

    On CPU with many candidates and a small share kept, the top of every row is found in two
    passes: a threshold from a strided sample (every 8th score's top ``keep/8``, with a margin of 10%
    and four standard deviations) keeps each row's scores at or above it, about 1.3-1.5 ``keep`` of
    them, and the top-k runs on those only.
    When every row keeps at least ``keep`` scores, its ``keep`` largest are among them, so the result
    is exact (the same values; among equal scores it may pick other indices); otherwise (or with a
    ``-inf`` threshold) it falls back to the plain top-k. (At 32k candidates and 2k kept per row this takes about 60% of the plain
    top-k's time on one thread, at 128k about half.) On other devices it is ``torch.topk``: it syncs
    with the host, which a CUDA step must not.
    """
    n = scores.shape[-1]
    if (scores.device.type != "cpu" or n < SAMPLED_TOPK_MIN_CANDIDATES or keep > SAMPLED_TOPK_MAX_SHARE * n
            or keep < SAMPLE_STRIDE):
        return torch.topk(scores, keep, dim=-1, sorted=False)
    lead = scores.shape[:-1]
    flat = scores.reshape(-1, n)
    sample = flat[:, ::SAMPLE_STRIDE]
    expected = keep / SAMPLE_STRIDE  # sampled scores above the row's keep-th largest, on average
    take = min(sample.shape[-1], int(expected * SAMPLE_MARGIN + 4 * math.sqrt(expected)) + 8)  # 4 sd of margin
    threshold = torch.topk(sample, take, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    rows, cols = (flat >= threshold).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=flat.shape[0])
    if bool(torch.isneginf(threshold).any()) or int(counts.min()) < keep:
        return torch.topk(scores, keep, dim=-1, sorted=False)
    width = int(counts.max())
    place = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
    kept = torch.full((flat.shape[0], width), float("-inf"), dtype=flat.dtype)
    kept[rows, place] = flat[rows, cols]
    columns = torch.zeros((flat.shape[0], width), dtype=torch.long)
    columns[rows, place] = cols
    values, within = torch.topk(kept, keep, dim=-1, sorted=False)
    return values.view(*lead, keep), columns.gather(-1, within).view(*lead, keep)


def sort_with_padding_last(positions: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending with ``-1`` padding at the end. positions ``[..., k]`` long."""
    big = torch.iinfo(positions.dtype).max
    keyed = torch.where(positions < 0, torch.full_like(positions, big), positions)
    keyed, _ = torch.sort(keyed, dim=-1)
    return torch.where(keyed == big, torch.full_like(keyed, PAD), keyed)


def sorted_unique(positions: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending, drop repeats, ``-1`` padding last. positions ``[..., k]`` long."""
    ordered = sort_with_padding_last(positions)
    duplicate = torch.zeros_like(ordered, dtype=torch.bool)
    duplicate[..., 1:] = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    return sort_with_padding_last(torch.where(duplicate, torch.full_like(ordered, PAD), ordered))


def expand_neighbors(positions: torch.Tensor, radius: int, lo: int, hi: int) -> torch.Tensor:
    """Add the ``radius`` positions after each selected position, within ``[lo, hi)``.

    positions ``[..., k]`` sorted with ``-1`` padding -> ``[..., k * (radius + 1)]`` sorted,
    deduplicated, ``-1`` padding. Absorbs drift of importance between predictions.
    """
    if radius <= 0 or positions.shape[-1] == 0:
        return positions
    offsets = torch.arange(radius + 1, device=positions.device)
    grown = positions.unsqueeze(-1) + offsets  # [..., k, r+1]
    valid = (positions.unsqueeze(-1) >= 0) & (grown < hi) & (grown >= lo)
    return sorted_unique(torch.where(valid, grown, torch.full_like(grown, PAD)).flatten(-2))


def extend_runs(positions: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The TokenButler reference's neighbour rule: after each run of ``c`` consecutive selected
    positions, add the ``c`` positions that follow it (within ``[lo, hi)``), doubling the area.

    positions ``[..., k]`` sorted with ``-1`` padding -> ``[..., 2k]`` sorted, deduplicated, ``-1``
    padding. Example: ``[3, 4, 9]`` -> ``[3, 4, 5, 6, 9, 10]``.
    """
    if positions.shape[-1] == 0:
        return positions
    valid = positions >= 0
    starts = torch.ones_like(valid)
    starts[..., 1:] = positions[..., 1:] != positions[..., :-1] + 1  # a run starts where the step is not +1
    run_id = torch.cumsum(starts.long(), dim=-1) - 1  # [..., k]
    lengths = torch.zeros_like(positions).scatter_add_(-1, run_id, valid.long())
    grown = positions + torch.gather(lengths, -1, run_id)  # p + c covers the c positions after the run
    grown = torch.where(valid & (grown < hi) & (grown >= lo), grown, torch.full_like(grown, PAD))
    return sorted_unique(torch.cat([positions, grown], dim=-1))
