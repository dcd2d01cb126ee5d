"""``tbrun serve`` in sparse offload (TokenButler with the shipped predictor) on the embedded model,
driven by the real ``openai`` client: a follow-up chat turn reuses the prefix and gives the tokens
of a fresh prefill of the whole conversation, with decode steps that select (a small budget)."""

from __future__ import annotations

import signal

import openai
import pytest

from test_serve import start_server

pytestmark = pytest.mark.slow

# sinks + window = 20 and 32 tokens attended per layer and KV head: past ~32 tokens every decode step
# selects, so the first answer's KV comes from sparse attention and is prefilled again (not reused)
SPARSE = ["--offload", "--policy", "tokenbutler", "--budget", "32", "--sinks", "4", "--window", "16",
          "--key-dtype", "bfloat16"]
DOCUMENT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. It is 330 metres tall and was the "
            "tallest man-made structure in the world for 41 years. Gustave Eiffel's company designed it. ") * 3


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-sparse") / "serve.log"
    base, process = start_server(log, "--context", "1024", *SPARSE)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, log.read_text()


def test_a_sparse_follow_up_turn_reuses_the_prefix_and_matches_a_fresh_prefill(client):
    first_turn = [{"role": "user", "content": DOCUMENT + "How tall is the tower?"}]
    first = client.chat.completions.create(model="default", messages=first_turn, temperature=0, max_tokens=12)
    stats = first.model_extra["tbrun"]
    assert stats["mode"] == "sparse-offload" and stats["policy"] == "tokenbutler"
    assert stats["predictor"].startswith("smollm2-135m-instruct") and stats["compact_keys"] == "bfloat16"
    assert stats["h2d_bytes_per_step"] > 0  # the steps fetched selected tokens from the host store
    conversation = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                                 {"role": "user", "content": "Who designed it?"}]
    reused = client.chat.completions.create(model="default", messages=conversation, temperature=0, max_tokens=12)
    stats = reused.model_extra["tbrun"]
    assert stats["prefill_tokens_saved"] == first.usage.prompt_tokens  # the prompt; not the sparse answer
    assert stats["prefill_tokens"] + stats["prefill_tokens_saved"] == reused.usage.prompt_tokens
    assert not [note for note in stats["notes"] if "prefix reuse" in note]
    client.completions.create(model="default", prompt="Zebras", max_tokens=2, temperature=0)  # replaces the cache
    fresh = client.chat.completions.create(model="default", messages=conversation, temperature=0, max_tokens=12)
    assert fresh.model_extra["tbrun"]["prefill_tokens_saved"] == 0
    assert fresh.choices[0].message.content == reused.choices[0].message.content
