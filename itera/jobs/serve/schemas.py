"""What the HTTP API accepts, strictly: request bodies as pydantic models (no coercion: ``"10"``
is not a number; unknown fields are refused), and :func:`parse` that turns any bad body into an
:class:`ApiError` naming the field, in OpenAI's error shape, so existing clients show it.

OpenAI parameters that itera does not implement (``n`` > 1, penalties, logprobs, ``echo``, ...)
are accepted only with their neutral value and refused otherwise, never silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from itera.jobs.serve.openai import error_body

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any context these models have, far below a memory problem
MAX_SEED = (1 << 63) - 1


class ApiError(Exception):
    """An HTTP error, answered in OpenAI's error shape (:func:`itera.jobs.serve.openai.error_body`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


NonEmpty = Annotated[str, Field(min_length=1)]
Stop = Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=4)], None]


class _Generate(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; not stored

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Generate):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content, **({"name": self.name} if self.name else {})}


class ChatRequest(_Generate):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class Thumbs(_Body):
    type: Literal["thumbs"]
    response_id: NonEmpty
    vote: Literal["up", "down"]


class Rating(_Body):
    type: Literal["rating"]
    response_id: NonEmpty
    rating: float = Field(allow_inf_nan=False)


class AB(_Body):
    type: Literal["ab"]
    a_id: NonEmpty
    b_id: NonEmpty
    winner: Literal["a", "b"]


class Correction(_Body):
    type: Literal["correction"]
    response_id: NonEmpty
    corrected: NonEmpty


Feedback = TypeAdapter(Annotated[Union[Thumbs, Rating, AB, Correction], Field(discriminator="type")])
FEEDBACK_TYPES = ("thumbs", "rating", "ab", "correction")

# OpenAI parameters itera does not implement, with the values that ask for nothing.
NEUTRAL = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (None, False),
           "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (False,), "suffix": (None, ""),
           "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
           "parallel_tool_calls": (None,), "service_tier": (None, "auto", "default"), "store": (None, False),
           "metadata": (None, {})}

HINTS = {"stop": "a string or a list of up to 4 non-empty strings",
         "prompt": "a string (or a list holding exactly one string)",
         "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


def _neutral(value, allowed: tuple) -> bool:
    return any(type(value) is type(a) and value == a or (type(value) in (int, float) and type(a) in (int, float)
                                                         and value == a) for a in allowed)


def _has_surrogate(obj) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if any("\ud800" <= c <= "\udfff" for c in x):
                return True
        elif isinstance(x, dict):
            stack += list(x.keys()) + list(x.values())
        elif isinstance(x, list):
            stack += x
    return False


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json(raw: bytes) -> dict:
    """The body as a JSON object; ApiError 400 for anything else."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", None, "invalid_json")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", None, "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", None, "invalid_json")
    if _has_surrogate(data):
        raise ApiError(400, "a string holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), which is not text",
                       None, "invalid_text")
    return data


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and "-" not in str(p)
                                                            and p not in ("str", "int", "float", "bool", "list"))]
    return ".".join(parts) or None


def _explain(e: ValidationError, drop_first: bool = False) -> ApiError:
    errors = e.errors(include_url=False)
    err = errors[0]
    loc = tuple(err["loc"])[1:] if drop_first and err["loc"] else tuple(err["loc"])
    param = _param(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param, "unknown_field")
    if kind == "missing":
        return ApiError(400, f"{param} is required", param, "missing_field")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return ApiError(400, f"type must be one of {', '.join(FEEDBACK_TYPES)}", "type", "invalid_value")
    leaf = param.rsplit(".", 1)[-1] if param else None
    if leaf in HINTS and len(errors) > 1:
        return ApiError(400, f"{param} must be {HINTS[leaf]}", param, "invalid_type")
    return ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param, "invalid_value")


def parse_body(data: dict, model: type[BaseModel]) -> BaseModel:
    for key, allowed in NEUTRAL.items():
        if key in data:
            if not _neutral(data[key], allowed):
                raise ApiError(400, f"{key} is not supported by itera serve (only {allowed[0]!r} is accepted)", key,
                               "unsupported_parameter")
            del data[key]
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _explain(e) from None


def parse_feedback(data: dict) -> dict:
    try:
        return Feedback.validate_python(data).model_dump()
    except ValidationError as e:
        raise _explain(e, drop_first=True) from None
