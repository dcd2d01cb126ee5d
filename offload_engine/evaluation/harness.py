"""Run an evaluation task through the real engine for every policy x budget, and score it.

One ``RunPoint`` is a (policy, budget) pair; dense (every token, KV on the device) is always the
first point. A policy may carry its own selection settings in brackets, e.g.
``tokenbutler[interval=4,neighbor_rule=runs]`` (keys: ``interval``, ``neighbors``, ``neighbor_rule``, ``keep_bonus``,
``group_reduction``, ``key_dtype``, ``page_prefilter``, ``prefilter_factor``), so variants of one policy run side
by side.

One ``Engine`` is built per point. The samples are run one at a time: each prompt is prefilled
once, densely (``Engine.record_prefill``), and every point starts from that record (its policy
replays the prefill's observations), so a run costs one prefill per sample whatever the number of
points. Generation tasks go through ``Engine.generate`` (greedy), teacher-forced tasks through
``Engine.score_continuation``, so every scored token is decoded under the policy.

Runs are resumable: each finished sample (every point) is appended to ``progress.jsonl`` in the
output directory; a rerun of the same config skips the samples found there.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import (
    DEFAULT_WINDOW, WINDOW_RULE, Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig, parse_context,
    parse_layers,
)
from ..engine import Engine, PrefillRecord, resolve_device
from ..errors import ConfigError
from ..machine import portable_path  # reports must not name local paths
from ..memory import dtype_name, parse_dtype
from ..models import ModelAdapter, load_model
from ..policies import available_policies, build_policy, parse_policy_spec
from ..policies.tokenbutler import GROUP_REDUCTIONS, KEY_DTYPES, compact_key_dtype, shipped_predictor_for
from ..selection.planner import keep_bonus_refusal
from ..predictor.checkpoint import WEIGHTS_NAME, load_checkpoint, resolve_checkpoint_dir
from .report import PROGRESS_FILE, build_report, check_output_dir, run_commit, write_report
from .scoring import score_forced, score_generation
from .tasks import Sample, get_task, make_samples, min_prompt_for

FORCED_TEXT_MAX_TOKENS = 64  # keep the greedy predictions' text in the report for short targets
MIN_PPL_PASSAGES = 8  # perplexity's t interval is taken over the passages


# SelectionConfig fields a variant may set (``tokenbutler[window=64]``: one point with another window)
SELECTION_KEYS = ("sinks", "window", "interval", "neighbors", "neighbor_rule", "refresh_layers", "keep_bonus")
COUNT_KEYS = ("sinks", "window", "interval", "neighbors")  # those that are whole numbers
SHARE_KEYS = ("keep_bonus",)  # those that are numbers
# options of the innermost policy a variant may set
POLICY_KEYS = ("group_reduction", "key_dtype", "page_prefilter", "prefilter_factor")
_VARIANT = re.compile(r"^(?P<base>[^\[\]]+?)\s*(?:\[(?P<options>[^\[\]]*)\])?$")


def split_policies(text: str) -> list[str]:
    """``--policy`` split at the commas outside brackets and parentheses:
    ``"quest,tokenbutler[interval=4,neighbor_rule=runs]"`` -> two specs."""
    specs, depth, current = [], 0, []
    for char in text:
        depth += char in "([" and 1 or (char in ")]" and -1 or 0)
        if char == "," and depth == 0:
            specs.append("".join(current))
            current = []
        else:
            current.append(char)
    return [spec.strip() for spec in [*specs, "".join(current)] if spec.strip()]


@dataclass(frozen=True, slots=True)
class PolicyVariant:
    """A policy spec with optional settings: ``base[key=value,...]``."""

    base: str  # e.g. "critical(tokenbutler)"
    settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "PolicyVariant":
        match = _VARIANT.match(spec.strip())
        if match is None:
            raise ConfigError(f"--policy {spec!r} is not POLICY or POLICY[key=value,...].")
        settings = []
        for item in filter(None, (part.strip() for part in (match.group("options") or "").split(","))):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or key not in SELECTION_KEYS + POLICY_KEYS or not value:
                raise ConfigError(f"--policy {spec!r}: {item!r} is not key=value with a key among "
                                  f"{', '.join(SELECTION_KEYS + POLICY_KEYS)}.")
            if key in COUNT_KEYS and not value.isdigit():
                raise ConfigError(f"--policy {spec!r}: {key} takes a whole number of tokens or steps, not {value!r}.")
            if key in SHARE_KEYS and not _is_number(value):
                raise ConfigError(f"--policy {spec!r}: {key} takes a number (a share: 0.25), not {value!r}.")
            settings.append((key, value))
        return cls(match.group("base").strip(), tuple(settings))

    def selection_overrides(self) -> dict:
        cast = dict.fromkeys(COUNT_KEYS, int) | dict.fromkeys(SHARE_KEYS, float)
        return {k: cast.get(k, str)(v) for k, v in self.settings if k in SELECTION_KEYS}

    def policy_options(self) -> dict:
        cast = {"page_prefilter": int, "prefilter_factor": float}
        return {k: cast.get(k, str)(v) for k, v in self.settings if k in POLICY_KEYS}


def check_policy_spec(spec: str) -> None:
    """Refuse a policy spec naming a policy that does not exist (listing the valid ones), nesting them in a way
    that is not a policy (``parse_policy_spec``) or with a bad setting."""
    base = PolicyVariant.parse(spec).base
    valid = available_policies()
    known = {name.split("(")[0] for name in valid}
    names = [name for name in re.split(r"[()\s]+", base) if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names or base.count("(") != base.count(")"):
        what = repr(unknown[0]) if unknown else repr(spec)
        raise ConfigError(f"--policy {what} is not a policy; valid policies: {', '.join(valid)}.")
    _, scorer = parse_policy_spec(base)  # the nesting: critical(dense) and critical(critical(quest)) are refused
    variant = PolicyVariant.parse(spec)
    for key, value in variant.settings:
        if key == "group_reduction" and ("tokenbutler" not in base or value not in GROUP_REDUCTIONS):
            raise ConfigError(f"--policy {spec!r}: group_reduction applies to tokenbutler and is one of "
                              f"{', '.join(GROUP_REDUCTIONS)}.")
        if key == "key_dtype" and ("tokenbutler" not in base or value not in KEY_DTYPES):
            raise ConfigError(f"--policy {spec!r}: key_dtype (how tokenbutler stores its compact keys) applies to "
                              f"tokenbutler and is one of {', '.join(KEY_DTYPES)}.")
        if key == "page_prefilter" and ("tokenbutler" not in base or not value.isdigit() or int(value) == 1):
            raise ConfigError(f"--policy {spec!r}: page_prefilter (pages of tokenbutler's compact keys ranked before "
                              "its tokens) applies to tokenbutler and is a page size of at least 2 tokens, or 0.")
        if key == "prefilter_factor" and ("tokenbutler" not in base or not _at_least_one(value)):
            raise ConfigError(f"--policy {spec!r}: prefilter_factor (the page prefilter's candidates, in multiples of "
                              "the budget) applies to tokenbutler and is a number of at least 1.")
        if key in ("interval", "neighbors") and not value.isdigit():
            raise ConfigError(f"--policy {spec!r}: {key} must be a whole number, got {value!r}.")
        if key == "refresh_layers":
            parse_layers(value)
    prefiltered = variant.policy_options().get("page_prefilter", 0) > 0  # (checked a whole number above)
    refusal = keep_bonus_refusal(variant.selection_overrides().get("keep_bonus", 0.0), scorer, prefiltered)
    if refusal is not None:
        raise ConfigError(f"--policy {spec!r}: {refusal.replace('--keep-bonus', 'keep_bonus')}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _at_least_one(text: str) -> bool:
    try:
        return float(text) >= 1.0
    except ValueError:
        return False


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
    window: int = DEFAULT_WINDOW
    interval: int = 1
    neighbors: int = 0
    neighbor_rule: str = "radius"
    group_reduction: str = "mean"  # tokenbutler's GQA rule (policy[group_reduction=...] overrides it)
    shared_prefill: bool = True  # one dense prefill per sample, replayed by every point
    ppl_prefix: int | None = None  # perplexity tasks: score from this token on (None: the shortest prompt allowed)

    def __post_init__(self) -> None:
        get_task(self.task)
        self.context = parse_context(self.context)
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}.")
        if get_task(self.task).primary == "ppl" and self.samples < MIN_PPL_PASSAGES:
            raise ConfigError(f"--task {self.task} needs at least {MIN_PPL_PASSAGES} passages for its interval, got "
                              f"--samples {self.samples}: use --samples {MIN_PPL_PASSAGES} or more.")
        self.policies = tuple(dict.fromkeys(spec.strip() for spec in self.policies if spec.strip()))
        self.budgets = tuple(dict.fromkeys(self.budgets))
        if not self.policies or not self.budgets:
            raise ConfigError("give at least one --policy and one --budget.")
        for spec in self.policies:
            check_policy_spec(spec)
        if self.group_reduction not in GROUP_REDUCTIONS:
            raise ConfigError(f"--group-reduction must be one of {', '.join(GROUP_REDUCTIONS)}, "
                              f"got {self.group_reduction!r}.")
        for budget in self.budgets:
            for spec in self.policies:
                self.selection(budget, spec)  # token budgets vs sinks + window, variant settings
            if budget.tokens is not None and budget.tokens > self.context:
                raise ConfigError(f"--budget {budget} is larger than --context {self.context}: lower it.")
        parse_dtype(self.dtype)
        resolve_device(self.device)  # refuse cuda where there is none, before loading anything
        if self.predictor is not None and not any("tokenbutler" in spec for spec in self.policies):
            raise ConfigError("--predictor is only used by the tokenbutler policy.")
        self._check_ppl_prefix()

    def _check_ppl_prefix(self) -> None:
        """``ppl_prefix``: only for a perplexity task, at least the shortest prompt every budget allows, short of
        the context."""
        if self.ppl_prefix is None:
            return
        if get_task(self.task).primary != "ppl":
            raise ConfigError(f"--ppl-prefix sets where a perplexity task starts scoring; --task {self.task} has no "
                              "perplexity: leave it out.")
        least = self.shortest_prompt()
        if not least <= self.ppl_prefix < self.context:
            raise ConfigError(f"--ppl-prefix {self.ppl_prefix} must be at least {least} (the shortest prompt at which "
                              f"every --budget covers --sinks and the narrowest window) and below --context "
                              f"{self.context}: choose one in between.")

    def shortest_prompt(self) -> int:
        """The shortest prompt at which every share budget covers the floor of every point (0: no shares)."""
        fractions = [b.fraction for b in self.budgets if b.fraction is not None]
        return min_prompt_for(fractions, self.fixed_tokens())

    def selection(self, budget: Budget | None, policy: str = "dense") -> SelectionConfig:
        """The selection settings of ``policy`` (a spec, variant settings applied) at ``budget``."""
        variant = PolicyVariant.parse(policy)
        settings = dict(sinks=self.sinks, window=self.window, interval=self.interval, neighbors=self.neighbors,
                        neighbor_rule=self.neighbor_rule)
        return SelectionConfig(policy=variant.base, budget=budget, **(settings | variant.selection_overrides()))

    def fixed_tokens(self) -> int:
        """The most tokens any point keeps whatever it scores: its floor, the sinks and the narrowest window (a
        variant may set its own; the window follows the budget above that)."""
        return max(selection.floor
                   for selection in [self.selection(None)] + [self.selection(None, p) for p in self.policies])

    def policy_options(self, policy: str) -> dict:
        """Constructor options of the innermost policy of spec ``policy``."""
        variant = PolicyVariant.parse(policy)
        if "tokenbutler" not in variant.base:
            return {}
        options = {"group_reduction": self.group_reduction} | variant.policy_options()
        return options | ({"predictor_path": self.predictor} if self.predictor is not None else {})

    def to_dict(self) -> dict:
        """The resolved configuration, JSON-ready (budgets as written: ``10%`` or ``2048``)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data.update(policies=list(self.policies), budgets=[str(b) for b in self.budgets])
        data["window_rule"] = WINDOW_RULE  # a run started under another rule is not resumed under this one
        for name in ("model", "predictor"):  # reports name no local path
            data[name] = portable_path(data[name]) if data[name] is not None else None
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
    """Dense keeps its KV on the device; every other policy runs the sparse offload path, counting the
    tokens it attends (a neighbour rule may attend more than the budget)."""
    mode = KVMode.DENSE_DEVICE if point.budget is None else KVMode.SPARSE_OFFLOAD
    return EngineConfig(context=config.context, mode=mode, selection=config.selection(point.budget, point.policy),
                        device=config.device, count_attended=mode is KVMode.SPARSE_OFFLOAD)


