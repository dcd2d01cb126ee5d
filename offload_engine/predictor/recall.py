"""Recall spans: training text in which later tokens look up earlier ones.

Ordinary text teaches the predictor where attention mass is, and most of it sits near the query,
where the engine's window keeps it anyway. What decides a long-context answer is the sliver that
is not: the few earlier tokens a later token looks up (a needle, a name, a definition). Plain text
has few such rows, so a predictor trained on it ranks far tokens poorly (docs/predictor.md).

``add_recall_spans`` copies spans of a sequence to later places in the same sequence. While the
teacher reads a copy, its induction heads attend to the earlier occurrence, far back and narrow:
the pattern a needle lookup has, in the corpus's own words rather than an evaluation's. It is
token-level, so it works for every tokenizer and model, and deterministic in ``(seed, index)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class RecallSpans:
    """How much of each sequence repeats earlier text, and in what pieces.

    ``fraction`` of each sequence's tokens (after its first ``1/8``, which is only ever a source) are
    overwritten by copies of spans of ``min_span``..``max_span`` tokens taken from anywhere before them.
    """

    fraction: float = 0.0
    min_span: int = 8
    max_span: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 0.5:
            raise ConfigError(f"--recall {self.fraction} must be between 0 (off) and 0.5: past half a sequence "
                              "of copies there is little text left to copy from.")
        if not 1 <= self.min_span <= self.max_span:
            raise ConfigError(f"recall spans need 1 <= min_span <= max_span, got {self.min_span}..{self.max_span}.")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0

    def describe(self) -> dict:
        return {"fraction": self.fraction, "min_span": self.min_span, "max_span": self.max_span}


def add_recall_spans(sequences: torch.Tensor, spans: RecallSpans, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of earlier spans written over later text.

    sequences ``[N, T]`` long -> (new sequences ``[N, T]``, copied ``[N, T]`` bool: True where a token
    is a copy). The input is not modified. Sequence ``i``'s spans depend only on ``(seed, i)``.
    """
    out = sequences.clone()
    copied = torch.zeros_like(sequences, dtype=torch.bool)
    if not spans.enabled or sequences.numel() == 0:
        return out, copied
    for index in range(sequences.shape[0]):
        rng = random.Random(f"recall-{seed}-{index}")
        for source, destination, length in plan_spans(sequences.shape[1], spans, rng):
            out[index, destination:destination + length] = out[index, source:source + length].clone()
            copied[index, destination:destination + length] = True
    return out, copied


def plan_spans(seq_len: int, spans: RecallSpans, rng: random.Random) -> list[tuple[int, int, int]]:
    """``(source, destination, length)`` triples for one sequence of ``seq_len`` tokens, in the order they
    are applied. A source ends before its destination; no destination overlaps another destination or
    any source, so every copy still has its original earlier in the finished sequence."""
    first = max(seq_len // 8, spans.min_span)
    target = int(spans.fraction * seq_len)
    written = [False] * seq_len  # destinations and sources: what a later destination must leave alone
    plan, done, misses = [], 0, 0
    while done < target and misses < 100:
        length = min(rng.randint(spans.min_span, spans.max_span), target - done)
        if max(first, length) + length > seq_len:
            break
        destination = rng.randint(max(first, length), seq_len - length)
        source = rng.randint(0, destination - length)
        if any(written[destination:destination + length]):
            misses += 1
            continue
        plan.append((source, destination, length))
        written[destination:destination + length] = [True] * length
        written[source:source + length] = [True] * length
        done += length
    return plan
