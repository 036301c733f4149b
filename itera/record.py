"""The record protocol (DESIGN.md §2): build, validate, emit and read itera records.

Every successful command prints exactly one record: a JSON object on one line of
stdout. The next command in a pipeline reads it from stdin as its *parent*, and
takes its input from ``parent["artifact"]["path"]``.

Also here: atomic writes of artifacts (write to a temporary path in the same
directory, then ``os.replace``) and content hashes of files and directories.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterator, TextIO

from itera.errors import InputError, RecordError

PROTOCOL_VERSION = 1
_HASH_CHUNK = 1 << 20


def schema() -> dict:
    """The published JSON Schema of a record (``itera/schema/record.schema.json``)."""
    text = resources.files("itera").joinpath("schema/record.schema.json").read_text("utf-8")
    return json.loads(text)


def validate(record: dict) -> None:
    """Raise :class:`RecordError` naming the first violation if ``record`` breaks the schema."""
    import jsonschema  # light, but only needed when a record is built or read

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise RecordError(f"record does not match the itera schema at {where}: {err.message}")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_info(device: str = "cpu") -> dict:
    """Where the record was made. Reads torch's version from package metadata, never imports it."""
    try:
        torch_version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch_version,
        "device": device,
    }


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def directory_manifest(path: Path) -> list[tuple[str, int, str]]:
    """(relative path, bytes, sha256) for every regular file under ``path``, sorted by path."""
    rows = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rows.append((p.relative_to(path).as_posix(), p.stat().st_size, sha256_file(p)))
    return rows


def artifact_digest(path: Path) -> tuple[int, str]:
    """(total bytes, sha256) of a file, or of a directory's manifest.

    A directory's digest is the sha256 of its manifest text, one ``<sha256>  <bytes>  <path>``
    line per file in path order, so renaming, adding or changing any file changes it.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    if path.is_dir():
        rows = directory_manifest(path)
        text = "".join(f"{digest}  {size}  {rel}\n" for rel, size, digest in rows)
        return sum(size for _, size, _ in rows), hashlib.sha256(text.encode()).hexdigest()
    raise InputError(f"artifact {path} does not exist")


def describe_artifact(path: Path, kind: str, fmt: str) -> dict:
    """The record's ``artifact`` block for an existing file or directory."""
    size, digest = artifact_digest(Path(path))
    return {"path": str(path), "kind": kind, "format": fmt, "bytes": size, "sha256": digest}


# --------------------------------------------------------------------------- building


@dataclass
class Run:
    """Times a command and builds its record. Create it before the work starts."""

    command: str
    parent: dict | None = None
    device: str = "cpu"
    started_at: str = field(default_factory=utc_now)
    _t0: float = field(default_factory=time.perf_counter)

    def record(self, artifact: dict | None, metrics: dict, params: dict) -> dict:
        rec = {
            "itera": PROTOCOL_VERSION,
            "command": self.command,
            "status": "ok",
            "artifact": artifact,
            "metrics": metrics,
            "params": params,
            "parent": self.parent,
            "started_at": self.started_at,
            "duration_s": round(time.perf_counter() - self._t0, 6),
            "host": host_info(self.device),
        }
        validate(rec)
        return rec


def dumps(record: dict, pretty: bool = False) -> str:
    # allow_nan=False: NaN/Infinity are not JSON; a metric that is not a number is a bug to surface.
    return json.dumps(record, indent=2 if pretty else None, allow_nan=False, ensure_ascii=False)


def emit(record: dict, out: TextIO | None = None, metrics_out: Path | None = None) -> None:
    """Print the record on stdout (one line; indented when stdout is a terminal) and to a file."""
    out = out or sys.stdout
    if metrics_out is not None:
        write_text_atomic(Path(metrics_out), dumps(record) + "\n")
    out.write(dumps(record, pretty=out.isatty()) + "\n")
    out.flush()


# --------------------------------------------------------------------------- reading


def parse_record(data: bytes, source: str = "stdin") -> dict:
    """Parse exactly one itera record from bytes; raise :class:`RecordError` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            f"{source} is not UTF-8 text (byte {e.start}); pipe the JSON record an itera command printed"
        ) from None
    text = text.strip()
    decoder = json.JSONDecoder()
    try:
        obj, end = decoder.raw_decode(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"{source} is not a JSON record (line {e.lineno} column {e.colno}: {e.msg}); "
            "pipe the output of an itera command or pass the input explicitly"
        ) from None
    rest = text[end:].strip()
    if rest:
        raise RecordError(
            f"{source} holds more than one JSON document; pipe exactly one itera record "
            "(the previous command's stdout)"
        )
    if not isinstance(obj, dict) or obj.get("itera") != PROTOCOL_VERSION:
        raise RecordError(
            f"{source} is JSON but not an itera record (no \"itera\": {PROTOCOL_VERSION}); "
            "pipe the output of an itera command"
        )
    validate(obj)
    return obj


def read_parent(stdin: Any = None) -> dict | None:
    """The parent record from stdin, or None when stdin is a terminal, closed or empty."""
    stdin = stdin if stdin is not None else sys.stdin
    if stdin is None:
        return None
    try:
        if stdin.isatty():
            return None
    except (ValueError, AttributeError):
        return None
    buf = getattr(stdin, "buffer", None)
    data = buf.read() if buf is not None else stdin.read().encode("utf-8")
    if not data.strip():
        return None
    return parse_record(data)


def read_record_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"record file {path} does not exist; pass a file written with --metrics-out")
    return parse_record(path.read_bytes(), source=str(path))


def input_path(explicit: Path | None, parent: dict | None, option: str) -> Path:
    """Resolve a command's input: the explicit option wins, else the parent record's artifact."""
    if explicit is not None:
        return Path(explicit)
    if parent is not None:
        art = parent.get("artifact")
        if not art or not art.get("path"):
            raise RecordError(
                f"the record on stdin (from `itera {parent.get('command')}`) has no artifact path; pass {option} PATH"
            )
        return Path(art["path"])
    raise InputError(f"no input: pass {option} PATH or pipe an itera record on stdin")


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; rename it to ``final`` on success.

    On any exception the temporary directory is removed and ``final`` is untouched. An
    existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; choose another --out or remove it")
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a directory; choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``final``; rename it to ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
