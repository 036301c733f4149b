"""The record protocol (docs/formats.md, "The record protocol"): build, validate, emit and read itera records.

Every successful command prints exactly one record: a JSON object on one line of
stdout. The next command in a pipeline reads it from stdin as its *parent*, and
takes its input from ``parent["artifact"]["path"]``.

Writing files and hashing them is :mod:`itera.fsio`'s job, one layer below.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterator, TextIO

from itera.errors import InputError, RecordError
from itera.fsio import write_text_through

PROTOCOL_VERSION = 1


def schema() -> dict:
    """The published JSON Schema of a record (``itera/schema/record.schema.json``)."""
    text = resources.files("itera").joinpath("schema/record.schema.json").read_text("utf-8")
    return json.loads(text)


def validate(record: dict, source: str = "record") -> None:
    """Raise :class:`RecordError` naming ``source`` and the first violation if ``record`` breaks the schema."""
    import jsonschema  # light, but only needed when a record is built or read

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise RecordError(f"{source} does not match the itera schema at {where}: {err.message}")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


RUNTIME_PACKAGES = ("torch", "onnxruntime", "llama_cpp_python", "gguf", "tokenizers")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def installed_versions(names) -> dict[str, str | None]:
    """{distribution name: installed version, or None}, from package metadata (nothing imported)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info(device: str = "cpu") -> dict:
    """Where the record was made: the machine, its CPU, the cores this process may use and the
    versions of the runtimes. Versions come from package metadata: nothing heavy is imported."""
    versions = installed_versions(RUNTIME_PACKAGES)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": versions["torch"],
        "device": device,
        "cpu": _cpu_model(),
        "usable_cores": cores,
        "versions": versions,
    }


# --------------------------------------------------------------------------- building

_runtime_used: dict | None = None  # the record's `runtime` block, when this process ran one that needs it


def note_runtime(block: dict) -> None:
    """Say how this process ran a runtime whose mode the record must show (llama.cpp's weight
    repacking: :func:`itera.runtime.llamacpp_mode.note_used`). Runtimes call this; the record
    never imports a runtime."""
    global _runtime_used
    _runtime_used = dict(block)



@dataclass
class Outcome:
    """What a library job returns (``run_<verb>(opts, reporter)``): the record's artifact block,
    its metrics and its params, and the device the work ran on."""

    artifact: dict | None
    metrics: dict
    params: dict
    device: str = "cpu"


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
        if _runtime_used is not None:  # how llama.cpp loaded weights: speed and crashes depend on it
            rec["runtime"] = dict(_runtime_used)
        validate(rec)
        return rec

    def finish(self, outcome: Outcome) -> dict:
        """The record of a finished job."""
        self.device = outcome.device
        return self.record(outcome.artifact, outcome.metrics, outcome.params)


def dumps(record: dict, pretty: bool = False) -> str:
    # allow_nan=False: NaN/Infinity are not JSON; a metric that is not a number is a bug to surface.
    return json.dumps(record, indent=2 if pretty else None, allow_nan=False, ensure_ascii=False)


FULL_ON_TERMINAL = False  # set by `itera --json`: the whole record, indented, even on a terminal


def ancestors(record: dict | None, include_self: bool = False) -> Iterator[dict]:
    """The parent chain of ``record``, nearest first: its parent, the parent's parent, ... (with
    ``include_self``, the record itself first). Stops at the first link that is not a record."""
    node = record if include_self else (record.get("parent") if isinstance(record, dict) else None)
    while isinstance(node, dict):
        yield node
        node = node.get("parent")


def summary(record: dict) -> dict:
    """The record as a person at a terminal reads it: its parent chain shortened to the names of
    the commands and artifacts (the full record goes to pipes, files and --metrics-out)."""
    chain = [f"{node.get('command')} {(node.get('artifact') or {}).get('path', '')}".strip()
             for node in ancestors(record)]
    return {**record, "parent": " <- ".join(chain) or None}