def build_engine(adapter: ModelAdapter, config: EvalConfig, point: RunPoint) -> Engine:
    """An ``Engine`` for one point, its policy built from the spec (and the predictor, if any)."""
    engine_cfg = engine_config(config, point)
    policy = None
    if engine_cfg.mode is KVMode.SPARSE_OFFLOAD:
        policy = build_policy(PolicyVariant.parse(point.policy).base, **config.policy_options(point.policy))
    return Engine(adapter, engine_cfg, policy=policy)


def predictor_identity(config: EvalConfig, adapter: ModelAdapter, interval: int = 1) -> dict | None:
    """The tokenbutler predictor a point at prediction ``interval`` uses (``--predictor``, else the one
    shipped for the model, interval and ``--context``): its path (repository-relative) and the sha256 of its weights."""
    path = (Path(config.predictor) if config.predictor is not None
            else shipped_predictor_for(adapter, interval, config.context))
    return predictor_record(path)


def predictor_record(path: Path | None) -> dict | None:
    """A predictor folder as reports name it: its path (repository-relative) and the sha256 of the weights the
    policy loads from it (a training output folder without its final predictor: its latest checkpoint's,
    ``resolve_checkpoint_dir``; None where there are none); None for no folder."""
    if path is None:
        return None
    weights = resolve_checkpoint_dir(path) / WEIGHTS_NAME
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"path": portable_path(path), "sha256": digest}


