"""The HTTP API's handlers: OpenAI-compatible completions and chat completions (streamed as
server-sent events with ``stream: true``), model listing, feedback, health and Prometheus metrics,
and the error handlers that answer every failure in OpenAI's error shape.

Every generation runs on a worker thread with a lane of the model it checked out; the event loop
only parses, admits, relays text and answers. A response is stored (prompt, text, version) before
its last byte is sent, so feedback can name it as soon as the client has it. Every answer names
the model version that produced it: ``system_fingerprint`` (``NAME@VERSION``), an ``itera`` object
(version, sha256) and the ``X-Itera-Model-Version`` header.

Handlers are plain functions; the :class:`~itera.jobs.serve.service.Server` they act on is
``request.app.state.server``. :data:`ROUTES` lists them for :func:`itera.jobs.serve.app.build_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from starlette.requests import Request  # at module level: FastAPI resolves route annotations by name

from itera.errors import IteraError
from itera.jobs.serve import openai
from itera.jobs.serve.schemas import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, load_json, parse_body,
                                      parse_feedback)
from itera.jobs.serve.service import Job, Server
from itera.feedback import FeedbackError


def _server(request) -> Server:
    return request.app.state.server


def json_response(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request) -> bytes:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {size} bytes; the limit is {MAX_BODY_BYTES}", None, "body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", None,
                           "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def watch_disconnect(request, left: threading.Event) -> None:
    """Sets ``left`` when the client closes its connection. Start it once the body has been read:
    the server then has nothing but the disconnect left to deliver (also once the response is sent,
    so this always ends). A server whose ``receive`` fails just ends the watch."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - watching is best effort; the request goes on
        return
    left.set()


# --------------------------------------------------------------------------- completions


