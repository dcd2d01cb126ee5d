"""Overhead of tbrun's CPU path: dense-device decode per step against transformers' own generate.

Both run the same model (the embedded SmolLM2-135M-Instruct by default, fp32 on the CPU) on the
same random prompt of 1k, 4k and 7.5k tokens, greedy, a fixed number of new tokens, in one
process. Repetitions are interleaved (tbrun and transformers alternate at each context, and the
order flips every repetition) so drift in a shared machine's load hits both alike; a warm-up
run of each is excluded, and so are the first ``--skip`` steps of every run.

How a step is timed:
- tbrun: ``result.stats.decode_ms``, the engine's wall time from feeding a token to having
  sampled the next one (one entry per decode step).
- transformers: ``model.generate`` with a logits processor that takes a timestamp each time it
  is called; it is called once per new token, right after that token's forward pass, so the
  interval between two calls is one full decode step (forward with ``DynamicCache``, logits
  processing, greedy choice, cache and stopping bookkeeping). ``min_new_tokens`` keeps both
  from stopping at an end-of-sequence token (tbrun: its EOS set is emptied for the run).

- vLLM (where the ``vllm`` extra is installed, its CPU build): one ``LLM`` engine in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), greedy, batch 1, its own attention (no tbrun plugin);
  each ``LLMEngine.step`` is timed and the steps that produced a token after the first are its
  decode steps (the prompt's prefill steps are excluded). The engine people would pick instead of
  tbrun on a CPU.

tbrun's runs are profiled (``EngineConfig.profile``: a clock read around each phase of each layer,
microseconds per step on the CPU): each tbrun row comes with where its steps went (selection,
copy, wait, attention, rest; ``offload_engine.profiling``) and the KV bytes it copied per step.

Contexts from ``--synthetic-kv-from`` on (past the model's trained positions, where a real prefill
on the CPU takes many minutes): tbrun's runners fill their KV cache with random keys and values
instead of prefilling (a decode step's time does not depend on the values), RoPE runs past its
trained positions (timing only), transformers is not run, and vLLM prefills for real. Random keys
renew most of a sparse policy's selection at every step, so its copies there bound the real ones
from above; ``--synthetic-kv-tile N`` prefills the prompt's first N tokens for real and repeats their
KV instead (each copy's keys turned by RoPE to the positions it fills), so selections change from step
to step as on a real prefix.

Run: ``python -m tbrun_bench.overhead --out bench/reports`` (``make bench-overhead``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from offload_engine import (
    Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, load_model, parse_context,
)
from offload_engine.config import DEFAULT_WINDOW, WINDOW_RULE
from offload_engine.errors import ConfigError
from offload_engine.memory import dtype_name
from offload_engine.policies import build_policy
from offload_engine.policies.tokenbutler import KEY_DTYPES, compact_key_dtype
from offload_engine.predictor.checkpoint import PredictorError, read_config
from offload_engine.profiling import timed_breakdown

from .report import (fmt, machine_header, markdown_header, markdown_table, provenance, ratio_cell, ratio_summary,
                     summarize_ms, write_json)

TARGET_RATIO = 1.1  # issue 2: at most 1.1x transformers' ms per step
SINKS, WINDOW = 4, DEFAULT_WINDOW  # of the sparse runners: tbrun generate's defaults (the window follows the budget)
OLD_WINDOW = 32  # the sparse runners' fixed window in reports that do not record theirs
BREAKDOWN_PHASES = ("selection", "copy", "wait", "attention", "rest")


class StepClock:
    """A logits processor that records ``time.perf_counter()`` at every call (one per new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive calls: one entry per decode step."""
        return [1000.0 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])]


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    """``length`` token ids drawn uniformly (ids below 256 skipped: special and byte tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(256, vocab_size, (length,), generator=generator).tolist()


Run = tuple[list[float], float, list[int]]  # per-step ms, prefill seconds, generated ids
Runner = Callable[[list[int], bool], "Run | None"]  # (prompt, synthetic KV) -> run, None: not at this context
Profile = tuple[list[dict], list[float], list[int]]  # a run's phases, ms and H2D bytes per decode step


def run_tbrun(adapter, prompt: list[int], new_tokens: int, selection: SelectionConfig | None = None,
              synthetic_kv: bool = False, profiles: list[Profile] | None = None, copy_thread: bool = False,
              synthetic_tile: int = 0, predictor: str | None = None, key_dtype: str = "auto", prefill=None) -> Run:
    """Per-step ms, prefill seconds and generated ids of the engine: dense on the device, or
    sparse offload under ``selection``; ``synthetic_kv``: random KV instead of the prefill, or with
    ``synthetic_tile`` N, the prompt's first N tokens prefilled and their KV repeated to its length.
    ``profiles``: the run is profiled and its phases, ms and bytes per step appended there.
    ``copy_thread`` (sparse offload): copies and selections on a copy thread, the model on one torch
    thread fewer than the process's, so that the run uses the process's cores and no more. ``predictor``:
    tokenbutler's checkpoint directory (default: the shipped one for the model and interval); ``key_dtype``:
    how tokenbutler stores its compact keys (``TokenButlerPolicy.key_dtype``). ``prefill``: the tile's
    ``record_tile``, replayed instead of prefilling the tile again (with ``synthetic_tile``)."""
    mode = KVMode.DENSE_DEVICE if selection is None else KVMode.SPARSE_OFFLOAD
    context = len(prompt) + new_tokens + 1
    config = EngineConfig(context=context, mode=mode, device=str(adapter.device),
                          selection=selection or SelectionConfig(), synthetic_kv=synthetic_kv,
                          synthetic_kv_tile=synthetic_tile if synthetic_kv else 0,
                          allow_rope_scaling=context > adapter.dims.max_positions, profile=profiles is not None,
                          copy_thread=copy_thread)
    custom = predictor is not None or key_dtype != "auto"
    policy = build_policy(selection.policy, predictor_path=predictor, key_dtype=key_dtype) if custom else None
    engine = Engine(adapter, config, policy=policy)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if copy_thread else threads)
    try:  # a fixed number of steps, like min_new_tokens on the other side
        result = engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True),
                                 prefill=prefill if synthetic_kv and synthetic_tile else None)
    finally:
        torch.set_num_threads(threads)
    if profiles is not None:
        stats = result.stats
        profiles.append((list(stats.step_phases_ms), list(stats.decode_ms), list(stats.h2d_bytes)))
    return list(result.stats.decode_ms), result.stats.prefill_seconds, result.token_ids


