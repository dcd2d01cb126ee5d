"""Text in and out of the server: prompts to token ids, generated ids to streamed text deltas.

The tokenizer is shared by the event loop (encoding a request, so a too-long prompt gets its 400
at once) and the generation thread (decoding); a fast tokenizer must not be entered from two
threads at a time, so every call goes through one lock.
"""

from __future__ import annotations

import threading

from jinja2 import TemplateError

from .protocol import ApiError


class ServeTokenizer:
    """The model's tokenizer behind a lock: chat and text prompts to ids, ids to text."""

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: tbrun serve needs one to read text")
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages ``[{"role", "content"}]`` through the chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions with a plain prompt.",
                           param="messages")
        with self._lock:
            try:
                encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except (TemplateError, ValueError) as exc:  # the template refuses these messages (roles, order)
                raise ApiError(400, f"this model's chat template refuses these messages: {exc}",
                               param="messages") from None
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(i) for i in ids]

    def encode_text(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    """Generated ids -> text deltas, cut at the first stop string.

    A delta never ends inside a character (an incomplete UTF-8 sequence decodes to U+FFFD) and
    never includes text that may be the start of a stop string, so a stop string is never sent.
    """

    def __init__(self, tokenizer: ServeTokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # what has been handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a generated token; returns the new text that is safe to send (may be empty)."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        cut = self._first_stop(full)  # before the unfinished-character check: the token may end in one
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        if full.endswith("\ufffd"):
            return ""
        return self._advance(full[: len(full) - self._held_back(full)])

    def finish(self) -> str:
        """The text held back at the end (no stop string came: ``push`` looks for one at every token)."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta

    def _first_stop(self, full: str) -> int | None:
        # A stop string may straddle what was already sent and the new text: search from there.
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Length of the longest end of ``full`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest
