"""The server's parts without a model: streamed text and stop strings, the bounded queue, the
request validation (tests/test_serve.py drives the whole server on the embedded model)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from offload_engine.config import SamplingConfig
from offload_engine.server.protocol import ChatCompletionRequest, CompletionRequest
from offload_engine.server.text import ServeTokenizer, TextStream
from offload_engine.server.worker import (
    CLIENT_GONE, SHUTDOWN, GenerationWorker, Job, QueueFull, ShuttingDown,
)
from offload_engine.session import StopGeneration

from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> ServeTokenizer:
    return ServeTokenizer(tiny_tokenizer())


def stream_all(tokenizer: ServeTokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode_text(text):
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return [d for d in deltas if d], stream


def test_without_stop_strings_the_deltas_make_the_text(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    deltas, stream = stream_all(tokenizer, text, [])
    assert "".join(deltas) == text == stream.text and not stream.stopped and len(deltas) > 3


def test_a_stop_string_is_never_sent_even_across_tokens(tokenizer):
    text = "Paris is the capital of France, famous for the Eiffel Tower."
    deltas, stream = stream_all(tokenizer, text, ["capital of", "zzz"])
    assert stream.stopped and "".join(deltas) == "Paris is the " == stream.text
    assert not any("cap" in d for d in deltas)


def test_text_that_only_looks_like_a_stop_string_start_is_sent_at_the_end(tokenizer):
    deltas, stream = stream_all(tokenizer, "add(a, b", ["b)"])
    assert not stream.stopped and "".join(deltas) == "add(a, b"


class ByteTokenizer:
    """Tokens that are byte strings, decoded as a byte-level tokenizer does (an unfinished UTF-8
    character comes out as U+FFFD)."""

    chat_template = None

    def __init__(self, tokens: list[bytes]):
        self.tokens = tokens

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", "replace")


@pytest.mark.parametrize("then_finish", [False, True])
def test_a_stop_string_completed_by_a_token_that_ends_inside_a_character_is_not_sent(then_finish):
    """"END" arrives with the first byte of a three-byte character: the answer stops there, whether or
    not another token follows (the generation may end at that token, by length or EOS)."""
    stream = TextStream(ServeTokenizer(ByteTokenizer([b"hi ", b"END \xe4", b"\xbd\xa0"])), ["END"])
    sent = [stream.push(0), stream.push(1)]
    if then_finish:
        sent.append(stream.finish())
    assert stream.stopped and "".join(sent) == "hi " == stream.text


def test_messages_a_chat_template_refuses_are_a_400_on_messages():
    from offload_engine.server.protocol import ApiError

    refusing = tiny_tokenizer()
    refusing.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ApiError, match="refuses these messages: System role not supported") as caught:
        ServeTokenizer(refusing).encode_chat([{"role": "system", "content": "be brief"}])
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_the_queue_admits_one_running_and_max_queue_waiting():
    worker = GenerationWorker(session=None, tokenizer=None, max_queue=2)  # thread not started: nothing runs
    loop = asyncio.new_event_loop()
    jobs = [Job([1, 2], SamplingConfig(), [], loop) for _ in range(3)]
    for job in jobs:
        worker.submit(job)
    with pytest.raises(QueueFull):
        worker.submit(Job([1], SamplingConfig(), [], loop))
    assert worker.counters.rejected == 1 and worker.waiting == 3
    loop.close()


def test_no_waiting_place_at_max_queue_zero():
    worker = GenerationWorker(session=None, tokenizer=None, max_queue=0)
    loop = asyncio.new_event_loop()
    worker.submit(Job([1], SamplingConfig(), [], loop))
    with pytest.raises(QueueFull):
        worker.submit(Job([1], SamplingConfig(), [], loop))
    loop.close()


def test_a_client_that_left_while_waiting_gives_its_place_up_at_once():
    worker = GenerationWorker(session=None, tokenizer=None, max_queue=1)  # thread not started: nothing runs
    loop = asyncio.new_event_loop()
    first, second = Job([1], SamplingConfig(), [], loop), Job([1], SamplingConfig(), [], loop)
    worker.submit(first)
    worker.submit(second)
    with pytest.raises(QueueFull):
        worker.submit(Job([1], SamplingConfig(), [], loop))
    second.cancel()  # its client disconnected
    assert worker.waiting == 1
    worker.submit(Job([1], SamplingConfig(), [], loop))
    assert worker.waiting == 2 and worker.counters.rejected == 1
    loop.close()


def test_a_job_keeps_the_first_reason_it_was_cancelled_for():
    loop = asyncio.new_event_loop()
    left, shut = Job([1], SamplingConfig(), [], loop), Job([1], SamplingConfig(), [], loop)
    left.cancel()
    left.cancel(SHUTDOWN)  # the server went down after the client had left
    shut.cancel(SHUTDOWN)
    shut.cancel()  # the stream closing after the shutdown cut it
    assert (left.cancel_reason, shut.cancel_reason) == (CLIENT_GONE, SHUTDOWN)
    loop.close()


class EndlessSession:
    """Stands in for ``Session``: one token every few milliseconds until the job is cancelled."""

    cached_tokens = 0

    def __init__(self, token: int):
        self.token = token

    def generate(self, prompt_ids, sampling, on_token, on_prefill):
        try:
            while True:
                on_token(self.token)
                time.sleep(0.005)
        except StopGeneration as stop:
            return SimpleNamespace(finish_reason=stop.reason), None

    def close(self) -> None:
        pass


def started_server(tokenizer: ServeTokenizer):
    """``tbrun serve``'s uvicorn server over an app whose engine never finishes a generation, running on a
    thread on a free port: (server, thread, worker, host:port)."""
    from offload_engine.server import ServeConfig, create_app
    from tbrun_cli.serve_cmd import uvicorn_server

    raw = tokenizer.tokenizer
    engine = SimpleNamespace(adapter=SimpleNamespace(tokenizer=raw, dims=SimpleNamespace(vocab_size=len(raw))),
                             config=SimpleNamespace(context=64), policy_name="dense")
    app = create_app(engine, ServeConfig(model_name="tiny", max_queue=1))
    worker = app.state.worker
    worker.session = EndlessSession(tokenizer.encode_text(" and")[-1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn_server(app, "127.0.0.1", port, "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    return server, thread, worker, f"127.0.0.1:{port}"


def post(address: str, body: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(address, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    return connection.getresponse()


def test_a_shutdown_answers_the_clients_still_there_with_503_or_an_error_chunk(tokenizer):
    """Ctrl-C while one request streams and another waits: both clients are told the server is going down
    (not dropped unanswered once uvicorn's graceful wait runs out), and nothing new is taken."""
    server, thread, worker, address = started_server(tokenizer)
    request = {"model": "default", "prompt": "Once", "max_tokens": 32}
    stream = post(address, {**request, "stream": True})
    assert stream.status == 200 and stream.readline().startswith(b"data: ")  # it is generating
    waited: dict = {}
    waiting = threading.Thread(target=lambda: waited.update(response=post(address, request)))
    waiting.start()
    deadline = time.monotonic() + 30
    while worker.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.waiting == 1
    server.should_exit = True  # what uvicorn's Ctrl-C handler does
    lines = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down" and "Retry it against a running server" in error["message"]
    waiting.join(timeout=30)
    response = waited["response"]
    assert response.status == 503
    assert json.loads(response.read())["error"]["code"] == "server_shutting_down"
    thread.join(timeout=30)
    assert not thread.is_alive() and worker.counters.cancelled == 2
    loop = asyncio.new_event_loop()
    with pytest.raises(ShuttingDown):
        worker.submit(Job([1], SamplingConfig(), [], loop))
    loop.close()


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"n": 3},
    {"stop": ["a", "b", "c", "d", "e"]}, {"stop": [""]}, {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]}, {"seed": 2**64}, {"seed": -(2**63) - 1},
])
def test_bad_chat_parameters_are_refused(bad):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], **bad}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_requests_read_what_openai_clients_send():
    chat = ChatCompletionRequest.model_validate({
        "model": "default", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "stop": "x", "stream_options": {"include_usage": True}, "frequency_penalty": 0})
    assert chat.messages[0].text() == "ab" and chat.token_limit == 7 and chat.stop_strings == ["x"]
    assert chat.include_usage and chat.temperature == 1.0
    completion = CompletionRequest.model_validate({"model": "m", "prompt": ["one prompt"]})
    assert completion.prompt == "one prompt" and completion.token_limit == 16
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["two", "prompts"]})


