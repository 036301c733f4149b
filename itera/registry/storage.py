"""Where the registry keeps its versions, tags, aliases and audit log: the interface a backend
implements (:class:`RegistryStorage`), the SQLite one (:class:`SQLiteStorage`, a local file, the
default) and the PostgreSQL one (:class:`PostgresStorage`, a team's database), which run the same
SQL (:class:`_SQLStorage`); :func:`open_storage` picks one from a path or URL.

A backend stores and fetches; it decides nothing (that is :mod:`itera.registry.policy`) and
validates nothing (names and refs are checked before they get here). Values reach SQL only as
bound parameters. JSON-valued fields (params, metrics, lineage, record, an event's detail) go in
and come out as Python objects; how they are kept is the backend's business.

Concurrency: everything a caller does inside :meth:`RegistryStorage.transaction` is one write
transaction that holds the write lock from its first statement, so a version number read there
is still the highest when the next one is inserted, and an alias read there is still where it
was when it is moved. Nested transactions join the open one.

``schema_found`` of a backend is the schema version it found when it was opened (None: a new,
empty registry), before anything was migrated: what ``itera registry migrate`` reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol, TypedDict

from itera import sqlite
from itera.errors import InputError
from itera.paths import itera_home

BUSY_TIMEOUT_S = float(os.environ.get("ITERA_REGISTRY_BUSY_S", "30"))

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
    # 2: who changed what and why (events.actor, events.reason: NULL in events logged before), and
    # archived versions (hidden from `list`, kept on disk and in the database)
    """
    ALTER TABLE events ADD COLUMN actor TEXT;
    ALTER TABLE events ADD COLUMN reason TEXT;
    ALTER TABLE versions ADD COLUMN archived_at TEXT;
    ALTER TABLE versions ADD COLUMN archived_by TEXT;
    ALTER TABLE versions ADD COLUMN archived_reason TEXT;
    """,
    # 3: the artifact store a version's bytes were copied into (NULL: the registered local path only)
    """
    ALTER TABLE versions ADD COLUMN store TEXT;
    """,
]


def default_path() -> Path:
    return itera_home() / "registry.db"


class NewVersion(TypedDict):
    """A version to insert: the artifact (path, kind, format, bytes, sha256) and what is known of it."""

    name: str
    version: int
    path: str
    kind: str
    format: str
    bytes: int
    sha256: str
    quantization: str | None
    params: dict
    metrics: dict[str, float]
    lineage: list[dict]
    record: dict | None
    git_commit: str | None
    created_at: str
    store: str | None  # the artifact store (file://…) holding a copy of the bytes; None: only ``path``


class Archived(TypedDict):
    """When a version was archived, by whom and why."""

    at: str
    by: str | None
    reason: str | None


class Version(NewVersion):
    """A stored version, with its tags, the aliases that point at it (sorted) and whether it is
    archived (None: it is not)."""

    tags: dict[str, str]
    aliases: list[str]
    archived: Archived | None


class Event(TypedDict):
    """One entry of the audit log."""

    id: int
    name: str
    version: int | None
    event: str
    ok: bool
    detail: dict[str, Any]
    at: str
    actor: str | None  # who: ITERA_ACTOR or the OS user (None in events logged before itera recorded it)
    reason: str | None  # why, as given with --reason


class RegistryStorage(Protocol):
    """What the registry needs of a backend. ``path`` is where it is, as messages and records name it."""

    path: Path | str

    def close(self) -> None: ...

    def migrate(self) -> None:
        """Bring the schema up to date (opening does; again, it changes nothing)."""

    def transaction(self, commit_on: tuple[type[BaseException], ...] = ()) -> ContextManager[None]:
        """One write transaction holding the write lock from its start; nested calls join the open
        one. It commits when the block ends normally or raises one of ``commit_on`` (a refusal whose
        audit event must stay); anything else rolls back."""

    def has_name(self, name: str) -> bool: ...

    def latest_version(self, name: str) -> int | None:
        """The highest version of ``name`` (None: it has none)."""

    def version(self, name: str, version: int) -> Version | None: ...

    def version_with_sha256(self, name: str, sha256: str) -> int | None:
        """The first version of ``name`` holding these bytes."""

    def versions(self, name: str | None = None, tags: dict[str, str] | None = None, fmt: str | None = None,
                 quantization: str | None = None, archived: bool = False) -> list[Version]:
        """The versions that match every filter given, by name then version; archived ones only
        with ``archived``."""

    def insert_version(self, row: NewVersion, tags: dict[str, str]) -> None: ...

    def alias(self, name: str, alias: str) -> int | None: ...

    def set_alias(self, name: str, alias: str, version: int, at: str) -> None: ...

    def remove_alias(self, name: str, alias: str) -> None: ...

    def set_tag(self, name: str, version: int, key: str, value: str) -> None: ...

    def remove_tag(self, name: str, version: int, key: str) -> None: ...

    def set_store(self, name: str, version: int, store: str) -> None:
        """Record the artifact store that now holds a version's bytes."""

    def set_archived(self, name: str, version: int, archived: Archived | None) -> None:
        """Archive a version (``archived``: when, by whom, why) or bring it back (None)."""

    def add_event(self, name: str, version: int | None, event: str, ok: bool, detail: dict[str, Any],
                  at: str, actor: str | None = None, reason: str | None = None) -> None: ...

    def events(self, name: str) -> list[Event]:
        """The audit log of ``name``, oldest first."""

    def integrity_ok(self) -> bool: ...


