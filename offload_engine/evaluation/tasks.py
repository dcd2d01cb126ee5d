"""Evaluation tasks, generated offline and deterministically from a seed.

Each task turns ``(tokenizer, count, context, seed)`` into ``Sample``s whose lengths are measured
in the model's own tokens: a haystack is grown sentence by sentence until the prompt plus the room
the answer needs fills ``context``. Prompts are wrapped in the tokenizer's chat template when it
has one (instruct models answer questions only inside it).

- ``niah*``: needle in a haystack after RULER (single, multikey, multivalue, multiquery); the
  haystack alternates between repeated filler and prose with the sample index; the depth of the
  asked needle is swept from 0 (start) to 1 (end) over the samples.
- ``vt``: RULER's variable tracking: chains ``VAR B = VAR A``, ``VAR A = 12345`` in filler.
- ``coref``: TokenButler's co-referential retrieval: who put what where, unrelated statements,
  then a question whose answer is the place; scored teacher-forced and by generation.
- ``ppl``: fixed chunks of held-out text, every token after a prefix scored teacher-forced;
  ``ppl-held-out`` the same from the text's topics that no predictor trained on the text read.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from . import haystack as text
from .prompts import chat_text, compose, encode, fill_prompt, largest_fit, take_sentences

NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("filler", "prose")
SHORT_ANSWER_TOKENS = 32  # instruct answers restate the question before the answer
LIST_ANSWER_TOKENS = 64  # answers that list several numbers or names
PPL_MIN_PREFIX = 64


@dataclass(frozen=True, slots=True)
class Forced:
    """A teacher-forced continuation: ``target_ids`` scored one token at a time after ``prompt_ids``."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Sample:
    """One evaluation item. ``answers`` must all appear in the text generated from ``prompt_ids``."""

    task: str
    index: int
    prompt_ids: tuple[int, ...]  # empty when the task does not generate
    answers: tuple[str, ...]
    max_new_tokens: int  # 0 when the task does not generate
    forced: Forced | None = None
    meta: dict = field(default_factory=dict)

    @property
    def longest_prompt(self) -> int:
        """Tokens in the prompt that reaches furthest into the context (answer room excluded)."""
        lengths = [len(self.prompt_ids)] + ([len(self.forced.prompt_ids)] if self.forced else [])
        return max(lengths)

    @property
    def shortest_prompt(self) -> int:
        """Tokens in the shortest prompt the engine will prefill."""
        lengths = ([len(self.prompt_ids)] if self.prompt_ids else []) + (
            [len(self.forced.prompt_ids)] if self.forced else []
        )
        return min(lengths)


def swept_depth(index: int, count: int) -> float:
    """Depth of sample ``index`` of ``count``: 0, ..., 1 evenly (0.5 for a single sample)."""
    return 0.5 if count == 1 else index / (count - 1)


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    """An independent, reproducible generator per (task, seed, sample)."""
    return random.Random(f"{task}:{seed}:{index}")


def distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    low = 10 ** (digits - 1)
    return [str(n) for n in rng.sample(range(low, 10 * low), count)]


# ---------------------------------------------------------------------------------------------
# niah


def _niah_needles(rng: random.Random, variant: str, depth: float):
    """(inserts, asked keys, answers) for one niah sample; the asked needle sits at ``depth``."""
    others = 3  # distractor keys (multikey), extra values (multivalue), extra queries (multiquery)
    keys = rng.sample(text.KEY_WORDS, 1 + others)
    values = distinct_numbers(rng, 1 + others, 7)
    if variant == "single":
        pairs, asked = [(keys[0], values[0])], keys[:1]
    elif variant == "multivalue":
        pairs, asked = [(keys[0], v) for v in values], keys[:1]
    else:  # multikey: other keys distract; multiquery: every key is asked
        pairs = list(zip(keys, values))
        asked = keys[:1] if variant == "multikey" else keys
    answers = [v for k, v in pairs if k in asked]
    depths = [depth] + [rng.random() for _ in pairs[1:]]
    inserts = [(d, f"The special magic number for {k} is {v}.") for d, (k, v) in zip(depths, pairs)]
    rng.shuffle(inserts)  # ties at one depth must not always put the asked needle first
    return inserts, asked, answers


def _niah_question(variant: str, asked: list[str]) -> str:
    if variant == "multivalue":
        return f"What are all the special magic numbers for {asked[0]} in the text above? List every one."
    if variant == "multiquery":
        keys = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        return f"What are the special magic numbers for {keys} in the text above? List them."
    return f"What is the special magic number for {asked[0]} in the text above?"