def test_an_explicit_null_means_the_default():
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": None, "top_p": None,
            "n": None, "stream": None, "seed": None, "max_tokens": None, "stop": None, "ignore_eos": None}
    chat = ChatCompletionRequest.model_validate(body)
    assert (chat.temperature, chat.top_p, chat.n, chat.stream, chat.ignore_eos) == (1.0, 1.0, 1, False, False)
    assert chat.seed is None and chat.token_limit is None and chat.stop_strings == []


@pytest.mark.parametrize("option,value,refused", [
    ("logprobs", True, True), ("logprobs", False, False), ("top_logprobs", 3, True), ("echo", True, True),
    ("tools", [{"type": "function", "function": {"name": "f"}}], True), ("tools", [], False),
    ("logit_bias", {"42": 100}, True), ("presence_penalty", 0.5, True), ("frequency_penalty", 0, False),
    ("response_format", {"type": "json_object"}, True), ("response_format", {"type": "text"}, False),
    ("best_of", 2, True), ("user", "someone", False), ("metadata", {"k": "v"}, False),
])
def test_options_tbrun_cannot_honour_are_named_when_set_not_dropped(option, value, refused):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], option: value}
    assert ChatCompletionRequest.model_validate(body).unsupported_option() == (option if refused else None)


def test_serve_refuses_a_taken_port_and_a_negative_queue_before_loading_the_model():
    import socket

    from typer.testing import CliRunner

    from tbrun_cli.main import app

    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port), "--model", "/no/such/model"])
    assert result.exit_code == 2 and "pick another --port" in " ".join(result.output.split())  # rich wraps
    result = runner.invoke(app, ["serve", "--max-queue", "-1", "--model", "/no/such/model"])
    assert result.exit_code == 2 and "--max-queue" in " ".join(result.output.split())
