"""A model registry on SQLite: versions with lineage, aliases (``active``, ``last-good``),
promotion gates and rollback, and an audit log of every change.

Concurrency: every write runs in ``BEGIN IMMEDIATE`` (one writer at a time, others wait up to
``busy_timeout``), so versions count 1, 2, 3… per name with no gaps or duplicates however many
processes register at once. WAL journaling where the file system supports it. Names and
versions reach SQL only as bound parameters, and names are validated besides.

This module imports no torch: ``itera registry list/show/resolve`` start fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from itera import dbkind
from itera.errors import InputError, IteraError, UsageError
from itera.paths import state_dir
from itera.paths import itera_home
from itera.record import utc_now

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (re.fullmatch): no trailing newline
VERSION_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only ('١' is a digit to str.isdigit); fits SQLite's integer
MAX_VERSION = 10 ** 18 - 1
BUSY_TIMEOUT_S = float(os.environ.get("ITERA_REGISTRY_BUSY_S", "30"))
ALIASES = ("active", "last-good")
TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Metric leaf names whose direction is known: promote compares on the right side.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss", "kl", "latency", "_ms", "seconds", "j_per_token",
                   "joules", "energy_j", "bytes", "bits_per_weight", "rss", "ttft", "error")
HIGHER_IS_BETTER = ("tokens_per_s", "tokens_per_j", "accuracy", "agreement", "reward_margin", "reward_accuracy",
                    "compression_ratio", "size_ratio")

MIGRATIONS = [
    # 1: the initial schema
    """
    CREATE TABLE versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        path TEXT NOT NULL,
        kind TEXT NOT NULL,
        format TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        quantization TEXT,
        params TEXT NOT NULL,
        metrics TEXT NOT NULL,
        lineage TEXT NOT NULL,
        record TEXT,
        git_commit TEXT,
        created_at TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE tags (
        name TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (name, version, key),
        FOREIGN KEY (name, version) REFERENCES versions(name, version)
    );
    CREATE TABLE aliases (
        name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated_at TEXT NOT NULL,
        PRIMARY KEY (name, alias),
        FOREIGN KEY (name, version) REFERENCES versions(name, version)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL, version INTEGER, event TEXT NOT NULL, ok INTEGER NOT NULL,
        detail TEXT NOT NULL, at TEXT NOT NULL
    );
    CREATE INDEX events_by_name ON events(name, id);
    """,
]


class RefusedError(IteraError):
    """A gate or a safety check said no (promote regression, rollback to a changed artifact)."""

    exit_code = 3


def default_path() -> Path:
    return itera_home() / "registry.db"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return name


@dataclass(frozen=True)
class Ref:
    """``name``, ``name@3``, ``name@active``, ``name@last-good`` or ``name@latest``."""

    name: str
    selector: str | None = None  # a version number as text, an alias, "latest", or None

    @classmethod
    def parse(cls, text: str) -> "Ref":
        name, sep, sel = str(text).partition("@")
        validate_name(name)
        if sep and not (VERSION_RE.fullmatch(sel) and int(sel) > 0 or sel in ALIASES or sel == "latest"):
            raise UsageError(f"invalid version {sel!r} in {text!r}: use NAME@N (N >= 1), NAME@active, "
                             "NAME@last-good or NAME@latest")
        return cls(name, sel or None)

    def __str__(self) -> str:
        return self.name + (f"@{self.selector}" if self.selector else "")


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not TAG_RE.match(key):
            raise UsageError(f"invalid tag {item!r}: use --tag key=value (key of letters, digits, '_', '.', '-')")
        if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 1024:
            raise UsageError(f"invalid tag value for {key!r}: at most 1024 characters and no control characters "
                             "(newlines, tabs)")
        tags[key] = value
    return tags


def parse_margin(text: str) -> float:
    """'2%' -> 0.02; '0.02' -> 0.02. Must be >= 0. A bare number of 1 or more is refused: '2'
    would otherwise allow a 200% regression where 2% was meant."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UsageError(f"invalid --max-regression {text!r}: use a percentage like 2% or a fraction like 0.02") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--max-regression must be a non-negative number, got {text!r}")
    if not s.endswith("%") and value >= 1:
        raise UsageError(f"--max-regression {text!r} is ambiguous: write {s}% for {s} percent, or a fraction "
                         f"below 1 (e.g. {value / 100:g})")
    return value


