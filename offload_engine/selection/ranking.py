"""Scores into sorted positions: top-k and the two neighbour rules.

Every function works row-wise on the last dimension, so the same call serves one layer
(``[KvH, n]``) or a whole producer group (``[Lg, KvH, n]``) at once. Positions are absolute,
long, ascending within a row, with ``-1`` padding last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import native

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


# numpy's introselect partition after the sampled cut: torch.topk's CPU kernel takes 1.7-4.5x longer on a
# producer's rows on one thread (bench/reports/topk_cpu.md, AMD EPYC; the partition alone matched torch.topk
# there and beat it 2-3.4x on an Intel Xeon), and was slower still with two threads (numpy uses one; not
# measured on machines with many cores). Half precision and bfloat16 stay with torch (numpy has no bfloat16).
PARTITION_DTYPES = (torch.float32, torch.float64)
# Long rows with a small keep are first cut to the entries at or above a threshold read from every
# STRIDE-th entry, and only those are partitioned (``_partition_rows``).
PREFILTER_MIN_CANDIDATES = 4096
PREFILTER_MAX_SHARE = 0.25
PREFILTER_STRIDE = 8


def topk_unsorted(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, keep, dim=-1, sorted=False)``: (values, indices) ``[..., keep]``, exact.

    On the CPU, float32 rows go to the native kernel (``native.kernels().topk_rows``: the cut found by
    counting, 6-7x faster than the partition at 32k candidates); float64 rows, or float32 ones where the
    kernel is not built (``native.status()``), are partitioned with numpy (``_partition_rows``), read
    through a numpy view of the tensor's memory. Among equal scores at the cut either may keep other
    indices than ``torch.topk`` (a CPU and a CUDA run may break such ties apart). No gradient reaches
    the values. Elsewhere ``torch.topk``, which on a GPU never syncs with the host.
    """
    n = scores.shape[-1]
    if scores.device.type != "cpu" or scores.dtype not in PARTITION_DTYPES or not 0 < keep <= n:
        return torch.topk(scores, keep, dim=-1, sorted=False)
    kernels = native.kernels() if scores.dtype == torch.float32 and n < 2**31 else None
    if kernels is not None:
        values, index = kernels.topk_rows(scores.detach().reshape(-1, n), keep)
        return values.view(*scores.shape[:-1], keep), index.view(*scores.shape[:-1], keep)
    rows = scores.detach().reshape(-1, n).numpy()
    index = _partition_rows(rows, keep)
    values = np.take_along_axis(rows, index, axis=-1)
    lead = scores.shape[:-1]
    return torch.from_numpy(values).view(*lead, keep), torch.from_numpy(index).view(*lead, keep)


def _partition_rows(rows: np.ndarray, keep: int) -> np.ndarray:
    """Indices ``[r, keep]`` of the ``keep`` largest entries of each row of ``rows [r, n]``, in no order.

    ``numpy.argpartition`` (linear-time selection). Where rows are long and ``keep`` a small share
    of them, each row is first cut to its entries at or above a threshold that a strided sample puts
    safely below its ``keep``-th largest entry, and only those are partitioned: the same entries,
    about 2x faster at 8k-32k candidates and 4-5x at 128k (bench/reports/topk_cpu.md). A row the sample misjudged
    (fewer than ``keep`` entries pass) is partitioned whole, so the result is always exact.
    """
    r, n = rows.shape
    if n < PREFILTER_MIN_CANDIDATES or keep > PREFILTER_MAX_SHARE * n or r == 0:
        return np.ascontiguousarray(np.argpartition(rows, n - keep, axis=-1)[:, n - keep :])
    thresholds = _sampled_thresholds(rows, keep)
    index = np.empty((r, keep), dtype=np.int64)
    for i, (row, threshold) in enumerate(zip(rows, thresholds)):
        passed = np.flatnonzero(~(row < threshold))  # NaN passes: both partitions rank it above all
        if passed.size < keep:
            index[i] = np.argpartition(row, n - keep)[n - keep :]
        else:
            index[i] = passed[np.argpartition(row[passed], passed.size - keep)[passed.size - keep :]]
    return index


def _sampled_thresholds(rows: np.ndarray, keep: int) -> np.ndarray:
    """Per row, a value that about ``keep + 4 sigma`` entries reach: the ``j``-th largest of every
    ``PREFILTER_STRIDE``-th entry, ``j`` the sample's share of ``keep`` plus four standard deviations
    of the count it stands for (and 8). ``rows [r, n]`` -> ``[r]``."""
    sample = rows[:, ::PREFILTER_STRIDE]
    size = sample.shape[1]
    expected = keep / PREFILTER_STRIDE
    rank = min(size, int(math.ceil(expected + 4.0 * math.sqrt(expected))) + 8)
    return np.partition(sample, size - rank, axis=-1)[:, size - rank]


@dataclass(frozen=True, slots=True)
class HeldTerms:
    """The top-k's hysteresis (``SelectionConfig.keep_bonus``) as the scores take it: a held token's score
    becomes ``score * mul + add`` (one of them the identity: masses scale, logits shift), in float32, the same
    numbers in torch (``favour_held``) and in the native selection (``tbrun_select_rows``)."""

    mul: float = 1.0
    add: float = 0.0


def held_terms(bonus: float, score_kind: str) -> HeldTerms | None:
    """``keep_bonus`` ``b`` for scores of ``score_kind``: "mass" (non-negative attention masses, ranked as they
    are) times ``1 + b``; "logit" (logits or bounds of them, ranked as their softmax) plus ``log(1 + b)``, the same
    factor on the probability. None for ``b = 0``. Both rounded to float32 as the scores are."""
    if bonus == 0:
        return None
    if score_kind == "mass":
        return HeldTerms(mul=float(np.float32(1.0 + bonus)))
    if score_kind == "logit":
        return HeldTerms(add=float(np.float32(math.log1p(bonus))))
    raise ValueError(f"score kind {score_kind!r} is not 'mass' or 'logit'")


def favour_held(scores: torch.Tensor, held: torch.Tensor, terms: HeldTerms) -> torch.Tensor:
    """scores ``[..., n]`` with the entries where ``held [..., n]`` (bool: the candidate is in a device slot)
    raised by ``terms``; a new tensor. A NaN or -inf score stays as it is."""
    favoured = scores
    if terms.mul != 1.0:
        favoured = favoured * terms.mul
    if terms.add != 0.0:
        favoured = favoured + terms.add
    return torch.where(held, favoured, scores)


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
