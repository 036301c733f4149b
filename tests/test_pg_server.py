"""The throwaway PostgreSQL server the tests start (tests/pg.py, the postgres and pg_url fixtures):
password authentication over TCP, one database per test, a restart that keeps committed rows."""

from __future__ import annotations

import pytest


def test_connects_with_the_password(pg_url):
    import psycopg

    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.host == "127.0.0.1"  # TCP, where the password is checked
        assert conn.execute("SELECT current_user").fetchone() == ("itera",)


def test_a_wrong_password_is_refused(postgres, pg_url):
    import psycopg

    dbname = pg_url.rsplit("/", 1)[1]
    wrong = f"postgresql://{postgres.user}:not-the-password@{postgres.host}:{postgres.port}/{dbname}"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="no password supplied|password authentication failed"):
        psycopg.connect(postgres.url(dbname, password=False), connect_timeout=10, passfile="/dev/null")


def test_each_url_is_its_own_database(pg_url, postgres):
    import psycopg

    other = postgres.create_database()
    assert other != pg_url
    with psycopg.connect(pg_url, autocommit=True) as a, psycopg.connect(other, autocommit=True) as b:
        assert a.execute("SELECT current_database()").fetchone() != b.execute("SELECT current_database()").fetchone()
        a.execute("CREATE TABLE only_here (x int)")
        assert a.execute("SELECT to_regclass('only_here')").fetchone() == ("only_here",)
        assert b.execute("SELECT to_regclass('only_here')").fetchone() == (None,)


def test_restart_keeps_a_committed_row(postgres, pg_url):
    import psycopg

    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (x text)")
        conn.execute("INSERT INTO t VALUES ('kept')")
        conn.commit()
        conn.execute("INSERT INTO t VALUES ('never committed')")  # open when the server stops
        port = postgres.port
        postgres.restart()
        assert conn.closed or conn.broken or _fails(conn)  # the server did go away
    assert postgres.port == port
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [("kept",)]


def _fails(conn) -> bool:
    """Whether a statement on ``conn`` fails: the server it was connected to has gone."""
    import psycopg

    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False
