"""The CPU copy thread (``EngineConfig.copy_thread``): copies, and tokenbutler's selections made ahead of
them, run on one more thread while the model goes on. It must change when work happens, never what is
computed: the same tokens, logits, selections and bytes moved as without it."""

from __future__ import annotations

import threading

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, native
from offload_engine.backends import sparse_offload
from offload_engine.cpu_cache import prefetcher as prefetcher_module
from offload_engine.cpu_cache.prefetcher import Prefetcher
from offload_engine.errors import ConfigError
from offload_engine.models import ModelAdapter
from offload_engine.selection import planner as planner_module

from tiny_models import seeded_policy, selecting_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEW = 90, 8


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return selecting_model()


make_policy = seeded_policy


# ------------------------------------------------------------------------------------------ prefetcher
def test_copies_run_on_one_other_thread_in_the_order_issued_and_wait_blocks_until_done():
    prefetcher = Prefetcher(torch.device("cpu"), 3, copy_thread=True)
    release = threading.Event()
    ran: list[tuple[int, int]] = []

    def copy(layer: int, block: bool = False):
        def run():
            if block:
                release.wait(5)
            ran.append((layer, threading.get_ident()))
        return run

    prefetcher.issue(0, copy(0, block=True))
    prefetcher.issue(1, copy(1))
    prefetcher.issue(0, copy(0))
    assert ran == []  # the first copy holds the thread; nothing ran on the caller's
    release.set()
    prefetcher.wait(1)
    assert [layer for layer, _ in ran][:2] == [0, 1]  # in order: layer 1's wait saw layer 0's first copy done
    prefetcher.wait(0)
    assert [layer for layer, _ in ran] == [0, 1, 0]
    assert {thread for _, thread in ran} != {threading.get_ident()} and len({thread for _, thread in ran}) == 1
    prefetcher.close()


def test_a_layers_wait_lets_all_its_copies_finish_before_raising_the_first_error():
    prefetcher = Prefetcher(torch.device("cpu"), 1, copy_thread=True)
    release, finished = threading.Event(), []

    def broken():
        raise IndexError("first")

    def slow():
        release.wait(5)
        finished.append(1)

    prefetcher.issue(0, broken)
    prefetcher.issue(0, slow)
    threading.Timer(0.05, release.set).start()
    with pytest.raises(IndexError, match="first"):
        prefetcher.wait(0)
    assert finished == [1]  # nothing of the layer still writes once wait has raised
    prefetcher.close()


def test_a_failed_copy_is_raised_at_its_wait_and_at_drain():
    prefetcher = Prefetcher(torch.device("cpu"), 2, copy_thread=True)

    def broken():
        raise IndexError("a fetch entry is outside its tables")

    prefetcher.issue(1, broken)
    prefetcher.issue(0, lambda: None)
    prefetcher.wait(0)  # another layer's copy is not affected
    with pytest.raises(IndexError, match="outside its tables"):
        prefetcher.wait(1)
    prefetcher.issue(1, broken)
    with pytest.raises(IndexError):
        prefetcher.drain()  # a copy no layer waited for: its error is not lost
    prefetcher.issue(1, broken)
    prefetcher.close()  # on a path already failing: drains without raising again, and the thread stops
    assert prefetcher._thread is None


def test_copies_on_the_thread_run_in_the_callers_inference_mode():
    prefetcher = Prefetcher(torch.device("cpu"), 1, copy_thread=True)
    with torch.inference_mode():
        target = torch.zeros(4)  # an inference tensor: written outside inference mode it would raise
        prefetcher.issue(0, lambda: target.copy_(torch.arange(4.0)))
        prefetcher.wait(0)
    assert target.tolist() == [0.0, 1.0, 2.0, 3.0]
    prefetcher.close()


def test_a_copy_thread_is_refused_where_copies_have_a_stream():
    with pytest.raises(ValueError, match="copy stream"):
        Prefetcher(torch.device("cpu"), 1, streams=object(), copy_thread=True)
    with pytest.raises(ConfigError, match="--copy-thread is for --device cpu"):
        EngineConfig(device="cuda", mode=KVMode.DENSE_OFFLOAD, copy_thread=True)
    with pytest.raises(ConfigError, match="add --offload or drop --copy-thread"):
        EngineConfig(mode=KVMode.DENSE_DEVICE, copy_thread=True)


