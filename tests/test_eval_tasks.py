"""Evaluation task generators and scoring: deterministic for a seed, sized in real tokens, and
every expected answer really is in the context (and only where the task put it)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from offload_engine.errors import ConfigError
from offload_engine.evaluation import haystack
from offload_engine.evaluation.scoring import contains, score_forced, score_generation, summarize
from offload_engine.evaluation.tasks import NIAH_VARIANTS, TASKS, compose, make_samples, min_prompt_for
from tiny_models import tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONTEXT = 600
GENERATING = [name for name in TASKS if TASKS[name].primary != "ppl"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def built(tokenizer):
    """Four samples of every task at a small context (built once: encoding is the slow part)."""
    return {name: make_samples(name, tokenizer, 4, CONTEXT, seed=3, min_prompt=100) for name in TASKS}


def prompt_text(tokenizer, sample) -> str:
    return tokenizer.decode(list(sample.prompt_ids))


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_for_a_seed(tokenizer, built, name):
    again = make_samples(name, tokenizer, 4, CONTEXT, seed=3, min_prompt=100)
    assert again == built[name]
    other = make_samples(name, tokenizer, 4, CONTEXT, seed=4, min_prompt=100)
    assert other != built[name]


@pytest.mark.parametrize("name", GENERATING)
def test_samples_fill_the_context_with_room_for_the_answer(built, name):
    for sample in built[name]:
        assert sample.max_new_tokens >= 32
        needs = [len(sample.prompt_ids) + sample.max_new_tokens]
        if sample.forced is not None:
            needs.append(len(sample.forced.prompt_ids) + len(sample.forced.target_ids))
        assert max(needs) <= CONTEXT
        assert max(needs) > 0.9 * CONTEXT  # filled, not left short


@pytest.mark.parametrize("name", GENERATING)
def test_prompts_use_the_chat_template(tokenizer, built, name):
    text = prompt_text(tokenizer, built[name][0])
    assert text.startswith("<|user|>\n") and text.endswith("<|assistant|>\n")


@pytest.mark.parametrize("variant", NIAH_VARIANTS)
def test_niah_answers_are_in_the_haystack_once(tokenizer, built, variant):
    for sample in built[f"niah-{variant}"]:
        text = prompt_text(tokenizer, sample)
        for answer in sample.answers:
            assert text.count(answer) == 1, (answer, text)
            assert re.search(rf"special magic number for ({'|'.join(sample.meta['keys'])}) is {answer}\.", text)
        expected = {"single": 1, "multikey": 1, "multivalue": 4, "multiquery": 4}[variant]
        assert len(sample.answers) == expected
        needles = re.findall(r"special magic number for \w+ is (\d{7})\.", text)
        assert len(needles) == (1 if variant == "single" else 4)  # multikey: 3 distractors with other keys
        for key in sample.meta["keys"]:
            assert key in text.rsplit("\n\n", 1)[-1]  # the question asks for every asked key


def test_niah_depth_is_swept_and_haystacks_alternate(tokenizer, built):
    samples = built["niah-single"]
    assert [s.meta["depth"] for s in samples] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-3)
    assert [s.meta["haystack"] for s in samples] == ["filler", "prose"] * 2
    places = []
    for sample in samples:
        text = prompt_text(tokenizer, sample)
        places.append(text.index(sample.answers[0]) / len(text))
    assert places == sorted(places) and places[0] < 0.2 and places[-1] > 0.8


def test_niah_cycles_through_the_variants(built):
    assert [s.meta["variant"] for s in built["niah"]] == list(NIAH_VARIANTS)


def test_needle_keys_never_occur_in_the_haystacks():
    import random

    rng = random.Random(0)
    prose = " ".join(next(haystack.prose_sentences(rng)) for _ in range(500))
    filler = " ".join(haystack.FILLER_SENTENCES)
    words = set(re.findall(r"[a-z]+", (prose + " " + filler).lower()))
    assert not words & set(haystack.KEY_WORDS)


def resolve_chains(text: str) -> dict[str, str]:
    """Follow every ``VAR X = ...`` statement in ``text`` to its numeric value."""
    bound = dict(re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d+)\.", text))
    resolved = {}
    for name in bound:
        value, hops = bound[name], 0
        while not value.isdigit() and hops < 100:
            value, hops = bound[value], hops + 1
        resolved[name] = value
    return resolved


def test_vt_answers_are_exactly_the_variables_bound_to_the_value(tokenizer, built):
    for sample in built["vt"]:
        text = prompt_text(tokenizer, sample)
        resolved = resolve_chains(text)
        assert len(resolved) == 10  # two chains of four hops
        value = sample.meta["value"]
        assert sorted(name for name, v in resolved.items() if v == value) == sorted(sample.answers)
        assert value in text.rsplit("\n\n", 1)[-1]  # the question names the value


def test_coref_location_is_introduced_once_and_is_the_forced_target(tokenizer, built):
    for sample in built["coref"]:
        (location,) = sample.answers
        text = prompt_text(tokenizer, sample)
        entity = sample.meta["entity"]
        assert text.count(location) == 1
        assert re.search(rf"{entity} \w+ the [\w ]+ (in|at|near) the {location}\.", text)
        forced_prompt = tokenizer.decode(list(sample.forced.prompt_ids))
        assert forced_prompt.startswith(text) and entity in forced_prompt[len(text):]
        assert tokenizer.decode(list(sample.forced.target_ids)) == f" {location}"
        assert list(sample.forced.prompt_ids[: len(sample.prompt_ids)]) == list(sample.prompt_ids)


def test_coref_filler_has_philosophy_food_and_math(tokenizer, built):
    text = " ".join(prompt_text(tokenizer, sample) for sample in built["coref"])
    assert " argued that " in text and " is made with " in text and " dollars, then " in text


def test_ppl_chunks_are_held_out_text_scored_after_a_prefix(tokenizer, built):
    samples = built["ppl"]
    assert len({s.meta["chunk"] for s in samples}) == 4
    for sample in samples:
        assert sample.max_new_tokens == 0 and not sample.prompt_ids
        assert len(sample.forced.prompt_ids) == 100  # the min_prompt asked for
        assert len(sample.forced.prompt_ids) + len(sample.forced.target_ids) == CONTEXT
        chunk = tokenizer.decode(list(sample.forced.prompt_ids) + list(sample.forced.target_ids))
        assert chunk in haystack.held_out_text()


def _words(text: str) -> str:
    """Text as its words, one space apart: the source file's quotes, escapes and line breaks gone."""
    return " ".join(re.findall(r"[A-Za-z]+", text.replace("\\n", " ")))


