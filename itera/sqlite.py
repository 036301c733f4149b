"""The SQLite plumbing of itera's databases, the registry's storage and the feedback store:
opening a file (busy timeout, WAL, foreign keys, durability), telling which kind of itera
database it is, migrating its schema by ``PRAGMA user_version``, and write transactions
(``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK``).

Which database a file is: the registry and the feedback store are both SQLite files that users
pass by path, so one can be given where the other belongs; each kind is marked with its own
``PRAGMA application_id`` when it is created (files made before the mark are told apart by their
tables), and the wrong kind is refused when it is opened, before anything is migrated or written
into it.

The callers word what goes wrong: sqlite3's errors come out of here as they are, so that each
store says "registry …" or "feedback store …" and names its own option.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence

from itera.errors import InputError
from itera.paths import state_dir

# kind: (application_id, a table only that kind has, what it is called, the option that takes it)
KINDS = {
    "registry": (0x69745247, "versions", "an itera registry", "--registry"),  # 'itRG'
    "feedback": (0x69744642, "responses", "an itera feedback store", "--feedback-db"),  # 'itFB'
}


def check_kind(db: sqlite3.Connection, path: Path, kind: str) -> None:
    """Refuse ``path`` (open as ``db``) unless it is empty or a database of ``kind``."""
    app_id, _, name, option = KINDS[kind]
    (found_id,) = db.execute("PRAGMA application_id").fetchone()
    if found_id == app_id:
        return
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    other = next((k for k, (i, table, _, _) in KINDS.items() if found_id == i or (found_id == 0 and table in tables)),
                 None)
    if other == kind:
        return  # made before the mark
    if other is not None:
        what, their = KINDS[other][2], KINDS[other][3]
        raise InputError(f"{path} is {what}, not {name}; pass it with {their}, and give {option} the {kind} file")
    if found_id != 0:
        raise InputError(f"{path} is another application's SQLite file (application_id {found_id:#x}), not {name}; "
                         f"pass another {option} path")
    if tables:
        raise InputError(f"{path} is a SQLite database of something else (tables: {', '.join(sorted(tables)[:5])}), "
                         f"not {name}; pass another {option} path")


def mark_kind(db: sqlite3.Connection, kind: str) -> None:
    """Set the file's application_id to ``kind``'s (inside the transaction that creates its tables)."""
    db.execute(f"PRAGMA application_id = {KINDS[kind][0]}")


def schema_version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return version


@contextlib.contextmanager
def write(db: sqlite3.Connection, keep: tuple[type[BaseException], ...] = (),
          begin_failed: Callable[[sqlite3.OperationalError], NoReturn] | None = None) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE`` takes the write lock before the first read, so
    what the block reads no other writer can change before it writes (others wait up to the busy
    timeout). It commits when the block ends normally or raises one of ``keep`` (a refusal whose
    audit row must stay); anything else rolls back. ``begin_failed`` words a failed BEGIN (busy)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        if begin_failed is None:
            raise
        begin_failed(e)
        raise
    try:
        yield db
    except keep:
        db.execute("COMMIT")
        raise
    except BaseException:
        db.execute("ROLLBACK")
        raise
    else:
        db.execute("COMMIT")


def migrate(db: sqlite3.Connection, migrations: Sequence[str], kind: str) -> None:
    """Apply the migrations the file has not had (``PRAGMA user_version`` counts them), all in one
    write, and mark the file as ``kind``. A file that is up to date is not written to."""
    if schema_version(db) >= len(migrations):
        return
    with write(db):
        current = schema_version(db)  # re-read under the lock: another process may have migrated it
        for i in range(current, len(migrations)):
            # execute() per statement: executescript() would COMMIT the open transaction first.
            for statement in filter(str.strip, migrations[i].split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {i + 1}")
        if current < len(migrations):
            mark_kind(db, kind)


def connect(path: Path, kind: str, migrations: Sequence[str], *, timeout_s: float, synchronous: str,
            newer: Callable[[int, int], str], threads: bool = False,
            older: Callable[[int, int], str] | None = None) -> sqlite3.Connection:
    """Open (creating where needed) ``path`` as a database of ``kind``, migrated to the last of
    ``migrations``, rows as :class:`sqlite3.Row`.

    In order: the directory (:func:`itera.paths.state_dir`); the busy timeout; the kind check,
    before anything is written; a schema newer than ``migrations`` refused with the message
    ``newer(found, known)``; WAL journaling (SQLite falls back by itself where the file system
    cannot), foreign keys, ``synchronous`` (``NORMAL`` or ``FULL``); the migrations. ``threads``:
    the connection may be used from other threads (the caller serialises them). ``older``: a file
    made by an older itera (schema above 0, below the last) is refused with the message
    ``older(found, known)`` instead of migrated, so that only an explicit command upgrades it (a new
    file is created at the last schema either way).

    Whatever fails closes the connection first (a refused file is left without -wal/-shm beside
    it); InputError for the kind and the schema version, sqlite3's errors as they are."""
    state_dir(path.parent)
    db = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=not threads)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        check_kind(db, path, kind)  # not another itera database, nor anything else
        found = schema_version(db)
        if found > len(migrations):
            raise InputError(newer(found, len(migrations)))
        if older is not None and 0 < found < len(migrations):
            raise InputError(older(found, len(migrations)))
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        migrate(db, migrations, kind)
    except BaseException:
        db.close()
        raise
    db.row_factory = sqlite3.Row
    return db