def metric_direction(key: str) -> str:
    """'lower' or 'higher' is better, from the metric's last name component."""
    leaf = key.rsplit(".", 1)[-1]
    if any(leaf == h or leaf.endswith(h) or leaf.startswith(h) for h in HIGHER_IS_BETTER):
        return "higher"
    if any(leaf == lo or leaf.endswith(lo) or leaf.startswith(lo) for lo in LOWER_IS_BETTER):
        return "lower"
    raise UsageError(f"itera does not know whether higher or lower {leaf!r} is better; "
                     "pass --higher-is-better or --lower-is-better")


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{"datasets": {"x": {"perplexity": 3}}} -> {"datasets.x.perplexity": 3}; numbers only."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = v
    return out


def lineage(record: dict) -> list[dict]:
    """The parent chain of a record, nearest first: command, artifact, time."""
    chain = []
    node = record
    while isinstance(node, dict):
        art = node.get("artifact") or {}
        chain.append({"command": node.get("command"), "path": art.get("path"), "format": art.get("format"),
                      "sha256": art.get("sha256"), "started_at": node.get("started_at")})
        node = node.get("parent")
    return chain


def measured_metrics(record: dict, sha256: str) -> dict[str, float]:
    """Numbers measured on this artifact anywhere in the chain (evaluate, benchmark-power, ...).

    The nearest record wins on a clash. Records about other artifacts (the float model a
    quantized one came from) are lineage, not measurements of this one, and are skipped.
    """
    merged: dict[str, float] = {}
    node = record
    while isinstance(node, dict):
        art = node.get("artifact") or {}
        if art.get("sha256") == sha256:
            for k, v in flatten_metrics(node.get("metrics") or {}).items():
                merged.setdefault(k, v)
        node = node.get("parent")
    return merged


PROTOCOL_KEYS = ("window", "stride", "bos", "max_tokens")  # which runtime computed a figure is not part of it


def evaluation_protocol(record: dict | None, sha256: str, key: str) -> dict | None:
    """How the figure ``key`` (``datasets.<dataset>.<metric>``) of the artifact ``sha256`` was
    measured: the evaluate record behind it in the lineage, its windowing, BOS and the number of
    tokens scored. None when no record says."""
    if not key.startswith("datasets."):
        return None
    node = record
    while isinstance(node, dict):
        art = node.get("artifact") or {}
        datasets = (node.get("metrics") or {}).get("datasets") or {}
        if node.get("command") == "evaluate" and art.get("sha256") == sha256:
            for spec, figures in datasets.items():
                if key.startswith(f"datasets.{spec}.") and "." not in key[len(f"datasets.{spec}."):]:
                    params = node.get("params") or {}
                    return {"dataset": spec, **{k: params.get(k) for k in PROTOCOL_KEYS},
                            "tokens": figures.get("tokens")}
        node = node.get("parent")
    return None


def quantization_of(record: dict | None) -> str | None:
    """A short label of how the artifact was quantized, from its lineage (None if it was not)."""
    node = record
    while isinstance(node, dict):
        p = node.get("params") or {}
        if node.get("command") == "export" and p.get("gguf_type"):
            return str(p["gguf_type"])
        if node.get("command") == "quantize" and p.get("method"):
            return f"{p['method']}-{p.get('bits')}bit"
        node = node.get("parent")
    return None