def tokenbutler_weights_sha(config: EvalConfig, adapter: ModelAdapter) -> str | None:
    """The sha256 of the predictor weights the run's tokenbutler points use, ``+``-joined in point order
    when they use several (one per interval); None: no such point."""
    intervals = dict.fromkeys(config.selection(point.budget, point.policy).interval for point in run_points(config)
                              if point.budget is not None and "tokenbutler" in point.policy)
    identities = [predictor_identity(config, adapter, interval) for interval in intervals]
    shas = dict.fromkeys(identity["sha256"] for identity in identities if identity)
    return "+".join(shas) if shas else None


def stored_key_dtype(config: EvalConfig, adapter: ModelAdapter, policy: str) -> str | None:
    """How a tokenbutler point of spec ``policy`` stores its compact keys on this machine (``compact_key_dtype``:
    ``auto`` resolves by the CPU's kernels); None for another policy."""
    options = config.policy_options(policy)
    if "group_reduction" not in options:  # not a tokenbutler point
        return None
    stored = compact_key_dtype(options.get("key_dtype", "auto"), adapter.dtype, adapter.device)
    return dtype_name(stored)


def tokenbutler_key_dtypes(config: EvalConfig, adapter: ModelAdapter) -> dict[str, str]:
    """``stored_key_dtype`` of each tokenbutler point, by policy spec; {} without such points."""
    dtypes = {point.policy: stored_key_dtype(config, adapter, point.policy)
              for point in run_points(config) if point.budget is not None}
    return {policy: dtype for policy, dtype in dtypes.items() if dtype is not None}


