"""The FastAPI application: OpenAI-compatible routes over one engine.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events ending
with ``data: [DONE]`` when ``stream`` is set), ``GET /v1/models``, ``GET /health``. Every error is
answered in the OpenAI shape; a malformed body or bad parameter is a 400, a full queue a 429, a
request the server's shutdown cut (``GenerationWorker.begin_shutdown``) a 503, or an error chunk when
streaming.
Each response carries the engine's statistics of the request in the ``tbrun`` field (the last
chunk when streaming): prefill tokens saved by prefix reuse, ms per step, bytes moved per step,
KV on the device.
"""

from __future__ import annotations

import asyncio
import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SamplingConfig
from ..engine import Engine
from ..errors import ConfigError, TbrunError
from ..session import Session
from . import protocol as p
from .text import ServeTokenizer
from .worker import SHUTDOWN, GenerationWorker, Job, Outcome, QueueFull, ShuttingDown

POLL_SECONDS = 0.25  # how often a non-streaming request checks whether its client is still there


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """What the server adds to the engine: the names it answers to and the queue length."""

    model_name: str
    max_queue: int = 8

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}.")

    @property
    def served_names(self) -> list[str]:
        return ["default", self.model_name] if self.model_name != "default" else ["default"]


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The application; its lifespan starts the generation thread and, on shutdown, stops it and frees the KV."""
    tokenizer = ServeTokenizer(engine.adapter.tokenizer)
    worker = GenerationWorker(Session(engine), tokenizer, config.max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="tbrun", lifespan=lifespan)
    app.state.worker = worker
    _add_error_handlers(app)
    routes = _Routes(engine, config, tokenizer, worker)
    app.post("/v1/chat/completions")(routes.chat)
    app.post("/v1/completions")(routes.completions)
    app.get("/v1/models")(routes.models)
    app.get("/health")(routes.health)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.ApiError)
    async def api_error(_request, exc: p.ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        return JSONResponse(_validation_error_body(exc.errors()), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):  # a bug: still an answer in the OpenAI shape
        return JSONResponse(p.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(p.error_body(str(exc.detail), kind), status_code=exc.status_code)


def _validation_error_body(errors) -> dict:
    """pydantic's first complaint as one OpenAI error: ``param`` is the field's dotted path."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return p.error_body(f"the request body is not valid JSON: {detail}".rstrip(": "), "invalid_request_error")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid request")
    return p.error_body(f"{where}: {message}" if where else message, "invalid_request_error", where or None)


