"""The OpenAI wire format: request bodies (validated by pydantic), response and chunk bodies, errors.

Only what tbrun can honour is accepted: one choice (``n == 1``), text content, and the sampling
parameters ``temperature``, ``top_p``, ``max_tokens`` (``max_completion_tokens`` for chat),
``seed`` and ``stop``; ``ignore_eos`` is the vLLM extension (decode exactly ``max_tokens``). An
explicit ``null`` means the default, as in OpenAI's API. Options that would change the answer's
content or shape and that tbrun does not implement (``UNSUPPORTED``: log-probabilities, echo,
tools, a JSON response format, logit bias, penalties, best_of, suffix) are refused when set to
anything but their neutral value, never silently dropped; other unknown fields are ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENGINE_TO_OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class ApiError(Exception):
    """An error answered in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


def _neutral_response_format(value) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type") == "text")


# option -> whether a value of it is neutral (what tbrun does anyway)
UNSUPPORTED = {
    "logprobs": lambda v: not v, "top_logprobs": lambda v: not v, "echo": lambda v: not v,
    "tools": lambda v: not v, "functions": lambda v: not v, "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "best_of": lambda v: v in (None, 1), "suffix": lambda v: not v, "response_format": _neutral_response_format,
}
DEFAULTS_FOR_NULL = {"temperature": 1.0, "top_p": 1.0, "n": 1, "stream": False, "ignore_eos": False}


class SamplingRequest(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="allow")  # kept to be checked against UNSUPPORTED, else unused

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False

    @field_validator(*DEFAULTS_FOR_NULL, mode="before")
    @classmethod
    def _null_is_the_default(cls, value, info):
        return DEFAULTS_FOR_NULL[info.field_name] if value is None else value

    def unsupported_option(self) -> str | None:
        """The first option set that tbrun cannot honour (``UNSUPPORTED``), or None."""
        extra = self.model_extra or {}
        return next((name for name, neutral in UNSUPPORTED.items() if name in extra and not neutral(extra[name])),
                    None)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("tbrun decodes one sequence at a time: n must be 1")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("tbrun takes one prompt per request: pass a string")
            return prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


# ------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, text: str, finish: str, usage_: dict, stats: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage_, "tbrun": stats}


def completion_response(request_id: str, model: str, text: str, finish: str, usage_: dict, stats: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage_, "tbrun": stats}


def chat_chunk(request_id: str, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}


def completion_chunk(request_id: str, model: str, text: str | None, finish: str | None = None, **extra) -> dict:
    choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}] if text is not None else []
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, **extra}