def test_ppl_held_out_reads_only_text_the_predictors_never_trained_on(tokenizer, built):
    """``ppl-held-out``'s chunks come from topics that ``--corpus stdlib:pydoc_data/topics.py`` leaves out of
    every training sequence (the file's last tenth), while ``ppl``'s reach the text trained on."""
    from offload_engine.predictor.corpus import resolve_corpus
    from offload_engine.predictor.data import load_sequences

    corpus = resolve_corpus(["stdlib:pydoc_data/topics.py"])
    data = load_sequences([], tokenizer, 64, 10**6, 1, corpus=corpus)  # every training sequence there is
    trained = _words(tokenizer.decode(data.train.flatten().tolist()))
    held_text = haystack.predictor_held_out_text(tokenizer)
    assert 0 < len(held_text) < len(haystack.held_out_text()) / 10
    samples = built["ppl-held-out"]
    assert len({s.meta["chunk"] for s in samples}) == 4
    for sample in samples:
        chunk = tokenizer.decode(list(sample.forced.prompt_ids) + list(sample.forced.target_ids))
        assert chunk in held_text
        words = _words(chunk).split()
        spans = [" ".join(words[i:i + 12]) for i in range(0, len(words) - 12, 6)]
        assert spans and not any(span in trained for span in spans)
    first_topic = _words(haystack.held_out_text()[:2000]).split()
    assert " ".join(first_topic[:12]) in trained  # the check can see what training read