class _SQLStorage:
    """What both backends share: the SQL of reads and writes (the same statements run on SQLite and
    PostgreSQL; ``?`` placeholders, which :meth:`_rows` of each backend binds its own way), and
    nested transactions joining the open one (:meth:`_write` is each backend's own)."""

    _depth = 0

    def _write(self, commit_on: tuple[type[BaseException], ...]) -> ContextManager[None]:
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self, commit_on: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        if self._depth:  # join the open transaction
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._write(commit_on):
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0

    def _rows(self, sql: str, args: tuple | list = ()) -> list[dict]:
        raise NotImplementedError

    def _one(self, sql: str, args: tuple | list = ()) -> dict | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    # ------------------------------------------------------------------ reads

    def _versions(self, rows: list[dict]) -> list[Version]:
        """Rows of ``versions`` as :class:`Version` s, their tags and aliases read in one query each
        (not two per row: on PostgreSQL every query is a round trip)."""
        if not rows:
            return []
        names = sorted({r["name"] for r in rows})
        where, args = ("WHERE name = ?", (names[0],)) if len(names) == 1 else ("", ())
        # sorted here, not by ORDER BY: PostgreSQL would use the database's collation, SQLite byte order
        tags: dict[tuple, dict[str, str]] = {}
        for t in sorted(self._rows(f"SELECT name, version, key, value FROM tags {where}", args), key=lambda t: t["key"]):
            tags.setdefault((t["name"], t["version"]), {})[t["key"]] = t["value"]
        aliases: dict[tuple, list[str]] = {}
        for a in sorted(self._rows(f"SELECT name, version, alias FROM aliases {where}", args), key=lambda a: a["alias"]):
            aliases.setdefault((a["name"], a["version"]), []).append(a["alias"])
        out = []
        for row in sorted(rows, key=lambda r: (r["name"], r["version"])):
            d = dict(row)
            at, by, why = d.pop("archived_at"), d.pop("archived_by"), d.pop("archived_reason")
            for k in ("params", "metrics", "lineage", "record"):
                d[k] = json.loads(d[k]) if d[k] is not None else None
            d["tags"] = tags.get((d["name"], d["version"]), {})
            d["aliases"] = aliases.get((d["name"], d["version"]), [])
            d["archived"] = {"at": at, "by": by, "reason": why} if at is not None else None
            out.append(d)
        return out  # type: ignore[return-value]

    def has_name(self, name: str) -> bool:
        return self._one("SELECT 1 AS one FROM versions WHERE name = ? LIMIT 1", (name,)) is not None

    def latest_version(self, name: str) -> int | None:
        return self._one("SELECT MAX(version) AS v FROM versions WHERE name = ?", (name,))["v"]

    def version(self, name: str, version: int) -> Version | None:
        rows = self._rows("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version))
        return self._versions(rows)[0] if rows else None

    def version_with_sha256(self, name: str, sha256: str) -> int | None:
        return self._one("SELECT MIN(version) AS v FROM versions WHERE name = ? AND sha256 = ?", (name, sha256))["v"]

    def versions(self, name: str | None = None, tags: dict[str, str] | None = None, fmt: str | None = None,
                 quantization: str | None = None, archived: bool = False) -> list[Version]:
        sql, args = "SELECT * FROM versions WHERE 1 = 1", []
        if not archived:
            sql += " AND archived_at IS NULL"
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
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
        return self._versions(self._rows(sql + " ORDER BY name, version", args))

    def alias(self, name: str, alias: str) -> int | None:
        row = self._one("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias))
        return row["version"] if row else None

    def events(self, name: str) -> list[Event]:
        rows = self._rows("SELECT * FROM events WHERE name = ? ORDER BY id", (name,))
        return [{**dict(r), "ok": bool(r["ok"]), "detail": json.loads(r["detail"])} for r in rows]  # type: ignore[misc]

    # ------------------------------------------------------------------ writes (inside transaction())

    def insert_version(self, row: NewVersion, tags: dict[str, str]) -> None:
        self._rows(
            "INSERT INTO versions (name, version, path, kind, format, bytes, sha256, quantization, params, "
            "metrics, lineage, record, git_commit, created_at, store) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row["name"], row["version"], row["path"], row["kind"], row["format"], row["bytes"], row["sha256"],
             row["quantization"], json.dumps(row["params"]), json.dumps(row["metrics"]), json.dumps(row["lineage"]),
             json.dumps(row["record"]) if row["record"] is not None else None, row["git_commit"], row["created_at"],
             row.get("store")))
        for k, v in tags.items():
            self._rows("INSERT INTO tags (name, version, key, value) VALUES (?, ?, ?, ?)",
                       (row["name"], row["version"], k, v))

    def set_alias(self, name: str, alias: str, version: int, at: str) -> None:
        self._rows(
            "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (name, alias, version, at))

    def remove_alias(self, name: str, alias: str) -> None:
        self._rows("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))

    def set_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._rows("INSERT INTO tags (name, version, key, value) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (name, version, key) DO UPDATE SET value = excluded.value",
                   (name, version, key, value))

    def remove_tag(self, name: str, version: int, key: str) -> None:
        self._rows("DELETE FROM tags WHERE name = ? AND version = ? AND key = ?", (name, version, key))

    def set_store(self, name: str, version: int, store: str) -> None:
        self._rows("UPDATE versions SET store = ? WHERE name = ? AND version = ?", (store, name, version))

    def set_archived(self, name: str, version: int, archived: Archived | None) -> None:
        a = archived or {"at": None, "by": None, "reason": None}
        self._rows("UPDATE versions SET archived_at = ?, archived_by = ?, archived_reason = ? "
                   "WHERE name = ? AND version = ?", (a["at"], a["by"], a["reason"], name, version))

    def add_event(self, name: str, version: int | None, event: str, ok: bool, detail: dict[str, Any],
                  at: str, actor: str | None = None, reason: str | None = None) -> None:
        self._rows("INSERT INTO events (name, version, event, ok, detail, at, actor, reason) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (name, version, event, int(ok), json.dumps(detail, sort_keys=True), at, actor, reason))


class SQLiteStorage(_SQLStorage):
    """The registry in one SQLite file (:mod:`itera.sqlite`: WAL where the file system allows it,
    ``BEGIN IMMEDIATE`` writes, schema migrations by ``user_version``). ``create=False`` refuses a
    file that does not exist: the reading commands never create a registry. A registry of an
    older schema is refused with the command that upgrades it, unless ``upgrade`` (``itera
    registry migrate``): no command migrates one as a side effect."""

    def __init__(self, path: Path | None = None, busy_timeout_s: float | None = None, create: bool = True,
                 upgrade: bool = False):
        self.path = Path(path) if path is not None else default_path()
        self.busy_timeout_s = BUSY_TIMEOUT_S if busy_timeout_s is None else busy_timeout_s
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"registry path {self.path} is a directory; pass a file path with --registry")
        if not create and not self.path.exists():
            raise InputError(f"registry {self.path} does not exist; pass --registry PATH (or ITERA_REGISTRY) of an "
                             "existing one: only register, activate, mark-good, promote and rollback create one")
        self.schema_found = self._schema_on_disk()
        try:
            self.db = sqlite.connect(
                self.path, "registry", MIGRATIONS, timeout_s=self.busy_timeout_s, synchronous="NORMAL",
                newer=lambda found, known: f"registry {self.path} was created by a newer itera (schema version "
                                           f"{found}; this itera knows {known}); upgrade itera or pass another "
                                           "--registry",
                older=None if upgrade else (
                    lambda found, known: f"registry {self.path} has schema version {found} and this itera uses "
                                         f"{known}: run `itera registry migrate --registry {self.path}` once "
                                         "(older itera versions cannot open it afterwards)"))
        except sqlite3.OperationalError as e:
            self._busy_or_corrupt(e)
        except sqlite3.DatabaseError as e:
            raise InputError(f"registry {self.path} is not a usable SQLite database ({e}); "
                             "pass another --registry path") from None

    def _schema_on_disk(self) -> int | None:
        """The file's schema version before opening it migrates anything (None: no such file, or
        not one SQLite reads; opening it says what is wrong)."""
        if not self.path.is_file():
            return None
        try:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return con.execute("PRAGMA user_version").fetchone()[0] or None
            finally:
                con.close()
        except sqlite3.DatabaseError:
            return None

    def close(self) -> None:
        self.db.close()

    def migrate(self) -> None:
        try:
            sqlite.migrate(self.db, MIGRATIONS, "registry")
        except sqlite3.OperationalError as e:
            self._busy_or_corrupt(e)

    def _busy_or_corrupt(self, e: sqlite3.OperationalError):
        if "locked" in str(e) or "busy" in str(e):
            raise InputError(f"registry {self.path} is busy: another process held it locked for more than "
                             f"{self.busy_timeout_s:g} s; try again") from None
        raise InputError(f"registry {self.path} is not a usable SQLite database ({e}); "
                         "pass another --registry path") from None

    def _write(self, commit_on: tuple[type[BaseException], ...]) -> ContextManager[None]:
        return sqlite.write(self.db, keep=commit_on, begin_failed=self._busy_or_corrupt)

    def _rows(self, sql: str, args: tuple | list = ()) -> list[dict]:
        return self.db.execute(sql, args).fetchall()

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# The same schema, version for version, in PostgreSQL's types: artifact sizes past 2 GB need BIGINT,
# an identity column is PostgreSQL's AUTOINCREMENT. Derived, so the two cannot drift apart.
def _pg_ddl(sql: str) -> str:
    return (sql.replace("bytes INTEGER", "bytes BIGINT")
               .replace("id INTEGER PRIMARY KEY AUTOINCREMENT", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"))


PG_MIGRATIONS = [_pg_ddl(m) for m in MIGRATIONS]
PG_MIGRATIONS[0] += "; CREATE INDEX versions_by_sha256 ON versions(name, sha256)"
assert len(PG_MIGRATIONS) == len(MIGRATIONS), "a schema version means the same on both backends"


class PostgresStorage(_SQLStorage):
    """The registry in a PostgreSQL database (``postgresql://USER@HOST:PORT/DB``), its tables in the
    schema ``itera`` (:mod:`itera.pg`). A team's CI runners and laptops share it: every write
    transaction first takes the registry's advisory lock, so versions count 1, 2, 3… with no gaps
    or duplicates and an alias read in a transaction is where it was when it is moved, as on SQLite.

    ``create=False`` refuses a database with no registry in it (the reading commands); a writer
    creates the tables in an empty database. One of an older schema is refused with the command
    that upgrades it unless ``upgrade``. ``path`` is the URL with its password masked: what
    messages, records and events show."""

    def __init__(self, url: str, busy_timeout_s: float | None = None, create: bool = True, upgrade: bool = False):
        from itera import pg

        self.url = url
        self.path = pg.mask(url)
        self.busy_timeout_s = BUSY_TIMEOUT_S if busy_timeout_s is None else busy_timeout_s
        self._errors = pg.errors()
        import psycopg

        self._psycopg_error = psycopg.Error
        self.con = pg.connect(url, "registry", "registry", "--registry", self.busy_timeout_s)
        try:
            self.schema_found = self._guard(lambda: pg.schema_version(self.con, "registry"))
            found, known = self.schema_found, len(PG_MIGRATIONS)
            if found is None and not (create or upgrade):
                raise InputError(f"registry {self.path} holds no itera registry yet; register a version there first "
                                 f"(or run `itera registry migrate --registry URL` to create its tables)")
            if found is not None and found > known:
                raise InputError(f"registry {self.path} was created by a newer itera (schema version {found}; this "
                                 f"itera knows {known}); upgrade itera or pass another --registry")
            if found is not None and found < known and not upgrade:
                raise InputError(f"registry {self.path} has schema version {found} and this itera uses {known}: "
                                 "run `itera registry migrate --registry URL` once (older itera versions cannot "
                                 "use it afterwards)")
            if found is None or found < known:
                self.migrate()
        except BaseException:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    @contextlib.contextmanager
    def _one_line(self) -> Iterator[None]:
        """A broken connection, a lock wait past the busy timeout or a statement the database
        refused, as one line (InputError)."""
        from itera import pg

        operational, lock_timeout = self._errors
        try:
            yield
        except lock_timeout:
            raise InputError(f"registry {self.path} is busy: another writer held it for more than "
                             f"{self.busy_timeout_s:g} s; try again") from None
        except operational as e:
            raise pg.lost(self.url, e, "registry") from None
        except self._psycopg_error as e:  # a privilege the role lacks, a constraint: one line, not a traceback
            raise pg.refused(self.url, e, "registry") from None

    def _guard(self, fn):
        with self._one_line():
            return fn()

    def migrate(self) -> None:
        from itera import pg

        self._guard(lambda: pg.migrate(self.con, "registry", PG_MIGRATIONS))

    def _rows(self, sql: str, args: tuple | list = ()) -> list[dict]:
        def run():
            cur = self.con.execute(sql.replace("?", "%s"), args)
            return cur.fetchall() if cur.description is not None else []
        return self._guard(run)

    @contextlib.contextmanager
    def _write(self, commit_on: tuple[type[BaseException], ...]) -> Iterator[None]:
        from itera import pg

        with self._one_line(), pg.write(self.con, "registry", keep=commit_on):
            yield

    def integrity_ok(self) -> bool:
        """PostgreSQL keeps its own pages consistent; what is checked here is that every alias and
        tag points at a version (the foreign keys say so too)."""
        return self._one("SELECT COUNT(*) AS n FROM aliases a LEFT JOIN versions v ON v.name = a.name AND "
                         "v.version = a.version WHERE v.name IS NULL")["n"] == 0


def sqlite_path(location: str | Path | None) -> Path | None:
    """The SQLite file ``location`` names (the default one for None), or None for a PostgreSQL URL.
    Other schemes are left to :func:`open_storage` to refuse."""
    from itera import pg

    if location is None:
        return default_path()
    text = str(location)
    scheme = pg.url_scheme(text) if isinstance(location, str) else None
    if scheme == "sqlite":
        return Path(text[len("sqlite://"):])
    return None if scheme is not None else Path(text)


def open_storage(location: str | Path | None = None, busy_timeout_s: float | None = None, create: bool = True,
                 upgrade: bool = False) -> RegistryStorage:
    """The backend ``location`` names: ``postgresql://…`` (or ``postgres://…``) a PostgreSQL
    database; ``sqlite:///abs/path`` or ``sqlite://rel/path`` or a plain path a SQLite file; None
    the default SQLite file. Any other URL scheme is refused."""
    from itera import pg

    if location is None:
        return SQLiteStorage(None, busy_timeout_s=busy_timeout_s, create=create, upgrade=upgrade)
    pg.check_location(location, "registry", "--registry")
    text = str(location)
    scheme = pg.url_scheme(text) if isinstance(location, str) else None
    if scheme in pg.SCHEMES:
        return PostgresStorage(text, busy_timeout_s=busy_timeout_s, create=create, upgrade=upgrade)
    if scheme == "sqlite":
        path = text[len("sqlite://"):]
        if not path:
            raise InputError(f"registry URL {text!r} names no file; use sqlite:///ABSOLUTE/PATH or sqlite://RELATIVE/PATH")
        return SQLiteStorage(Path(path), busy_timeout_s=busy_timeout_s, create=create, upgrade=upgrade)
    return SQLiteStorage(Path(text), busy_timeout_s=busy_timeout_s, create=create, upgrade=upgrade)
