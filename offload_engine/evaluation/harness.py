"""Run an evaluation task through the real engine for every policy x budget, and score it.

One ``RunPoint`` is a (policy, budget) pair; dense (every token, KV on the device) is always the
first point. For each point one ``Engine`` is built and every sample goes through it: generation
tasks through ``Engine.generate`` (greedy), teacher-forced tasks through
``Engine.score_continuation``, so every scored token is decoded under the policy.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig, parse_context
from ..engine import Engine, resolve_device
from ..errors import ConfigError
from ..memory import parse_dtype
from ..models import ModelAdapter, load_model
from ..policies import available_policies, build_policy
from .report import build_report, check_output_dir, write_report
from .scoring import score_forced, score_generation
from .tasks import Sample, get_task, make_samples, min_prompt_for

FORCED_TEXT_MAX_TOKENS = 64  # keep the greedy predictions' text in the report for short targets


def check_policy_spec(spec: str) -> None:
    """Refuse a policy spec naming a policy that does not exist, listing the valid ones."""
    valid = available_policies()
    known = {name.split("(")[0] for name in valid}
    names = [name for name in re.split(r"[()\s]+", spec) if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names or spec.count("(") != spec.count(")"):
        what = repr(unknown[0]) if unknown else repr(spec)
        raise ConfigError(f"--policy {what} is not a policy; valid policies: {', '.join(valid)}.")


@dataclass(slots=True)
class EvalConfig:
    """What ``tbrun eval`` runs; validated at construction, before a model is loaded."""

    task: str
    policies: Sequence[str]
    budgets: Sequence[Budget]
    context: int | str = 4096
    samples: int = 8
    seed: int = 0
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    predictor: str | None = None  # TokenButler checkpoint (default: the one shipped for the model)
    device: str = "cpu"
    dtype: str = "fp32"
    sinks: int = 4
    window: int = 32
    interval: int = 1
    neighbors: int = 0

    def __post_init__(self) -> None:
        get_task(self.task)
        self.context = parse_context(self.context)
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}.")
        self.policies = tuple(dict.fromkeys(spec.strip() for spec in self.policies if spec.strip()))
        self.budgets = tuple(dict.fromkeys(self.budgets))
        if not self.policies or not self.budgets:
            raise ConfigError("give at least one --policy and one --budget.")
        for spec in self.policies:
            check_policy_spec(spec)
        for budget in self.budgets:
            self.selection(budget)  # token budgets vs sinks + window
            if budget.tokens is not None and budget.tokens > self.context:
                raise ConfigError(f"--budget {budget} is larger than --context {self.context}: lower it.")
        parse_dtype(self.dtype)
        resolve_device(self.device)  # refuse cuda where there is none, before loading anything
        if self.predictor is not None and not any("tokenbutler" in spec for spec in self.policies):
            raise ConfigError("--predictor is only used by the tokenbutler policy.")

    def selection(self, budget: Budget | None, policy: str = "dense") -> SelectionConfig:
        return SelectionConfig(policy=policy, budget=budget, sinks=self.sinks, window=self.window,
                               interval=self.interval, neighbors=self.neighbors)

    def to_dict(self) -> dict:
        """The resolved configuration, JSON-ready (budgets as written: ``10%`` or ``2048``)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data.update(policies=list(self.policies), budgets=[str(b) for b in self.budgets])
        return data


@dataclass(frozen=True, slots=True)
class RunPoint:
    """One row of results: a policy at a budget (``budget`` None: dense, every token)."""

    policy: str
    budget: Budget | None

    @property
    def budget_label(self) -> str:
        return "100%" if self.budget is None else str(self.budget)

    @property
    def label(self) -> str:
        return self.policy if self.budget is None else f"{self.policy} @ {self.budget}"


def run_points(config: EvalConfig) -> list[RunPoint]:
    """Dense first, then every other policy at every budget, in the order asked."""
    sparse = [spec for spec in config.policies if spec != "dense"]
    return [RunPoint("dense", None)] + [RunPoint(spec, b) for spec in sparse for b in config.budgets]


def engine_config(config: EvalConfig, point: RunPoint) -> EngineConfig:
    """Dense keeps its KV on the device; every other policy runs the sparse offload path."""
    mode = KVMode.DENSE_DEVICE if point.budget is None else KVMode.SPARSE_OFFLOAD
    return EngineConfig(context=config.context, mode=mode, selection=config.selection(point.budget, point.policy),
                        device=config.device)


def build_engine(adapter: ModelAdapter, config: EvalConfig, point: RunPoint) -> Engine:
    """An ``Engine`` for one point, its policy built from the spec (and the predictor, if any)."""
    engine_cfg = engine_config(config, point)
    policy = None
    if engine_cfg.mode is KVMode.SPARSE_OFFLOAD:
        wants_predictor = config.predictor is not None and "tokenbutler" in point.policy
        policy = build_policy(point.policy, **({"predictor_path": config.predictor} if wants_predictor else {}))
    return Engine(adapter, engine_cfg, policy=policy)