def test_ppl_refuses_more_samples_than_chunks(tokenizer):
    with pytest.raises(ConfigError, match="chunks"):
        make_samples("ppl", tokenizer, 100000, CONTEXT)


def test_bad_task_input_is_refused_with_the_valid_names(tokenizer):
    with pytest.raises(ConfigError, match="valid tasks: niah, niah-single"):
        make_samples("needle", tokenizer, 2, CONTEXT)
    with pytest.raises(ConfigError, match="at least 1"):
        make_samples("niah", tokenizer, 0, CONTEXT)
    with pytest.raises(ConfigError, match="too short"):
        make_samples("niah", tokenizer, 1, 40)


def test_compose_places_inserts_at_their_depth():
    assert compose(["a", "b", "c", "d"], [(0.0, "X"), (0.5, "Y"), (1.0, "Z")]) == "X a b Y c d Z"
    assert compose([], [(0.3, "X")]) == "X"


def test_min_prompt_covers_sinks_and_window_at_the_smallest_budget():
    assert min_prompt_for([0.5, 0.05, 0.1], 36) == 720
    assert min_prompt_for([], 36) == 0


def test_contains_matches_whole_words_case_insensitively():
    assert contains("The number is 1234567.", "1234567")
    assert not contains("The number is 12345678.", "1234567")
    assert contains("It is in the Crimson  boathouse on larch street", "crimson boathouse on Larch Street")
    assert not contains("VAR ABCDEF", "ABCDE")


def test_generation_score_is_the_fraction_of_answers_found():
    assert score_generation("1111111 and 2222222", ["1111111", "2222222"]) == {"score": 1.0, "correct": True}
    assert score_generation("only 1111111", ["1111111", "2222222", "3333333", "4444444"]) == {
        "score": 0.25, "correct": False}


def test_forced_score_and_summary():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 1.0]))
    metrics = score_forced(logprobs, torch.tensor([7, 9, 3]), [7, 8, 3])
    assert metrics["token_error"] == pytest.approx(1 / 3) and metrics["any_wrong"]
    assert metrics["tokens"] == 3 and metrics["nll"] == pytest.approx(math.log(8))
    right = score_forced(torch.zeros(2), torch.tensor([1, 2]), [1, 2])
    summary = summarize([metrics, right])
    assert summary["forced_accuracy"] == 50.0
    assert summary["token_error"] == pytest.approx(100 / 6)
    assert summary["ppl"] == pytest.approx(math.exp(math.log(8) / 5))


@pytest.mark.slow
def test_tasks_fit_the_embedded_models_own_tokens():
    """With SmolLM2's tokenizer and chat template, every task fills 4k tokens around its answers."""
    from transformers import AutoTokenizer

    from offload_engine.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    for name in TASKS:
        for sample in make_samples(name, tok, 2, 4096, seed=0, min_prompt=720):
            text = tok.decode(list(sample.prompt_ids or sample.forced.prompt_ids))
            assert sample.longest_prompt + max(sample.max_new_tokens, 1) <= 4096
            assert sample.longest_prompt > 3500 or TASKS[name].primary == "ppl"
            assert all(answer in text for answer in sample.answers)
            if sample.prompt_ids:
                assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_samples_are_the_same_in_another_process():
    """String hashing is salted per process (PYTHONHASHSEED): samples must not depend on it."""
    import os
    import subprocess
    import sys

    script = ("from offload_engine.evaluation.tasks import TASKS, make_samples\n"
              "from tiny_models import tiny_tokenizer\n"
              "tok = tiny_tokenizer()\n"
              "print([[list(s.prompt_ids), s.answers] for name in ('vt', 'niah', 'coref') "
              "for s in make_samples(name, tok, 2, 512, seed=1, min_prompt=100)])\n")
    outputs = set()
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": os.path.dirname(__file__)}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1
