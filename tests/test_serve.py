"""``tbrun serve`` on the embedded model, driven by the real ``openai`` client: one server for the
module, started with the CLI on a free port of 127.0.0.1 and stopped with Ctrl-C (SIGINT) at the end."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.slow

MAX_QUEUE = 2
CONTEXT = 2048
STARTUP_SECONDS = 300  # the model loads in ~10 s on an idle machine; a busy CI machine gets room
GREEDY = dict(temperature=0, max_tokens=8)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def open_stream(base: str, path: str, body: dict | bytes) -> tuple[http.client.HTTPConnection,
                                                                   http.client.HTTPResponse]:
    """POST ``body`` and return once the response headers are in; the body is read by the caller."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=120)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(log, *options: str) -> tuple[str, subprocess.Popen]:
    """Start ``tbrun serve OPTIONS`` on a free port (one torch thread, output to ``log``) and wait
    until it answers /health; (base URL, process). Fails the test with the log if it does not start."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tbrun_cli.main", "serve", "--port", str(port), "--log-level", "warning", *options],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            get_json(f"{base}/health")
            return base, process
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"tbrun serve did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, process, log path) of a running ``tbrun serve``."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    base, process = start_server(log, "--max-queue", str(MAX_QUEUE), "--context", str(CONTEXT))
    yield base, process, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def health(server) -> dict:
    return get_json(f"{server[0]}/health")


def wait_for(server, condition, what: str, limit: float = 120.0) -> dict:
    """Poll /health until ``condition(health)`` holds (bounded; no time is asserted)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = health(server)
        if condition(state):
            return state
        time.sleep(0.1)
    pytest.fail(f"the server never reached: {what}; last /health: {state}")


def chat(client, content: str, **options):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                          **{**GREEDY, **options})


def test_models_lists_default_and_the_model_name(client):
    assert {"default", "SmolLM2-135M-Instruct"} <= {model.id for model in client.models.list()}


def test_chat_and_completion_answer_with_usage_and_engine_stats(client):
    answer = chat(client, "What is the capital of France?")
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert 0 < usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = answer.model_extra["tbrun"]
    assert stats["mode"] == "dense-device" and stats["prompt_tokens"] == usage.prompt_tokens
    assert stats["decode_steps"] == usage.completion_tokens - 1 and stats["ms_per_step"] > 0
    assert stats["decode_kv_bytes"] > 0
    done = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", **GREEDY)
    assert done.choices[0].text.strip() and done.usage.completion_tokens == 8  # greedy runs on, no EOS here
    assert done.choices[0].finish_reason == "length"
    sampled = [client.completions.create(model="default", prompt="My favourite animal is", temperature=1.0, top_p=0.9,
                                         seed=seed, max_tokens=8).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]  # the seed makes sampling repeatable