def _stats_summary(stats) -> dict:
    """The few statistics worth keeping per sample (the rest is in ``tbrun bench``)."""
    return {"prefill_seconds": round(stats.prefill_seconds, 4), "ms_per_step": round(stats.ms_per_step, 3),
            "h2d_bytes_per_step": stats.h2d_bytes_per_step, "new_tokens": stats.new_tokens}


def evaluate_sample(engine: Engine, tokenizer, sample: Sample) -> dict:
    """Generate and/or teacher-force one sample through ``engine``; returns its metrics and output."""
    record: dict = {}
    if sample.max_new_tokens:
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=sample.max_new_tokens)
        result = engine.generate(list(sample.prompt_ids), sampling)
        record.update(score_generation(result.text, sample.answers), output=result.text,
                      finish_reason=result.finish_reason, stats=_stats_summary(result.stats))
    if sample.forced is not None:
        forced = sample.forced
        scored = engine.score_continuation(list(forced.prompt_ids), list(forced.target_ids))
        record.update(score_forced(scored.logprobs, scored.predicted, forced.target_ids))
        if len(forced.target_ids) <= FORCED_TEXT_MAX_TOKENS:
            record["forced_predicted"] = tokenizer.decode(scored.predicted.tolist())
    return record


def describe_sample(sample: Sample) -> dict:
    """The sample's identity and expected answer, stored beside every result."""
    return {"index": sample.index, "task": sample.task, "answers": list(sample.answers),
            "prompt_tokens": sample.longest_prompt, **sample.meta}


SampleCallback = Callable[[RunPoint, dict], None]


def evaluate(config: EvalConfig, adapter: ModelAdapter, samples: Sequence[Sample],
             on_sample: SampleCallback | None = None) -> list[dict]:
    """Every sample at every run point; one result dict per (point, sample)."""
    results = []
    for point in run_points(config):
        engine = build_engine(adapter, config, point)
        for sample in samples:
            start = time.perf_counter()
            record = {"policy": point.policy, "budget": point.budget_label, **describe_sample(sample)}
            record.update(evaluate_sample(engine, adapter.tokenizer, sample))
            record["seconds"] = round(time.perf_counter() - start, 3)
            results.append(record)
            if on_sample is not None:
                on_sample(point, record)
        del engine
        gc.collect()  # drop the point's policy state before the next engine allocates its own
    return results


def check_budgets_fit(config: EvalConfig, samples: Sequence[Sample]) -> None:
    """Every fractional budget must cover the sinks and window at the shortest prompt."""
    shortest = min(sample.shortest_prompt for sample in samples)
    for budget in config.budgets:
        config.selection(budget).check_fraction_budget(shortest)


def load_for_eval(config: EvalConfig) -> ModelAdapter:
    """Load the model (and tokenizer) and check the context fits its positions."""
    adapter = load_model(config.model, dtype=parse_dtype(config.dtype), device=config.device)
    if config.context > adapter.dims.max_positions:
        raise ConfigError(
            f"--context {config.context} is longer than the model's {adapter.dims.max_positions} positions: "
            f"use --context {adapter.dims.max_positions} or less."
        )
    if adapter.tokenizer is None:
        raise ConfigError(f"model {config.model!r} has no tokenizer; tasks are built from its tokens.")
    return adapter


def prepare_samples(config: EvalConfig, tokenizer) -> list[Sample]:
    """The task's samples for this config (ppl's prefix long enough for the smallest budget)."""
    fractions = [b.fraction for b in config.budgets if b.fraction is not None]
    min_prompt = min_prompt_for(fractions, config.sinks + config.window)
    samples = make_samples(config.task, tokenizer, config.samples, config.context, config.seed, min_prompt)
    check_budgets_fit(config, samples)
    return samples


def run_eval(config: EvalConfig, out_dir, overwrite: bool = False, command: str = "",
             on_sample: SampleCallback | None = None, on_ready: Callable[[int], None] | None = None) -> dict:
    """Load, build samples, evaluate every point, write the report into ``out_dir``; return it.

    ``on_ready(total)`` is called once the samples exist, with the number of (point, sample) runs.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, config.to_dict(), overwrite)
    adapter = load_for_eval(config)
    samples = prepare_samples(config, adapter.tokenizer)
    points = run_points(config)
    for point in points[1:]:
        build_engine(adapter, config, point)  # refuse a bad policy spec before hours of work
    if on_ready is not None:
        on_ready(len(points) * len(samples))
    start = time.perf_counter()
    results = evaluate(config, adapter, samples, on_sample)
    report = build_report(config, adapter, points, results, command, time.perf_counter() - start)
    write_report(out_dir, report, overwrite)
    return report
