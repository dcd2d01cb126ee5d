"""Recall spans: copies of earlier text written later in a training sequence."""

import random

import pytest
import torch

from offload_engine.errors import ConfigError
from offload_engine.predictor.recall import RecallSpans, add_recall_spans, plan_spans


def _distinct(n: int, t: int) -> torch.Tensor:
    """``[n, t]`` ids, every token distinct, so each copy can be traced to its source."""
    return torch.arange(n * t).view(n, t)


def test_every_copy_repeats_text_that_is_still_earlier_in_the_sequence():
    original = _distinct(3, 512)
    spans = RecallSpans(fraction=0.25)
    out, copied = add_recall_spans(original, spans, seed=1)
    distances = []
    for i in range(3):
        plan = plan_spans(512, spans, random.Random(f"recall-1-{i}"))
        assert plan
        distances += [destination - source for source, destination, _ in plan]
        for source, destination, length in plan:
            assert source + length <= destination
            assert destination >= 512 // 8
            assert torch.equal(out[i, destination:destination + length], out[i, source:source + length])
            assert copied[i, destination:destination + length].all()
    assert max(distances) > 512 // 4  # far lookups, not only near ones


def test_the_requested_fraction_is_copied_and_the_rest_is_untouched():
    original = _distinct(4, 1024)
    out, copied = add_recall_spans(original, RecallSpans(fraction=0.2), seed=0)
    fraction = copied.float().mean(dim=1)
    assert torch.all(fraction > 0.15) and torch.all(fraction <= 0.2 + 1e-9)
    assert torch.equal(out[~copied], original[~copied])
    assert not torch.equal(out, original)
    assert torch.equal(original, _distinct(4, 1024))  # the input is not modified


def test_spans_depend_only_on_seed_and_index():
    original = _distinct(2, 256)
    first, _ = add_recall_spans(original, RecallSpans(fraction=0.3), seed=5)
    again, _ = add_recall_spans(original, RecallSpans(fraction=0.3), seed=5)
    other, _ = add_recall_spans(original, RecallSpans(fraction=0.3), seed=6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    alone, _ = add_recall_spans(original[1:], RecallSpans(fraction=0.3), seed=5)  # index 0 now: other spans
    assert not torch.equal(alone[0] - 256, first[1] - 256)


def test_off_returns_the_text_unchanged():
    original = _distinct(2, 128)
    out, copied = add_recall_spans(original, RecallSpans(), seed=0)
    assert torch.equal(out, original) and not copied.any()


@pytest.mark.parametrize("fraction", [-0.1, 0.6])
def test_a_fraction_outside_the_range_is_refused(fraction):
    with pytest.raises(ConfigError, match="--recall"):
        RecallSpans(fraction=fraction)
