"""Scoring one sample's output, and summarising many.

Per-sample metrics (each a plain float or bool, stored in the JSON report):

- generation: ``score`` (fraction of the expected answers found in the generated text) and
  ``correct`` (all of them found). A match is case-insensitive, on whole words/numbers.
- teacher forcing: ``token_error`` (fraction of target tokens whose greedy prediction differs),
  ``any_wrong``, ``nll`` (summed negative log-likelihood) and ``tokens``.

``summarize`` turns a list of per-sample metrics into the numbers the report shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

METRIC_LABELS = {
    "accuracy": "accuracy (%)",
    "all_correct": "all answers found (%)",
    "forced_accuracy": "answer tokens all right, teacher-forced (%)",
    "token_error": "answer tokens wrong, teacher-forced (%)",
    "ppl": "perplexity of the scored tokens",
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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(metrics: Sequence[dict]) -> dict[str, float]:
    """Report numbers from per-sample metrics (only those the samples have).

    ``accuracy`` = mean ``score`` x 100; ``all_correct`` = samples with every answer x 100;
    ``forced_accuracy`` = samples with no wrong answer token x 100; ``token_error`` = mean x 100;
    ``ppl`` = exp(total nll / total tokens), over all samples together.
    """
    summary: dict[str, float] = {"samples": len(metrics)}
    if metrics and "score" in metrics[0]:
        summary["accuracy"] = 100 * _mean([m["score"] for m in metrics])
        summary["all_correct"] = 100 * _mean([float(m["correct"]) for m in metrics])
    if metrics and "token_error" in metrics[0]:
        summary["forced_accuracy"] = 100 * _mean([0.0 if m["any_wrong"] else 1.0 for m in metrics])
        summary["token_error"] = 100 * _mean([m["token_error"] for m in metrics])
        summary["ppl"] = math.exp(sum(m["nll"] for m in metrics) / sum(m["tokens"] for m in metrics))
    return summary


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
                   "seconds": sum(r["seconds"] for r in part)}
            rows.append(row | ({group: key} if group else {}))
    return rows