class SparseSpec(NamedTuple):
    """A sparse runner of ``--sparse``: its selection, tokenbutler's predictor directory (None: the shipped
    one) and tokenbutler's compact key dtype (``TokenButlerPolicy.key_dtype``)."""

    selection: SelectionConfig
    predictor: str | None
    key_dtype: str


def sparse_selection(spec: str, predictors: dict[str, str] | None = None) -> SparseSpec:
    """``tokenbutler:10%``, ``tokenbutler:10%:4`` (predict every 4th step) or ``tokenbutler:10%:1:bfloat16``
    (the compact keys stored so; default auto) -> the selection of a sparse runner (sinks 4, window up to 128
    following the budget, as tbrun generate), its predictor directory (``tokenbutler@LABEL:10%`` takes the one
    ``--predictor LABEL=DIR`` names, else None: the shipped one) and its key dtype."""
    fields = spec.split(":")
    policy, budget, interval, keys = (fields + ["", "", ""])[:4]
    if len(fields) > 4 or (interval and not interval.isdigit()) or (keys and keys not in KEY_DTYPES):
        raise ConfigError(f"--sparse {spec!r} is not POLICY:BUDGET[:INTERVAL[:KEYS]] (e.g. tokenbutler:10%:4, "
                          f"tokenbutler:10%:1:bfloat16; KEYS one of {', '.join(KEY_DTYPES)}).")
    policy, _, label = policy.partition("@")
    if label and label not in (predictors or {}):
        raise ConfigError(f"--sparse {spec!r} names predictor {label!r}: give --predictor {label}=DIR.")
    if (label or keys) and "tokenbutler" not in policy:
        raise ConfigError(f"--sparse {spec!r}: only tokenbutler (or a wrapper of it) takes a predictor or key dtype.")
    selection = SelectionConfig(policy=policy, budget=Budget.parse(budget or "10%"), sinks=SINKS, window=WINDOW,
                                interval=int(interval or 1))
    return SparseSpec(selection, (predictors or {}).get(label) if label else None, keys or "auto")


def parse_predictors(items: list[str]) -> dict[str, str]:
    """``--predictor LABEL=DIR`` items -> {label: directory}, each checked to be a predictor checkpoint."""
    predictors = {}
    for item in items:
        label, _, directory = item.partition("=")
        if not label or not directory or ":" in label or "@" in label:
            raise ConfigError(f"--predictor {item!r} is not LABEL=DIR (e.g. q1=runs/pred-q1).")
        read_config(directory)  # a missing or foreign folder: refused before the model loads
        predictors[label] = directory
    return predictors


def describe_predictors(predictors: dict[str, str]) -> dict[str, dict]:
    """What a report records of each labelled predictor: its folder's name and weights' hash, no local path."""
    return {label: {"name": Path(directory).name, "weights_sha256": read_config(directory)["weights_sha256"]}
            for label, directory in predictors.items()}


