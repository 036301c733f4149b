"""OpenAI's response shapes, as pure functions of plain values: completion and chat.completion
objects, stream chunks and their server-sent-event framing, usage blocks and error bodies, and
what every answer adds to say which model version produced it (the ``itera`` object, the
``X-Itera-Model*`` headers).

``endpoint`` is ``"completion"`` (``/v1/completions``) or ``"chat"`` (``/v1/chat/completions``);
``source`` is the served model's source (name, label, version, sha256).
"""

from __future__ import annotations

import json

# OpenAI's error type for each status; any other status is an invalid_request_error
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}

SSE_DONE = b"data: [DONE]\n\n"  # a stream's last event


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def version_block(source) -> dict:
    """The ``itera`` object of every answer: the version and sha256 that produced it."""
    return {"version": source.version, "sha256": source.sha256}


def headers(source, request_id: str | None = None) -> dict:
    """The headers of a generation's answer: the model, its version and the response's id."""
    h = {"X-Itera-Model": source.name, "X-Itera-Model-Version": "" if source.version is None else str(source.version)}
    if request_id:
        h["X-Request-Id"] = request_id
    return h


def envelope(response_id: str, endpoint: str, source, created: int) -> dict:
    """What a response object and all its stream chunks share."""
    return {"id": response_id, "object": "chat.completion" if endpoint == "chat" else "text_completion",
            "created": created, "model": source.name, "system_fingerprint": source.label,
            "itera": version_block(source)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(base: dict, endpoint: str, text: str, finish_reason: str, usage: dict) -> dict:
    """The whole answer (no ``stream``): a ``text_completion`` or ``chat.completion`` object."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": finish_reason} if endpoint == "chat" else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
    return {**base, "choices": [choice], "usage": usage}


def _chunk_base(base: dict, endpoint: str) -> dict:
    return {**base, "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion"}


def chunk(base: dict, endpoint: str, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    """One stream chunk: a text delta, the assistant role that opens a chat stream (``role``), or the
    ``finish`` reason that closes it."""
    if endpoint == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**_chunk_base(base, endpoint), "choices": [choice]}


def usage_chunk(base: dict, endpoint: str, usage: dict) -> dict:
    """The chunk with no choices that carries the usage (``stream_options.include_usage``)."""
    return {**_chunk_base(base, endpoint), "choices": [], "usage": usage}


def sse(obj) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
