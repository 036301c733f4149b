"""A model registry: versions with lineage, aliases (``active``, ``last-good``, and custom ones
such as ``staging``), tags, promotion gates, rollback and archiving, and an audit log of every
change that says who made it (``ITERA_ACTOR``, else the OS user) and why (``--reason``).

- :mod:`.refs` — model names and ``NAME@…`` references.
- :mod:`.storage` — where versions, tags, aliases and events are kept: the
  :class:`~.storage.RegistryStorage` interface and its SQLite and PostgreSQL backends (the only
  SQL; :mod:`itera.pg` connects to PostgreSQL).
- :mod:`.policy` — the decisions (metric directions, the promotion gate, rollback), pure functions.
- :mod:`.provenance` — what a record's parent chain says (metrics measured on an artifact, how).
- :mod:`.artifacts` — the files: what to register, whether a registered one is intact.
- :mod:`.store` — a content-addressed artifact store on a shared filesystem (``file://``): versions
  registered on one machine are fetched, checked byte for byte, into a local cache on another.
- :class:`Registry` here — reads rows, asks the policy, writes what it decided, logs it.

Concurrency: every change is one storage transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory lock taken first; one writer at a time, others wait up to ``busy_timeout``), so versions count 1, 2, 3… per name with no gaps
or duplicates however many processes register at once.

This package imports no torch: ``itera registry list/show/resolve`` start fast.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any

from itera.errors import InputError, IteraError, UsageError
from itera.record import utc_now
from itera.registry import policy
from itera.registry.integrity import git_commit, integrity_problem, registration
from itera.registry.policy import HIGHER_IS_BETTER, KEY_METRICS, LOWER_IS_BETTER, RefusedError, metric_direction
from itera.registry.provenance import (PROTOCOL_KEYS, evaluation_protocol, flatten_metrics, lineage,
                                       measured_metrics, quantization_of)
from itera.registry.refs import (ALIASES, MAX_VERSION, NAME_RE, VERSION_RE, Ref, is_alias, validate_alias,
                                 validate_name, validate_text)
from itera.registry.storage import (BUSY_TIMEOUT_S, MIGRATIONS, PostgresStorage, RegistryStorage, SQLiteStorage,
                                    Version, default_path, open_storage, sqlite_path)

__all__ = [
    "ALIASES", "BUSY_TIMEOUT_S", "HIGHER_IS_BETTER", "KEY_METRICS", "LOWER_IS_BETTER", "MAX_VERSION", "MIGRATIONS",
    "NAME_RE", "PROTOCOL_KEYS", "VERSION_RE", "Ref", "RefusedError", "Registry", "RegistryStorage", "SQLiteStorage", "PostgresStorage", "open_storage", "sqlite_path",
    "Version", "default_path", "evaluation_protocol", "flatten_metrics", "git_commit",
    "current_actor", "integrity_problem", "lineage", "measured_metrics", "metric_direction", "quantization_of",
    "registration", "validate_alias", "validate_name", "validate_text",
]


def current_actor() -> str:
    """Who is changing the registry, as events record it: ``ITERA_ACTOR`` when set (a CI job may
    name the pipeline or the person behind it), else the OS user name, else the user id."""
    env = os.environ.get("ITERA_ACTOR", "")
    if env:
        return validate_text(env, "ITERA_ACTOR")
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):  # no LOGNAME/USER and no passwd entry (a container's uid)
        user = ""
    try:
        return validate_text(user, "user name")
    except IteraError:
        return f"uid {os.getuid()}"


class Registry:
    """One registry. Every write is one transaction; a caller may hold one open around several
    steps with :meth:`transaction`, so that everything that can fail (building and serialising
    the record it will print) happens before the commit.

    ``path`` is a SQLite file (default ``$ITERA_HOME/registry.db``) or a URL: ``sqlite:///PATH``,
    ``postgresql://USER@HOST:PORT/DB`` (:func:`~.storage.open_storage`); ``create=False`` refuses
    one that does not exist (or a database with no registry in it); one of an older schema is
    refused unless ``upgrade`` (``itera registry migrate``). ``storage`` is another backend
    instead (:class:`RegistryStorage`)."""

    def __init__(self, path: Path | str | None = None, busy_timeout_s: float | None = None, create: bool = True,
                 storage: RegistryStorage | None = None, actor: str | None = None, upgrade: bool = False):
        self._actor = validate_text(actor, "actor") if actor is not None else None
        self._checked: dict[tuple, str | None] = {}  # check_ahead's verdicts, by (name, version, sha256)
        self.storage: RegistryStorage = storage if storage is not None else \
            open_storage(path, busy_timeout_s=busy_timeout_s, create=create, upgrade=upgrade)

    @property
    def actor(self) -> str:
        """Who the events this registry logs say made the change (:func:`current_actor` by default)."""
        if self._actor is None:
            self._actor = current_actor()
        return self._actor

    @property
    def path(self) -> Path | str:
        """Where the registry is: the SQLite file, or the PostgreSQL URL with its password masked."""
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

    def _event(self, name: str, version: int | None, event: str, ok: bool, *, why: str | None = None,
               **detail: Any) -> None:
        """Log an event with its actor and ``why`` (the --reason given; ``detail['reason']`` of a
        refusal is the registry's own reason for it)."""
        self.storage.add_event(name, version, event, ok, detail, utc_now(), actor=self.actor, reason=why)

    def _row(self, name: str, version: int) -> Version | None:
        return self.storage.version(name, version)

    def _set_alias(self, name: str, alias: str, version: int, event: str, *, why: str | None = None,
                   **detail: Any) -> None:
        before = self.alias(name, alias)
        self.storage.set_alias(name, alias, version, utc_now())
        self._event(name, version, event, True, why=why, alias=alias, previous=before, **detail)

    def local_path(self, row: Version, cache: Path | None = None) -> Path:
        """Where this machine reads ``row``'s artifact: its registered path, or for a version kept in
        an artifact store, its copy in the local cache (``$ITERA_HOME/cache/artifacts`` unless
        ``cache``), fetched when the cache does not hold it, every byte checked against its sha256
        (InputError when the store lost or altered it)."""
        if not row.get("store"):
            return Path(row["path"])
        from itera.registry.store import default_cache, open_store

        return open_store(row["store"]).fetch(row["sha256"], cache or default_cache())

    def local(self, row: Version) -> Version:
        """``row`` with ``path`` where this machine reads the artifact (:meth:`local_path`)."""
        return {**row, "path": str(self.local_path(row))} if row.get("store") else row

    def check_ahead(self, name: str, version: int | None) -> None:
        """Fetch and hash version ``version``'s artifact now, before a write transaction, which then
        takes this verdict while the version's row is unchanged: copying gigabytes from a store, or
        hashing them, must not hold the write lock every other writer waits on (PostgreSQL's
        ``lock_timeout``, SQLite's busy timeout)."""
        row = self._row(name, version) if version is not None else None
        if row is None or row["archived"]:
            return
        key = (name, version, row["sha256"])
        if key not in self._checked:
            self._checked[key] = self._integrity(f"{name}@{version}", row)

    def _integrity(self, label: str, row: Version) -> str | None:
        """Why ``row``'s artifact cannot be used here (:func:`integrity_problem`), for a stored
        version after fetching it from the store; None when it can. A verdict of
        :meth:`check_ahead` on the same row is taken (once)."""
        key = (row["name"], row["version"], row["sha256"])
        if key in self._checked:
            return self._checked.pop(key)
        if not row.get("store"):
            return integrity_problem(label, row)
        for attempt in (1, 2):  # a cached copy that no longer hashes right is fetched again, once
            try:
                local = self.local(row)
            except InputError as e:
                return str(e)
            problem = integrity_problem(label, local)
            if problem is None or attempt == 2:
                return problem
            from itera.registry.store import forget

            forget(Path(local["path"]))
        return problem

    def _usable(self, name: str, version: int, fix: str) -> Version:
        """Version ``version`` of ``name``, which an alias is about to point at: refused
        (InputError, nothing written) when it is archived or its artifact is gone or changed
        (:meth:`_integrity`, as rollback checks it); ``fix`` is the second half of what to do
        about a bad artifact ('activate the new version')."""
        row = self._row(name, version)
        label = f"{name}@{version}"
        integrity = None if row["archived"] else self._integrity(label, row)
        problem = policy.use_problem(label, row, integrity, fix)
        if problem is not None:
            raise InputError(problem)
        return row

    @staticmethod
    def _why(reason: str | None) -> str | None:
        return validate_text(reason, "--reason") if reason is not None else None

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
        if is_alias(sel):  # active, last-good or a custom one
            v = self.alias(ref.name, sel)
            if v is None:
                if sel in ALIASES:
                    raise InputError(f"{ref.name} has no {sel!r} version yet; see `itera registry history {ref.name}`")
                raise InputError(self._no_alias(ref.name, sel))
            return v
        v = int(sel)
        if self._row(ref.name, v) is None:
            raise InputError(f"{ref.name} has no version {v}; see `itera registry list --name {ref.name}`")
        return v

    def _no_alias(self, name: str, alias: str) -> str:
        """'demo has no alias 'actve'; did you mean 'active'? (its aliases: active, last-good)'."""
        import difflib

        have = sorted({a for v in self.storage.versions(name, archived=True) for a in v["aliases"]})
        close = difflib.get_close_matches(alias, have, n=1, cutoff=0.6)
        hint = f"; did you mean {name}@{close[0]}?" if close else ""
        listed = f" (its aliases: {', '.join(have)})" if have else " (it has no aliases)"
        return f"{name} has no alias {alias!r}{hint}{listed}; `itera registry alias {name}@V {alias}` sets one"

    def get(self, ref: Ref) -> dict:
        return self._row(ref.name, self.resolve_version(ref))

    def list(self, name: str | None = None, tags: dict[str, str] | None = None, fmt: str | None = None,
             quantization: str | None = None, archived: bool = False) -> list[dict]:
        """Versions matching every filter, by name then version; archived ones only with ``archived``."""
        if name is not None:
            validate_name(name)
        return self.storage.versions(name, tags, fmt, quantization, archived=archived)

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
                 commit: str | None = None, allow_duplicate: bool = False, reason: str | None = None,
                 store: str | None = None) -> dict:
        """Add the next version of ``name``. ``artifact`` must carry path, kind, format, bytes, sha256.
        ``store``: the URL of the artifact store the caller copied it into (:func:`~.store.put_artifact`,
        before the transaction: a copy of gigabytes must not hold the write lock); it must hold it.

        The same bytes registered again under the same name are that version, not a new one
        (``duplicate_of`` says which), unless ``allow_duplicate``."""
        validate_name(name)
        why = self._why(reason)
        if store is not None:
            from itera.registry.store import open_store

            if not open_store(store).has(artifact["sha256"]):
                raise InputError(f"store {store} does not hold {artifact['path']} (sha256 "
                                 f"{artifact['sha256'][:12]}…); copy it in first (itera registry register --store)")
        # Absolute, so `resolve` and rollback's checks work from any directory.
        artifact = {**artifact, "path": str(Path(artifact["path"]).resolve())}
        params = (record or {}).get("params") or {}
        metrics = measured_metrics(record, artifact["sha256"]) if record else {}
        with self.transaction():
            if not allow_duplicate:  # under the write lock: two registrations of the same bytes make one version
                first = self.storage.version_with_sha256(name, artifact["sha256"])
                if first is not None:
                    if store is not None and not self._row(name, first)["store"]:  # now reachable from anywhere
                        self.storage.set_store(name, first, store)
                        self._event(name, first, "store", True, why=why, store=store)
                    return {**self._row(name, first), "duplicate_of": first}
            version = self._next_version(name)
            self.storage.insert_version(
                {"name": name, "version": version, "path": artifact["path"], "kind": artifact["kind"],
                 "format": artifact["format"], "bytes": artifact["bytes"], "sha256": artifact["sha256"],
                 "quantization": quantization_of(record), "params": params, "metrics": metrics,
                 "lineage": lineage(record) if record else [], "record": record or None, "git_commit": commit,
                 "created_at": utc_now(), "store": store}, tags or {})
            self._event(name, version, "register", True, why=why, path=artifact["path"], sha256=artifact["sha256"],
                        **({"store": store} if store else {}))
        return self._row(name, version)

    def _point(self, ref: Ref, alias: str, event: str, fix: str, reason: str | None) -> dict:
        """Point ``alias`` of ``ref``'s model at it, logged as ``event``; refused (InputError,
        nothing written) when the version is archived or its artifact is gone or changed
        (:meth:`_usable`; ``fix`` is what to do then)."""
        why = self._why(reason)
        self.check_ahead(ref.name, self.resolve_version(ref))
        with self.transaction():
            v = self.resolve_version(ref)
            self._usable(ref.name, v, fix)
            self._set_alias(ref.name, alias, v, event, why=why)
        return self._row(ref.name, v)

    def activate(self, ref: Ref, reason: str | None = None) -> dict:
        """Point ``active`` at ``ref``; refused (InputError, nothing written) when that version is
        archived or its artifact is gone or changed."""
        return self._point(ref, "active", "activate", "activate the new version", reason)

    def mark_good(self, ref: Ref, reason: str | None = None) -> dict:
        """Point ``last-good`` at ``ref``: refused like :meth:`activate` (rollback would refuse it)."""
        return self._point(ref, "last-good", "mark-good", "mark the new version good", reason)

    def set_alias(self, ref: Ref, alias: str, reason: str | None = None) -> dict:
        """Point the custom alias ``alias`` (``staging``, ``canary``) of ``ref``'s model at it;
        refused like :meth:`activate`. ``active`` and ``last-good`` are not set here."""
        validate_alias(alias)
        return self._point(ref, alias, "alias", f"point {alias} at the new version", reason)

    def remove_alias(self, name: str, alias: str, reason: str | None = None) -> dict:
        """Remove the custom alias ``alias`` of ``name``; the version it pointed at is returned."""
        validate_name(name)
        validate_alias(alias)
        why = self._why(reason)
        with self.transaction():
            self._require(name)
            v = self.alias(name, alias)
            if v is None:
                raise InputError(f"{name} has no alias {alias!r}; see `itera registry list --name {name}`")
            self.storage.remove_alias(name, alias)
            self._event(name, v, "unalias", True, why=why, alias=alias, previous=v)
        return self._row(name, v)

    def tag(self, ref: Ref, set_: dict[str, str], remove: list[str] | None = None, reason: str | None = None) -> dict:
        """Set tags (``set_``, key to value) and remove others (``remove``) of one version, in one
        event; a removal of a tag the version lacks is refused before anything is written."""
        why = self._why(reason)
        with self.transaction():
            v = self.resolve_version(ref)
            row = self._row(ref.name, v)
            detail = policy.tag_edit(f"{ref.name}@{v}", row["tags"], set_, list(remove or []))
            for k, val in detail["set"].items():
                self.storage.set_tag(ref.name, v, k, val)
            for k in detail["removed"]:
                self.storage.remove_tag(ref.name, v, k)
            self._event(ref.name, v, "tag", True, why=why, **detail)
        return self._row(ref.name, v)

    def archive(self, ref: Ref, reason: str) -> dict:
        """Hide a version from :meth:`list` (nothing is deleted, on disk or here). Refused when it
        already is or an alias points at it (``active`` above all); ``reason`` is required."""
        if reason is None:
            raise UsageError("say why with --reason TEXT: the history keeps it")
        why = self._why(reason)
        with self.transaction():
            v = self.resolve_version(ref)
            row = self._row(ref.name, v)
            problem = policy.archive_problem(f"{ref.name}@{v}", row)
            if problem is not None:
                raise InputError(problem)
            at = utc_now()
            self.storage.set_archived(ref.name, v, {"at": at, "by": self.actor, "reason": why})
            self._event(ref.name, v, "archive", True, why=why)
        return self._row(ref.name, v)

    def unarchive(self, ref: Ref, reason: str | None = None) -> dict:
        """Bring an archived version back into :meth:`list`; it may be activated again."""
        why = self._why(reason)
        with self.transaction():
            v = self.resolve_version(ref)
            problem = policy.unarchive_problem(f"{ref.name}@{v}", self._row(ref.name, v))
            if problem is not None:
                raise InputError(problem)
            self.storage.set_archived(ref.name, v, None)
            self._event(ref.name, v, "unarchive", True, why=why)
        return self._row(ref.name, v)

    def rollback(self, name: str, to: int | None = None, reason: str | None = None) -> dict:
        """Point ``active`` at ``last-good`` (or at version ``to``) after checking its bytes.

        A refusal (no such version, no last-good, artifact missing or changed) records a
        ``rollback-refused`` event, leaves the aliases as they were and raises RefusedError.
        """
        policy.check_rollback_to(to)
        validate_name(name)
        why = self._why(reason)
        self.check_ahead(name, to if to is not None else self.alias(name, "last-good"))
        with self.transaction():
            self._require(name)
            if to is not None and self._row(name, to) is None:
                raise InputError(f"{name} has no version {to} to roll back to; see `itera registry list --name {name}`")
            target = to if to is not None else self.alias(name, "last-good")
            row = self._row(name, target) if target is not None else None
            problem = policy.rollback_problem(name, target, row, self._integrity(f"{name}@{target}", row)
                                              if row is not None and not row["archived"] else None)
            if problem is None:
                self._set_alias(name, "active", target, "rollback", why=why)
            else:  # the refusal is part of the audit log too
                self._event(name, target, "rollback-refused", False, why=why, reason=problem)
        if problem is not None:
            raise policy.rollback_refused(problem)
        return self._row(name, target)

    def promote(self, ref: Ref, metric: str | list[str], max_regression: float, direction: str | None = None,
                reason: str | None = None, preference: dict | None = None, baseline: Ref | None = None) -> dict:
        """Activate ``ref`` only if every gate in ``metric`` (one name or several) passes: a metric no
        worse than the active version's by more than the margin (:func:`policy.promotion_gate`), or
        ``preference``, what users preferred on held-out feedback, as measured beforehand against the
        active version (:func:`policy.preference_promotion`; ``preference`` holds the measurement).
        A refusal is logged as ``promote-refused`` and raises RefusedError. An archived candidate,
        or one whose artifact is gone or changed, is refused like :meth:`activate`. ``baseline``:
        the metric gates compare with that version of the same name instead of the active one."""
        metrics = [metric] if isinstance(metric, str) else list(metric)
        if baseline is not None and baseline.name != ref.name:
            raise UsageError(f"--baseline {baseline} is not a version of {ref.name}; pass {ref.name}@N")
        why = self._why(reason)
        self.check_ahead(ref.name, self.resolve_version(ref))
        with self.transaction():
            v = self.resolve_version(ref)
            candidate = self._usable(ref.name, v, "promote the new version")
            active = self.alias(ref.name, "active")
            base = None
            if baseline is not None:
                bv = self.resolve_version(baseline)
                base = (bv, self._row(ref.name, bv))
            decisions = []
            for m in metrics:
                if m == "preference":
                    measured = ((preference["candidate_version"], preference["active_version"]) if preference
                                else (v, None))
                    if measured != (v, active):  # another writer moved an alias while the gate was scoring
                        raise InputError(f"{ref.name}@active is version {active}, but the preference gate measured "
                                         f"version {measured[0]} against {measured[1] or 'no active version'}; "
                                         "nothing changed: promote again")
                    decisions.append(policy.preference_promotion(ref.name, v, active, preference))
                else:
                    decisions.append(policy.promotion_gate(ref.name, v, candidate, active,
                                                           self._row(ref.name, active) if active is not None else None,
                                                           m, max_regression, direction, base))
            decision = policy.combined(decisions)
            if decision.passed:
                self._set_alias(ref.name, "active", v, "promote", why=why, **decision.detail)
            else:
                self._event(ref.name, v, "promote-refused", False, why=why, reason=decision.refusal,
                            **decision.detail)
        if not decision.passed:
            raise decision.error()
        return {**self._row(ref.name, v), "gate": decision.gate()}

    def copy_from(self, source: "Registry") -> dict:
        """Copy every version of ``source`` (archived ones too) with its tags, aliases, archiving and
        audit log into this registry, in one transaction, version numbers kept; each name copied
        gets a ``copy`` event saying from where. Refused, with nothing written, when a name is in
        both: the histories would mix. Returns what was copied."""
        rows = source.storage.versions(archived=True)
        names = sorted({r["name"] for r in rows})
        with self.transaction():
            clash = [n for n in names if self.storage.has_name(n)]
            if clash:
                raise InputError(f"registry {self.path} already has {', '.join(clash[:5])}"
                                 f"{' …' if len(clash) > 5 else ''}; copy into a registry without those names "
                                 "(or rename them in the source first): itera does not merge two histories")
            n_events = 0
            for row in rows:
                new = {k: row[k] for k in ("name", "version", "path", "kind", "format", "bytes", "sha256",
                                           "quantization", "params", "metrics", "lineage", "record", "git_commit",
                                           "created_at", "store")}
                self.storage.insert_version(new, row["tags"])  # type: ignore[arg-type]
                if row["archived"]:
                    self.storage.set_archived(row["name"], row["version"], row["archived"])
            at = utc_now()
            for row in rows:
                for alias in row["aliases"]:
                    self.storage.set_alias(row["name"], alias, row["version"], at)
            for name in names:
                for e in source.storage.events(name):
                    self.storage.add_event(name, e["version"], e["event"], e["ok"], e["detail"], e["at"],
                                           actor=e["actor"], reason=e["reason"])
                    n_events += 1
                self._event(name, None, "copy", True, source=str(source.path))
        return {"names": names, "versions": len(rows), "events": n_events}