def run_transformers(model, prompt: list[int], new_tokens: int) -> Run:
    """Per-step ms, prefill seconds and generated ids of ``model.generate`` (greedy, DynamicCache)."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    ids = torch.tensor([prompt], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
        )
    prefill = clock.stamps[0] - start if clock.stamps else float("nan")
    return clock.step_ms(), prefill, out[0, len(prompt):].tolist()


class VllmRunner:
    """vLLM's CPU build decoding one prompt at a time, densely, with its own attention kernel.

    One engine for the whole run (built at the first call), in this process so that its steps can
    be timed one by one. ``max_len``: the longest prompt plus its new tokens. Returns, per prompt,
    the ms of each step that produced a token after the first, the seconds to the first token and
    the generated ids.
    """

    def __init__(self, model_dir: str, max_len: int, new_tokens: int, enforce_eager: bool, llm=None):
        self.model_dir, self.max_len, self.new_tokens, self.enforce_eager = model_dir, max_len, new_tokens, enforce_eager
        self.llm = llm  # an engine already built (tests), else built at the first call
        # process CPU seconds and wall seconds over every timed step: how many cores vLLM's steps used
        self.cpu_seconds = self.wall_seconds = 0.0

    def cores_used(self) -> float | None:
        """Process CPU time / wall time over the timed steps (1.0: one core busy), None before any."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else None

    def settings(self) -> dict:
        import vllm

        return {"vllm": vllm.__version__, "enforce_eager": self.enforce_eager, "max_model_len": self.max_len,
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}

    def _engine(self):
        if self.llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # its engine core in this process
            os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # contexts past the trained positions
            from vllm import LLM

            from transformers import AutoConfig

            trained = AutoConfig.from_pretrained(self.model_dir).max_position_embeddings
            # past the trained positions, vLLM's RoPE table must cover them (timing only, as in tbrun)
            overrides = {"max_position_embeddings": self.max_len} if self.max_len > trained else None
            self.llm = LLM(self.model_dir, dtype="float32", max_model_len=self.max_len, max_num_seqs=1, seed=0,
                           enforce_eager=self.enforce_eager, hf_overrides=overrides)
        return self.llm.llm_engine

    def __call__(self, prompt: list[int], synthetic_kv: bool = False) -> Run:
        from vllm import SamplingParams

        engine = self._engine()
        params = SamplingParams(temperature=0, max_tokens=self.new_tokens, min_tokens=self.new_tokens, ignore_eos=True)
        start = time.perf_counter()
        engine.add_request(f"overhead-{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
        steps, ids, first_token_at = [], [], None
        while engine.has_unfinished_requests():
            before, cpu_before = time.perf_counter(), time.process_time()
            outputs = engine.step()
            after, cpu_after = time.perf_counter(), time.process_time()
            produced = [list(o.outputs[0].token_ids) for o in outputs if o.outputs]
            if produced and len(produced[0]) > len(ids):
                if ids:
                    steps.append(1000.0 * (after - before))
                    self.cpu_seconds += cpu_after - cpu_before
                    self.wall_seconds += after - before
                else:
                    first_token_at = after
                ids = produced[0]
        return steps, (first_token_at or time.perf_counter()) - start, ids


def vllm_runner(adapter, model: str | None, contexts: list[int], new_tokens: int, enforce_eager: bool,
                log) -> VllmRunner | None:
    """The vLLM runner where the ``vllm`` extra is installed, else None (said once in the log); its KV
    space (``VLLM_CPU_KVCACHE_SPACE``, unless set) fits the longest context of ``adapter``'s model."""
    if importlib.util.find_spec("vllm") is None:
        log("vLLM is not installed (the `vllm` extra, docs/vllm.md): its column is left out")
        return None
    from offload_engine.models import embedded_model_dir

    longest = max(contexts) + new_tokens + 16
    kv_gib = max(1, math.ceil(longest * adapter.dims.kv_bytes_per_token(torch.float32) * 1.25 / 2**30))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    return VllmRunner(model or str(embedded_model_dir()), longest, new_tokens, enforce_eager)



def measure(adapter, contexts: list[int], new_tokens: int, repeats: int, skip: int, seed: int, log,
            sparse: tuple[str, ...] = (), synthetic_from: int | None = None,
            vllm: VllmRunner | None = None, on_context: Callable[[list[dict]], None] | None = None,
            copy_thread: bool = False, synthetic_tile: int = 0, predictors: dict[str, str] | None = None) -> list[dict]:
    """Interleaved repetitions at every context; returns one row per context (``on_context`` gets the
    rows so far after each context: a run cut short keeps what it measured).

    ``sparse``: extra tbrun runners in sparse-offload mode, as ``policy:budget`` specs (``policy@label``:
    tokenbutler with the predictor ``predictors[label]``).
    ``synthetic_from``: contexts from this one on fill tbrun's KV with random values (or, with
    ``synthetic_tile`` N, the first N tokens' real KV repeated) and skip transformers. ``vllm``: vLLM's
    dense decode beside them.
    """
    profiles: dict[str, list[Profile]] = {"tbrun": []}  # of tbrun's runners, the latest run last
    prompts = {c: random_prompt(adapter.dims.vocab_size, c, seed + c) for c in contexts}
    synthetic = {c: synthetic_from is not None and c >= synthetic_from for c in contexts}
    tiles = TileRecords(adapter, new_tokens, synthetic_tile, log)
    runners: dict[str, Runner] = {
        "tbrun": lambda p, synthetic: run_tbrun(adapter, p, new_tokens, synthetic_kv=synthetic,
                                                profiles=profiles["tbrun"], synthetic_tile=synthetic_tile,
                                                prefill=tiles.of(p, synthetic)),
        "transformers": lambda p, synthetic: None if synthetic else run_transformers(adapter.model, p, new_tokens),
    }
    for spec in sparse:
        runner, name = sparse_selection(spec, predictors), f"tbrun {spec}"
        profiles[name] = []
        runners[name] = lambda p, synthetic, run=runner, sink=profiles[name]: run_tbrun(
            adapter, p, new_tokens, run.selection, synthetic, sink, copy_thread, synthetic_tile, run.predictor,
            run.key_dtype, prefill=tiles.of(p, synthetic))
    if vllm is not None:
        runners["vllm"] = vllm
    for name, runner in runners.items():  # warm-up, excluded
        log(f"warm-up: {name} at {contexts[0]} tokens")
        runner(prompts[contexts[0]], synthetic[contexts[0]])
    samples = {(name, c): [] for name in runners for c in contexts}
    prefill = {(name, c): [] for name in runners for c in contexts}
    profiled = {(name, c): [] for name in profiles for c in contexts}
    by_repetition = {(name, c): [None] * repeats for name in runners for c in contexts}  # each repetition's median
    outputs: dict = {}
    rows = []
    for c in contexts:  # repetitions interleaved within a context: its ratios are fair on a shared machine
        for rep in range(repeats):
            order = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for name in order:
                run = runners[name](prompts[c], synthetic[c])
                if run is None:
                    continue
                steps, prefill_s, ids = run
                samples[name, c] += steps[skip:]
                prefill[name, c].append(prefill_s)
                if name in profiles:
                    profiled[name, c].append(profiles[name][-1])
                outputs[name, c] = ids
                median = by_repetition[name, c][rep] = summarize_ms(steps[skip:])["median_ms"]
                log(f"rep {rep + 1}/{repeats}, {c} tokens, {name}: median {median:.1f} ms/step")
        rows.append(_row(c, samples, prefill, outputs, sparse, synthetic[c], profiled, skip))
        rows[-1]["paired_ratios"] = paired_ratios(by_repetition, c, sparse)
        if len(prompts[c]) in tiles.seconds:
            rows[-1]["tile_prefill_s"] = tiles.seconds[len(prompts[c])]
        tiles.forget(len(prompts[c]))  # its last run is done: the record's memory is not kept for later contexts
        if on_context is not None:
            on_context(rows)
    return rows


def _tile_note(report: dict) -> str:
    """How the tile was prefilled: once per context and replayed (reports since 2026-12-07), or per run."""
    seconds = [r["tile_prefill_s"] for r in report["rows"] if r.get("tile_prefill_s") is not None]
    if not seconds:
        return ""
    return (f" The tile was prefilled once per context ({min(seconds):.1f}-{max(seconds):.1f} s, `tile_prefill_s` in "
            "the JSON) and replayed into every tbrun run, so tbrun's prefill s there is the replay and the fill.")


class TileRecords:
    """With ``--synthetic-kv-tile`` N: the real prefill of each prompt's first N tokens, made once (timed, logged,
    ``seconds``) and replayed by every tbrun runner at that context instead of prefilling the tile again per run
    (``Engine.record_prefill``; a replay is what the runner's own tiled prefill would give, tested in
    tests/test_memory_and_lifecycle.py)."""

    def __init__(self, adapter, new_tokens: int, tile: int, log: Callable[[str], None]):
        self.adapter, self.new_tokens, self.tile, self.log = adapter, new_tokens, tile, log
        self.records: dict[int, object] = {}  # prompt length -> its tile's PrefillRecord
        self.seconds: dict[int, float] = {}

    def forget(self, length: int) -> None:
        """Drop the record of prompts of ``length`` tokens (its seconds stay)."""
        self.records.pop(length, None)

    def of(self, prompt: list[int], synthetic: bool):
        """The prompt's tile record (made now if it is the first), or None where no tile fills the KV."""
        if not (synthetic and self.tile):
            return None
        length = len(prompt)
        if length not in self.records:
            context = length + self.new_tokens + 1
            config = EngineConfig(context=context, device=str(self.adapter.device), allow_rope_scaling=True,
                                  synthetic_kv=True, synthetic_kv_tile=self.tile)
            start = time.perf_counter()
            self.records[length] = Engine(self.adapter, config).record_prefill(prompt)
            self.seconds[length] = time.perf_counter() - start
            self.log(f"the tile of {self.tile} tokens for {length} tokens prefilled once in "
                     f"{self.seconds[length]:.1f} s; every tbrun runner replays it")
        return self.records[length]


def _timing(samples: dict, prefill: dict, name: str, context: int, profiled: dict | None = None,
            skip: int = 0) -> dict | None:
    if not samples.get((name, context)):
        return None
    timing = summarize_ms(samples[name, context]) | {"prefill_s_median": _median(prefill[name, context])}
    runs = (profiled or {}).get((name, context))
    if runs:
        timing["breakdown"] = timed_breakdown([(phases, step_ms) for phases, step_ms, _ in runs], skip)
        timing["breakdown_steps"] = "timed"  # reports before 2026-12-07 (no such key): every decode step
        copied = [b for _, _, per_step in runs for b in per_step[skip:]]
        timing["h2d_mib_per_step"] = sum(copied) / len(copied) / 2**20 if copied else 0.0
    return timing


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return a["median_ms"] / b["median_ms"] if a and b else None


def _row(context: int, samples: dict, prefill: dict, outputs: dict, sparse: tuple[str, ...] = (),
         synthetic: bool = False, profiled: dict | None = None, skip: int = 0) -> dict:
    ours = _timing(samples, prefill, "tbrun", context, profiled, skip)
    theirs, vllm = _timing(samples, prefill, "transformers", context), _timing(samples, prefill, "vllm", context)
    extra = {}
    for spec in sparse:
        timing = _timing(samples, prefill, f"tbrun {spec}", context, profiled, skip)
        extra[spec] = timing | {"ratio_to_transformers": _ratio(timing, theirs), "ratio_to_dense": _ratio(timing, ours),
                                "ratio_to_vllm": _ratio(timing, vllm)}
    row = {
        "sparse": extra,
        "context": context,
        "synthetic_kv": synthetic,
        "tbrun": ours,
        "transformers": theirs,
        "vllm": vllm,
        "ratio_median": _ratio(ours, theirs),
        "ratio_p90": ours["p90_ms"] / theirs["p90_ms"] if theirs else None,
        "tbrun_ratio_to_vllm": _ratio(ours, vllm),
        "same_tokens": outputs["tbrun", context] == outputs["transformers", context] if theirs else None,
    }
    if vllm is not None and not synthetic:
        row["same_tokens_as_vllm"] = outputs["tbrun", context] == outputs["vllm", context]
    return row


def paired_ratios(by_repetition: dict, context: int, sparse: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """Each tbrun runner's median ms per step over each other runner's, repetition by repetition (both ran in
    the same repetition, one soon after the other): {runner: {reference: ``report.ratio_summary``}}; tbrun dense
    against transformers and vLLM, a sparse runner against tbrun dense, vLLM and the first streaming runner.
    ``by_repetition``: {(runner, context): each repetition's median, None where it did not run}."""
    streaming = next((spec for spec in sparse if spec.split(":")[0] == "streaming"), None)
    wanted = {"tbrun": ["transformers", "vllm"]}
    for spec in sparse:
        wanted[f"tbrun {spec}"] = ["tbrun", "vllm"] + ([f"tbrun {streaming}"] if streaming and spec != streaming
                                                       else [])
    out: dict[str, dict[str, dict]] = {}
    for name, references in wanted.items():
        mine = by_repetition.get((name, context), [])
        for reference in references:
            theirs = by_repetition.get((reference, context), [])
            ratios = [a / b for a, b in zip(mine, theirs) if a is not None and b is not None]
            if ratios:
                out.setdefault(name, {})[reference] = ratio_summary(ratios)
    return out


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def to_markdown(report: dict) -> str:
    compared = [r for r in report["rows"] if r["transformers"]]
    rows = [[r["context"], fmt(r["tbrun"]["median_ms"]), fmt(r["tbrun"]["p90_ms"]),
             fmt(r["transformers"]["median_ms"]), fmt(r["transformers"]["p90_ms"]),
             fmt(r["ratio_median"], 2), fmt(r["ratio_p90"], 2),
             f'{fmt(r["tbrun"]["prefill_s_median"], 2)} / {fmt(r["transformers"]["prefill_s_median"], 2)}',
             "yes" if r["same_tokens"] else "no"] for r in compared]
    headers = ["context", "tbrun median ms", "tbrun p90 ms", "transformers median ms", "transformers p90 ms",
               "ratio (median)", "ratio (p90)", "prefill s (tbrun / transformers)", "same tokens"]
    s = report["settings"]
    steps = report["rows"][0]["tbrun"]["steps"] if report["rows"] else 0
    notes = [
        "", f"Model {s['model']} ({s['dtype']}), greedy, {s['new_tokens']} new tokens per run, {s['repeats']} "
        f"interleaved repetitions, first {s['skip_steps']} steps of each run and one warm-up run of each excluded; "
        f"{steps} steps per cell.",
        *([f"tbrun's decode steps read the weights as {s['weights']} (its logits the same, bit for bit, as from the "
           "float32 weights: gguf_weights); transformers and vLLM read their own (float32 here for transformers).", ""]
          if s.get("weights") and not s["weights"].endswith(" tensors") else []),
        f"Target: tbrun at most {TARGET_RATIO}x transformers' median ms per step.", "", s["timing_method"], "",
    ]
    if report.get("partial"):
        notes += ["**Partial**: the run stopped before its last contexts; the rows below are the contexts it finished.", ""]
    synthetic = [r["context"] for r in report["rows"] if r.get("synthetic_kv")]
    tile = s.get("synthetic_kv_tile") or 0
    if synthetic and tile:
        turned = ("each copy's queries and keys turned by RoPE to the positions it fills"
                  if s.get("synthetic_kv_tile_rope") == TILE_ROPE else
                  "the same keys in every copy, as the bench filled it before 2026-12-06: a scorer's copies tie")
        notes += [f"Contexts {', '.join(map(str, synthetic))}: tbrun's KV filled with the real keys and values of the "
                  f"prompt's first {tile} tokens, repeated along the positions ({turned}), instead of a prefill of the "
                  "whole prompt (a decode step's time does not depend on the values, but a sparse policy's selections "
                  "change from step to step as they do on a real prefix, where random keys renew most of them at "
                  "every step); RoPE past the model's trained positions (timing only); transformers not run there."
                  + _tile_note(report), ""]
    elif synthetic:
        notes += [f"Contexts {', '.join(map(str, synthetic))}: tbrun's KV filled with random keys and values instead of "
                  "a prefill (a decode step's time does not depend on the values), RoPE past the model's trained "
                  "positions (timing only); transformers not run there.", ""]
    return markdown_header("Overhead: tbrun dense-device decode vs transformers generate", report) + "\n" + \
        "\n".join(notes) + "\n" + markdown_table(headers, rows) + "\n" + _sparse_markdown(report) + \
        _breakdown_markdown(report) + _vllm_markdown(report) + _paired_markdown(report)


def _paired_markdown(report: dict) -> str:
    """The ratios paired by repetition (``paired_ratios``), where a report has them from two repetitions on."""
    rows = []
    for r in report["rows"]:
        for name, references in r.get("paired_ratios", {}).items():
            for reference, summary in references.items():
                if len(summary["per_round"]) < 2:
                    continue
                rows.append([r["context"], name, reference, ", ".join(fmt(x, 2) for x in summary["per_round"]),
                             ratio_cell(summary)])
    if not rows:
        return ""
    return ("\n## Ratios paired by repetition\n\nEach repetition ran every runner once (every other one in reverse "
            "order), so a ratio within a repetition compares medians measured minutes apart at most: per repetition, "
            "then their geometric mean [95% t interval of the log ratios]. These, not the ratios of medians pooled "
            "over repetitions above, are the ones to judge a target by.\n\n"
            + markdown_table(["context", "runner", "over", "ratio by repetition", "geomean [95%]"], rows) + "\n")


def _sparse_markdown(report: dict) -> str:
    """The sparse-offload runners measured beside the two above, if any."""
    rows = [[r["context"], spec, fmt(t["median_ms"]), fmt(t["p90_ms"]), fmt(t["ratio_to_dense"], 2),
             fmt(t["ratio_to_transformers"], 2), fmt(t.get("ratio_to_vllm"), 2)]
            for r in report["rows"] for spec, t in r.get("sparse", {}).items()]
    if not rows:
        return ""
    headers = ["context", "sparse offload (policy:budget)", "median ms", "p90 ms", "ratio to tbrun dense",
               "ratio to transformers", "ratio to vLLM dense"]
    return (f"\n## Sparse offload in the same run\n\nSame prompts, interleaved with the runs above; "
            f"{_window_note(report['settings'])}; tokenbutler predicting every N steps (`:N`) loads the shipped "
            "predictor trained for that interval where there is one (`predictors/smollm2-135m-instruct-interval4` "
            "for N = 4, as `tbrun generate` does); tokenbutler's compact keys are stored as `:KEYS` says, by default "
            f"(`auto`) {report['settings'].get('auto_key_dtype', 'as the engine chooses')} here "
            "(`compact_key_dtype`)." + _copy_thread_note(report) + "\n\n" + markdown_table(headers, rows) + "\n")


def _window_note(settings: dict) -> str:
    """Sinks and window of the sparse runners, as the report recorded them (older reports: 4 and a fixed 32)."""
    window = settings.get("window", OLD_WINDOW)
    if settings.get("window_rule", "fixed") == "fixed":
        return f"sinks {settings.get('sinks', SINKS)}, window {window}"
    return (f"sinks {settings['sinks']}, window up to {window} following the budget (half of it after the sinks, "
            "`local_window`), as `tbrun generate`")


def _copy_thread_note(report: dict) -> str:
    """How the cores were shared when the sparse runners had a copy thread."""
    s = report["settings"]
    if not s.get("copy_thread"):
        return ""
    threads = s["torch_threads"]
    return (f" With `--copy-thread`: the sparse runners ran the model on {threads - 1} torch thread(s) and their "
            f"copies and selections on one more thread; tbrun dense and transformers on {threads} torch threads, "
            "vLLM on its own (its cores used are below): every runner had the same cores. Work on the copy thread "
            "is not in the breakdown's `selection` or `copy`; `wait` is what the step stalled for it.")


def _breakdown_markdown(report: dict) -> str:
    """Where tbrun's steps went, per runner and context, where the runs were profiled."""
    rows = []
    for r in report["rows"]:
        timed = [("tbrun dense", r["tbrun"])] + [(spec, t) for spec, t in r.get("sparse", {}).items()]
        for name, timing in timed:
            parts = (timing or {}).get("breakdown")
            if parts:
                cells = [f"{fmt(parts[p]['ms_per_step'], 2)} ({100 * parts[p]['share']:.0f}%)" for p in BREAKDOWN_PHASES]
                rows.append([r["context"], name] + cells + [fmt(timing["h2d_mib_per_step"], 2)])
    if not rows:
        return ""
    every_step = any("breakdown_steps" not in (t or {}) for r in report["rows"]
                     for t in [r["tbrun"], *r.get("sparse", {}).values()] if (t or {}).get("breakdown"))
    steps = ("(every decode step, the first included, so a sparse runner's first fetch of its whole selection counts "
             "here)" if every_step else "(the timed steps only: the first steps of each run excluded, as in the "
             "timings)")
    over = "mean over the timed runs" if every_step else "over the timed steps of the timed runs, pooled"
    return ("\n## Where tbrun's steps went\n\nms per step (share) of each phase, " + over + " "
            f"{steps}; `rest` is the step less the phases: projections, MLP, norms, logits, sampling. MiB copied per "
            "step: KV bytes gathered from the host store into the working set, the first steps excluded as in the "
            "timings.\n\n"
            + markdown_table(["context", "runner"] + list(BREAKDOWN_PHASES) + ["MiB copied/step"], rows) + "\n")


def _vllm_markdown(report: dict) -> str:
    """vLLM's CPU build decoding densely, where it was installed."""
    rows = [[r["context"], fmt(r["vllm"]["median_ms"]), fmt(r["vllm"]["p90_ms"]), fmt(r["vllm"]["prefill_s_median"], 1),
             fmt(r["tbrun_ratio_to_vllm"], 2),
             {True: "yes", False: "no"}.get(r.get("same_tokens_as_vllm"), "- (random KV)")]
            + [fmt(t.get("ratio_to_vllm"), 2) for t in r.get("sparse", {}).values()]
            for r in report["rows"] if r.get("vllm")]
    if not rows:
        return ""
    specs = list(report["rows"][0].get("sparse", {}))
    headers = ["context", "vLLM median ms", "vLLM p90 ms", "vLLM prefill s", "tbrun dense / vLLM",
               "same tokens (tbrun dense, vLLM)"] + [f"{spec} / vLLM" for spec in specs]
    settings = report["settings"].get("vllm") or {}
    return (f"\n## vLLM's CPU build, dense, in the same run\n\nvLLM {settings.get('vllm')} "
            f"({'eager' if settings.get('enforce_eager') else 'compiled (its default)'}), batch 1, greedy, its own "
            "attention kernel; one engine step timed per decode step (`LLMEngine.step`, in this process)"
            f"{_cores_text(settings.get('cores_used'))}. Ratios below 1: tbrun's step is faster.\n\n"
            + markdown_table(headers, rows) + "\n")


def _cores_text(cores: float | None) -> str:
    """How many cores vLLM's timed steps kept busy, as the report says it."""
    if cores is None:
        return ""
    return f"; process CPU time / wall time over its timed steps {cores:.2f} (1.00: one core busy)"


# How --synthetic-kv-tile's copies hold their queries and keys (recorded in the settings; reports without it
# repeated the first copy's as they were)
TILE_ROPE = "turned to their positions"
TIMING_METHOD = (
    "Timing: tbrun's per-step time is the engine's own (feed a token, sample the next); transformers' is the "
    "interval between consecutive calls of a timestamping logits processor, i.e. one full generate step."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tbrun_bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path or id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--contexts", default="1k,4k,7.5k", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per context")
    parser.add_argument("--skip", type=int, default=1, help="first steps of each run to exclude")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/reports"), help="report folder")
    parser.add_argument("--name", default="overhead_cpu", help="report file name (without extension)")
    parser.add_argument("--sparse", action="append", default=[],
                        help="also time sparse offload, as policy:budget[:interval[:keys]] (e.g. tokenbutler:10%%:4; "
                             "tokenbutler:10%%:1:bfloat16 with the compact keys in bfloat16; tokenbutler@LABEL:10%% "
                             "with the predictor of --predictor LABEL=DIR); repeatable")
    parser.add_argument("--predictor", action="append", default=[], metavar="LABEL=DIR",
                        help="a tokenbutler checkpoint that --sparse specs name as POLICY@LABEL; repeatable")
    parser.add_argument("--synthetic-kv-from", default=None,
                        help="contexts from this one on: random KV instead of tbrun's prefill, no transformers (e.g. 16k)")
    parser.add_argument("--synthetic-kv-tile", default=None,
                        help="with --synthetic-kv-from: instead of random KV, prefill the prompt's first N tokens for "
                             "real and repeat their KV to the context (e.g. 4k), so sparse selections churn as on a "
                             "real prefix")
    parser.add_argument("--vllm", choices=("auto", "off"), default="auto",
                        help="auto: time vLLM's CPU build beside tbrun where the vllm extra is installed")
    parser.add_argument("--vllm-eager", action="store_true", help="run vLLM in eager mode (default: compiled)")
    parser.add_argument("--copy-thread", action="store_true",
                        help="sparse runners copy and select on a copy thread and run the model on one torch thread "
                             "fewer; the others use every torch thread (OMP_NUM_THREADS=2 on 2 cores: the same cores)")
    args = parser.parse_args(argv)
    try:
        args.predictors = parse_predictors(args.predictor)
        for spec in args.sparse:
            sparse_selection(spec, args.predictors)
    except (ConfigError, PredictorError) as error:
        parser.error(str(error))
    if args.synthetic_kv_tile and not args.synthetic_kv_from:
        parser.error("--synthetic-kv-tile repeats a real prefix where --synthetic-kv-from fills the KV: give both")
    if args.copy_thread and torch.get_num_threads() < 2:
        parser.error("--copy-thread needs 2 or more torch threads (OMP_NUM_THREADS=2): the sparse runners give one "
                     "of them to the copy thread, so that every runner uses the same cores")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    contexts = [parse_context(c) for c in args.contexts.split(",")]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log("loading the model")
    adapter = load_model(args.model, dtype=torch.float32, device="cpu", progress=log)
    synthetic_from = parse_context(args.synthetic_kv_from) if args.synthetic_kv_from else None
    synthetic_tile = parse_context(args.synthetic_kv_tile) if args.synthetic_kv_tile else 0
    vllm = vllm_runner(adapter, args.model, contexts, args.new_tokens, args.vllm_eager, log) if args.vllm == "auto" else None
    settings = {"model": args.model or "embedded SmolLM2-135M-Instruct", "dtype": "fp32",
                "weights": adapter.weights_text(),
                "new_tokens": args.new_tokens, "repeats": args.repeats, "skip_steps": args.skip,
                "seed": args.seed, "sparse": args.sparse, "sinks": SINKS, "window": WINDOW, "window_rule": WINDOW_RULE,
                "target_ratio": TARGET_RATIO, "timing_method": TIMING_METHOD,
                "synthetic_kv_from": synthetic_from, "synthetic_kv_tile": synthetic_tile,
                "synthetic_kv_tile_rope": TILE_ROPE if synthetic_tile else None, "vllm": vllm.settings() if vllm else None,
                "copy_thread": args.copy_thread, "torch_threads": torch.get_num_threads(),
                "predictors": describe_predictors(args.predictors),
                "auto_key_dtype": dtype_name(compact_key_dtype("auto", torch.float32, torch.device("cpu")))}
    report = {"benchmark": "overhead", "provenance": provenance("python -m tbrun_bench.overhead"),
              "machine": machine_header(torch.device("cpu")), "settings": settings, "rows": []}

    def write(rows: list[dict]) -> None:
        report["rows"] = rows
        if vllm is not None:
            settings["vllm"]["cores_used"] = vllm.cores_used()
        report["partial"] = len(rows) < len(contexts)
        write_json(args.out / f"{args.name}.json", report)
        (args.out / f"{args.name}.md").write_text(to_markdown(report))

    measure(adapter, contexts, args.new_tokens, args.repeats, args.skip, args.seed, log, tuple(args.sparse),
            synthetic_from, vllm, on_context=write, copy_thread=args.copy_thread, synthetic_tile=synthetic_tile,
            predictors=args.predictors)
    log(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