def point_settings(config: EvalConfig, adapter: ModelAdapter, point: RunPoint) -> dict:
    """Every setting that changes what ``point`` selects, for results.json."""
    entry = {"policy": point.policy, "budget": point.budget_label}
    if point.budget is None:
        return entry | {"mode": "dense"}
    selection = config.selection(point.budget, point.policy)
    entry |= {"base_policy": selection.policy, "sinks": selection.sinks, "window": selection.window,
              "window_rule": WINDOW_RULE,
              "interval": selection.interval, "neighbors": selection.neighbors,
              "neighbor_rule": selection.neighbor_rule}
    if selection.refresh_layers:
        entry["refresh_layers"] = sorted(selection.refresh_layers)
    if selection.keep_bonus:
        entry["keep_bonus"] = selection.keep_bonus
    options = config.policy_options(point.policy)
    if "group_reduction" in options:
        entry |= {"group_reduction": options["group_reduction"],
                  "key_dtype": stored_key_dtype(config, adapter, point.policy),
                  "predictor": predictor_identity(config, adapter, selection.interval)}
    return entry


def _stats_summary(stats) -> dict:
    """The few statistics worth keeping per sample (the rest is in ``tbrun bench``)."""
    return {"prefill_seconds": round(stats.prefill_seconds, 4), "ms_per_step": round(stats.ms_per_step, 3),
            "h2d_bytes_per_step": stats.h2d_bytes_per_step, "new_tokens": stats.new_tokens}