def niah_sample(tokenizer, variant: str, index: int, count: int, context: int, seed: int) -> Sample:
    rng = sample_rng(f"niah-{variant}", seed, index)
    kind, depth = HAYSTACKS[index % 2], swept_depth(index, count)
    inserts, asked, answers = _niah_needles(rng, variant, depth)
    question = _niah_question(variant, asked)
    reserve = SHORT_ANSWER_TOKENS if len(answers) == 1 else LIST_ANSWER_TOKENS

    def render(body: str) -> str:
        intro = "Some special magic numbers are hidden in the following text. Remember them."
        return chat_text(tokenizer, f"{intro}\n\n{body}\n\n{question}")

    ids, _ = fill_prompt(tokenizer, "niah", text.haystack_sentences(kind, rng), inserts, render, reserve, context)
    meta = {"variant": variant, "haystack": kind, "depth": round(depth, 4), "keys": asked}
    return Sample(f"niah-{variant}", index, ids, tuple(answers), reserve, meta=meta)


def niah_samples(variant: str | None):
    """Samples of one niah variant, or of all four in turn when ``variant`` is None."""

    def build(tokenizer, count: int, context: int, seed: int, min_prompt: int = 0) -> list[Sample]:
        pick = (lambda i: NIAH_VARIANTS[i % len(NIAH_VARIANTS)]) if variant is None else (lambda i: variant)
        return [niah_sample(tokenizer, pick(i), i, count, context, seed) for i in range(count)]

    return build


# ---------------------------------------------------------------------------------------------
# vt