async def generate(request: Request, endpoint: str):
    """A completion (``endpoint`` ``"completion"``) or chat completion (``"chat"``): parse, admit,
    generate, then answer whole or stream. A client that leaves while queued or generating gets 499
    and its generation stops."""
    from starlette.responses import Response, StreamingResponse

    server = _server(request)
    t_request = time.perf_counter()
    data = load_json(await read_body(request))
    body = parse_body(data, ChatRequest if endpoint == "chat" else CompletionRequest)
    left = threading.Event()  # set when the client hangs up, queued or not: its generation stops
    watcher = asyncio.ensure_future(watch_disconnect(request, left))
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()  # a stream's deltas, from the first (emit is set before the job starts)
    emit = (lambda text: loop.call_soon_threadsafe(q.put_nowait, ("text", text))) if body.stream else None
    starting = asyncio.ensure_future(server.start(body, endpoint, t_request, left, emit))
    try:
        await asyncio.wait({starting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done() and left.is_set():
            starting.cancel()  # the client left while its request waited: its place goes to the next
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if starting.cancelled():
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        job, fut = await starting
    except BaseException:
        watcher.cancel()
        starting.cancel()
        raise
    source = job.prepared.model.source
    base = openai.envelope(job.id, endpoint, source, int(time.time()))
    if not body.stream:
        return await _answer(job, fut, watcher, left, base)
    fut.add_done_callback(lambda f: q.put_nowait(("done", f)))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_events(server, job, base, q, watcher, include_usage), media_type="text/event-stream",
                             headers={**openai.headers(source, job.id), "Cache-Control": "no-cache"})


async def _answer(job: Job, fut: asyncio.Future, watcher: asyncio.Future, left: threading.Event, base: dict):
    """The whole answer once the generation ends; 499 if the client leaves first (nothing is stored)."""
    from starlette.responses import Response

    try:
        await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not fut.done() and left.is_set():  # the client left: the generation stops, nothing is stored
            return Response(status_code=499)
        r = await asyncio.shield(fut)
    except IteraError as e:
        raise ApiError(500, f"generation failed: {e}") from None
    finally:
        watcher.cancel()
    usage = openai.usage(len(job.prepared.ids), r.completion_tokens)
    answer = openai.completion(base, job.endpoint, r.text, r.finish_reason, usage)
    return json_response(200, answer, openai.headers(job.prepared.model.source, job.id))


async def _events(server: Server, job: Job, base: dict, q: asyncio.Queue, watcher: asyncio.Future,
                  include_usage: bool):
    """A stream's server-sent events: (for chat) the role, the text deltas as they come, the finish
    reason, (if asked) the usage, ``[DONE]``. Ending early (the client left) stops the generation."""
    endpoint = job.endpoint
    try:
        if endpoint == "chat":
            yield openai.sse(openai.chunk(base, endpoint, None, role=True))
        pending = None
        while True:
            kind, value = pending or await q.get()
            pending = None
            if kind == "text":
                # text that queued up while the last chunk was being sent goes out as one chunk
                while not q.empty():
                    nxt = q.get_nowait()
                    if nxt[0] != "text":
                        pending = nxt
                        break
                    value += nxt[1]
                yield openai.sse(openai.chunk(base, endpoint, value))
                continue
            if value.exception() is not None:
                e = value.exception()
                server.log(f"serve: generation {job.id} failed: {type(e).__name__}: {e}")
                server.stream_errors += 1  # its 200 is already sent: counted here, not by status
                server.metrics.stream_errors.inc()
                yield openai.sse(openai.error_body(500, f"generation failed ({type(e).__name__})"))
                return
            r = value.result()
            yield openai.sse(openai.chunk(base, endpoint, None, r.finish_reason))
            if include_usage:
                usage = openai.usage(len(job.prepared.ids), r.completion_tokens)
                yield openai.sse(openai.usage_chunk(base, endpoint, usage))
            yield openai.SSE_DONE
            return
    finally:
        job.cancel.set()  # the client left mid-stream (or the stream ended): stop generating
        watcher.cancel()


async def completions(request: Request):
    return await generate(request, "completion")


async def chat_completions(request: Request):
    return await generate(request, "chat")


# --------------------------------------------------------------------------- the rest


async def feedback(request: Request):
    import anyio

    server = _server(request)
    event = parse_feedback(load_json(await read_body(request)))
    try:
        stored = await anyio.to_thread.run_sync(server.store.add_feedback, event)
    except FeedbackError as e:
        if e.status == 503:  # the PostgreSQL store is restarting or unreachable: nothing stored
            raise ApiError(503, str(e), None, "store_unavailable", {"Retry-After": "1"}) from None
        raise ApiError(e.status, str(e), e.param,
                       "response_not_found" if e.status == 404 else "invalid_value") from None
    server.metrics.feedback.labels(event["type"]).inc()
    server.feedback_stored += 1
    return json_response(201, {"object": "feedback", **stored})


async def models(request: Request):
    server = _server(request)
    m = server.pool.current
    return {"object": "list", "data": [{"id": m.source.name, "object": "model", "created": int(server.started),
                                        "owned_by": "itera", "itera": m.describe()}]}


async def health(request: Request):
    server = _server(request)
    m = server.pool.current
    w = server.watcher
    return {"status": "draining" if server.admission.draining else "ok", "model": m.source.name,
            "version": m.source.version, "sha256": m.source.sha256, "format": m.source.format,
            "runtime": m.runtime_name, "uptime_s": round(time.time() - server.started, 3),
            "in_flight": server.admission.running, "queued": server.admission.queued,
            "swaps": len(w.swaps) if w else 0,
            "last_refused": ({k: v for k, v in w.refused[-1].items()} if w and w.refused else None)}


async def metrics(request: Request):
    from starlette.responses import Response

    server = _server(request)
    m = server.pool.current
    server.metrics.serving(m.source.name, m.source.version, m.source.sha256)
    data, content_type = server.metrics.render()
    return Response(data, media_type=content_type)


ROUTES = (  # method, path, handler
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/feedback", feedback),
    ("GET", "/v1/models", models),
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
)


# --------------------------------------------------------------------------- errors


async def api_error(request, e: ApiError):
    return json_response(e.status, e.body(), e.headers)


async def http_error(request, e):
    """Starlette's own errors (no such route, wrong method) in OpenAI's error shape."""
    what = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(e.status_code, str(e.detail))
    body = openai.error_body(e.status_code, f"{what}: {request.method} {request.url.path}")
    return json_response(e.status_code, body)


async def unexpected(request, e):
    _server(request).log(f"serve: unexpected {type(e).__name__} on {request.url.path}: {e}")
    body = openai.error_body(500, f"internal error ({type(e).__name__}); the server log has the detail")
    return json_response(500, body)