class _Routes:
    """The route handlers, sharing the engine, the tokenizer and the worker."""

    def __init__(self, engine: Engine, config: ServeConfig, tokenizer: ServeTokenizer, worker: GenerationWorker):
        self.engine, self.config, self.tokenizer, self.worker = engine, config, tokenizer, worker

    async def chat(self, body: p.ChatCompletionRequest, request: Request):
        self._check_request(body)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
        ids = self.tokenizer.encode_chat(messages)
        return await self._answer(body, ids, request, chat=True)

    async def completions(self, body: p.CompletionRequest, request: Request):
        self._check_request(body)
        prompt = body.prompt
        ids = [int(t) for t in prompt] if isinstance(prompt, list) else self.tokenizer.encode_text(prompt)
        return await self._answer(body, ids, request, chat=False)

    async def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tbrun"}
                                           for name in self.config.served_names]}

    async def health(self):
        counters = self.worker.counters
        return {"status": "ok", "model": self.config.model_name, "mode": self.engine.config.mode.value,
                "policy": self.engine.policy_name, "context": self.engine.config.context,
                "busy": self.worker.busy, "waiting": self.worker.waiting, "max_queue": self.worker.max_queue,
                "cached_tokens": self.worker.session.cached_tokens,
                "requests": {"completed": counters.completed, "cancelled": counters.cancelled,
                             "rejected": counters.rejected, "failed": counters.failed}}

    # ------------------------------------------------------------------------ internals
    def _check_request(self, body: p.SamplingRequest) -> None:
        """A model served here, and no option tbrun cannot honour (``protocol.UNSUPPORTED``)."""
        if body.model not in self.config.served_names:
            raise p.ApiError(404, f"the model {body.model!r} does not exist here: use one of "
                                  f"{self.config.served_names}.", "invalid_request_error", "model", "model_not_found")
        option = body.unsupported_option()
        if option is not None:
            raise p.ApiError(400, f"{option} is not supported by tbrun serve: leave it out (it answers with text, "
                                  "one choice, no log-probabilities, tools or penalties).", param=option,
                             code="unsupported_parameter")

    def _sampling(self, body: p.SamplingRequest, prompt_tokens: int, chat: bool) -> SamplingConfig:
        context, prompt_param = self.engine.config.context, "messages" if chat else "prompt"
        if prompt_tokens == 0:
            raise p.ApiError(400, "the prompt is empty.", param=prompt_param)
        if prompt_tokens >= context:
            raise p.ApiError(400, f"the prompt has {prompt_tokens} tokens; this server's context is {context} "
                                  "tokens, which leaves no room for an answer: shorten the prompt.",
                             param=prompt_param, code="context_length_exceeded")
        room = context - prompt_tokens
        asked = body.token_limit
        limit_param = next((name for name in ("max_completion_tokens", "max_tokens")
                            if getattr(body, name, None) is not None and name in body.model_fields_set), None)
        if asked is not None and asked > room and limit_param is not None:  # a default (completions' 16) is cut
            raise p.ApiError(400, f"{limit_param} is {asked}, but the prompt has {prompt_tokens} tokens of this "
                                  f"server's {context}: at most {room} can be generated. Lower {limit_param} or "
                                  "shorten the prompt.", param=limit_param, code="context_length_exceeded")
        limit = min(asked or room, room)
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        try:
            return SamplingConfig(temperature=body.temperature, top_p=body.top_p, seed=seed, max_new_tokens=limit,
                                  ignore_eos=body.ignore_eos)
        except TbrunError as exc:
            raise p.ApiError(400, str(exc)) from None

    async def _answer(self, body: p.SamplingRequest, ids: list[int], request: Request, chat: bool):
        vocab = self.engine.adapter.dims.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise p.ApiError(400, f"a prompt token id is outside the vocabulary [0, {vocab}).", param="prompt")
        job = Job(ids, self._sampling(body, len(ids), chat), body.stop_strings, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull:
            raise p.ApiError(429, f"the server is busy: one request is running and {self.worker.max_queue} are "
                                  "waiting. Retry later.", "rate_limit_exceeded", code="rate_limit_exceeded") from None
        except ShuttingDown:
            raise _shutting_down() from None
        reply = _Reply(body.model, chat, p.new_id("chatcmpl" if chat else "cmpl"))
        if body.stream:
            return _JobStream(reply.events(job, body.include_usage), job)
        return await reply.wait(job, request)


class _Reply:
    """Turns a job's events into one JSON response or a stream of SSE chunks."""

    def __init__(self, model: str, chat: bool, request_id: str):
        self.model, self.chat, self.id = model, chat, request_id

    async def wait(self, job: Job, request: Request) -> Response:
        """The finished answer as JSON; a client that leaves first cancels the job."""
        watcher = asyncio.create_task(_cancel_when_gone(job, request))
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "done":
                    return JSONResponse(self._response(payload))
                if kind == "error":
                    raise _as_api_error(payload)
                if kind == "cancelled":
                    if payload == SHUTDOWN:  # the client is still there: tell it why
                        raise _shutting_down()
                    return Response(status_code=499)  # the client left: nobody reads it
        finally:
            watcher.cancel()

    async def events(self, job: Job, include_usage: bool):
        """SSE lines: a role chunk (chat), text deltas, the finish chunk with the statistics, usage, [DONE]."""
        if self.chat:
            yield _sse(p.chat_chunk(self.id, self.model, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield _sse(self._chunk(payload))
            elif kind == "error":
                yield _sse(_as_api_error(payload).body())
                break
            elif kind == "cancelled":
                if payload != SHUTDOWN:
                    return  # the client left: nobody reads the rest
                yield _sse(_shutting_down().body())
                break
            else:
                yield _sse(self._chunk(None, _finish(payload), tbrun=_stats(payload)))
                if include_usage:
                    yield _sse(self._chunk(None, usage=_usage(payload), empty=True))
                break
        yield "data: [DONE]\n\n"

    def _chunk(self, text: str | None, finish: str | None = None, empty: bool = False, **extra) -> dict:
        if self.chat:
            delta = None if empty else ({"content": text} if text is not None else {})
            return p.chat_chunk(self.id, self.model, delta, finish, **extra)
        return p.completion_chunk(self.id, self.model, None if empty else (text or ""), finish, **extra)

    def _response(self, outcome: Outcome) -> dict:
        build = p.chat_response if self.chat else p.completion_response
        return build(self.id, self.model, outcome.text, _finish(outcome), _usage(outcome), _stats(outcome))


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job when it ends for any reason (the client left,
    the stream finished, the server is going down); cancelling a finished job does nothing."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _cancel_when_gone(job: Job, request: Request) -> None:
    """Poll the connection while the job runs or waits (tokens arriving do not delay the check)."""
    while not await request.is_disconnected():
        await asyncio.sleep(POLL_SECONDS)
    job.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _finish(outcome: Outcome) -> str:
    return p.ENGINE_TO_OPENAI_FINISH.get(outcome.result.finish_reason, "stop")


def _usage(outcome: Outcome) -> dict:
    return p.usage(len(outcome.result.prompt_ids), len(outcome.result.token_ids))


def _stats(outcome: Outcome) -> dict:
    """The ``tbrun`` extension field: what this request cost the engine."""
    s, reuse = outcome.result.stats, outcome.reuse
    return {"mode": s.mode, "policy": s.policy, "predictor": s.predictor, "compact_keys": s.compact_keys,
            "prompt_tokens": s.prompt_tokens,
            "prefill_tokens": reuse.prefilled_tokens, "prefill_tokens_saved": reuse.reused_tokens,
            "prefill_seconds": round(s.prefill_seconds, 4), "queue_ms": round(outcome.queue_ms, 2),
            "time_to_first_token_ms": round(outcome.first_token_ms, 2), "decode_steps": len(s.decode_ms),
            "ms_per_step": round(s.ms_per_step, 3), "h2d_bytes_per_step": s.h2d_bytes_per_step,
            "decode_kv_bytes": s.decode_kv_bytes, "prefill_peak_kv_bytes": s.prefill_peak_kv_bytes,
            "finish_reason": outcome.result.finish_reason, "notes": list(s.notes)}


def _shutting_down() -> p.ApiError:
    """The answer to a request the server's shutdown cut or arrived during it."""
    return p.ApiError(503, "the server is shutting down: this request was not finished. Retry it against a "
                           "running server.", "server_error", code="server_shutting_down")


def _as_api_error(exc: Exception) -> p.ApiError:
    if isinstance(exc, p.ApiError):
        return exc
    if isinstance(exc, TbrunError):
        return p.ApiError(400, str(exc))
    return p.ApiError(500, f"the generation failed: {type(exc).__name__}: {exc}", "server_error")
