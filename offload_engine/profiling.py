"""Where a decode step's time goes: predictor and selection, copies, waiting, attention, the rest.

``PhaseClock`` is off by default and then costs one attribute check per phase. Turned on
(``EngineConfig.profile``, ``tbrun bench latency``), it times each phase of each decode step (kept per
step, so that a report can leave out warm-up steps: ``GenerationStats.step_phases_ms``):

- on the CPU with ``time.perf_counter`` around the phase (CPU ops run synchronously, so the
  interval is the work);
- on CUDA with a pair of events recorded on the *current* stream around the phase, read once
  at the end of the generation (one sync). Inside a prefetcher copy the current stream is the copy
  stream, so ``copy`` measures the copies themselves, which overlap compute: on CUDA the phases
  need not add up to the step. ``wait`` brackets the compute stream's wait for a layer's copies,
  i.e. the time it stalled.

With a copy thread on the CPU (``EngineConfig.copy_thread``) the copies, and the selections made
there, run off the step's path: they are not timed, and ``wait`` is the time the step stalled for them.

Phases: ``selection`` (policy bookkeeping of the new token, predictor, top-k, residency),
``copy`` (gathers of selected tokens, or whole layers in dense offload), ``wait`` (compute
waiting for copies), ``attention`` (decode attention). ``rest`` is the step minus those.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext

import torch

PHASES = ("selection", "copy", "wait", "attention")


class PhaseClock:
    """Accumulates per-phase time over the decode steps of one generation, step by step (``end_step``)."""

    def __init__(self, enabled: bool = False, device: torch.device | None = None):
        self.enabled = enabled
        # phases are the step's own: work another thread does meanwhile (a copy thread) is not timed
        self._thread = threading.get_ident()
        self.cuda = enabled and device is not None and device.type == "cuda"
        self._steps: list[dict[str, float]] = [dict.fromkeys(PHASES, 0.0)]  # seconds; the last is the open step
        self._events: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []

    def end_step(self) -> None:
        """Close the current decode step: what is timed from here on counts to the next."""
        if self.enabled:
            self._steps.append(dict.fromkeys(PHASES, 0.0))

    def phase(self, name: str):
        """Context manager timing ``name`` (a no-op when the clock is off)."""
        if not self.enabled or threading.get_ident() != self._thread:
            return nullcontext()
        return self._timed(name)

    @contextmanager
    def _timed(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((len(self._steps) - 1, name, start, end))
            return
        begin = time.perf_counter()
        yield
        self._steps[-1][name] += time.perf_counter() - begin

    def shift(self, source: str, target: str, seconds: float) -> None:
        """Count ``seconds`` of the current step timed as ``source`` as ``target`` instead: work a call of one phase
        did for another (a producer's selection that copied what it placed). CPU timers only."""
        if self.enabled and not self.cuda:
            self._steps[-1][source] -= seconds
            self._steps[-1][target] += seconds

    def steps_ms(self) -> list[dict[str, float]]:
        """Milliseconds per phase of every closed decode step, in order (reads CUDA events once)."""
        if self._events:
            torch.cuda.synchronize()  # once, at the end: every recorded event must have completed
            for step, name, start, end in self._events:
                self._steps[step][name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        return [{name: 1000.0 * seconds for name, seconds in step.items()} for step in self._steps[:-1]]


def sum_phases(steps_ms: list[dict[str, float]]) -> dict[str, float]:
    """Per-phase sums of per-step phase times."""
    return {name: sum(step[name] for step in steps_ms) for name in PHASES}


def breakdown(phases_ms: dict[str, float], step_ms: list[float]) -> dict[str, dict[str, float]]:
    """Per-step ms and share of each phase over the steps of ``step_ms`` (``phases_ms``: their summed phase
    times), with ``rest`` = step time minus the phases."""
    steps = max(1, len(step_ms))
    total = sum(step_ms)
    rows = {name: value for name, value in phases_ms.items()}
    rows["rest"] = max(0.0, total - sum(rows.values()))
    return {name: {"ms_per_step": value / steps, "share": value / total if total else 0.0}
            for name, value in rows.items()}


def timed_breakdown(runs: list[tuple[list[dict[str, float]], list[float]]], skip: int) -> dict[str, dict[str, float]]:
    """The breakdown over the timed steps of one or more generations pooled, each run's first ``skip`` decode steps
    left out as benchmark timings leave them out (the first step fetches every layer's whole selection).
    ``runs``: (``GenerationStats.step_phases_ms``, ``GenerationStats.decode_ms``) per generation."""
    phases = [step for step_phases, _ in runs for step in step_phases[skip:]]
    steps = [ms for _, step_ms in runs for ms in step_ms[skip:]]
    return breakdown(sum_phases(phases), steps)
