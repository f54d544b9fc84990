"""The OpenAI request bodies the server takes, their checks, and OpenAI's error object.

A field the server does not know, or a value it cannot honour (logprobs, penalties, a logit bias),
is refused by name rather than silently ignored."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI's, for the completions API
MAX_INPUTS = 2048
OFF_VALUES: dict[str, list[Any]] = {
    "logprobs": [], "best_of": [1], "presence_penalty": [0], "frequency_penalty": [0], "logit_bias": [{}], "suffix": [""],
}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object, naming the field."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


Prompt = str | list[str] | list[int] | list[list[int]]


def _token_lists_or_texts(value: Any, field: str) -> Any:
    """A string, a non-empty list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field} must be a string, a list of strings, a list of token ids or a list of lists of them")
    if len(value) > MAX_INPUTS:
        raise ValueError(f"{field} holds {len(value)} items; at most {MAX_INPUTS} are taken")
    if all(isinstance(item, str) for item in value):
        return value
    if all(_is_id(item) for item in value):
        return value
    for i, item in enumerate(value):
        if not isinstance(item, list) or not item or not all(_is_id(token) for token in item):
            raise ValueError(f"{field}[{i}] must be a string or a non-empty list of integer token ids, like the others, got {item!r:.80}")
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    user: str | None = None


class CompletionRequest(_Request):
    prompt: Any
    max_tokens: StrictInt | None = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    temperature: float | None = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    n: StrictInt = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    echo: StrictBool = False
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    # OpenAI fields the server cannot honour: taken only at a value that means "off" (OFF_VALUES).
    logprobs: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return _token_lists_or_texts(value, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS or any(not stop for stop in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {value!r:.80}")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and (set(value) - {"include_usage"} or not isinstance(value.get("include_usage", False), bool)):
            raise ValueError(f"stream_options takes include_usage (true or false) only, got {value!r:.80}")
        return value

    def checked(self) -> CompletionRequest:
        """Checks across fields, which pydantic's per-field ones cannot make; max_tokens null is the default."""
        if self.max_tokens is None:
            self.max_tokens = DEFAULT_MAX_TOKENS
        for name, off in OFF_VALUES.items():
            value = getattr(self, name)
            if value is not None and value not in off and not (name == "best_of" and value == self.n):
                raise RequestError(f"{name}={json.dumps(value)[:80]} is not supported by this server", name)
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only taken with stream=true", "stream_options")
        return self


class EmbeddingRequest(_Request):
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> Any:
        return _token_lists_or_texts(value, "input")


def parse(model: type[_Request], body: bytes) -> Any:
    """The request from a JSON body; RequestError naming the first field at fault."""
    try:
        values = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the body is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise RequestError(f"the body must be a JSON object, got a JSON {type(values).__name__}")
    try:
        request = model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise RequestError(f"unknown field {param!r}", param) from None
        message = first["msg"].removeprefix("Value error, ")
        given = "" if "got" in message else f" (got {json.dumps(first.get('input'))[:80]})"
        raise RequestError(f"{param}: {message}{given}", param) from None
    return request.checked() if isinstance(request, CompletionRequest) else request
