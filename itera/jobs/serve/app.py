"""The HTTP API: OpenAI-compatible completions and chat completions (streamed as server-sent
events with ``stream: true``), model listing, feedback, health and Prometheus metrics.

Every generation runs on a worker thread with a lane of the model it checked out; the event loop
only parses, admits, relays text and answers. A response is stored (prompt, text, version) before
its last byte is sent, so feedback can name it as soon as the client has it. Every answer names
the model version that produced it: ``system_fingerprint`` (``NAME@VERSION``), an ``itera`` object
(version, sha256) and the ``X-Itera-Model-Version`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time

from starlette.requests import Request  # at module level: FastAPI resolves route annotations by name

from itera.errors import IteraError
from itera.jobs.serve import openai
from itera.jobs.serve.metrics import endpoint_label
from itera.jobs.serve.schemas import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, load_json, parse_body,
                                 parse_feedback)
from itera.jobs.serve.service import Server
from itera.feedback import FeedbackError


# --------------------------------------------------------------------------- the ASGI app


def _json(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request) -> bytes:
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


async def _watch_disconnect(request, left: threading.Event) -> None:
    """Sets ``left`` when the client closes its connection. Start it once the body has been read:
    the server then has nothing but the disconnect left to deliver (also once the response is sent,
    so this always ends). A server whose ``receive`` fails just ends the watch."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - watching is best effort; the request goes on
        return
    left.set()


class _Gate:
    """Pure ASGI middleware: the browser guard (:mod:`itera.jobs.serve.guard`), the API key (every path
    but /health) and per-request metrics (status, time to the last byte, streams included)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        label = endpoint_label(scope["path"])
        status = {"code": 500}
        s = self.server

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                s.metrics.latency.labels(label).observe(time.perf_counter() - t0)

        try:
            if (err := s.guard.refusal(scope)) is not None:  # cross-site and rebinding requests, non-JSON bodies
                return await _json(err.status, err.body(), err.headers)(scope, receive, send_wrapper)
            if s.api_key is not None and scope["path"] != "/health" and not self._authorised(scope):
                err = ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>", None,
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await _json(401, err.body(), err.headers)(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            code = str(status["code"])
            s.metrics.requests.labels(label, code).inc()
            s.status_counts[code] = s.status_counts.get(code, 0) + 1

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"),
                                                                          self.server.api_key.encode("ascii"))
        return False


def build_app(server: Server):
    """The FastAPI application around ``server``."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response, StreamingResponse

    app = FastAPI(title="itera serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _json(e.status, e.body(), e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        what = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(e.status_code, str(e.detail))
        return _json(e.status_code, openai.error_body(e.status_code, f"{what}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        server.log(f"serve: unexpected {type(e).__name__} on {request.url.path}: {e}")
        return _json(500, openai.error_body(500, f"internal error ({type(e).__name__}); the server log has the detail"))

    async def generate(request: Request, endpoint: str):
        t_request = time.perf_counter()
        data = load_json(await _read_body(request))
        body = parse_body(data, ChatRequest if endpoint == "chat" else CompletionRequest)
        left = threading.Event()  # set when the client hangs up, queued or not: its generation stops
        watcher = asyncio.ensure_future(_watch_disconnect(request, left))
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
        m = job.prepared.model
        base = openai.envelope(job.id, endpoint, m.source, int(time.time()))
        n_prompt = len(job.prepared.ids)

        if not body.stream:
            try:
                await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not fut.done() and left.is_set():  # the client left: the generation stops, nothing is stored
                    return Response(status_code=499)
                r = await asyncio.shield(fut)
            except IteraError as e:
                raise ApiError(500, f"generation failed: {e}") from None
            finally:
                watcher.cancel()
            usage = openai.usage(n_prompt, r.completion_tokens)
            answer = openai.completion(base, endpoint, r.text, r.finish_reason, usage)
            return _json(200, answer, openai.headers(m.source, job.id))

        fut.add_done_callback(lambda f: q.put_nowait(("done", f)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
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
                        yield openai.sse(openai.error_body(500, f"generation failed ({type(e).__name__})"))
                        return
                    r = value.result()
                    yield openai.sse(openai.chunk(base, endpoint, None, r.finish_reason))
                    if include_usage:
                        usage = openai.usage(n_prompt, r.completion_tokens)
                        yield openai.sse(openai.usage_chunk(base, endpoint, usage))
                    yield openai.SSE_DONE
                    return
            finally:
                job.cancel.set()  # the client left mid-stream (or the stream ended): stop generating
                watcher.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**openai.headers(m.source, job.id), "Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        import anyio

        event = parse_feedback(load_json(await _read_body(request)))
        try:
            stored = await anyio.to_thread.run_sync(server.store.add_feedback, event)
        except FeedbackError as e:
            raise ApiError(e.status, str(e), e.param,
                           "response_not_found" if e.status == 404 else "invalid_value") from None
        server.metrics.feedback.labels(event["type"]).inc()
        server.feedback_stored += 1
        return _json(201, {"object": "feedback", **stored})

    @app.get("/v1/models")
    async def models():
        m = server.pool.current
        return {"object": "list", "data": [{"id": m.source.name, "object": "model", "created": int(server.started),
                                            "owned_by": "itera", "itera": m.describe()}]}

    @app.get("/health")
    async def health():
        m = server.pool.current
        w = server.watcher
        return {"status": "draining" if server.admission.draining else "ok", "model": m.source.name,
                "version": m.source.version, "sha256": m.source.sha256, "format": m.source.format,
                "runtime": m.runtime_name, "uptime_s": round(time.time() - server.started, 3),
                "in_flight": server.admission.running, "queued": server.admission.queued,
                "swaps": len(w.swaps) if w else 0,
                "last_refused": ({k: v for k, v in w.refused[-1].items()} if w and w.refused else None)}

    @app.get("/metrics")
    async def metrics():
        m = server.pool.current
        server.metrics.serving(m.source.name, m.source.version, m.source.sha256)
        data, content_type = server.metrics.render()
        return Response(data, media_type=content_type)

    return _Gate(app, server)