def emit(record: dict, out: TextIO | None = None, metrics_out: Path | None = None) -> None:
    """Print the record on stdout (one line) and to a file. On a terminal it is indented and
    :func:`summary`'s (the whole record with ``itera --json``).

    ``metrics_out`` is written through (an existing file or device keeps its node: ``/dev/null``
    stays a device); the record's text is made first, so a record that cannot be serialised
    writes nothing anywhere."""
    out = out or sys.stdout
    line = dumps(record)
    if metrics_out is not None:
        write_text_through(Path(metrics_out), line + "\n")
    if out.isatty():
        line = dumps(record if FULL_ON_TERMINAL else summary(record), pretty=True)
    out.write(line + "\n")
    out.flush()


# --------------------------------------------------------------------------- reading


MAX_DEPTH = 200  # a record nests its parents; no pipeline is this deep, a hostile document may be


class _NotANumber(ValueError):
    """NaN, Infinity or -Infinity in a JSON text (the argument is which)."""


def _refuse_constant(name: str):
    raise _NotANumber(name)


def _depth(obj, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping past ``limit`` (iterative: no recursion)."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def parse_record(data: bytes, source: str = "stdin") -> dict:
    """Parse exactly one itera record from bytes; raise :class:`RecordError` otherwise.

    NaN and Infinity are refused (they are not JSON, and no measured number is either)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            f"{source} is not UTF-8 text (byte {e.start}); pipe the JSON record an itera command printed"
        ) from None
    text = text.strip()
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)
    try:
        obj, end = decoder.raw_decode(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"{source} is not a JSON record (line {e.lineno} column {e.colno}: {e.msg}); "
            "pipe the output of an itera command or pass the input explicitly"
        ) from None
    except _NotANumber as e:
        raise RecordError(f"{source} holds {e}, which is not a JSON number; pipe the record an itera command "
                          "printed") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise RecordError(f"{source} is not a JSON record itera can read ({str(e).split(';')[0]}); "
                          "pipe the record an itera command printed") from None
    except RecursionError:
        raise RecordError(f"{source} is JSON nested too deeply to be an itera record") from None
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
    if _depth(obj, MAX_DEPTH) > MAX_DEPTH:
        raise RecordError(f"{source} is JSON nested more than {MAX_DEPTH} levels deep; not an itera record")
    validate(obj, f"the record on {source}" if source == "stdin" else f"the record in {source}")
    return obj


EMPTY_PIPE = False  # set by read_parent: stdin was a pipe that closed without a record


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
        global EMPTY_PIPE
        try:
            EMPTY_PIPE = stat.S_ISFIFO(os.fstat(stdin.fileno()).st_mode)
        except (OSError, ValueError, AttributeError):
            EMPTY_PIPE = False
        return None
    return parse_record(data)


def read_record_file(path: Path) -> dict:
    from itera.fsio import check_input_file

    path = Path(path)
    check_input_file(path, "record file", "pass a file written with --metrics-out")
    return parse_record(path.read_bytes(), source=str(path))


def input_path(explicit: Path | None, parent: dict | None, option: str) -> Path:
    """Resolve a command's input: the explicit option wins, else the parent record's artifact."""
    if explicit is not None:
        from itera.artifacts import resolve_model

        return resolve_model(Path(explicit))
    if parent is not None:
        art = parent.get("artifact")
        if not art or not art.get("path"):
            raise RecordError(
                f"the record on stdin (from `itera {parent.get('command')}`) has no artifact path; pass {option} PATH"
            )
        return Path(art["path"])
    raise no_input(f"pass {option} PATH or pipe an itera record on stdin")


def no_input(fix: str) -> InputError:
    """The error of a command that got neither a path nor a record; in `a | b` where `a` failed
    (stdin a pipe that closed empty) it says so, rather than blame b's options."""
    before = "the previous command in the pipe wrote no record (it failed: see its error above); otherwise "
    return InputError(f"no input: {before if EMPTY_PIPE else ''}{fix}")
