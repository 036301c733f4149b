"""A model registry: versions with lineage, aliases (``active``, ``last-good``), promotion gates
and rollback, and an audit log of every change.

- :mod:`.refs` — model names and ``NAME@…`` references.
- :mod:`.storage` — where versions, tags, aliases and events are kept: the
  :class:`~.storage.RegistryStorage` interface and its SQLite backend (the only SQL).
- :mod:`.policy` — the decisions (metric directions, the promotion gate, rollback), pure functions.
- :mod:`.provenance` — what a record's parent chain says (metrics measured on an artifact, how).
- :mod:`.artifacts` — the files: what to register, whether a registered one is intact.
- :class:`Registry` here — reads rows, asks the policy, writes what it decided, logs it.

Concurrency: every change is one storage transaction (SQLite: ``BEGIN IMMEDIATE``, one writer
at a time, others wait up to ``busy_timeout``), so versions count 1, 2, 3… per name with no gaps
or duplicates however many processes register at once.

This package imports no torch: ``itera registry list/show/resolve`` start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itera.errors import InputError
from itera.record import utc_now
from itera.registry import policy
from itera.registry.integrity import git_commit, integrity_problem, registration
from itera.registry.policy import HIGHER_IS_BETTER, KEY_METRICS, LOWER_IS_BETTER, RefusedError, metric_direction
from itera.registry.provenance import (PROTOCOL_KEYS, evaluation_protocol, flatten_metrics, lineage,
                                       measured_metrics, quantization_of)
from itera.registry.refs import ALIASES, MAX_VERSION, NAME_RE, VERSION_RE, Ref, validate_name
from itera.registry.storage import (BUSY_TIMEOUT_S, MIGRATIONS, RegistryStorage, SQLiteStorage, Version,
                                    default_path)

__all__ = [
    "ALIASES", "BUSY_TIMEOUT_S", "HIGHER_IS_BETTER", "KEY_METRICS", "LOWER_IS_BETTER", "MAX_VERSION", "MIGRATIONS",
    "NAME_RE", "PROTOCOL_KEYS", "VERSION_RE", "Ref", "RefusedError", "Registry", "RegistryStorage", "SQLiteStorage",
    "Version", "default_path", "evaluation_protocol", "flatten_metrics", "git_commit",
    "integrity_problem", "lineage", "measured_metrics", "metric_direction", "quantization_of", "registration",
    "validate_name",
]


class Registry:
    """One registry. Every write is one transaction; a caller may hold one open around several
    steps with :meth:`transaction`, so that everything that can fail (building and serialising
    the record it will print) happens before the commit.

    ``path`` is a SQLite file (default ``$ITERA_HOME/registry.db``); ``create=False`` refuses one
    that does not exist. ``storage`` is another backend instead (:class:`RegistryStorage`)."""

    def __init__(self, path: Path | None = None, busy_timeout_s: float | None = None, create: bool = True,
                 storage: RegistryStorage | None = None):
        self.storage: RegistryStorage = storage if storage is not None else \
            SQLiteStorage(path, busy_timeout_s=busy_timeout_s, create=create)

    @property
    def path(self) -> Path | str:
        """Where the registry is: the SQLite file."""
        return self.storage.path

    @property
    def db(self):
        """The SQLite backend's connection."""
        return self.storage.db  # type: ignore[attr-defined]

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self):
        """Hold one write transaction around several steps: ``with reg.transaction(): ...``. It
        commits when the block ends, or with a refusal (whose audit event must stay); anything
        else rolls back."""
        return self.storage.transaction(commit_on=(RefusedError,))

    def _migrate(self) -> None:
        """Bring the schema up to date (opening did: a no-op then)."""
        self.storage.migrate()

    def _event(self, name: str, version: int | None, event: str, ok: bool, **detail: Any) -> None:
        self.storage.add_event(name, version, event, ok, detail, utc_now())

    def _row(self, name: str, version: int) -> Version | None:
        return self.storage.version(name, version)

    def _set_alias(self, name: str, alias: str, version: int, event: str, **detail: Any) -> None:
        before = self.alias(name, alias)
        self.storage.set_alias(name, alias, version, utc_now())
        self._event(name, version, event, True, alias=alias, previous=before, **detail)

    def _require(self, name: str) -> None:
        if not self.storage.has_name(name):
            raise InputError(f"no model named {name!r} in registry {self.path}; see `itera registry list`")

    # ------------------------------------------------------------------ reads

    def alias(self, name: str, alias: str) -> int | None:
        return self.storage.alias(name, alias)

    def resolve_version(self, ref: Ref) -> int:
        """The version number a ref points to; InputError when it points nowhere."""
        self._require(ref.name)
        sel = ref.selector or "latest"
        if sel == "latest":
            return self.storage.latest_version(ref.name)
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

    def list(self, name: str | None = None, tags: dict[str, str] | None = None, fmt: str | None = None,
             quantization: str | None = None) -> list[dict]:
        if name is not None:
            validate_name(name)
        return self.storage.versions(name, tags, fmt, quantization)

    def history(self, name: str) -> list[dict]:
        validate_name(name)
        return self.storage.events(name)

    def compare(self, refs: list[Ref]) -> dict:
        """Metrics side by side, size first, then the figures people compare on (perplexity, bits
        per byte, speed, energy, bits per weight), then everything else alphabetically."""
        return policy.comparison([self.get(r) for r in refs])

    def integrity_ok(self) -> bool:
        return self.storage.integrity_ok()

    # ------------------------------------------------------------------ writes

    def _next_version(self, name: str) -> int:
        """One past the highest version of ``name``. Only call it inside :meth:`transaction`: the
        read and the INSERT that follows are one write transaction, so no other writer can take
        the same number in between (tests/test_registry.py slows this step down to show it)."""
        return (self.storage.latest_version(name) or 0) + 1

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
        with self.transaction():
            if not allow_duplicate:  # under the write lock: two registrations of the same bytes make one version
                first = self.storage.version_with_sha256(name, artifact["sha256"])
                if first is not None:
                    return {**self._row(name, first), "duplicate_of": first}
            version = self._next_version(name)
            self.storage.insert_version(
                {"name": name, "version": version, "path": artifact["path"], "kind": artifact["kind"],
                 "format": artifact["format"], "bytes": artifact["bytes"], "sha256": artifact["sha256"],
                 "quantization": quantization_of(record), "params": params, "metrics": metrics,
                 "lineage": lineage(record) if record else [], "record": record or None, "git_commit": commit,
                 "created_at": utc_now()}, tags or {})
            self._event(name, version, "register", True, path=artifact["path"], sha256=artifact["sha256"])
        return self._row(name, version)

    def activate(self, ref: Ref) -> dict:
        with self.transaction():
            v = self.resolve_version(ref)
            self._set_alias(ref.name, "active", v, "activate")
        return self._row(ref.name, v)

    def mark_good(self, ref: Ref) -> dict:
        with self.transaction():
            v = self.resolve_version(ref)
            self._set_alias(ref.name, "last-good", v, "mark-good")
        return self._row(ref.name, v)

    def rollback(self, name: str, to: int | None = None) -> dict:
        """Point ``active`` at ``last-good`` (or at version ``to``) after checking its bytes.

        A refusal (no such version, no last-good, artifact missing or changed) records a
        ``rollback-refused`` event, leaves the aliases as they were and raises RefusedError.
        """
        policy.check_rollback_to(to)
        validate_name(name)
        with self.transaction():
            self._require(name)
            if to is not None and self._row(name, to) is None:
                raise InputError(f"{name} has no version {to} to roll back to; see `itera registry list --name {name}`")
            target = to if to is not None else self.alias(name, "last-good")
            row = self._row(name, target) if target is not None else None
            problem = policy.rollback_problem(name, target, row, integrity_problem(f"{name}@{target}", row)
                                              if row is not None else None)
            if problem is None:
                self._set_alias(name, "active", target, "rollback")
            else:  # the refusal is part of the audit log too
                self._event(name, target, "rollback-refused", False, reason=problem)
        if problem is not None:
            raise policy.rollback_refused(problem)
        return self._row(name, target)

    def promote(self, ref: Ref, metric: str, max_regression: float, direction: str | None = None) -> dict:
        """Activate ``ref`` only if ``metric`` is no worse than the active version's by more than the margin
        (:func:`policy.promotion_gate`); a refusal is logged as ``promote-refused`` and raises RefusedError."""
        with self.transaction():
            v = self.resolve_version(ref)
            candidate = self._row(ref.name, v)
            active = self.alias(ref.name, "active")
            decision = policy.promotion_gate(ref.name, v, candidate, active,
                                             self._row(ref.name, active) if active is not None else None,
                                             metric, max_regression, direction)
            if decision.passed:
                self._set_alias(ref.name, "active", v, "promote", **decision.detail)
            else:
                self._event(ref.name, v, "promote-refused", False, reason=decision.refusal, **decision.detail)
        if not decision.passed:
            raise decision.error()
        return {**self._row(ref.name, v), "gate": decision.gate()}
