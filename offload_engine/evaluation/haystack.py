"""Text the evaluation tasks are built from: filler, prose, distractor sentences and held-out text.

Everything here is generated from word lists written for this project and a ``random.Random``
handed in by the caller, so a task built from the same seed is the same text on every machine.
The words that tasks use as answers (needle keys, coref locations) are kept out of the filler and
prose vocabularies, so an answer can only come from where the task put it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

# Needle keys: never used by the filler or prose generators below.
KEY_WORDS = (
    "anchor beacon cactus dolphin ember falcon glacier harbor jasmine kettle lantern nectar "
    "orchid quartz raven saffron tundra velvet walnut yarrow zephyr almond basalt cobalt fjord "
    "garnet hazel indigo juniper lotus marble nutmeg onyx quill sable topaz urchin zinnia badger "
    "dahlia ermine ferret gecko heron ibis jackal koala lemur magpie narwhal otter pelican"
).split()

# Repeated noise: the same few plain sentences, in order, over and over.
FILLER_SENTENCES = (
    "The river runs past the old hill.",
    "The wind is cold in the morning.",
    "Small birds sing on the fence.",
    "The road goes on and on.",
    "Here is one more quiet line of text.",
)

_PROSE = {
    "person": "the farmer|the teacher|my neighbour|the old sailor|a young painter|the baker|"
    "the mayor|a tired traveller|the village doctor|her brother|the shopkeeper|a student",
    "verb": "watched|carried|painted|repaired|described|remembered|found|cleaned|sold|borrowed|"
    "measured|forgot",
    "thing": "the wooden gate|a basket of apples|the broken clock|an old map|the blue boat|"
    "a pile of letters|the garden wall|a heavy coat|the kitchen table|a bundle of sticks",
    "place": "by the church|near the station|behind the barn|on the main square|at the edge of town|"
    "under the bridge|beside the mill|in the market|along the canal|outside the school",
    "time": "early in the spring|after the long winter|one rainy afternoon|before the harvest|"
    "late that evening|during the fair|on a quiet Sunday|at the end of summer",
    "feeling": "glad|puzzled|calm|restless|proud|uneasy|hopeful|curious|weary|content",
    "weather": "The sky was grey|A light rain fell|The sun came out|Fog covered the fields|"
    "The air smelled of smoke|A warm wind blew|Snow lay on the roofs",
}
_PROSE_TEMPLATES = (
    "{time}, {person} {verb} {thing} {place}.",
    "{weather}, and {person} felt {feeling}.",
    "Nobody knew why {person} {verb} {thing}, but everyone talked about it {place}.",
    "{person} {verb} {thing} and then walked home, {feeling} and quiet.",
    "{weather} {time}, so the streets {place} were almost empty.",
    "It was said that {person} had once {verb} {thing} {place}.",
    "{person} was {feeling} because {person2} had {verb} {thing}.",
)


def _pick(rng: random.Random, slot: str) -> str:
    return rng.choice(_PROSE[slot].split("|"))


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def filler_sentences() -> Iterator[str]:
    """The repeated noise haystack, one sentence at a time, endlessly."""
    while True:
        yield from FILLER_SENTENCES


def prose_sentences(rng: random.Random) -> Iterator[str]:
    """Ordinary-looking prose, one sentence at a time, endlessly (deterministic for ``rng``)."""
    while True:
        template = rng.choice(_PROSE_TEMPLATES)
        slots = {name: _pick(rng, name) for name in _PROSE}
        slots["person2"] = _pick(rng, "person")
        yield _capitalise(template.format(**slots))


def haystack_sentences(kind: str, rng: random.Random) -> Iterator[str]:
    """``kind`` is ``"filler"`` (repeated noise) or ``"prose"``."""
    if kind == "filler":
        return filler_sentences()
    if kind == "prose":
        return prose_sentences(rng)
    raise ConfigError(f"haystack {kind!r} is unknown: use filler or prose.")


# ---------------------------------------------------------------------------------------------
# Co-referential retrieval (TokenButler paper): philosophy, food and arithmetic distractors.

_PHILOSOPHERS = "Plato|Hume|Spinoza|Kant|Epicurus|Seneca|Descartes|Locke|Confucius|Aristotle".split("|")
_IDEAS = (
    "virtue|happiness|knowledge|freedom|justice|beauty|duty|doubt|friendship|courage".split("|")
)
_CLAIMS = (
    "can only be learned through practice|depends on the habits of the mind|is worth more than wealth|"
    "begins with admitting what we do not know|is shaped by the laws of a city|"
    "cannot be separated from reason|is a kind of balance between two extremes|"
    "grows from small daily choices"
).split("|")
_DISHES = "The soup|The bread|The stew|This pie|The salad|The curry|The porridge|The cake".split("|")
_INGREDIENTS = (
    "lentils|fresh basil|roasted garlic|brown butter|sweet onions|goat cheese|toasted oats|"
    "ginger|lemon zest|smoked paprika|honey|wild mushrooms"
).split("|")
_TASTES = "rich and warm|light and sour|sweet and nutty|sharp and salty|smooth and mild".split("|")
_COUNTABLE = "pencils|apples|tickets|bottles|stamps|candles".split("|")


def philosophy_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_PHILOSOPHERS)} argued that {rng.choice(_IDEAS)} {rng.choice(_CLAIMS)}."


def food_sentence(rng: random.Random) -> str:
    first, second = rng.sample(_INGREDIENTS, 2)
    return f"{rng.choice(_DISHES)} is made with {first} and {second}, and it tastes {rng.choice(_TASTES)}."


def math_sentence(rng: random.Random) -> str:
    count, price, more = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9)
    item = rng.choice(_COUNTABLE)
    return (
        f"If {count} {item} cost {count * price} dollars, then {count * more} {item} "
        f"cost {count * more * price} dollars."
    )


def coref_filler_sentences(rng: random.Random) -> Iterator[str]:
    """Unrelated statements: philosophy, food and arithmetic, in random order, endlessly."""
    makers = (philosophy_sentence, food_sentence, math_sentence)
    while True:
        yield rng.choice(makers)(rng)


# Entities and where they put things. Location words appear nowhere else in any haystack.
COREF_NAMES = (
    "Alice|Bruno|Chiara|Dmitri|Elena|Farid|Greta|Hiroshi|Ingrid|Jonas|Keiko|Lorenzo|Marta|Nikolai|"
    "Olga|Pablo|Quentin|Rosa|Stefan|Tamsin"
).split("|")
COREF_OBJECTS = "umbrella|violin|passport|notebook|telescope|lantern key|camera|wallet".split("|")
COREF_ACTIONS = (  # (past, base form, preposition)
    ("hid", "hide", "in"),
    ("left", "leave", "at"),
    ("stored", "store", "in"),
    ("buried", "bury", "near"),
)
_LOCATION_ADJECTIVES = "crimson|hollow|silver|crooked|amber|narrow|sunken|painted|mossy|copper".split("|")
_LOCATION_PLACES = "boathouse|greenhouse|chapel|workshop|cellar|pavilion|granary|lighthouse|attic|kiosk".split("|")
_LOCATION_STREETS = "Larch|Thistle|Orchard|Cobble|Heather|Quarry|Lindon|Marsh|Pinecrest|Saltmarsh".split("|")


def coref_location(rng: random.Random) -> str:
    """A made-up multi-word location, e.g. ``crimson boathouse on Larch Street``."""
    return (
        f"{rng.choice(_LOCATION_ADJECTIVES)} {rng.choice(_LOCATION_PLACES)} "
        f"on {rng.choice(_LOCATION_STREETS)} Street"
    )


# ---------------------------------------------------------------------------------------------
# Held-out text for perplexity.


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        raise ConfigError(
            "the ppl task reads Python's pydoc_data.topics, which this Python lacks; "
            "install the full standard library (e.g. the python3-stdlib package)."
        ) from None
    return topics


def held_out_text() -> str:
    """English technical prose for perplexity: the Python reference's topic texts (stdlib).

    ``pydoc_data.topics`` ships with CPython (about 460k characters); sorted by topic so the text
    is the same on every machine with the same Python minor version.
    """
    topics = _topics()
    return "\n\n".join(topics[name] for name in sorted(topics))


def predictor_held_out_text(tokenizer) -> str:
    """The topics of ``held_out_text`` that a predictor trained on ``--corpus stdlib:pydoc_data/topics.py``
    never read, in the same order.

    Training holds out the last tenth of a one-file source's tokens (``predictor.data``: the file's
    source text, ``tokenizer``'s ids, its separator after them). The topics whose entry in the source
    file starts after that boundary are held out; the one it cuts through is left out.
    """
    from pydoc_data import topics as module

    from ..predictor.data import HELD_OUT_EVERY, read_text

    source = read_text(Path(module.__file__))
    encoded = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
    separator = 1 if tokenizer.eos_token_id is not None else 0
    length = len(encoded["input_ids"]) + separator
    boundary = length - length // HELD_OUT_EVERY
    offsets = encoded["offset_mapping"]
    first_char = offsets[boundary][0] if boundary < len(offsets) else len(source)
    topics, held, start = _topics(), [], 0
    for name in sorted(topics):
        start = source.find(f"'{name}': ", start)
        if start < 0:
            raise ConfigError(f"pydoc_data/topics.py has no entry {name!r} in key order: this Python's file is "
                              "not laid out as the held-out split assumes; use --task ppl.")
        if start >= first_char:
            held.append(name)
    return "\n\n".join(topics[name] for name in held)