def test_streaming_gives_the_non_streaming_text_and_ends_with_done(client, server):
    whole = chat(client, "Name three colours.")
    chunks = list(chat(client, "Name three colours.", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["tbrun"]["finish_reason"] in ("eos", "length")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = {"model": "default", "prompt": "One, two,", "max_tokens": 4, "temperature": 0, "stream": True}
    connection, response = open_stream(server[0], "/v1/completions", body)
    lines = [line for line in response.read().decode().splitlines() if line]
    connection.close()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_string_cuts_the_answer(client):
    full = client.completions.create(model="default", prompt="The capital of France is", **GREEDY).choices[0]
    assert "." in full.text
    cut = client.completions.create(model="default", prompt="The capital of France is", stop=["."], **GREEDY)
    assert cut.choices[0].text == full.text.split(".")[0] and cut.choices[0].finish_reason == "stop"


def test_three_concurrent_clients_are_all_answered(client):
    questions = ["What is 2 + 2?", "Say hello in French.", "What colour is the sky?"]
    alone = [chat(client, q, max_tokens=6).choices[0].message.content for q in questions]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = chat(client, questions[i], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers.get(i) for i in range(3)] == alone


def test_a_client_leaving_mid_stream_cancels_it_and_the_next_request_is_served(client, server):
    before = health(server)["requests"]["cancelled"]
    long = dict(temperature=0, max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    stream = chat(client, "Count from one to one thousand.", **long)
    received = [next(stream) for _ in range(3)]
    stream.close()
    assert len(received) == 3
    state = wait_for(server, lambda s: s["requests"]["cancelled"] > before and not s["busy"], "the stream cancelled")
    assert state["cached_tokens"] == 0  # its KV was freed
    # The same for a non-streaming request whose client goes away while it is decoding.
    body = {"model": "default", "prompt": "Once", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    connection = http.client.HTTPConnection(server[0].removeprefix("http://"), timeout=120)
    connection.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    wait_for(server, lambda s: s["busy"], "the request running")
    connection.close()
    wait_for(server, lambda s: s["requests"]["cancelled"] > before + 1 and not s["busy"], "the request cancelled")
    assert "Paris" in chat(client, "What is the capital of France?").choices[0].message.content


def test_bad_requests_get_400_in_the_openai_error_shape(client, server):
    bad = [dict(temperature=5), dict(top_p=0), dict(max_tokens=0), dict(n=2), dict(stop=["a", "b", "c", "d", "e"])]
    for options in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, "hi", **options)
        assert caught.value.status_code == 400 and caught.value.body["message"], options
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "word " * CONTEXT)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:  # the prompt fits, the answer asked for would not
        chat(client, "hi", max_tokens=CONTEXT)
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:  # refused, not silently dropped
        chat(client, "hi", logprobs=True)
    assert caught.value.body["code"] == "unsupported_parameter" and caught.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", seed=2**64)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    connection, response = open_stream(server[0], "/v1/chat/completions", b"{not json")
    error = json.loads(response.read())["error"]
    connection.close()
    assert response.status == 400 and "JSON" in error["message"] and error["type"] == "invalid_request_error"
    nulls = {"model": "default", "prompt": "One, two,", "max_tokens": 2, "temperature": None, "top_p": None,
             "n": None, "stream": None, "seed": None, "stop": None}  # what some clients send: the defaults
    connection, response = open_stream(server[0], "/v1/completions", nulls)
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 200 and answer["usage"]["completion_tokens"] >= 1
    assert health(server)["status"] == "ok"


def test_a_full_queue_gets_429(client, server):
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    streams = []
    try:
        for _ in range(1 + MAX_QUEUE):
            connection, response = open_stream(server[0], "/v1/completions", body)
            streams.append(connection)
            assert response.status == 200
        wait_for(server, lambda s: s["busy"] and s["waiting"] == MAX_QUEUE, "one running and the queue full")
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model="default", prompt="hi", max_tokens=2)
        assert caught.value.status_code == 429 and caught.value.body["code"] == "rate_limit_exceeded"
    finally:
        for connection in streams:
            connection.close()
    wait_for(server, lambda s: not s["busy"] and s["waiting"] == 0, "the queue drained")
    assert chat(client, "Say yes.", max_tokens=2).usage.completion_tokens >= 1


def test_a_follow_up_turn_reuses_the_prefix_and_matches_a_fresh_prefill(client):
    first_turn = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model="default", messages=first_turn, temperature=0, max_tokens=16)
    conversation = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                                 {"role": "user", "content": "And what is it famous for?"}]
    reused = client.chat.completions.create(model="default", messages=conversation, temperature=0, max_tokens=12)
    stats = reused.model_extra["tbrun"]
    assert stats["prefill_tokens_saved"] >= first.usage.prompt_tokens
    assert stats["prefill_tokens"] + stats["prefill_tokens_saved"] == reused.usage.prompt_tokens
    # An unrelated prompt replaces the cache, so the same conversation is prefilled from scratch.
    client.completions.create(model="default", prompt="Zebras", max_tokens=2, temperature=0)
    fresh = client.chat.completions.create(model="default", messages=conversation, temperature=0, max_tokens=12)
    assert fresh.model_extra["tbrun"]["prefill_tokens_saved"] == 0
    assert fresh.choices[0].message.content == reused.choices[0].message.content
    assert fresh.usage.completion_tokens == reused.usage.completion_tokens


def test_ctrl_c_stops_the_server_cleanly(server):
    _, process, log = server
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, log.read_text()
    assert "stopped: the KV cache is freed" in log.read_text()