def _variable_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct five-letter names in the order drawn (no set iteration: string hashes
    change between processes, and so would the samples)."""
    names: dict[str, None] = {}
    while len(names) < count:
        names["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))] = None
    return list(names)


def _vt_chains(rng: random.Random, chains: int, hops: int):
    """Assignment statements (with sorted random depths per chain), names and value of chain 0."""
    names = _variable_names(rng, chains * (hops + 1))
    values = distinct_numbers(rng, chains, 5)
    inserts, asked = [], []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        lines = [f"VAR {chain[0]} = {values[c]}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])
        ]
        inserts += list(zip(sorted(rng.random() for _ in lines), lines))
        asked = asked or chain
    return inserts, asked, values[0]


def vt_sample(tokenizer, index: int, context: int, seed: int, chains: int = 2, hops: int = 4) -> Sample:
    rng = sample_rng("vt", seed, index)
    inserts, names, value = _vt_chains(rng, chains, hops)
    question = (f"Find all variables that are assigned the value {value} in the text above, directly or "
                "through other variables. List their names.")

    def render(body: str) -> str:
        intro = "Memorize the variable assignments hidden in the following text."
        return chat_text(tokenizer, f"{intro}\n\n{body}\n\n{question}")

    ids, _ = fill_prompt(tokenizer, "vt", text.filler_sentences(), inserts, render, LIST_ANSWER_TOKENS, context)
    meta = {"value": value, "chains": chains, "hops": hops}
    return Sample("vt", index, ids, tuple(names), LIST_ANSWER_TOKENS, meta=meta)


def vt_samples(tokenizer, count: int, context: int, seed: int, min_prompt: int = 0) -> list[Sample]:
    return [vt_sample(tokenizer, i, context, seed) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# coref


def _coref_entities(rng: random.Random, count: int):
    """``count`` (name, object, action, location) with distinct names, objects and locations."""
    locations: list[str] = []
    while len(locations) < count:
        place = text.coref_location(rng)
        if place not in locations:
            locations.append(place)
    names = rng.sample(text.COREF_NAMES, count)
    objects = rng.sample(text.COREF_OBJECTS, count)
    actions = [rng.choice(text.COREF_ACTIONS) for _ in range(count)]
    return list(zip(names, objects, actions, locations))


def split_forced(tokenizer, prompt_text: str, answer: str) -> Forced:
    """Token ids of ``prompt_text`` and of ``" " + answer`` as the model sees them joined."""
    prompt = encode(tokenizer, prompt_text)
    joined = encode(tokenizer, f"{prompt_text} {answer}")
    if joined[: len(prompt)] != prompt:  # the boundary merged differently: encode apart
        joined = prompt + encode(tokenizer, f" {answer}")
    return Forced(tuple(prompt), tuple(joined[len(prompt) :]))


def coref_sample(tokenizer, index: int, count: int, context: int, seed: int, distractors: int = 2) -> Sample:
    rng = sample_rng("coref", seed, index)
    entities = _coref_entities(rng, 1 + distractors)
    name, obj, (past, base, prep), location = entities[0]
    depth = 0.9 * swept_depth(index, count)  # leave filler between the intro and the question
    depths = [depth] + [rng.random() for _ in entities[1:]]
    inserts = [(d, f"{who} {did} the {what} {prep_} the {where}.")
               for d, (who, what, (did, _, prep_), where) in zip(depths, entities)]
    question = f"Question: Where did {name} {base} the {obj}? Answer with the place."
    restated = f"{name} {past} the {obj} {prep} the"  # the teacher-forced answer starts after this
    pool = take_sentences(tokenizer, text.coref_filler_sentences(rng), context)

    def render(body: str) -> str:
        return chat_text(tokenizer, f"Read the following notes.\n\n{body}\n\n{question}")

    def need(n: int) -> int:
        prompt = render(compose(pool[:n], inserts))
        forced_tokens = len(encode(tokenizer, f"{prompt}{restated} {location}"))
        return max(len(encode(tokenizer, prompt)) + SHORT_ANSWER_TOKENS, forced_tokens)

    body = compose(pool[: largest_fit(need, len(pool), context, "coref")], inserts)
    prompt = render(body)
    forced = split_forced(tokenizer, prompt + restated, location)
    meta = {"depth": round(depth, 4), "distractors": distractors, "entity": name}
    ids = tuple(encode(tokenizer, prompt))
    return Sample("coref", index, ids, (location,), SHORT_ANSWER_TOKENS, forced, meta)


def coref_samples(tokenizer, count: int, context: int, seed: int, min_prompt: int = 0) -> list[Sample]:
    return [coref_sample(tokenizer, i, count, context, seed) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# ppl


def ppl_samples(tokenizer, count: int, context: int, seed: int, min_prompt: int = 0,
                predictor_held_out: bool = False) -> list[Sample]:
    """Chunks of ``context`` tokens of held-out text; the first ``prefix`` tokens are the prompt.

    ``prefix = max(min_prompt, 64)``: ``min_prompt`` is the shortest prompt at which every budget
    asked for still covers the sinks and the narrowest local window (``SelectionConfig.floor``).
    ``predictor_held_out``: only the topics a predictor trained on the text never read (``ppl-held-out``).
    """
    ids = encode(tokenizer, text.predictor_held_out_text(tokenizer) if predictor_held_out else text.held_out_text())
    chunks = len(ids) // context
    prefix = max(min_prompt, PPL_MIN_PREFIX)
    if count > chunks:
        where = "the text the predictors hold out" if predictor_held_out else "the held-out text"
        raise ConfigError(
            f"{where} has {chunks} chunks of {context} tokens; ask for --samples {chunks} or fewer"
            f"{' or a shorter --context' if predictor_held_out else ''}."
        )
    if prefix >= context:
        raise ConfigError(f"--context {context} leaves nothing to score after a {prefix}-token prefix.")
    order = random.Random(f"ppl:{seed}").sample(range(chunks), count)
    samples = []
    for index, chunk in enumerate(order):
        tokens = ids[chunk * context : (chunk + 1) * context]
        forced = Forced(tuple(tokens[:prefix]), tuple(tokens[prefix:]))
        meta = {"chunk": chunk, "prefix": prefix, "scored": context - prefix}
        samples.append(Sample("ppl", index, (), (), 0, forced, meta))
    return samples


def ppl_held_out_samples(tokenizer, count: int, context: int, seed: int, min_prompt: int = 0) -> list[Sample]:
    """``ppl`` on the topics a predictor trained on ``--corpus stdlib:pydoc_data/topics.py`` never read
    (``haystack.predictor_held_out_text``: the last tenth of the file), so that tokenbutler's perplexity
    is a held-out measurement; ``ppl`` samples the whole text, most of which the shipped predictors read."""
    return ppl_samples(tokenizer, count, context, seed, min_prompt, predictor_held_out=True)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True, slots=True)
class Task:
    """A named task: how to build its samples and which metric its table and plot show."""

    name: str
    summary: str
    build: Callable[..., list[Sample]]
    primary: str  # a key of ``scoring.summarize``'s result
    higher_is_better: bool = True


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah", "needle in a haystack, the four RULER variants in turn", niah_samples(None), "accuracy"),
        *(
            Task(f"niah-{v}", f"needle in a haystack, {v} variant", niah_samples(v), "accuracy")
            for v in NIAH_VARIANTS
        ),
        Task("vt", "RULER variable tracking (2 chains, 4 hops)", vt_samples, "accuracy"),
        Task("coref", "TokenButler co-referential retrieval", coref_samples, "forced_accuracy"),
        Task("ppl", "perplexity on held-out text, teacher-forced", ppl_samples, "ppl", higher_is_better=False),
        Task("ppl-held-out", "perplexity on the part of that text which predictors trained on it never read",
             ppl_held_out_samples, "ppl", higher_is_better=False),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"--task {name!r} is unknown; valid tasks: {', '.join(TASKS)}.")
    return TASKS[name]


def make_samples(name: str, tokenizer, count: int, context: int, seed: int = 0,
                 min_prompt: int = 0) -> list[Sample]:
    """``count`` samples of task ``name``, each fitting ``context`` tokens with its answer.

    ``min_prompt``: the shortest prompt a task may make (only ppl's prefix can be that short).
    """
    if count < 1:
        raise ConfigError(f"--samples must be at least 1, got {count}.")
    return get_task(name).build(tokenizer, count, context, seed, min_prompt)


def min_prompt_for(fractions: Sequence[float], reserved: int) -> int:
    """Shortest prompt whose smallest fractional budget still covers ``reserved`` (sinks + the narrowest window)."""
    return math.ceil(reserved / min(fractions)) if fractions else 0