def test_a_deferred_plan_is_made_once_and_its_failure_raised_to_every_layer():
    calls = []

    def make():
        calls.append(1)
        raise RuntimeError("select_rows failed")

    deferred = planner_module.DeferredPlan(make)
    rows = [planner_module.DeferredRows(deferred, 0, 2), planner_module.DeferredRows(deferred, 2, 4)]
    for part in rows:
        with pytest.raises(RuntimeError, match="select_rows failed"):
            part.resolve()
    assert calls == [1]  # never retried on rows the first attempt may have half written


# ---------------------------------------------------------------------------------------------- engine
def _run(adapter, spec: str, copy_thread: bool, profile: bool = False, score: bool = True, **selection):
    mode = KVMode.DENSE_OFFLOAD if spec == "dense" else KVMode.SPARSE_OFFLOAD
    config = SelectionConfig(policy=spec, **({} if spec == "dense" else
                                            {"budget": Budget(tokens=24), "sinks": 2, "window": 6, **selection}))
    engine = Engine(adapter, EngineConfig(context=160, mode=mode, selection=config, copy_thread=copy_thread,
                                          profile=profile),
                    policy=make_policy(adapter, spec) if mode is KVMode.SPARSE_OFFLOAD else None)
    prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW))
    return result, engine.score_continuation(prompt, result.token_ids) if score else None


@pytest.fixture
def copy_threads(monkeypatch) -> list[int]:
    """The threads every copy issued to a copy thread ran on."""
    seen: list[int] = []
    original = prefetcher_module._in_mode
    monkeypatch.setattr(prefetcher_module, "_in_mode",
                        lambda fn, inference: seen.append(threading.get_ident()) or original(fn, inference))
    return seen


@pytest.mark.parametrize("spec, selection", [
    ("tokenbutler", {}),
    ("tokenbutler", {"interval": 4, "neighbor_rule": "runs"}),
    ("tokenbutler", {"interval": 4, "refresh_layers": "3"}),
    ("critical(tokenbutler)", {}),
    ("quest", {"neighbors": 1}),
    ("streaming", {}),
    ("dense", {}),
])
def test_the_copy_thread_changes_when_work_happens_not_what_is_computed(adapter, spec, selection, copy_threads):
    plain, plain_scores = _run(adapter, spec, False, **selection)
    assert copy_threads == []
    threaded, threaded_scores = _run(adapter, spec, True, **selection)
    assert copy_threads and threading.get_ident() not in copy_threads  # the copies did go through the thread
    assert threaded.token_ids == plain.token_ids
    assert threaded.stats.h2d_bytes == plain.stats.h2d_bytes and sum(plain.stats.h2d_bytes) > 0
    torch.testing.assert_close(threaded_scores.logprobs, plain_scores.logprobs, rtol=0, atol=0)


