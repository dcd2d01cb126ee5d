"""Top-k on the CPU: the sampled-threshold path gives what torch.topk gives, or falls back to it."""

from __future__ import annotations

import pytest
import torch

from offload_engine.selection import ranking
from offload_engine.selection.ranking import topk_positions, topk_unsorted


def _as_sets(index: torch.Tensor) -> list[set[int]]:
    flat = index.reshape(-1, index.shape[-1])
    return [set(row.tolist()) for row in flat]


@pytest.mark.parametrize("shape, keep", [((3, 4, 17000), 1000), ((12, 20000), 1400), ((2, 3, 33000), 64)])
@pytest.mark.parametrize("kind", ["gauss", "peaked", "ties"])
def test_the_sampled_top_k_selects_the_same_tokens_as_torch_topk(shape, keep, kind, monkeypatch):
    generator = torch.Generator().manual_seed(sum(shape) + keep)
    scores = torch.randn(shape, generator=generator)
    if kind == "peaked":  # softmax-like: a few large scores, a long flat tail
        scores = torch.softmax(scores * 4, dim=-1)
    if kind == "ties":  # many equal scores (rounded), ties at the cut
        scores = torch.round(scores * 4) / 4
    widths, original = [], torch.topk
    monkeypatch.setattr(ranking.torch, "topk", lambda t, *a, **k: widths.append(t.shape[-1]) or original(t, *a, **k))
    values, index = topk_unsorted(scores, keep)
    assert max(widths) < shape[-1]  # the sampled path ran: no top-k over whole rows
    expected_values, expected_index = original(scores, keep, dim=-1, sorted=False)
    assert index.shape == expected_index.shape == (*shape[:-1], keep)
    assert torch.equal(scores.gather(-1, index), values)  # the values are the scores of the indices
    assert torch.equal(values.sort(dim=-1).values, expected_values.sort(dim=-1).values)
    if kind != "ties":
        assert _as_sets(index) == _as_sets(expected_index)
    assert all(len(row) == keep for row in _as_sets(index))  # no index twice


def test_rows_the_threshold_would_starve_fall_back_to_the_plain_top_k(monkeypatch):
    """-inf candidates (not selectable) and rows too flat for the sample: still exactly torch.topk."""
    calls = []
    original = torch.topk

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    scores = torch.randn(4, 20000)
    scores[1, 1500:] = float("-inf")  # 1,500 finite candidates, keep 1,400: the sample's threshold is -inf
    monkeypatch.setattr(ranking.torch, "topk", counting)
    values, index = topk_unsorted(scores, 1400)
    assert calls[-1] == (4, 20000)  # the fallback ran on the whole rows
    assert torch.equal(values.sort(dim=-1).values, original(scores, 1400, dim=-1).values.sort(dim=-1).values)
    positions = topk_positions(scores, 1400, lo=10)
    assert ((positions[1] - 10) < 1500).all()  # -inf candidates are never positions


def test_small_or_large_shares_use_torch_topk(monkeypatch):
    calls = []
    original = torch.topk
    monkeypatch.setattr(ranking.torch, "topk", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    topk_unsorted(torch.randn(2, 12000), 400)  # fewer candidates than the sampled path needs
    topk_unsorted(torch.randn(2, 20000), 2000)  # keeps 10%
    assert calls == [(2, 12000), (2, 20000)]
