"""The PostgreSQL plumbing of itera's team databases (the registry's PostgreSQL backend), as
:mod:`itera.sqlite` is for the local files: telling a PostgreSQL URL from a path, masking its
password wherever it is echoed, connecting with errors worded for the person at the terminal,
versioned schema migrations, and write transactions that hold a lock from their first statement.

Where the tables live: in the schema ``itera`` of the database the URL names (created with the
first itera tables), so that itera can share a database with other tools (MLflow's tables are
called ``tags`` too). ``itera.schema_versions`` holds one row per kind of itera database kept
there (``registry``), its schema version: the count of migrations applied, as ``PRAGMA
user_version`` counts them in SQLite.

Credentials come from wherever libpq takes them: the URL, ``PGPASSWORD``, ``~/.pgpass``, a
service file (``postgresql:///?service=team``). itera never prints a password and never stores a
URL with one: :func:`mask` replaces it with ``***`` in everything a person or a record sees.

psycopg is imported when a connection is opened, not before: ``itera registry list`` on SQLite
does not load it.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator, Sequence
from urllib.parse import quote

from itera.errors import InputError

SCHEMES = ("postgresql", "postgres")
SCHEMA = "itera"
CONNECT_TIMEOUT_S = int(os.environ.get("ITERA_PG_CONNECT_S", "10"))
# pg_advisory_xact_lock keys, one per kind (every write transaction of that kind that must see no
# other writer takes it first), as the SQLite files' application_ids; and one that every migration takes
LOCK_KEYS = {"registry": 0x69745247, "feedback": 0x69744642}  # 'itRG', 'itFB'
MIGRATION_LOCK = 0x69744D47  # 'itMG' 
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(text: str) -> str | None:
    """The scheme of ``text`` when it is written as a URL (``postgresql``, ``sqlite``, ``s3``…),
    else None (a path)."""
    m = _URL_SCHEME.match(str(text))
    return m.group(1).lower() if m else None


def is_url(text: object) -> bool:
    return isinstance(text, str) and url_scheme(text) in SCHEMES


_AUTH_SECRET = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*:)([^/?#]*)(@)")  # to the authority's last @
_QUERY_SECRET = re.compile(r"([?&][^=&#]*password[^=&#]*=)([^&#]*)", re.IGNORECASE)


def mask(url: str) -> str:
    """``url`` with its password (in the authority, or any ``…password…=`` parameter: ``password``,
    ``sslpassword``) as ``***``; everything else exactly as written (``postgresql:///db`` stays so)."""
    url = _AUTH_SECRET.sub(lambda m: m.group(1) + "***" + m.group(3), str(url))
    return _QUERY_SECRET.sub(lambda m: m.group(1) + "***", url)


def check_location(text: object, what: str, option: str) -> None:
    """Refuse, in one line with the password masked, a location that is written as a URL of a
    scheme itera does not read (``mysql://``, a mistyped ``postgresq://``), or that looks like a
    libpq keyword string (``host=db password=…``): taken for a file path, it would be created, and
    printed."""
    if not isinstance(text, str):
        return
    scheme = url_scheme(text)
    if scheme is not None and scheme not in (*SCHEMES, "sqlite"):
        raise InputError(f"{what} URL {mask(text)} has an unknown scheme {scheme!r}; pass a file path, "
                         "sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE")
    if scheme is None and re.search(r"(^|\s)(host|dbname|user|password|service)=", text):
        shown = re.sub(r"(password=)\S*", r"\1***", text)
        raise InputError(f"{option} {shown!r} looks like a libpq connection string; pass it as a URL, "
                         "postgresql://USER@HOST:PORT/DATABASE (the password from PGPASSWORD or ~/.pgpass)")


def _password(url: str) -> str | None:
    m = _AUTH_SECRET.match(url)
    if m:
        return m.group(2)
    q = _QUERY_SECRET.search(url)
    return q.group(2) if q else None


def _first_line(e: BaseException, url: str) -> str:
    """libpq's message, its first line, with nothing of the password in it."""
    text = " ".join(str(e).split("\n")[:1]).strip().rstrip(".")
    secret = _password(url)
    if secret:
        text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def connect_error(url: str, e: BaseException, what: str, option: str) -> InputError:
    """One line about a connection that failed, naming the masked URL and the fix."""
    shown, msg = mask(url), _first_line(e, url)
    low = msg.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        fix = "check the password (in the URL, PGPASSWORD or ~/.pgpass)"
        return InputError(f"PostgreSQL at {shown} refused the credentials ({msg}); {fix}")
    if "does not exist" in low and "database" in low:
        return InputError(f"{what} {shown}: {msg}; create the database (createdb) or pass another {option} URL")
    if "invalid" in low and ("dsn" in low or "uri" in low or "connection option" in low or "conninfo" in low):
        return InputError(f"{what} URL {shown} is not a valid PostgreSQL URL ({msg}); "
                          "use postgresql://USER@HOST:PORT/DATABASE")
    return InputError(f"cannot reach {what} {shown} ({msg}); check the host and port in {option}, and that the "
                      "PostgreSQL server is running and accepts connections from here")


def connect(url: str, kind: str, what: str, option: str, lock_timeout_s: float):
    """An autocommit connection to ``url`` (rows as dicts, ``search_path`` the itera schema),
    or InputError saying why not (unreachable, wrong password, no such database, a bad URL)."""
    import psycopg
    from psycopg.rows import dict_row

    kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row, "application_name": "itera"}
    if "connect_timeout" not in url:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        con = psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as e:
        raise connect_error(url, e, what, option) from None
    except (psycopg.ProgrammingError, psycopg.InterfaceError, ValueError) as e:
        raise InputError(f"{what} URL {mask(url)} is not a valid PostgreSQL URL ({_first_line(e, url)}); "
                         "use postgresql://USER@HOST:PORT/DATABASE") from None
    try:
        con.execute(f"SET search_path TO {SCHEMA}")
        con.execute(f"SET lock_timeout = '{max(1, int(lock_timeout_s * 1000))}ms'")  # 0 would wait forever
    except psycopg.Error as e:
        con.close()
        raise connect_error(url, e, what, option) from None
    return con


