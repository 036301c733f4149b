"""What a browser must not be able to do to a server on the user's own machine.

A web page the user visits can send requests to ``127.0.0.1`` (a "simple" cross-site POST with
``Content-Type: text/plain`` needs no permission), and by DNS rebinding can make its own domain
resolve to 127.0.0.1 and read the answers. Against a server without a key that means storing
feedback that ``dpo-train`` trains on. So, as llama-server and ollama-class servers learned to:

- request bodies must be ``application/json`` (415 otherwise): a simple cross-site POST cannot
  send that type, and a preflighted one gets no CORS permission from this server;
- when the server listens on loopback (or ``--allowed-host`` names hosts), the ``Host`` header
  must be a loopback name or address or an allowed host (403 otherwise): a rebound domain carries
  its own name;
- a state-changing request whose ``Origin`` names another site is refused (403).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from itera.jobs.serve.options import is_loopback
from itera.jobs.serve.schemas import ApiError

SAFE_METHODS = ("GET", "HEAD")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


def host_name(value: str) -> str:
    """The host of a ``Host`` header value: without its port, lower case, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[: value.find("]") + 1] if "]" in value else value
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class Guard:
    """``check_host``: whether Host and Origin must name loopback or ``allowed`` hosts (the server
    listens on loopback, or the user named the hosts it may be reached by)."""

    def __init__(self, check_host: bool, allowed: tuple[str, ...] = ()):
        self.allowed = frozenset(host_name(h) for h in allowed)
        self.check_host = check_host or bool(self.allowed)

    def _ours(self, host: str) -> bool:
        return host in self.allowed or is_loopback(host)

    def refusal(self, scope) -> ApiError | None:
        """The error to answer ``scope`` with, or None to let it through."""
        fix = "start the server with --allowed-host NAME to allow another name"
        if self.check_host:
            host = _header(scope, b"host")
            if host is None or not self._ours(host_name(host)):
                return ApiError(403, f"Host {host!r} is not a name of this server (loopback only); a web page "
                                     f"cannot reach it through the browser; {fix}", None, "host_not_allowed")
        if scope.get("method", "GET") in SAFE_METHODS:
            return None
        origin = _header(scope, b"origin")
        if self.check_host and origin is not None:
            try:
                origin_host = urlsplit(origin).hostname or ""
            except ValueError:
                origin_host = ""
            if not self._ours(host_name(origin_host)):
                return ApiError(403, f"cross-origin request from Origin {origin!r} refused; {fix}", None,
                                "origin_not_allowed")
        ctype = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return ApiError(415, f"Content-Type {ctype or '(none)'!r} is not accepted: send the body as JSON with "
                                 "Content-Type: application/json", None, "unsupported_media_type")
        return None