def evaluate_sample(engine: Engine, tokenizer, sample: Sample,
                    prefills: dict[tuple[int, ...], PrefillRecord] | None = None) -> dict:
    """Generate and/or teacher-force one sample through ``engine``; returns its metrics and output.

    ``prefills``: recorded prefills by prompt, replayed instead of running the model's prefill.
    """
    prefills = prefills or {}
    record: dict = {}
    if sample.max_new_tokens:
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=sample.max_new_tokens)
        result = engine.generate(list(sample.prompt_ids), sampling, prefill=prefills.get(sample.prompt_ids))
        record.update(score_generation(result.text, sample.answers), output=result.text,
                      finish_reason=result.finish_reason, stats=_stats_summary(result.stats))
        if result.stats.attended_share is not None:
            record["attended"] = result.stats.attended_share
    if sample.forced is not None:
        forced = sample.forced
        scored = engine.score_continuation(list(forced.prompt_ids), list(forced.target_ids),
                                           prefill=prefills.get(forced.prompt_ids))
        record.update(score_forced(scored.logprobs, scored.predicted, forced.target_ids))
        if scored.attended_share is not None:  # the forced pass's share where a sample has both
            record["attended"] = scored.attended_share
        if len(forced.target_ids) <= FORCED_TEXT_MAX_TOKENS:
            record["forced_predicted"] = tokenizer.decode(scored.predicted.tolist())
    return record


def describe_sample(sample: Sample) -> dict:
    """The sample's identity and expected answer, stored beside every result."""
    return {"index": sample.index, "task": sample.task, "answers": list(sample.answers),
            "prompt_tokens": sample.longest_prompt, **sample.meta}


SampleCallback = Callable[[RunPoint, dict], None]
StatusCallback = Callable[[str], None]


def sample_prompts(sample: Sample) -> list[tuple[int, ...]]:
    """The distinct prompts the engine prefills for ``sample`` (coref has two: generation and forced)."""
    prompts = ([sample.prompt_ids] if sample.max_new_tokens else []) + ([sample.forced.prompt_ids] if sample.forced else [])
    return list(dict.fromkeys(prompts))


def evaluate_one(engines: Sequence[tuple[RunPoint, Engine]], adapter: ModelAdapter, sample: Sample,
                 shared_prefill: bool, on_sample: SampleCallback | None = None,
                 on_status: StatusCallback | None = None) -> list[dict]:
    """One sample at every point; with ``shared_prefill`` each of its prompts is prefilled once.

    Each record carries ``prefill_seconds`` (the shared prefills, the same for every point of the
    sample, 0 without sharing) and ``seconds`` (this point's own time: replay or prefill, decode).
    """
    prefills: dict[tuple[int, ...], PrefillRecord] = {}
    shared_seconds = 0.0
    if shared_prefill:
        if on_status is not None:
            on_status(f"sample {sample.index}: prefill")
        for prompt in sample_prompts(sample):
            prefills[prompt] = engines[0][1].record_prefill(list(prompt))
            shared_seconds += prefills[prompt].seconds
    results = []
    for point, engine in engines:
        if on_status is not None:
            on_status(f"sample {sample.index}: {point.label}")
        start = time.perf_counter()
        record = {"policy": point.policy, "budget": point.budget_label, **describe_sample(sample)}
        record.update(evaluate_sample(engine, adapter.tokenizer, sample, prefills))
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["prefill_seconds"] = round(shared_seconds, 3)
        results.append(record)
        if on_sample is not None:
            on_sample(point, record)
    return results


def spread_order(count: int) -> list[int]:
    """``0 .. count-1`` in an order whose every prefix spreads over the range (van der Corput:
    0, 1/2, 1/4, 3/4, ... of ``count``), so a run stopped early has samples from the whole sweep
    (needle depths, variants, haystacks), not only its start."""
    order: dict[int, None] = {}
    j = 0
    while len(order) < count:
        fraction, denominator, n = 0.0, 1.0, j
        while n:
            denominator *= 2
            fraction += (n % 2) / denominator
            n //= 2
        order.setdefault(int(fraction * count), None)
        j += 1
    return list(order)


