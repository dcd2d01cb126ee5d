"""One generation at a time on one thread; the requests behind it wait in a bounded queue.

The HTTP side (an asyncio event loop) builds a ``Job`` and ``submit``s it; a full queue raises
``QueueFull`` (the 429). The worker thread runs each job through the ``Session`` (prefix reuse)
and posts its events back to the job's event loop: ``("text", delta)`` as tokens arrive, then
``("done", Outcome)``, ``("error", exception)`` or ``("cancelled", reason)``. ``job.cancel()`` (the
client left) ends the generation at its next token or prefill layer and frees its KV; a cancelled
job still waiting is skipped. ``begin_shutdown()`` cancels every job with the reason ``SHUTDOWN`` (the
HTTP side tells a client still there to retry elsewhere) and refuses new ones (``ShuttingDown``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..config import SamplingConfig
from ..engine import GenerationResult
from ..errors import TbrunError
from ..session import PrefixReuse, Session, StopGeneration
from .text import ServeTokenizer, TextStream

log = logging.getLogger("tbrun.serve")


CLIENT_GONE = "client_gone"  # why a job was cancelled: its client disconnected (nobody reads the answer)
SHUTDOWN = "shutdown"  # the server is going down (a client still connected is told so)


class QueueFull(Exception):
    """Every waiting place is taken."""


class ShuttingDown(Exception):
    """The server is going down: no new job is taken."""


@dataclass
class Job:
    """One request's generation, and the way its events get back to the request's event loop."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None  # CLIENT_GONE or SHUTDOWN once cancelled: the first reason given
    submitted: float = field(default_factory=time.perf_counter)
    _cancel_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self, reason: str = CLIENT_GONE) -> None:
        """End the job at its next token or prefill layer (a waiting one is skipped); a second cancel, e.g.
        the stream closing after a shutdown cancelled it, keeps the first reason."""
        with self._cancel_lock:
            if self.cancel_reason is None:
                self.cancel_reason = reason
            self.cancelled.set()

    def emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is going down
            pass


@dataclass(slots=True)
class Outcome:
    """A finished generation: the text to send (cut at a stop string) and what it cost."""

    result: GenerationResult
    reuse: PrefixReuse
    text: str
    queue_ms: float
    first_token_ms: float  # from the start of the generation (after the queue)


@dataclass(slots=True)
class Counters:
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0


class GenerationWorker:
    """The one thread that touches the engine; ``max_queue`` requests may wait behind the running one."""

    def __init__(self, session: Session, tokenizer: ServeTokenizer, max_queue: int):
        self.session, self.tokenizer = session, tokenizer
        self.max_queue = max_queue
        self.counters = Counters()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tbrun-generation", daemon=True)
        self._current: Job | None = None
        self._waiting: list[Job] = []
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Jobs queued whose clients are still there (one that left gives its place up at once, though the
        thread skips it only when it reaches it)."""
        with self._lock:
            return sum(1 for job in self._waiting if not job.cancelled.is_set())

    @property
    def busy(self) -> bool:
        return self._current is not None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when one job runs and ``max_queue`` wait already, ``ShuttingDown``
        once the server is going down."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown
            waiting = sum(1 for queued in self._waiting if not queued.cancelled.is_set())
            if waiting + (self._current is not None) >= self.max_queue + 1:
                self.counters.rejected += 1
                raise QueueFull
            self._waiting.append(job)
        self._queue.put(job)

    def begin_shutdown(self) -> None:
        """The server is going down: cancel the running and waiting jobs with the reason ``SHUTDOWN`` and
        take no new one. Returns at once (the thread ends the running job at its next token or layer)."""
        with self._lock:
            self._stopping = True
            for job in [self._current, *self._waiting]:
                if job is not None:
                    job.cancel(SHUTDOWN)

    def stop(self) -> None:
        """Cancel the running and waiting jobs, end the thread, free the KV (pinned memory too)."""
        self.begin_shutdown()
        if self._thread.is_alive():
            self._queue.put(None)  # the thread skips the cancelled jobs ahead of it quickly
            self._thread.join()
        self.session.close()

    # ---------------------------------------------------------------------- the thread
    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting.remove(job)
                self._current = job
            try:
                if job.cancelled.is_set():  # the client left while it waited, or the server is going down
                    self.counters.cancelled += 1
                    job.emit("cancelled", job.cancel_reason)
                else:
                    self._generate(job)
            finally:
                with self._lock:
                    self._current = None

    def _generate(self, job: Job) -> None:
        started = time.perf_counter()
        stream = TextStream(self.tokenizer, job.stop)
        first_token_at: list[float] = []

        def on_prefill(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise StopGeneration("cancelled")

        def on_token(token: int) -> None:
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            if job.cancelled.is_set():
                raise StopGeneration("cancelled")
            delta = stream.push(token)
            if delta:
                job.emit("text", delta)
            if stream.stopped:
                raise StopGeneration("stop")

        try:
            result, reuse = self.session.generate(job.prompt_ids, job.sampling, on_token, on_prefill)
        except TbrunError as exc:
            self.counters.failed += 1
            job.emit("error", exc)
            return
        except Exception as exc:  # no request may stop the server: report it and go on
            log.exception("generation failed")
            self.counters.failed += 1
            job.emit("error", exc)
            return
        if result.finish_reason == "cancelled":
            self.counters.cancelled += 1
            job.emit("cancelled", job.cancel_reason)
            return
        tail = stream.finish()
        if tail:
            job.emit("text", tail)
        self.counters.completed += 1
        first = (first_token_at[0] if first_token_at else time.perf_counter()) - started
        job.emit("done", Outcome(result, reuse, stream.text, 1000.0 * (started - job.submitted), 1000.0 * first))
