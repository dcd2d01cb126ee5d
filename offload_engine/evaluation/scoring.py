"""Scoring one sample's output, and summarising many.

Per-sample metrics (each a plain float or bool, stored in the JSON report):

- generation: ``score`` (fraction of the expected answers found in the generated text) and
  ``correct`` (all of them found). A match is case-insensitive, on whole words/numbers.
- teacher forcing: ``token_error`` (fraction of target tokens whose greedy prediction differs),
  ``any_wrong``, ``nll`` (summed negative log-likelihood) and ``tokens``.
- sparse points: ``attended``, the share of the cached tokens the decode steps attended (over
  layers, KV heads and steps; a policy's dense layers count whole), which a neighbour rule may take
  past the budget. Counting it adds two small tensor operations per layer and step to ``ms_per_step``.

``summarize`` turns a list of per-sample metrics into the numbers the report shows, and
``intervals`` into their 95% confidence intervals: Wilson score intervals for the accuracies (the
samples are Bernoulli trials; a multi-answer sample counts its fraction of answers found), a
Student t interval for perplexity over the per-sample mean log-loss (each ppl sample is one held-out
passage), mapped through ``exp``.

``compare_paired`` compares two points over the samples both ran: the mean per-sample difference with
its t interval (for display), and the two-sided p of an exact paired sign-flip (permutation) test
(``sign_flip_p``), which decides significance: per-sample accuracy differences take few values and
are mostly 0, where a t interval can exclude 0 although no test on so few differing samples could.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

METRIC_LABELS = {
    "accuracy": "accuracy (%)",
    "all_correct": "all answers found (%)",
    "forced_accuracy": "answer tokens all right, teacher-forced (%)",
    "token_error": "answer tokens wrong, teacher-forced (%)",
    "ppl": "perplexity of the scored tokens",
    "attended": "tokens attended, share of the cache (%)",
    "samples": "samples",
}


def contains(generated: str, answer: str) -> bool:
    """``answer`` appears in ``generated`` as a whole word (case-insensitive, spaces normalised)."""
    words = r"\s+".join(re.escape(part) for part in answer.split())
    return re.search(rf"(?<![0-9A-Za-z]){words}(?![0-9A-Za-z])", generated, re.IGNORECASE) is not None


def score_generation(generated: str, answers: Sequence[str]) -> dict:
    """Fraction of ``answers`` found in ``generated``, and whether all were."""
    found = [contains(generated, answer) for answer in answers]
    return {"score": sum(found) / len(found), "correct": all(found)}


def score_forced(logprobs: torch.Tensor, predicted: torch.Tensor, target: Sequence[int]) -> dict:
    """Teacher-forced metrics.

    logprobs ``[N]`` float (log p of each target token), predicted ``[N]`` long (greedy argmax at
    each position), target: the ``N`` target ids.
    """
    target_t = torch.as_tensor(list(target), dtype=torch.long)
    wrong = predicted.to(torch.long).cpu() != target_t
    return {
        "token_error": float(wrong.float().mean()),
        "any_wrong": bool(wrong.any()),
        "nll": float(-logprobs.double().sum()),
        "tokens": int(target_t.numel()),
    }


Z95 = 1.959964  # two-sided 95% normal quantile
# Two-sided 95% Student t quantiles by degrees of freedom (1-30); above 30 the table interpolates
# towards the normal value (error < 0.01).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)
INTERVAL_METRICS = ("accuracy", "all_correct", "forced_accuracy", "ppl")


def t95(dof: int) -> float:
    """The two-sided 95% Student t quantile for ``dof`` >= 1 degrees of freedom."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    return T95[dof - 1] if dof <= len(T95) else Z95 + (T95[-1] - Z95) * len(T95) / dof


