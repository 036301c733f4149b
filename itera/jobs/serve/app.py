"""The ASGI application: :func:`build_app` puts the routes and error handlers of
:mod:`itera.jobs.serve.routes` in a FastAPI app with the :class:`~itera.jobs.serve.service.Server`
as ``app.state.server``, behind :class:`_Gate` (the browser guard, the API key, request metrics).
"""

from __future__ import annotations

import hmac
import time

from itera.jobs.serve import routes
from itera.jobs.serve.metrics import endpoint_label
from itera.jobs.serve.routes import json_response
from itera.jobs.serve.schemas import ApiError
from itera.jobs.serve.service import Server


def build_app(server: Server):
    """The FastAPI application around ``server``."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="itera serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(ApiError, routes.api_error)
    app.add_exception_handler(StarletteHTTPException, routes.http_error)
    app.add_exception_handler(Exception, routes.unexpected)
    for method, path, handler in routes.ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return _Gate(app, server)


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
                return await json_response(err.status, err.body(), err.headers)(scope, receive, send_wrapper)
            if s.api_key is not None and scope["path"] != "/health" and not self._authorised(scope):
                err = ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>", None,
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await json_response(401, err.body(), err.headers)(scope, receive, send_wrapper)
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