def artifact_digest_of(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of an artifact with its companion files (an ONNX graph's KV graph and data)."""
    from itera.artifacts import digest

    return digest(path)


def integrity_problem(label: str, row) -> str | None:
    """Why a registered artifact cannot be trusted now (gone, no longer an artifact of its kind,
    its bytes changed), or None. What is not a regular file or a directory of the registered kind
    is refused before anything is hashed: a FIFO would block, a link to /etc would be walked."""
    from itera.artifacts import check_artifact

    path = Path(row["path"])
    if not path.exists() and not path.is_symlink():
        return f"{label}'s artifact {path} no longer exists"
    if path.is_dir() != (row["kind"] != "file"):
        return f"{label}'s artifact {path} is no longer a {'file' if row['kind'] == 'file' else 'directory'}"
    try:
        check_artifact(path)
    except IteraError as e:
        return f"{label}'s artifact is no longer one itera can read ({e})"
    if artifact_digest_of(path)[1] != row["sha256"]:
        return f"{label}'s artifact {path} changed since it was registered (sha256 no longer {row['sha256'][:12]}…)"
    return None


def registration(record: dict | None = None, path: Path | None = None) -> dict:
    """The artifact block to register: a bare ``path``, or the artifact of ``record``. Either way
    the path must be an artifact itera can read, and it is hashed here; a record's sha256 that
    disagrees (the artifact changed since it was written) is refused, one that is null is filled in."""
    from itera.artifacts import check_artifact, describe

    if path is not None:
        if not Path(path).exists() and not Path(path).is_symlink():
            raise InputError(f"{path} does not exist; pass an existing file or directory with --path")
        return describe(check_artifact(Path(path)))
    if record is None:
        from itera import record as records

        before = ("the previous command in the pipe wrote no record (it failed: see its error above); otherwise "
                  if records.EMPTY_PIPE else "")
        raise InputError(f"no input: {before}pipe an itera record on stdin, or pass --record FILE or --path ARTIFACT")
    artifact = record.get("artifact")
    if not artifact:
        raise InputError(f"the record from `itera {record.get('command')}` names no artifact to register")
    p = Path(artifact["path"])
    if not p.exists() and not p.is_symlink():
        raise InputError(f"the record's artifact {p} does not exist; register from the directory the pipeline ran in")
    check_artifact(p)
    size, digest = artifact_digest_of(p)
    if artifact.get("sha256") and artifact["sha256"] != digest:
        raise InputError(f"{p} changed since the record was written (sha256 differs); re-run the command that made it")
    return {**artifact, "bytes": size, "sha256": digest}


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


KEY_METRICS = ("perplexity", "bits_per_byte", "decode_tokens_per_s", "j_per_token", "bits_per_weight",
               "kl_to_source", "top1_agreement", "peak_rss_bytes")


def _compare_order(key: str) -> tuple[int, str]:
    """The artifact's size first, then the figures people compare on, then the rest by name."""
    if key == "bytes":
        return (-1, key)
    leaf = key.rsplit(".", 1)[-1]
    return (KEY_METRICS.index(leaf) if leaf in KEY_METRICS else len(KEY_METRICS), key)


class Registry:
    """One SQLite registry file. Every write is one transaction (``BEGIN IMMEDIATE``); a caller
    may hold one open around several steps with :meth:`transaction`, so that everything that can
    fail (building and serialising the record it will print) happens before the commit."""

    def __init__(self, path: Path | None = None, busy_timeout_s: float | None = None, create: bool = True):
        self.path = Path(path) if path is not None else default_path()
        self.busy_timeout_s = BUSY_TIMEOUT_S if busy_timeout_s is None else busy_timeout_s
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"registry path {self.path} is a directory; pass a file path with --registry")
        if not create and not self.path.exists():
            raise InputError(f"registry {self.path} does not exist; pass --registry PATH (or ITERA_REGISTRY) of an "
                             "existing one: only register, activate, mark-good, promote and rollback create one")
        state_dir(self.path.parent)
        self._depth = 0
        try:
            self.db = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            try:
                dbkind.check(self.db, self.path, "registry")  # not a feedback store, nor anything else
            except InputError:
                self.db.close()  # closed before the error: a read leaves no -wal/-shm beside the file
                raise
            self._check_schema_version()
            self.db.execute("PRAGMA journal_mode = WAL")  # falls back by itself where WAL is not possible
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.OperationalError as e:
            self._raise_busy_or_corrupt(e)
        except sqlite3.DatabaseError as e:
            raise InputError(f"registry {self.path} is not a usable SQLite database ({e}); "
                             "pass another --registry path") from None
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _raise_busy_or_corrupt(self, e: sqlite3.OperationalError):
        if "locked" in str(e) or "busy" in str(e):
            raise InputError(f"registry {self.path} is busy: another process held it locked for more than "
                             f"{self.busy_timeout_s:g} s; try again") from None
        raise InputError(f"registry {self.path} is not a usable SQLite database ({e}); "
                         "pass another --registry path") from None

    def _check_schema_version(self) -> None:
        (current,) = self.db.execute("PRAGMA user_version").fetchone()
        if current > len(MIGRATIONS):
            raise InputError(f"registry {self.path} was created by a newer itera (schema version {current}; this "
                             f"itera knows {len(MIGRATIONS)}); upgrade itera or pass another --registry")

    def _migrate(self) -> None:
        (current,) = self.db.execute("PRAGMA user_version").fetchone()
        if current >= len(MIGRATIONS):
            return
        with self._write():
            (current,) = self.db.execute("PRAGMA user_version").fetchone()  # re-read under the lock
            for i in range(current, len(MIGRATIONS)):
                # execute() per statement: executescript() would COMMIT the open transaction first.
                for statement in filter(str.strip, MIGRATIONS[i].split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {i + 1}")
            dbkind.mark(self.db, "registry")

    @contextlib.contextmanager
    def _write(self):
        """One write transaction; nested calls join the open one. It commits when the block ends
        normally, or with a refusal (whose audit event must stay); anything else rolls back."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            self._raise_busy_or_corrupt(e)
        self._depth = 1
        try:
            yield self.db
        except RefusedError:
            self.db.execute("COMMIT")
            raise
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    def transaction(self):
        """Hold one write transaction around several steps: ``with reg.transaction(): ...``."""
        return self._write()

    def _event(self, name: str, version: int | None, event: str, ok: bool, **detail: Any) -> None:
        self.db.execute("INSERT INTO events (name, version, event, ok, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
                        (name, version, event, int(ok), json.dumps(detail, sort_keys=True), utc_now()))

    def _row(self, name: str, version: int) -> dict | None:
        row = self.db.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
        return self._version_dict(row) if row else None

    def _version_dict(self, row: sqlite3.Row) -> dict:
        d = dict(row)
        for k in ("params", "metrics", "lineage", "record"):
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["tags"] = {r["key"]: r["value"] for r in self.db.execute(
            "SELECT key, value FROM tags WHERE name = ? AND version = ? ORDER BY key", (d["name"], d["version"]))}
        d["aliases"] = [r["alias"] for r in self.db.execute(
            "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (d["name"], d["version"]))]
        return d

    def alias(self, name: str, alias: str) -> int | None:
        row = self.db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        return row[0] if row else None

    def _set_alias(self, name: str, alias: str, version: int, event: str, **detail: Any) -> None:
        before = self.alias(name, alias)
        self.db.execute(
            "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (name, alias, version, utc_now()))
        self._event(name, version, event, True, alias=alias, previous=before, **detail)

    def _names(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT name FROM versions")}

    def resolve_version(self, ref: Ref) -> int:
        """The version number a ref points to; InputError when it points nowhere."""
        if ref.name not in self._names():
            raise InputError(f"no model named {ref.name!r} in registry {self.path}; see `itera registry list`")
        sel = ref.selector or "latest"
        if sel == "latest":
            return self.db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (ref.name,)).fetchone()[0]
        if sel in ALIASES:
            v = self.alias(ref.name, sel)
            if v is None:
                raise InputError(f"{ref.name} has no {sel!r} version yet; see `itera registry history {ref.name}`")
            return v
        v = int(sel)
        if self._row(ref.name, v) is None:
            raise InputError(f"{ref.name} has no version {v}; see `itera registry list --name {ref.name}`")
        return v

    def get(self, ref: Ref) -> dict:
        return self._row(ref.name, self.resolve_version(ref))

    # ------------------------------------------------------------------ writes

    def _next_version(self, name: str) -> int:
        """One past the highest version of ``name``. Only call it inside :meth:`_write`: the read and
        the INSERT that follows are one ``BEGIN IMMEDIATE`` transaction, so no other writer can take
        the same number in between (tests/test_registry.py slows this step down to show it)."""
        (last,) = self.db.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE name = ?", (name,)).fetchone()
        return last + 1

    def register(self, name: str, artifact: dict, record: dict | None, tags: dict[str, str] | None = None,
                 commit: str | None = None, allow_duplicate: bool = False) -> dict:
        """Add the next version of ``name``. ``artifact`` must carry path, kind, format, bytes, sha256.

        The same bytes registered again under the same name are that version, not a new one
        (``duplicate_of`` says which), unless ``allow_duplicate``."""
        validate_name(name)
        # Absolute, so `resolve` and rollback's checks work from any directory.
        artifact = {**artifact, "path": str(Path(artifact["path"]).resolve())}
        params = (record or {}).get("params") or {}
        metrics = measured_metrics(record, artifact["sha256"]) if record else {}
        with self._write():
            if not allow_duplicate:  # under the write lock: two registrations of the same bytes make one version
                row = self.db.execute("SELECT MIN(version) FROM versions WHERE name = ? AND sha256 = ?",
                                      (name, artifact["sha256"])).fetchone()
                if row[0] is not None:
                    return {**self._row(name, row[0]), "duplicate_of": row[0]}
            version = self._next_version(name)
            self.db.execute(
                "INSERT INTO versions (name, version, path, kind, format, bytes, sha256, quantization, params, "
                "metrics, lineage, record, git_commit, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, artifact["path"], artifact["kind"], artifact["format"], artifact["bytes"],
                 artifact["sha256"], quantization_of(record), json.dumps(params), json.dumps(metrics),
                 json.dumps(lineage(record) if record else []), json.dumps(record) if record else None,
                 commit, utc_now()))
            for k, v in (tags or {}).items():
                self.db.execute("INSERT INTO tags (name, version, key, value) VALUES (?, ?, ?, ?)", (name, version, k, v))
            self._event(name, version, "register", True, path=artifact["path"], sha256=artifact["sha256"])
        return self._row(name, version)

    def activate(self, ref: Ref) -> dict:
        with self._write():
            v = self.resolve_version(ref)
            self._set_alias(ref.name, "active", v, "activate")
        return self._row(ref.name, v)

    def mark_good(self, ref: Ref) -> dict:
        with self._write():
            v = self.resolve_version(ref)
            self._set_alias(ref.name, "last-good", v, "mark-good")
        return self._row(ref.name, v)

    def rollback(self, name: str, to: int | None = None) -> dict:
        if to is not None and not 1 <= to <= MAX_VERSION:
            raise UsageError(f"--to {to} is not a version number; pass N between 1 and {MAX_VERSION}")
        """Point ``active`` at ``last-good`` (or at version ``to``) after checking its bytes.

        A refusal (no such version, no last-good, artifact missing or changed) records a
        ``rollback-refused`` event, leaves the aliases as they were and raises RefusedError.
        """
        validate_name(name)
        with self._write():
            if name not in self._names():
                raise InputError(f"no model named {name!r} in registry {self.path}; see `itera registry list`")
            if to is not None and self._row(name, to) is None:
                raise InputError(f"{name} has no version {to} to roll back to; see `itera registry list --name {name}`")
            target = to if to is not None else self.alias(name, "last-good")
            problem, row = None, None
            if target is None:
                problem = f"{name} has no last-good version; mark one with `itera registry mark-good {name}@N` or pass --to N"
            else:
                row = self._row(name, target)
                if row is None:
                    problem = f"{name} has no version {target} to roll back to"
                else:
                    problem = integrity_problem(f"{name}@{target}", row)
            if problem is None:
                self._set_alias(name, "active", target, "rollback")
            else:  # the refusal is part of the audit log too
                self._event(name, target, "rollback-refused", False, reason=problem)
        if problem is not None:
            raise RefusedError(f"rollback refused: {problem}; aliases unchanged")
        return self._row(name, target)

    def promote(self, ref: Ref, metric: str, max_regression: float, direction: str | None = None) -> dict:
        """Activate ``ref`` only if ``metric`` is no worse than the active version's by more than the margin."""
        with self._write():
            v = self.resolve_version(ref)
            cand = self._row(ref.name, v)
            key = self._metric_key(cand["metrics"], metric, f"{ref.name}@{v}")
            direction = direction or metric_direction(key)
            active = self.alias(ref.name, "active")
            detail: dict[str, Any] = {"metric": key, "direction": direction, "max_regression": max_regression,
                                      "candidate": cand["metrics"][key]}
            if active is None:
                detail["reason"] = "no active version to compare with"
                self._set_alias(ref.name, "active", v, "promote", **detail)
                return {**self._row(ref.name, v), "gate": {**detail, "passed": True}}
            cur = self._row(ref.name, active)
            if key not in cur["metrics"]:
                raise UsageError(f"the active version {ref.name}@{active} has no metric {key!r}; "
                                 "evaluate it the same way, or activate the candidate by hand")
            differs = self._protocol_difference(cand, cur, key)
            if differs:
                reason = (f"{key} of {ref.name}@{v} and of active {ref.name}@{active} were measured differently "
                          f"({differs}); evaluate both the same way")
                self._event(ref.name, v, "promote-refused", False, reason=reason, **detail)
                raise RefusedError(f"promotion refused: {reason}; {ref.name}@active stays at version {active}")
            a, c = cur["metrics"][key], cand["metrics"][key]
            worse = (c - a) if direction == "lower" else (a - c)
            regression = worse / abs(a) if a != 0 else (0.0 if worse <= 0 else math.inf)
            detail.update(active=a, active_version=active, regression=regression)
            if regression > max_regression:
                reason = (f"{key} of {ref.name}@{v} is {c:.6g} against {a:.6g} for active {ref.name}@{active}: "
                          f"{regression:+.2%} worse, more than the allowed {max_regression:.2%}")
                self._event(ref.name, v, "promote-refused", False, reason=reason, **detail)
                refused = reason
            else:
                refused = None
                self._set_alias(ref.name, "active", v, "promote", **detail)
        if refused:
            raise RefusedError(f"promotion refused: {refused}; {ref.name}@active stays at version {active}")
        return {**self._row(ref.name, v), "gate": {**detail, "passed": True}}

    @staticmethod
    def _protocol_difference(cand: dict, cur: dict, key: str) -> str | None:
        """Which evaluation setting differs between two versions' figures for ``key`` (None: same)."""
        if not key.startswith("datasets."):
            return None
        pc = evaluation_protocol(cand["record"], cand["sha256"], key)
        pa = evaluation_protocol(cur["record"], cur["sha256"], key)
        if pc is None or pa is None:
            return "no evaluate record says how " + ("the candidate's" if pc is None else "the active one's") + \
                " figure was measured"
        diff = [f"{k} {pc[k]!r} vs {pa[k]!r}" for k in pc if pc[k] != pa.get(k)]
        return ", ".join(diff) or None

    @staticmethod
    def _metric_key(metrics: dict[str, float], metric: str, where: str) -> str:
        if metric in metrics:
            return metric
        matches = sorted(k for k in metrics if k.endswith("." + metric))
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise UsageError(f"{where} has no metric {metric!r}; it has: {', '.join(sorted(metrics)) or 'none'}")
        raise UsageError(f"metric {metric!r} is ambiguous in {where}; pass one of: {', '.join(matches)}")

    # ------------------------------------------------------------------ reads

    def list(self, name: str | None = None, tags: dict[str, str] | None = None, fmt: str | None = None,
             quantization: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM versions WHERE 1 = 1", []
        if name is not None:
            sql += " AND name = ?"
            args.append(validate_name(name))
        if fmt is not None:
            sql += " AND format = ?"
            args.append(fmt)
        if quantization is not None:
            sql += " AND quantization = ?"
            args.append(quantization)
        for k, v in (tags or {}).items():
            sql += " AND EXISTS (SELECT 1 FROM tags t WHERE t.name = versions.name AND t.version = versions.version " \
                   "AND t.key = ? AND t.value = ?)"
            args += [k, v]
        rows = self.db.execute(sql + " ORDER BY name, version", args).fetchall()
        return [self._version_dict(r) for r in rows]

    def history(self, name: str) -> list[dict]:
        validate_name(name)
        rows = self.db.execute("SELECT * FROM events WHERE name = ? ORDER BY id", (name,)).fetchall()
        return [{**dict(r), "ok": bool(r["ok"]), "detail": json.loads(r["detail"])} for r in rows]

    def compare(self, refs: list[Ref]) -> dict:
        """Metrics side by side, size first, then the figures people compare on (perplexity, bits
        per byte, speed, energy, bits per weight), then everything else alphabetically."""
        versions = [self.get(r) for r in refs]
        for v in versions:
            v["metrics"] = {"bytes": v["bytes"], **v["metrics"]}
        keys = sorted(set().union(*(v["metrics"] for v in versions)), key=_compare_order)
        base = versions[0]["metrics"]
        table = {}
        for k in keys:
            row = {}
            for ref, v in zip(refs, versions):
                val = v["metrics"].get(k)
                entry: dict[str, Any] = {"value": val}
                if val is not None and k in base and v is not versions[0]:
                    entry["delta"] = val - base[k]
                    entry["relative"] = (val - base[k]) / abs(base[k]) if base[k] else None
                row[f"{v['name']}@{v['version']}"] = entry
            table[k] = row
        return {"versions": [f"{v['name']}@{v['version']}" for v in versions], "metrics": table}

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