def wilson_interval(successes: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in percent: ``(low, high)``."""
    if trials < 1:
        raise ValueError("a Wilson interval needs at least one trial")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def ppl_interval(nll: Sequence[float], tokens: Sequence[int]) -> tuple[float, float] | None:
    """95% t interval of the perplexity over passages: ``exp(mean +- t s / sqrt(n))`` of the per-passage
    mean log-loss; None with fewer than two passages."""
    interval = t_interval([n / t for n, t in zip(nll, tokens)])
    if interval is None:
        return None
    _, low, high = interval
    return math.exp(low), math.exp(high)


def t_interval(values: Sequence[float]) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the mean of ``values`` with its 95% Student t interval; None under two values."""
    if len(values) < 2:
        return None
    mean = _mean(values)
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    half = t95(len(values) - 1) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def intervals(metrics: Sequence[dict]) -> dict[str, list[float]]:
    """95% intervals ``[low, high]`` of the ``summarize`` metrics that have one (see the module doc)."""
    out: dict[str, list[float]] = {}
    n = len(metrics)
    if n and "score" in metrics[0]:
        out["accuracy"] = list(wilson_interval(sum(m["score"] for m in metrics), n))
        out["all_correct"] = list(wilson_interval(sum(float(m["correct"]) for m in metrics), n))
    if n and "token_error" in metrics[0]:
        out["forced_accuracy"] = list(wilson_interval(sum(0.0 if m["any_wrong"] else 1.0 for m in metrics), n))
        ppl = ppl_interval([m["nll"] for m in metrics], [m["tokens"] for m in metrics])
        if ppl is not None:
            out["ppl"] = list(ppl)
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(metrics: Sequence[dict]) -> dict[str, float]:
    """Report numbers from per-sample metrics (only those the samples have).

    ``accuracy`` = mean ``score`` x 100; ``all_correct`` = samples with every answer x 100;
    ``forced_accuracy`` = samples with no wrong answer token x 100; ``token_error`` = mean x 100;
    ``ppl`` = exp(total nll / total tokens), over all samples together; ``attended`` = the mean share
    of the cached tokens the decode steps attended x 100 (sparse points, runs that counted it).
    """
    summary: dict[str, float] = {"samples": len(metrics)}
    if metrics and "score" in metrics[0]:
        summary["accuracy"] = 100 * _mean([m["score"] for m in metrics])
        summary["all_correct"] = 100 * _mean([float(m["correct"]) for m in metrics])
    if metrics and "token_error" in metrics[0]:
        summary["forced_accuracy"] = 100 * _mean([0.0 if m["any_wrong"] else 1.0 for m in metrics])
        summary["token_error"] = 100 * _mean([m["token_error"] for m in metrics])
        summary["ppl"] = math.exp(sum(m["nll"] for m in metrics) / sum(m["tokens"] for m in metrics))
    if metrics and all("attended" in m for m in metrics):
        summary["attended"] = 100 * _mean([m["attended"] for m in metrics])
    return summary


def sample_value(record: dict, primary: str) -> float:
    """One sample's part of metric ``primary``, on the summary's scale: percent for the accuracies and
    the token error, the mean log-loss per token for perplexity (whose pairs are compared in logs)."""
    if primary == "accuracy":
        return 100 * record["score"]
    if primary == "all_correct":
        return 100 * float(record["correct"])
    if primary == "forced_accuracy":
        return 0.0 if record["any_wrong"] else 100.0
    if primary == "token_error":
        return 100 * record["token_error"]
    if primary == "ppl":
        return record["nll"] / record["tokens"]
    raise KeyError(f"no per-sample value for metric {primary!r}")


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """Mean of ``a[i] - b[i]`` over paired samples, with its 95% Student t interval: ``(mean, low, high)``.

    Pairing removes what the samples share (a needle the model itself cannot find counts against
    both), so it separates two policies that their own intervals do not. None under two pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in number: {len(a)} and {len(b)}")
    return t_interval([x - y for x, y in zip(a, b)])


EXACT_SIGN_FLIPS = 20  # up to this many nonzero differences, every sign pattern is enumerated
SIGN_FLIP_DRAWS = 20_000  # random sign patterns otherwise (when no exact grid count applies)
SIGN_FLIP_SEED = 0
GRID_STEPS = 100_000  # the largest sum, in grid steps, that the exact grid count handles
SIGNIFICANCE = 0.05


def sign_flip_p(differences: Sequence[float], exact_limit: int = EXACT_SIGN_FLIPS, draws: int = SIGN_FLIP_DRAWS,
                seed: int = SIGN_FLIP_SEED) -> float:
    """Two-sided p of the paired sign-flip (permutation) test of ``differences`` (one per sample pair).

    Under the null hypothesis (the two points are exchangeable on each sample) each nonzero difference is
    as likely with either sign; the statistic is their sum (so the mean), and p is the share of the
    ``2^k`` sign patterns of the ``k`` nonzero differences whose sum is at least as far from 0 as the one
    observed. Zero differences (ties) carry no sign and drop out, so with ``k`` differing samples p is
    never below ``2 / 2^k`` (0.0625 for 5): e.g. 4 differences of +25 among 16 zeros give p = 0.125, 6 of
    them 0.03125. No differing sample: p = 1.

    Exact for ``k <= exact_limit`` (every pattern's sum, built by doubling: ``2^(k-1)`` floats by the
    symmetry of the patterns) and for differences on a common grid (e.g. multiples of 25 points: the
    distribution of the signed sum counted step by step over the grid); otherwise estimated from
    ``draws`` random patterns with a fixed ``seed``, as ``(hits + 1) / (draws + 1)``.
    """
    values = np.asarray([float(d) for d in differences if d != 0], dtype=np.float64)
    k = len(values)
    if k == 0:
        return 1.0
    if not np.all(np.isfinite(values)):
        raise ValueError("sign_flip_p needs finite differences")
    observed = abs(float(values.sum()))
    tolerance = 1e-9 * float(np.abs(values).sum())  # sums equal but for rounding count as reached
    if k <= exact_limit:
        sums = np.zeros(1)
        for value in values[1:]:
            sums = np.concatenate((sums + value, sums - value))
        sums += values[0]  # the patterns with the first sign flipped mirror these: the same share
        return float(np.count_nonzero(np.abs(sums) >= observed - tolerance)) / len(sums)
    steps = _grid_steps(np.abs(values))
    if steps is not None and sum(steps) <= GRID_STEPS:
        total = sum(steps)
        distribution = np.zeros(2 * total + 1)
        distribution[total] = 1.0  # index = signed sum in steps + total
        for step in steps:
            shifted = np.zeros_like(distribution)
            shifted[step:] += distribution[:-step]
            shifted[:-step] += distribution[step:]
            distribution = shifted / 2
        signs = np.sign(values).astype(np.int64)
        reached = abs(int(np.dot(signs, steps)))
        offsets = np.abs(np.arange(-total, total + 1))
        return float(min(1.0, distribution[offsets >= reached].sum()))
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < draws:
        chunk = min(4096, draws - done)
        signs = rng.integers(0, 2, size=(chunk, k)) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ values) >= observed - tolerance))
        done += chunk
    return (hits + 1) / (draws + 1)


def _grid_steps(magnitudes: np.ndarray, max_denominator: int = 64) -> list[int] | None:
    """``magnitudes`` as whole multiples of one step (the smallest over a small common denominator), or
    None when they are not on such a grid (to rounding)."""
    smallest = float(magnitudes.min())
    fractions = [Fraction(float(m) / smallest).limit_denominator(max_denominator) for m in magnitudes]
    if any(abs(float(f) - float(m) / smallest) > 1e-9 * float(m) / smallest for f, m in zip(fractions, magnitudes)):
        return None
    denominator = math.lcm(*(f.denominator for f in fractions))
    if denominator > max_denominator:
        return None
    return [int(f * denominator) for f in fractions]


@dataclass(frozen=True)
class PairedComparison:
    """Two points over the samples both ran: ``a - b`` per sample pair."""

    pairs: int
    differing: int  # pairs whose difference is not 0
    mean: float
    low: float  # 95% Student t interval of the mean difference
    high: float
    p: float  # two-sided p of the exact paired sign-flip test (``sign_flip_p``)
    constant: bool  # every pair differs by the same amount (the t interval has no width)

    @property
    def significant(self) -> bool:
        """The exact test rejects "no difference" at 5% (a difference of 0 never is)."""
        return self.differing > 0 and self.p < SIGNIFICANCE


def compare_paired(a: Sequence[float], b: Sequence[float]) -> PairedComparison | None:
    """``a[i] - b[i]`` over paired samples: mean, 95% t interval (``paired_difference``), how many pairs
    differ, and the sign-flip test's p, which is what decides significance (see ``sign_flip_p``: the t
    interval of differences that are mostly 0 excludes 0 too readily). None under two pairs."""
    interval = paired_difference(a, b)
    if interval is None:
        return None
    differences = [x - y for x, y in zip(a, b)]
    mean, low, high = interval
    spread = max(differences) - min(differences)
    return PairedComparison(pairs=len(differences), differing=sum(d != 0 for d in differences), mean=mean,
                            low=low, high=high, p=sign_flip_p(differences),
                            constant=spread <= 1e-12 * max(1.0, abs(mean)))


def summarize_points(points: Sequence, results: Sequence[dict], group: str | None = None) -> list[dict]:
    """One summary per run point (``.policy``, ``.budget_label``) over its results' metrics.

    With ``group``, one summary per point and per value of ``result[group]`` (e.g. the variant).
    """
    rows = []
    for point in points:
        mine = [r for r in results if r["policy"] == point.policy and r["budget"] == point.budget_label]
        keys = sorted({str(r.get(group)) for r in mine}) if group else [None]
        for key in keys:
            part = [r for r in mine if key is None or str(r.get(group)) == key]
            row = {"policy": point.policy, "budget": point.budget_label, "metrics": summarize(part),
                   "intervals": intervals(part), "seconds": sum(r["seconds"] for r in part)}
            rows.append(row | ({group: key} if group else {}))
    return rows
