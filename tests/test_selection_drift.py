"""The selection-drift report's measures, and its recording of what each step selected."""

from __future__ import annotations

import pytest

from tbrun_bench.archs import build_random_model
from tbrun_bench.selection_drift import coverage, kept_share, needle_positions, recorded_selections, summarize

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.selection.planner import SelectionPlanner


class DigitTokenizer:
    """Each character is a token: its code point."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_kept_share_and_coverage_average_over_layers_and_heads():
    now = {1: [{1, 2, 3, 4}, {5, 6}], 2: [{7, 8}, {9, 10}]}
    before = {1: [{1, 2, 9, 9}, {5, 6}], 2: [set(), {10}]}
    assert kept_share(now, before) == pytest.approx((0.5 + 1.0 + 0.0 + 0.5) / 4)
    assert coverage(now, {1, 2, 7, 8}) == pytest.approx((0.5 + 0.0 + 0.5 + 0.0) / 4)


def test_needle_positions_find_every_occurrence_of_each_answer():
    prompt = [ord(c) for c in "ab123cd123e45"]
    assert needle_positions(prompt, ("123", "45"), DigitTokenizer()) == {2, 3, 4, 7, 8, 9, 11, 12}
    assert needle_positions(prompt, ("999",), DigitTokenizer()) == set()


def test_summary_gives_a_mean_with_an_interval_per_lag():
    rows = [{"kept": {"1": 0.8}, "needle_coverage": {"0": 0.5, "1": 0.4, "2": 0.3, "3": 0.2}},
            {"kept": {"1": 0.6}, "needle_coverage": {"0": 0.7, "1": 0.6, "2": 0.5, "3": 0.4}}]
    summary = summarize(rows)
    assert summary["kept"]["1"]["mean"] == pytest.approx(0.7)
    assert summary["kept"]["1"]["low"] < 0.7 < summary["kept"]["1"]["high"]
    assert summary["needle_coverage_interval4"]["mean"] == pytest.approx((0.35 + 0.55) / 2)
    assert summary["needle_coverage_loss"]["3"]["mean"] == pytest.approx(0.3)  # paired: 0.3 in both samples
    assert summary["needle_coverage_loss"]["3"]["low"] == pytest.approx(0.3)


def test_recording_holds_each_selecting_step_and_restores_the_planner():
    adapter = build_random_model("tiny-llama", device="cpu")
    selection = SelectionConfig(policy="quest", budget=Budget.parse("24"), sinks=2, window=4)
    engine = Engine(adapter, EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, selection=selection))
    original = SelectionPlanner.begin_step
    log: list[dict] = []
    with recorded_selections(log):
        engine.generate(list(range(3, 83)), SamplingConfig(max_new_tokens=6, ignore_eos=True))
    assert SelectionPlanner.begin_step is original
    assert len(log) == 4  # 5 decode steps, the last one's selection is never followed by another step
    layers = adapter.dims.num_layers
    for step in log:
        assert sorted(step) == list(range(layers))  # quest selects in every layer
        for heads in step.values():
            assert len(heads) == adapter.dims.num_kv_heads
            assert all(len(sel) == 24 - 2 - 4 and all(2 <= p < 90 for p in sel) for sel in heads)