@pytest.mark.parametrize("copy_thread", [False, True])
def test_a_cpu_decode_runs_the_kernels_on_the_cores_torch_had_and_computes_the_same(adapter, copy_thread,
                                                                                   monkeypatch):
    """Every decode step (of generate and of teacher-forced scoring) runs with torch on one thread and the native
    kernels on the cores torch had (a copy thread takes a core ``--threads`` left free); the prefill keeps torch's threads; torch's count is
    restored after; the tokens, bytes and log-probabilities are those of one kernel thread."""
    if native.kernels() is None:
        pytest.skip(f"the native kernels are not built here: {native.status()}")
    monkeypatch.setenv(native.THREADS_VARIABLE, "1")
    one, one_scores = _run(adapter, "tokenbutler", copy_thread)
    monkeypatch.delenv(native.THREADS_VARIABLE)
    steps, prefills = [], []
    original_step, original_prefill = Engine._decode_step, Engine._prefill

    def step(self, *args, **kwargs):
        steps.append((torch.get_num_threads(), native.kernel_threads()))
        return original_step(self, *args, **kwargs)

    def prefill(self, *args, **kwargs):
        prefills.append(torch.get_num_threads())
        return original_prefill(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_decode_step", step)
    monkeypatch.setattr(Engine, "_prefill", prefill)
    torch.set_num_threads(3)  # the one_thread fixture restores its own count after the test
    threaded, threaded_scores = _run(adapter, "tokenbutler", copy_thread)
    assert torch.get_num_threads() == 3 and native.kernel_threads() == 1
    assert prefills == [3, 3] and len(steps) == 2 * (NEW - 1)
    assert set(steps) == {(1, 3)}
    assert threaded.token_ids == one.token_ids and threaded.stats.h2d_bytes == one.stats.h2d_bytes
    torch.testing.assert_close(threaded_scores.logprobs, one_scores.logprobs, rtol=0, atol=0)


def test_tokenbutlers_selections_are_made_on_the_copy_thread(adapter, monkeypatch):
    """With plain top-k, each producer's selection (scores, top-k, residency) runs on the copy thread,
    once per prediction step and producer, never on the thread that runs the model."""
    made: list[int] = []
    original = planner_module.DeferredPlan.result

    def recording(self):
        if self._plan is None:
            made.append(threading.get_ident())
        return original(self)

    monkeypatch.setattr(planner_module.DeferredPlan, "result", recording)
    if native.kernels() is None:
        pytest.skip(f"the native kernels are not built here, so selections take the separate steps: {native.status()}")
    _run(adapter, "tokenbutler", True, score=False)
    assert threading.get_ident() not in made and len(set(made)) == 1
    producers = sum(make_policy(adapter, "tokenbutler").predictor.is_producer(layer) for layer in range(5))
    assert len(made) % producers == 0 and 0 < len(made) // producers <= NEW - 1  # at most one per decode step


@pytest.mark.parametrize("spec", ["tokenbutler", "dense"])
def test_with_a_copy_thread_the_breakdown_is_the_steps_own_path(adapter, spec):
    """Work on the copy thread is not timed (it overlaps the step); the phases still account for the step."""
    result, _ = _run(adapter, spec, True, profile=True, score=False)
    parts, steps = result.stats.breakdown, result.stats.decode_ms
    assert parts["copy"]["ms_per_step"] == 0
    total = sum(part["ms_per_step"] for part in parts.values())
    step = sum(steps) / len(steps)
    assert abs(total - step) <= 0.1 * step
    if spec == "tokenbutler":
        assert parts["selection"]["ms_per_step"] > 0  # the predictor's queries and bookkeeping stay on the step


@pytest.mark.parametrize("spec", ["tokenbutler", "quest", "dense"])
def test_a_copy_that_fails_on_the_thread_fails_the_generation_and_everything_is_freed(adapter, spec, monkeypatch):
    """The error raised on the copy thread surfaces from generate (at the layer that waited for it); the
    backend is closed all the same: its copy thread stopped, its host store freed. (Dense offload copies
    with torch's copy_, sparse offload with its layers' pairs_gatherer; the third one on the copy thread fails.)"""
    calls = {"n": 0}

    def failing_gatherer(*args, **kwargs):
        real_gather = make_gatherer(*args, **kwargs)

        def failing(*plan):
            calls["n"] += 1
            if calls["n"] == 3:
                raise IndexError("a fetch entry is outside its tables")
            return real_gather(*plan)

        return failing

    make_gatherer = sparse_offload.pairs_gatherer
    monkeypatch.setattr(sparse_offload, "pairs_gatherer", failing_gatherer)
    copy = torch.Tensor.copy_

    def failing_copy(self, *args, **kwargs):
        if threading.current_thread().name.startswith("tbrun-copy"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise IndexError("a fetch entry is outside its tables")
        return copy(self, *args, **kwargs)

    if spec == "dense":
        monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    backends = []
    original = Engine._new_backend

    def recording(self, *args):
        backends.append(original(self, *args))
        return backends[-1]

    monkeypatch.setattr(Engine, "_new_backend", recording)
    with pytest.raises(IndexError, match="outside its tables"):
        _run(adapter, spec, True, score=False)
    assert calls["n"] >= 3 and len(backends) == 1
    backend = backends[0]
    assert backend.prefetcher._thread is None and backend.host.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("tbrun-copy") and t.is_alive()]