def evaluate(config: EvalConfig, adapter: ModelAdapter, samples: Sequence[Sample],
             on_sample: SampleCallback | None = None, done: dict[int, list[dict]] | None = None,
             on_done: Callable[[Sample, list[dict]], None] | None = None,
             on_status: StatusCallback | None = None, deadline: float | None = None) -> list[dict]:
    """Every sample at every run point; one result dict per (point, sample), by sample index.

    Samples run in ``spread_order``. ``done``: results already made, by sample index (a resumed run);
    those samples are skipped. ``on_done(sample, results)``: after each sample's every point (to save
    progress). ``deadline`` (``time.monotonic()`` value): start no sample after it once one is done
    (a partial run).
    """
    done = dict(done or {})
    engines = [(point, build_engine(adapter, config, point)) for point in run_points(config)]
    for position in spread_order(len(samples)):
        sample = samples[position]
        if sample.index in done:
            continue
        if deadline is not None and done and time.monotonic() >= deadline:
            break  # (a report needs one sample at least)
        done[sample.index] = evaluate_one(engines, adapter, sample, config.shared_prefill, on_sample, on_status)
        if on_done is not None:
            on_done(sample, done[sample.index])
    return [record for index in sorted(done) for record in done[index]]


def check_budgets_fit(config: EvalConfig, samples: Sequence[Sample]) -> None:
    """Every fractional budget must cover the sinks and window at the shortest prompt."""
    shortest = min(sample.shortest_prompt for sample in samples)
    for budget in config.budgets:
        for policy in config.policies:
            try:
                config.selection(budget, policy).check_fraction_budget(shortest)
            except ConfigError as error:
                raise ConfigError(f"--policy {policy}: {error}") from None


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
    """The task's samples for this config (ppl's prefix long enough for the smallest budget, or ``ppl_prefix``)."""
    min_prompt = max(config.shortest_prompt(), config.ppl_prefix or 0)
    samples = make_samples(config.task, tokenizer, config.samples, config.context, config.seed, min_prompt)
    check_budgets_fit(config, samples)
    return samples


def read_progress(out_dir: Path, config: dict, predictor_sha256: str | None = None,
                  key_dtypes: dict[str, str] | None = None) -> dict[int, list[dict]]:
    """Results saved by an interrupted run of ``config`` in ``out_dir``, by sample index ({} if none).

    ``predictor_sha256``: the weights the tokenbutler points use now; ``key_dtypes``: how they store their
    compact keys here (``tokenbutler_key_dtypes``: ``auto`` depends on the CPU). A progress file made with
    other weights or key dtypes is refused (finishing it would mix two selections in one row). Files written
    before either was recorded carry none and are taken as they are.
    """
    path = out_dir / PROGRESS_FILE
    header = _progress_header(path, config)
    if header is None:
        return {}
    lines = path.read_text().splitlines()
    recorded = header.get("predictor_sha256")
    if recorded is not None and predictor_sha256 is not None and recorded != predictor_sha256:
        raise ConfigError(
            f"{path} was made with a predictor whose weights have sha256 {recorded[:12]}..., but "
            f"{config.get('predictor') or 'the shipped predictor'} now has {predictor_sha256[:12]}...: finishing "
            "the run would mix two predictors. Use another --out, or --overwrite to start the run over."
        )
    stored = header.get("key_dtypes")
    if stored is not None and key_dtypes is not None and stored != key_dtypes:
        raise ConfigError(
            f"{path} was made with tokenbutler's compact keys stored as {stored}, but here they are {key_dtypes} "
            "(how `auto` stores them depends on the CPU's kernels): finishing the run would mix two. Use another "
            "--out, or --overwrite to start the run over."
        )
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            done[int(entry["index"])] = list(entry["results"])
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by an interruption: that sample is run again
    return done


# Settings added to the config after runs were started without them, at the value that means what those runs did:
# a progress file that lacks one still belongs to the same run (it resumes instead of starting over).
ADDED_SETTINGS = {"ppl_prefix": None}


