"""``itera serve``'s options: a dataclass that validates itself, cross-flag rules included,
before anything is loaded or bound."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sqlite3
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from itera.errors import InputError, UsageError
from itera.options import flag

MAX_CONCURRENCY = 64
MAX_QUEUE = 4096


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; every other name or address counts as reachable
    from elsewhere (``0.0.0.0`` and ``::`` are every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


HOST_NAME = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?|"
                       r"\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+")


def read_api_key(path: Path) -> str:
    """The key in ``path``: its first line, stripped; refused when missing, empty or not a file."""
    from itera.fsio import check_regular

    st = check_regular(Path(path), "--api-key-file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"--api-key-file {path} is a directory; pass a file holding the key")
    if st.st_size > 4096:
        raise InputError(f"--api-key-file {path} is {st.st_size} bytes; a key file holds one line")
    try:
        lines = Path(path).read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--api-key-file {path} cannot be read as text ({e})") from None
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise InputError(f"--api-key-file {path} holds {'no key' if not key else 'a key shorter than 16 characters'}; "
                         "write one long random line, e.g. `openssl rand -hex 32 > key`")
    if not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        raise InputError(f"--api-key-file {path}: the key must be printable ASCII without spaces")
    return key


def registered_name_hint(model: str, registry: str | None) -> str | None:
    """'did you mean NAME@active? (...)' when ``--model NAME`` is no file or directory but a model
    of that name is in the registry (``registry``, else $ITERA_REGISTRY, else the default one);
    None otherwise. Only a registry that exists is opened, and only to read."""
    from itera.errors import IteraError
    from itera.registry import NAME_RE, Registry

    p = Path(model)
    if p.exists() or p.is_symlink() or not NAME_RE.fullmatch(model):
        return None
    if registry is None and os.environ.get("ITERA_REGISTRY"):
        registry = os.environ["ITERA_REGISTRY"]
    try:
        with Registry(registry, create=False) as reg:
            if not reg.storage.has_name(model):
                return None
            where = reg.path
    except (IteraError, OSError, sqlite3.Error):  # no registry there, or not one itera can read: no hint
        return None
    return f"did you mean {model}@active? (registry {where} has a model of that name)"


@dataclass
class ServeOptions:
    """What ``itera serve`` serves and how.

    ``model``: ``NAME@active`` (or any registry ref with ``@``: ``NAME@last-good``, ``NAME@latest``
    follow their alias; ``NAME@3`` is pinned) or the path of a checkpoint directory, ``.gguf`` or
    ``.onnx`` file. ``registry``: the registry file for a ref. ``host``/``port``: where to listen
    (loopback unless an API key is set). ``api_key_file``: a file whose first line is the bearer
    key every endpoint but ``/health`` requires. ``max_concurrency``: generations at once (each
    has its own KV cache); ``max_queue``: requests waiting beyond those, after which the server
    answers 429. ``feedback_db``: the SQLite store of responses and feedback (default
    ``$ITERA_HOME/feedback.db``). ``threads``: CPU threads per generation for llama.cpp (default:
    the cores shared among ``max_concurrency``). ``chat_template``: a Jinja file that replaces the
    model's chat template. ``poll_interval``: seconds between looks at the registry alias.
    ``shutdown_timeout``: seconds in-flight requests get to finish after SIGTERM. ``allowed_hosts``:
    names besides loopback's that a request's ``Host`` and ``Origin`` may carry (see
    :func:`request_refusal`)."""

    model: str = flag("--model")
    # the CLI's default for a ref: $ITERA_REGISTRY when set
    registry: str | None = flag("--registry", default=None)  # a SQLite file or a PostgreSQL URL
    host: str = flag("--host", default="127.0.0.1")
    port: int = flag("--port", default=8080)
    api_key_file: Path | None = flag("--api-key-file", default=None)
    max_concurrency: int = flag("--max-concurrency", default=2)
    max_queue: int = flag("--max-queue", default=16)
    feedback_db: Path | str | None = flag("--feedback-db", default=None)  # a SQLite file or a PostgreSQL URL
    threads: int | None = flag("--threads", default=None)
    chat_template: Path | None = flag("--chat-template", default=None)
    poll_interval: float = flag("--poll-interval", default=1.0)
    shutdown_timeout: float = flag("--shutdown-timeout", default=30.0)
    allowed_hosts: tuple[str, ...] = flag("--allowed-host", default=())  # the flag is repeated, once per name

    @property
    def is_ref(self) -> bool:
        return "@" in self.model

    def validate(self) -> "ServeOptions":
        if not self.model:
            raise UsageError("pass --model NAME@active (a registry ref) or a checkpoint directory, .gguf or .onnx file")
        if self.is_ref:
            from itera.registry import Ref

            Ref.parse(self.model)
        elif self.registry is not None:
            hint = registered_name_hint(self.model, self.registry)
            raise UsageError(f"--registry applies to a registry ref (NAME@active); --model {self.model} is a path"
                             + (f"; {hint}" if hint else ""))
        else:
            hint = registered_name_hint(self.model, None)
            if hint:
                raise InputError(f"{self.model} does not exist; {hint}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535 (got {self.port}); 0 picks a free port")
        if not self.host or any(c.isspace() for c in self.host):
            raise UsageError(f"--host {self.host!r} is not a host name or address")
        if not is_loopback(self.host) and self.api_key_file is None:
            raise UsageError(f"--host {self.host} is reachable from other machines; pass --api-key-file FILE so that "
                             "requests need a key, or keep the default --host 127.0.0.1")
        if not 1 <= self.max_concurrency <= MAX_CONCURRENCY:
            raise UsageError(f"--max-concurrency must be between 1 and {MAX_CONCURRENCY} (got {self.max_concurrency})")
        if not 0 <= self.max_queue <= MAX_QUEUE:
            raise UsageError(f"--max-queue must be between 0 and {MAX_QUEUE} (got {self.max_queue})")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        if not (math.isfinite(self.poll_interval) and 0.05 <= self.poll_interval <= 3600):
            raise UsageError(f"--poll-interval must be between 0.05 and 3600 seconds (got {self.poll_interval})")
        if not (math.isfinite(self.shutdown_timeout) and 0 <= self.shutdown_timeout <= 3600):
            raise UsageError(f"--shutdown-timeout must be between 0 and 3600 seconds (got {self.shutdown_timeout})")
        for h in self.allowed_hosts:
            if not HOST_NAME.fullmatch(h):
                raise UsageError(f"--allowed-host {h!r} is not a host name or address (no scheme, port or path: "
                                 "e.g. --allowed-host my-box.local)")
        if self.api_key_file is not None:
            read_api_key(self.api_key_file)
        if self.chat_template is not None:
            from itera.fsio import check_input_file

            check_input_file(Path(self.chat_template), "--chat-template", "pass a Jinja template file")
            try:
                Path(self.chat_template).read_text("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"--chat-template {self.chat_template} is not UTF-8 text (byte {e.start}); save the "
                                 "template as UTF-8") from None
        from itera import pg

        pg.check_location(self.feedback_db, "feedback store", "--feedback-db")
        if self.feedback_db is not None and pg.is_url(self.feedback_db):
            return self
        if self.feedback_db is not None:
            self.feedback_db = Path(self.feedback_db)
        if self.feedback_db is not None and self.feedback_db.is_dir():
            raise UsageError(f"--feedback-db {self.feedback_db} is a directory; pass a file path")
        return self

    def lane_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.max_concurrency)

    def inputs(self) -> list[Path]:
        from itera.registry.storage import sqlite_path

        local = sqlite_path(self.registry) if self.registry is not None else None
        return [p for p in (None if self.is_ref else Path(self.model), self.api_key_file, self.chat_template,
                            local) if p is not None]

    def outputs(self) -> list:
        return []  # the feedback store is appended to, never replaced

    def as_params(self) -> dict:
        from itera import pg

        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        for key in ("registry", "feedback_db"):
            if params.get(key):
                params[key] = pg.mask(params[key])  # a URL's password is never printed
        return params
