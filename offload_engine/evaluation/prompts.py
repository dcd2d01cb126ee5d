"""Prompts measured in the model's own tokens: chat wrapping, needle placement, haystack fitting.

A haystack is a list of sentences with a few inserts (needles, assignments, introductions) at
fractional depths; ``fill_prompt`` finds, by bisection over the number of sentences, the longest
haystack whose rendered prompt plus the room its answer needs fits the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ..errors import ConfigError


class Tokenizer(Protocol):
    """What tasks need from a tokenizer (a transformers tokenizer satisfies it)."""

    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages, add_generation_prompt: bool = ..., tokenize: bool = ...): ...


def encode(tokenizer: Tokenizer, content: str) -> list[int]:
    return list(tokenizer.encode(content, add_special_tokens=False))


def chat_text(tokenizer: Tokenizer, user: str) -> str:
    """The user turn in the chat template, ready for the assistant's answer (plain without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{user}\n\nAnswer: "
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def compose(sentences: Sequence[str], inserts: Sequence[tuple[float, str]]) -> str:
    """Join ``sentences``, placing each insert at its depth (0: first, 1: last); order kept on ties."""
    slots: list[list[str]] = [[] for _ in range(len(sentences) + 1)]
    for depth, sentence in inserts:
        slots[round(depth * len(sentences))].append(sentence)
    parts: list[str] = []
    for i, extra in enumerate(slots):
        parts.extend(extra)
        if i < len(sentences):
            parts.append(sentences[i])
    return " ".join(parts)


def take_sentences(tokenizer: Tokenizer, source: Iterator[str], tokens: int) -> list[str]:
    """Sentences from ``source`` until they hold at least ``tokens`` tokens (each counted alone)."""
    taken, total = [], 0
    while total < tokens:
        sentence = next(source)
        taken.append(sentence)
        total += max(1, len(encode(tokenizer, " " + sentence)))
    return taken


def largest_fit(need: Callable[[int], int], upper: int, limit: int, task: str) -> int:
    """The largest ``n`` in ``[0, upper]`` with ``need(n) <= limit`` (``need`` grows with ``n``)."""
    if need(0) > limit:
        raise ConfigError(
            f"--context {limit} is too short for the {task} task: its question and answer alone "
            f"need {need(0)} tokens. Use a longer --context."
        )
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= limit else (lo, mid - 1)
    return lo


def fill_prompt(tokenizer: Tokenizer, task: str, sentences: Iterator[str], inserts: Sequence[tuple[float, str]],
                render: Callable[[str], str], reserve: int, context: int) -> tuple[tuple[int, ...], str]:
    """The longest haystack whose prompt ``render(body)`` plus ``reserve`` tokens fits ``context``.

    Returns the prompt's token ids and the haystack body.
    """

    def need(n: int) -> int:
        return len(encode(tokenizer, render(compose(pool[:n], inserts)))) + reserve

    pool = take_sentences(tokenizer, sentences, context)
    n = largest_fit(need, len(pool), context, task)
    body = compose(pool[:n], inserts)
    return tuple(encode(tokenizer, render(body))), body