def _progress_header(path: Path, config: dict) -> dict | None:
    """The header of the progress file at ``path`` when it is one of a run of ``config``, else None."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        recorded = header.get("config")
        same = isinstance(recorded, dict) and ADDED_SETTINGS | recorded == ADDED_SETTINGS | config
        return header if same else None
    except (ValueError, AttributeError):
        return None


def progress_commits(out_dir: Path, config: dict) -> list[str]:
    """The commits an interrupted run of ``config`` in ``out_dir`` measured its samples at, oldest first ([] if
    none, or a progress file from before they were kept)."""
    header = _progress_header(out_dir / PROGRESS_FILE, config)
    return list(header.get("commits", [])) if header else []


class ProgressLog:
    """``progress.jsonl``: a header line with the config (and the commits the samples were measured at), then
    one line per finished sample."""

    def __init__(self, out_dir: Path, config: dict, done: dict[int, list[dict]], predictor_sha256: str | None = None,
                 commits: Sequence[str] = (), key_dtypes: dict[str, str] | None = None):
        self.path = out_dir / PROGRESS_FILE
        out_dir.mkdir(parents=True, exist_ok=True)
        header = {"config": config, "predictor_sha256": predictor_sha256, "commits": list(commits),
                  "key_dtypes": key_dtypes}
        lines = [json.dumps(header)] + [json.dumps({"index": i, "results": r}) for i, r in done.items()]
        self.path.write_text("\n".join(lines) + "\n")

    def add(self, sample: Sample, results: list[dict]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"index": sample.index, "results": results}) + "\n")
            handle.flush()


def check_max_minutes(max_minutes: float | None) -> None:
    """Refuse a ``--max-minutes`` that is no time limit: 0 or less (0 reads as "no limit" in many tools, but
    would stop this run after its first sample), nan or inf (leave the option out to run every sample)."""
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise ConfigError(f"--max-minutes {max_minutes:g}: give a number of minutes above 0 (e.g. 90), or leave "
                          "it out to run every sample.")


def run_eval(config: EvalConfig, out_dir, overwrite: bool = False, command: str = "",
             on_sample: SampleCallback | None = None, on_ready: Callable[[int, int], None] | None = None,
             on_status: StatusCallback | None = None, max_minutes: float | None = None) -> dict:
    """Load, build samples, evaluate every point, write the report into ``out_dir``; return it.

    ``on_ready(total, done)`` is called once the samples exist, with the number of (point, sample)
    runs and how many of them an interrupted run of the same config already made (resumed).
    ``max_minutes``: start no sample after that long; the report then covers the samples done (marked
    partial) and the progress file stays beside it, so the same command finishes the run later.
    """
    check_max_minutes(max_minutes)
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    out_dir = Path(out_dir)
    if config.predictor is not None and any("tokenbutler" in point.policy for point in run_points(config)):
        load_checkpoint(config.predictor)  # missing, incomplete or corrupted: refused before anything is written
    check_output_dir(out_dir, config.to_dict(), overwrite)
    adapter = load_for_eval(config)
    samples = prepare_samples(config, adapter.tokenizer)
    points = run_points(config)
    for point in points[1:]:
        build_engine(adapter, config, point)  # refuse a bad policy spec before hours of work
    sha, key_dtypes = tokenbutler_weights_sha(config, adapter), tokenbutler_key_dtypes(config, adapter)
    done = {i: r for i, r in read_progress(out_dir, config.to_dict(), sha, key_dtypes).items() if i < len(samples)}
    earlier = progress_commits(out_dir, config.to_dict()) if done else []
    commits = list(dict.fromkeys([*earlier, run_commit()]))  # a resumed run names every commit it ran at
    log = ProgressLog(out_dir, config.to_dict(), done, sha, commits, key_dtypes)
    if on_ready is not None:
        on_ready(len(points) * len(samples), len(points) * len(done))
    start = time.perf_counter()
    results = evaluate(config, adapter, samples, on_sample, done, log.add, on_status, deadline)
    settings = [point_settings(config, adapter, point) for point in points]
    finished = len({r["index"] for r in results})
    partial = {"samples_done": finished} if finished < len(samples) else None
    report = build_report(config, adapter, points, results, command, time.perf_counter() - start, settings, partial,
                          resumed={"samples": len(done), "commits": earlier} if done else None)
    # the directory holds this run (checked above); a partial run keeps its progress file
    write_report(out_dir, report, overwrite=True, keep=(PROGRESS_FILE,) if partial else ())
    return report