def schema_version(con, kind: str) -> int | None:
    """The schema version of ``kind`` in this database: None when it holds no itera tables of
    that kind (0 is never stored)."""
    row = con.execute("SELECT to_regclass(%s) AS t", (f"{SCHEMA}.schema_versions",)).fetchone()
    if row["t"] is None:
        return None
    row = con.execute("SELECT version FROM schema_versions WHERE kind = %s", (kind,)).fetchone()
    return row["version"] if row else None


@contextlib.contextmanager
def write(con, kind: str, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """One write transaction that first takes ``kind``'s advisory lock: writers queue on it (up to
    ``lock_timeout``) as SQLite's ``BEGIN IMMEDIATE`` makes them, so what the block reads no other
    writer changes before it writes. It commits when the block ends normally or raises one of
    ``keep`` (a refusal whose audit row must stay); anything else rolls back."""
    kept: BaseException | None = None
    with con.transaction():
        con.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEYS[kind],))
        try:
            yield
        except keep as e:
            kept = e
    if kept is not None:
        raise kept


def migrate(con, kind: str, migrations: Sequence[str]) -> tuple[int | None, int]:
    """Create the itera schema where needed and apply the migrations of ``kind`` this database
    has not had, in one transaction; (version before, version after)."""
    with con.transaction():
        con.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))  # first: two creators queue
        if con.execute("SELECT to_regnamespace(%s) AS s", (SCHEMA,)).fetchone()["s"] is None:
            con.execute(f"CREATE SCHEMA {SCHEMA}")  # a role with CREATE on the schema only need not create it
        con.execute("CREATE TABLE IF NOT EXISTS schema_versions (kind TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        before = schema_version(con, kind)
        for i in range((before or 0), len(migrations)):
            for statement in filter(str.strip, migrations[i].split(";")):
                con.execute(statement)
        if (before or 0) < len(migrations):
            con.execute("INSERT INTO schema_versions (kind, version) VALUES (%s, %s) ON CONFLICT (kind) "
                        "DO UPDATE SET version = excluded.version", (kind, len(migrations)))
    return before, len(migrations)


def lost(url: str, e: BaseException, what: str) -> InputError:
    """A connection that broke mid-command (the server restarted or went away): nothing of the
    open transaction was committed."""
    return InputError(f"lost the connection to {what} {mask(url)} ({_first_line(e, url)}); nothing of this "
                      "command was committed: run it again")


def errors() -> tuple[type[BaseException], type[BaseException]]:
    """(psycopg.OperationalError, psycopg.errors.LockNotAvailable), imported when needed."""
    import psycopg
    from psycopg import errors as pg_errors

    return psycopg.OperationalError, pg_errors.LockNotAvailable


def refused(url: str, e: BaseException, what: str) -> InputError:
    """The database refused a statement (no privilege on the schema, a constraint): one line."""
    return InputError(f"{what} {mask(url)} refused the change ({_first_line(e, url)}); check the role's "
                      f"privileges on the schema {SCHEMA} (CREATE and USAGE), or ask the database's owner")

