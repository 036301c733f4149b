"""The registry on real SQLite and a real PostgreSQL (the tests that take ``db`` run on both):
concurrency, crash safety, aliases, gates, rollback, lineage."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, assert_usage_error, file_key, make_record, run_itera
from itera.cli.registry import parse_margin
from itera.registry import MIGRATIONS, Ref, Registry, metric_direction
from itera.errors import UsageError


@pytest.fixture
def artifact(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF weights v1")  # the GGUF magic: registry takes only artifacts it can read
    return f


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """Where a test's registry is: a SQLite file, or a new database on the suite's PostgreSQL server
    (tests/pg.py). The tests that take it hold on both backends: one suite, not a copy."""
    if request.param == "sqlite":
        return tmp_path / "r.db"
    return request.getfixturevalue("pg_url")


def reg_cli(db, *args, stdin=None):
    return run_itera("registry", *args, "--registry", db, stdin=stdin)


def test_sixteen_concurrent_writers_get_versions_1_to_16(tmp_path, db):
    env = {**os.environ, "ITERA_REGISTRY": str(db)}
    arts = []
    for i in range(16):  # sixteen different artifacts: the same bytes twice may be one version
        arts.append(tmp_path / f"m{i}.gguf")
        arts[-1].write_bytes(f"GGUF weights {i}".encode())
    procs = [subprocess.Popen([sys.executable, "-m", "itera", "registry", "register", "--name", "same",
                               "--path", str(a), "--tag", f"writer={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
             for i, a in enumerate(arts)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode() for o in outs]
    versions = sorted(json.loads(o[0])["params"]["version"] for o in outs)
    assert versions == list(range(1, 17))
    with Registry(db) as reg:
        rows = reg.list("same")
        assert [v["version"] for v in rows] == list(range(1, 17))
        assert sorted(v["tags"]["writer"] for v in rows) == sorted(str(i) for i in range(16))
        assert reg.integrity_ok()


# A writer process for the races below. It slows down the two reads a write depends on (the highest
# version, the current alias) so that every writer has read before any has written, unless the
# transaction holds the write lock from its first statement (BEGIN IMMEDIATE). All writers start
# together: each opens the registry, says "ready", and waits for the barrier file.
RACER = textwrap.dedent("""
    import json, os, sys, time
    from itera.artifacts import describe_artifact
    from itera.registry import Ref, Registry

    db, barrier, action, arg = sys.argv[1:5]
    next_version, alias = Registry._next_version, Registry.alias

    def slow_next_version(self, name):
        v = next_version(self, name)
        time.sleep(0.3)  # between SELECT MAX(version) and the INSERT
        return v

    def slow_alias(self, name, which):
        v = alias(self, name, which)
        time.sleep(0.3)  # between reading the alias and moving it
        return v

    Registry._next_version, Registry.alias = slow_next_version, slow_alias
    reg = Registry(db)
    print("ready", flush=True)
    while not os.path.exists(barrier):
        time.sleep(0.002)
    if action == "register":
        row = reg.register("race", describe_artifact(arg, "file", "gguf"), None)
    elif action == "activate":
        row = reg.activate(Ref.parse(arg))
    else:
        row = reg.promote(Ref.parse(arg), "perplexity", 0.02)
    print(json.dumps({"version": row["version"]}), flush=True)
""")


def _race(db, barrier, jobs: list[tuple[str, str]]) -> list[tuple[int, str, str]]:
    """Start one racer per (action, argument) behind the barrier; (exit code, stdout, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(db), str(barrier), action, str(arg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for action, arg in jobs]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        barrier.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _failures(results) -> list[str]:
    """The last line (the error) of every racer that failed."""
    return [err.strip().splitlines()[-1] if err.strip() else f"exit {code}" for code, _, err in results if code]


def test_racing_registrations_read_and_insert_in_one_immediate_transaction(tmp_path, db):
    """Six writers each read MAX(version), pause, then insert. With BEGIN IMMEDIATE they queue on
    the write lock and get 1..6; with a deferred BEGIN all six read 0 and all but one fail."""
    Registry(db).close()
    arts = []
    for i in range(6):
        arts.append(tmp_path / f"w{i}.gguf")
        arts[-1].write_bytes(f"GGUF writer {i}".encode())
    results = _race(db, tmp_path / "go", [("register", a) for a in arts])
    assert not _failures(results), f"{len(_failures(results))} of {len(results)} failed: {_failures(results)}"
    assert sorted(json.loads(out)["version"] for _, out, _ in results) == list(range(1, 7))
    with Registry(db) as reg:
        rows = reg.list("race")
        assert [r["version"] for r in rows] == list(range(1, 7))
        assert sorted(r["path"] for r in rows) == sorted(str(a.resolve()) for a in arts)
        assert [e["version"] for e in reg.history("race")] == list(range(1, 7))
        assert reg.integrity_ok()


def test_racing_activate_and_promote_keep_alias_and_audit_log_consistent(tmp_path, db):
    """Two promotions and two activations at once, each reading the active alias and pausing before
    it moves it: every change lands, one after another, and the log chains them with no lost update."""
    with Registry(db) as reg:
        for i in range(1, 6):
            _register_with_metric(reg, tmp_path, "race", i, {"perplexity": 10.0})
        reg.activate(Ref.parse("race@1"))
    jobs = [("promote", "race@2"), ("activate", "race@3"), ("promote", "race@4"), ("activate", "race@5")]
    results = _race(db, tmp_path / "go", jobs)
    assert not _failures(results), f"{len(_failures(results))} of {len(results)} failed: {_failures(results)}"
    with Registry(db) as reg:
        changes = [e for e in reg.history("race") if e["event"] in ("activate", "promote")][1:]
        final = reg.alias("race", "active")
        assert reg.integrity_ok()
    # exactly the four changes that were asked for, each once
    assert sorted((e["event"], e["version"]) for e in changes) == sorted((a, int(r[-1])) for a, r in jobs)
    # each moved the alias from where the one before left it; the alias is where the last one put it
    previous = 1
    for e in changes:
        assert e["ok"] and e["detail"]["alias"] == "active" and e["detail"]["previous"] == previous, changes
        if e["event"] == "promote":  # the gate compared with the version that was active at that moment
            assert e["detail"]["active_version"] == previous
        previous = e["version"]
    assert final == previous


def test_sigkill_mid_write_leaves_a_consistent_database(tmp_path, artifact):
    db = tmp_path / "r.db"
    Registry(db).close()
    # A writer that registers as fast as it can, with a big record so each write takes a while.
    script = textwrap.dedent(f"""
        from itera.registry import Registry
        from itera.artifacts import describe_artifact
        reg = Registry({str(db)!r})
        art = describe_artifact({str(artifact)!r}, "file", "gguf")
        big = {{"itera": 1, "command": "x", "params": {{"blob": "x" * 2_000_000}}, "metrics": {{}}}}
        print("ready", flush=True)
        while True:
            reg.register("crash", art, big, tags={{"a": "1", "b": "2"}})
    """)
    for delay in (0.3, 0.7, 1.1):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO)
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        versions = [r[0] for r in con.execute("SELECT version FROM versions WHERE name='crash' ORDER BY version")]
        assert versions == list(range(1, len(versions) + 1))  # no gaps, no half-written version
        for v in versions:  # each version is complete: its tags and its event landed with it
            assert con.execute("SELECT COUNT(*) FROM tags WHERE name='crash' AND version=?", (v,)).fetchone()[0] == 2
            assert con.execute("SELECT COUNT(*) FROM events WHERE name='crash' AND version=? AND event='register'",
                               (v,)).fetchone()[0] == 1
        con.close()
    assert versions, "the writer never committed a version; the test proved nothing"


def test_activate_mark_good_rollback_and_audit_log(tmp_path, db, artifact):
    assert reg_cli(db, "register", "--name", "m", "--path", artifact).returncode == 0
    other = tmp_path / "v2.gguf"
    other.write_bytes(b"GGUF weights v2")
    assert reg_cli(db, "register", "--name", "m", "--path", other).returncode == 0
    assert reg_cli(db, "activate", "m@1").returncode == 0
    assert reg_cli(db, "mark-good", "m@1").returncode == 0
    assert reg_cli(db, "activate", "m@2").returncode == 0
    assert reg_cli(db, "resolve", "m@active").stdout.strip() == str(other.resolve())
    res = reg_cli(db, "rollback", "m")
    assert res.record["params"]["version"] == 1 and "active" in res.record["params"]["aliases"]
    assert reg_cli(db, "resolve", "m@active").stdout.strip() == str(artifact.resolve())
    events = json.loads(reg_cli(db, "history", "m").stdout)["events"]
    assert [e["event"] for e in events] == ["register", "register", "activate", "mark-good", "activate", "rollback"]
    assert events[-1]["detail"] == {"alias": "active", "previous": 2}


def _aliases(db, name="m"):
    with Registry(db) as reg:
        return {a: reg.alias(name, a) for a in ("active", "last-good")}


def test_rollback_refusals_leave_aliases_and_log_an_event(tmp_path, db, artifact):
    with Registry(db) as reg:
        from itera.artifacts import describe_artifact

        reg.register("m", describe_artifact(artifact, "file", "gguf"), None)
        reg.activate(Ref.parse("m@1"))
    # No last-good yet.
    before = _aliases(db)
    res = reg_cli(db, "rollback", "m")
    assert res.returncode == 3 and "no last-good version" in res.stderr and res.stdout == ""
    # A version that does not exist is bad input (exit 2), not a refusal: nothing to log.
    assert_usage_error(reg_cli(db, "rollback", "m", "--to", "9"), "has no version 9 to roll back to")
    assert _aliases(db) == before
    # The artifact's bytes changed after registration.
    assert reg_cli(db, "mark-good", "m@1").returncode == 0
    before = _aliases(db)
    artifact.write_bytes(b"GGUF tampered")
    res = reg_cli(db, "rollback", "m")
    assert res.returncode == 3 and "changed since it was registered" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert _aliases(db) == before
    with Registry(db) as reg:
        refused = [e for e in reg.history("m") if e["event"] == "rollback-refused"]
        assert all(e["version"] != 9 for e in reg.history("m"))
    assert len(refused) == 2 and all(not e["ok"] and e["detail"]["reason"] for e in refused)
    assert "no last-good version" in refused[0]["detail"]["reason"]
    assert "changed since it was registered" in refused[1]["detail"]["reason"]


def test_names_reach_sql_only_as_parameters(tmp_path, artifact):
    db = tmp_path / "r.db"
    evil = "x'; DROP TABLE versions; --"
    assert_usage_error(reg_cli(db, "register", "--name", evil, "--path", artifact), "invalid model name")
    assert not db.exists()  # refused before the registry was opened
    assert reg_cli(db, "register", "--name", "first", "--path", artifact).returncode == 0
    assert_usage_error(reg_cli(db, "show", evil + "@1"), "invalid model name")
    # Values that are not validated (tag values) are stored literally, never executed.
    res = reg_cli(db, "register", "--name", "ok", "--path", artifact, "--tag", f"note={evil}")
    assert res.returncode == 0
    listed = json.loads(reg_cli(db, "list", "--tag", f"note={evil}").stdout)["versions"]
    assert [v["tags"]["note"] for v in listed] == [evil]
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"versions", "tags", "aliases", "events"} <= tables


def _register_with_metric(reg, tmp_path, name, i, metrics):
    """Version ``i`` of ``name``: a benchmark record with ``metrics`` besides its required ones."""
    from test_record import MINIMAL

    from itera.artifacts import describe_artifact
    from itera.record import Run

    f = tmp_path / f"{name}-{i}.gguf"
    f.write_bytes(f"GGUF {name} {i}".encode())  # an artifact itera can read: activate and promote check it
    art = describe_artifact(f, "file", "gguf")
    core, params = MINIMAL["benchmark-power"]
    rec = Run("benchmark-power").record(art, {**core, **metrics}, params)
    return reg.register(name, art, rec)


@pytest.mark.parametrize("metric,active,ok,bad", [
    ("perplexity", 10.0, 10.19, 10.21),  # lower is better: +1.9% passes, +2.1% fails
    ("tokens_per_s", 100.0, 98.1, 97.9),  # higher is better: -1.9% passes, -2.1% fails
])
def test_promote_gate_on_both_sides_of_the_margin(tmp_path, db, metric, active, ok, bad):
    with Registry(db) as reg:
        _register_with_metric(reg, tmp_path, "g", 1, {metric: active})
        _register_with_metric(reg, tmp_path, "g", 2, {metric: bad})
        _register_with_metric(reg, tmp_path, "g", 3, {metric: ok})
    assert reg_cli(db, "promote", "g@1", "--metric", metric, "--max-regression", "2%").returncode == 0
    res = reg_cli(db, "promote", "g@2", "--metric", metric, "--max-regression", "2%")
    assert res.returncode == 3 and "promotion refused" in res.stderr and res.stdout == ""
    assert _aliases(db, "g")["active"] == 1
    res = reg_cli(db, "promote", "g@3", "--metric", metric, "--max-regression", "2%")
    assert res.returncode == 0 and res.record["params"]["gate"]["passed"] is True
    assert _aliases(db, "g")["active"] == 3
    with Registry(db) as reg:
        assert [e["event"] for e in reg.history("g")][-3:] == ["promote", "promote-refused", "promote"]


def test_metric_directions_and_margins():
    assert metric_direction("datasets.x.perplexity") == "lower"
    assert metric_direction("decode_tokens_per_s") == "higher"
    assert metric_direction("latency_p95_ms") == "lower"
    with pytest.raises(UsageError, match="--higher-is-better"):
        metric_direction("mystery")
    assert parse_margin("2%") == pytest.approx(0.02) and parse_margin("0.05") == 0.05
    with pytest.raises(UsageError):
        parse_margin("-1%")


def test_pipeline_register_stores_evaluate_metrics_and_lineage(tmp_path, tiny_ckpt, corpus_file):
    db = tmp_path / "r.db"
    ev = run_itera("evaluate", "--model", tiny_ckpt, "-d", corpus_file, "--window", "32", "--stride", "16",
                   "--max-tokens", "200")
    res = reg_cli(db, "register", "--name", "demo", "--tag", "stage=ci", stdin=ev.stdout)
    rec = res.record
    assert rec["command"] == "registry register" and rec["parent"] == ev.record
    show = json.loads(reg_cli(db, "show", "demo@latest").stdout)
    want = ev.record["metrics"]["datasets"][file_key(corpus_file)]["perplexity"]
    assert show["metrics"][f"datasets.{file_key(corpus_file)}.perplexity"] == want
    assert show["lineage"][0]["command"] == "evaluate" and show["lineage"][0]["sha256"] == ev.record["artifact"]["sha256"]
    assert show["tags"] == {"stage": "ci"} and show["path"] == str(tiny_ckpt.resolve())
    if shutil.which("git") and (REPO / ".git").exists():  # registered from a git checkout: its commit
        assert re.fullmatch(r"[0-9a-f]{40}", show["git_commit"]), show["git_commit"]
    else:
        assert show["git_commit"] is None
    # promote with the short metric name works when it is unambiguous
    assert reg_cli(db, "promote", "demo@1", "--metric", "perplexity").returncode == 0


def test_register_refuses_a_changed_artifact(tmp_path, artifact):
    from itera.artifacts import describe_artifact
    from itera.record import Run, dumps

    from test_record import MINIMAL

    rec = Run("export").record(describe_artifact(artifact, "file", "gguf"), *MINIMAL["export"])
    artifact.write_bytes(b"GGUF changed after export")
    res = reg_cli(tmp_path / "r.db", "register", "--name", "x", stdin=dumps(rec))
    assert_usage_error(res, "changed since the record was written")


def test_read_commands_do_not_import_torch(tmp_path, artifact):
    db = tmp_path / "r.db"
    reg_cli(db, "register", "--name", "m", "--path", artifact)
    for argv in (["list"], ["show", "m@1"], ["resolve", "m@1"]):
        code = ("import sys\n"
                f"sys.argv = ['itera', 'registry'] + {argv!r} + ['--registry', {str(db)!r}]\n"
                "from itera.cli import main\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
                "print('HEAVY=' + ','.join(m for m in ('torch', 'onnxruntime', 'llama_cpp') if m in sys.modules),"
                " file=sys.stderr)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 0, p.stderr
        assert p.stderr.strip().splitlines()[-1] == "HEAVY=", argv


def test_schema_is_migrated_once_and_versioned(tmp_path):
    db = tmp_path / "r.db"
    Registry(db).close()
    with Registry(db) as reg:
        assert reg.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert reg.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_not_a_database(tmp_path):
    bad = tmp_path / "r.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    assert_usage_error(reg_cli(bad, "list"), "not a usable SQLite database")


def test_show_missing_things(tmp_path, artifact):
    db = tmp_path / "r.db"
    assert_usage_error(reg_cli(db, "show", "nobody"), "registry", "does not exist")
    assert not db.exists()  # a read never creates a registry
    assert reg_cli(db, "register", "--name", "m", "--path", artifact).returncode == 0
    assert_usage_error(reg_cli(db, "show", "nobody"), "no model named 'nobody'")
    assert_usage_error(reg_cli(db, "show", "m@7"), "has no version 7")
    assert_usage_error(reg_cli(db, "show", "m@active"), "has no 'active' version")
    assert_usage_error(reg_cli(db, "show", "m@0"), "invalid version")


# ------------------------------------------------------------------ what a team needs (#29): aliases,
# tags, archive, who and why; activate/promote of a version whose file is gone


def _two(tmp_path, db):
    """m@1 and m@2: two bare GGUF files registered with the CLI."""
    arts = []
    for i in (1, 2):
        f = tmp_path / f"m{i}.gguf"
        f.write_bytes(f"GGUF weights {i}".encode())
        arts.append(f)
        assert reg_cli(db, "register", "--name", "m", "--path", f).returncode == 0
    return arts


def _tables(db) -> dict:
    """Every row of the registry's tables (what "nothing written" is checked against), on either backend."""
    from itera.registry import open_storage

    storage = open_storage(db, create=False)
    try:
        return {t: [tuple(dict(r).values()) for r in storage._rows(f"SELECT * FROM {t} ORDER BY 1, 2")]
                for t in ("versions", "tags", "aliases", "events")}
    finally:
        storage.close()


def test_activate_promote_and_mark_good_refuse_a_version_whose_artifact_is_gone(tmp_path, db):
    arts = _two(tmp_path, db)
    assert reg_cli(db, "activate", "m@1").returncode == 0
    gone = arts[1].resolve()
    arts[1].unlink()
    before = _tables(db)
    for argv, verb in ((["activate", "m@2"], "activate the new version"),
                       (["activate", "m@latest"], "activate the new version"),
                       (["promote", "m@2", "--metric", "x", "--higher-is-better"], "promote the new version"),
                       (["mark-good", "m@2"], "mark the new version good"),
                       (["alias", "m@2", "staging"], "point staging at the new version")):
        line = assert_usage_error(reg_cli(db, *argv))
        assert line == (f"itera: error: m@2's artifact {gone} no longer exists; put it back, or register it again "
                        f"and {verb}; aliases unchanged"), line
    assert _tables(db) == before  # nothing written: no alias moved, no event
    # resolve and rollback said so before; they still do
    assert_usage_error(reg_cli(db, "resolve", "m@2"), f"{gone} no longer exists")
    res = reg_cli(db, "rollback", "m", "--to", "2")
    assert res.returncode == 3 and "no longer exists" in res.stderr
    # changed bytes are refused the same way (the check rollback makes)
    arts[0].write_bytes(b"GGUF tampered")
    assert_usage_error(reg_cli(db, "activate", "m@1"), "m@1's artifact", "changed since it was registered",
                       "aliases unchanged")


def test_custom_aliases_resolve_everywhere_a_ref_is_taken(tmp_path, db):
    arts = _two(tmp_path, db)
    res = reg_cli(db, "alias", "m@1", "staging", "--reason", "canary for a day")
    assert res.returncode == 0 and res.stderr == "m@staging -> version 1\n"
    assert res.record["params"]["aliases"] == ["staging"] and res.record["params"]["alias"] == "staging"
    assert reg_cli(db, "resolve", "m@staging").stdout == f"{arts[0].resolve()}\n"
    assert json.loads(reg_cli(db, "show", "m@staging").stdout)["version"] == 1
    assert json.loads(reg_cli(db, "compare", "m@staging", "m@2").stdout)["versions"] == ["m@1", "m@2"]
    assert reg_cli(db, "alias", "m@2", "staging").returncode == 0  # moved
    assert reg_cli(db, "alias", "m@staging", "canary").returncode == 0  # an alias of an alias's version
    assert reg_cli(db, "activate", "m@canary").returncode == 0
    assert [v["aliases"] for v in json.loads(reg_cli(db, "list").stdout)["versions"]] == \
        [[], ["active", "canary", "staging"]]
    # serve takes NAME@staging and follows it like NAME@active
    from itera.jobs.serve.engine import resolve_source
    from itera.jobs.serve.options import ServeOptions

    ServeOptions(model="m@staging", registry=db).validate()
    source, follow = resolve_source("m@staging", db)
    assert source.version == 2 and follow.ref == Ref("m", "staging")
    res = reg_cli(db, "unalias", "m", "staging")
    assert res.returncode == 0 and res.stderr == "removed m@staging (it pointed at version 2)\n"
    assert_usage_error(reg_cli(db, "show", "m@staging"), "m has no alias 'staging' (its aliases: active, canary)")
    assert_usage_error(reg_cli(db, "unalias", "m", "staging"), "m has no alias 'staging'")
    events = [e for e in json.loads(reg_cli(db, "history", "m").stdout)["events"] if "alias" in e["event"]]
    assert [(e["event"], e["version"], e["detail"], e["reason"]) for e in events] == [
        ("alias", 1, {"alias": "staging", "previous": None}, "canary for a day"),
        ("alias", 2, {"alias": "staging", "previous": 1}, None),
        ("alias", 2, {"alias": "canary", "previous": None}, None),
        ("unalias", 2, {"alias": "staging", "previous": 2}, None)]


def test_reserved_and_invalid_alias_names_are_refused(tmp_path):
    db = tmp_path / "r.db"
    _two(tmp_path, db)
    before = _tables(db)
    assert assert_usage_error(reg_cli(db, "alias", "m@1", "active")) == \
        "itera: error: 'active' is reserved: `itera registry activate`, `promote` or `rollback` moves it"
    assert assert_usage_error(reg_cli(db, "unalias", "m", "last-good")) == \
        "itera: error: 'last-good' is reserved: `itera registry mark-good` moves it"
    assert_usage_error(reg_cli(db, "alias", "m@1", "latest"), "NAME@latest is always the highest version")
    for bad in ("12", "_x", "a b", "x'; DROP TABLE aliases; --", "é"):
        assert_usage_error(reg_cli(db, "alias", "m@1", bad), f"invalid alias {bad!r}")
    assert_usage_error(reg_cli(db, "show", "m@a b"), "invalid version", "NAME@ALIAS")
    assert _tables(db) == before


def test_tags_are_set_and_removed_in_one_logged_event(tmp_path, db):
    _two(tmp_path, db)
    res = reg_cli(db, "tag", "m@1", "stage=dev", "owner=ml")
    assert res.returncode == 0 and res.record["params"]["tags"] == {"owner": "ml", "stage": "dev"}
    res = reg_cli(db, "tag", "m@1", "stage=prod", "--remove", "owner", "--reason", "shipped")
    assert res.returncode == 0 and res.stderr == "tags of m@1: stage=prod\n"
    assert json.loads(reg_cli(db, "show", "m@1").stdout)["tags"] == {"stage": "prod"}
    assert [v["version"] for v in json.loads(reg_cli(db, "list", "--tag", "stage=prod").stdout)["versions"]] == [1]
    before = _tables(db)
    assert assert_usage_error(reg_cli(db, "tag", "m@1", "--remove", "owner")) == \
        "itera: error: m@1 has no tag 'owner'; its tags: stage"
    assert_usage_error(reg_cli(db, "tag", "m@1"), "nothing to change")
    assert_usage_error(reg_cli(db, "tag", "m@1", "a=1", "--remove", "a"), "tag 'a' is both set and removed")
    assert_usage_error(reg_cli(db, "tag", "m@1", "no-equals"), "invalid tag 'no-equals': use KEY=VALUE")
    assert_usage_error(reg_cli(db, "tag", "m@1", "k=line\nbreak"), "no control characters")
    assert _tables(db) == before
    tags = [e for e in json.loads(reg_cli(db, "history", "m").stdout)["events"] if e["event"] == "tag"]
    assert [(e["detail"], e["reason"]) for e in tags] == [
        ({"set": {"owner": "ml", "stage": "dev"}, "removed": [], "previous": {"owner": None, "stage": None}}, None),
        ({"set": {"stage": "prod"}, "removed": ["owner"], "previous": {"owner": "ml", "stage": "dev"}}, "shipped")]


def test_archive_hides_a_version_keeps_its_file_and_blocks_activation_until_unarchived(tmp_path, db):
    arts = _two(tmp_path, db)
    assert reg_cli(db, "activate", "m@1").returncode == 0
    assert reg_cli(db, "alias", "m@2", "staging").returncode == 0
    before = _tables(db)
    assert assert_usage_error(reg_cli(db, "archive", "m@1", "--reason", "x")) == \
        "itera: error: m@1 is active: activate (or promote, or roll back to) another version of m before archiving it"
    assert_usage_error(reg_cli(db, "archive", "m@2", "--reason", "x"),
                       "m@2 is m@staging", "`itera registry unalias m staging`")
    assert_usage_error(reg_cli(db, "archive", "m@2"), "say why with --reason TEXT")
    assert_usage_error(reg_cli(db, "unarchive", "m@2"), "m@2 is not archived")
    assert _tables(db) == before
    assert reg_cli(db, "unalias", "m", "staging").returncode == 0
    res = reg_cli(db, "archive", "m@2", "--reason", "trained on the test split")
    assert res.returncode == 0 and res.record["params"]["archived"]["reason"] == "trained on the test split"
    assert arts[1].exists()  # nothing deleted
    assert [v["version"] for v in json.loads(reg_cli(db, "list").stdout)["versions"]] == [1]
    listed = json.loads(reg_cli(db, "list", "--all").stdout)["versions"]
    assert [v["version"] for v in listed] == [1, 2] and listed[0]["archived"] is None
    assert listed[1]["archived"]["reason"] == "trained on the test split"
    assert json.loads(reg_cli(db, "show", "m@2").stdout)["archived"]["by"]  # still shown, still resolved
    assert reg_cli(db, "resolve", "m@2").stdout == f"{arts[1].resolve()}\n"
    before = _tables(db)
    hint = "m@2 is archived; bring it back first with `itera registry unarchive m@2`"
    for argv in (["activate", "m@2"], ["promote", "m@2", "--metric", "x", "--higher-is-better"],
                 ["mark-good", "m@2"], ["alias", "m@2", "canary"]):
        assert assert_usage_error(reg_cli(db, *argv)) == f"itera: error: {hint}; aliases unchanged"
    assert_usage_error(reg_cli(db, "archive", "m@2", "--reason", "again"), "m@2 is already archived")
    assert _tables(db) == before
    res = reg_cli(db, "rollback", "m", "--to", "2")  # a refused rollback: exit 3, logged
    assert res.returncode == 3 and res.stderr == f"itera: error: rollback refused: {hint}; aliases unchanged\n"
    assert reg_cli(db, "unarchive", "m@2", "--reason", "false alarm").returncode == 0
    assert [v["version"] for v in json.loads(reg_cli(db, "list").stdout)["versions"]] == [1, 2]
    assert reg_cli(db, "activate", "m@2").returncode == 0
    events = json.loads(reg_cli(db, "history", "m").stdout)["events"]
    assert [(e["event"], e["reason"]) for e in events if "archive" in e["event"]] == [
        ("archive", "trained on the test split"), ("unarchive", "false alarm")]


def test_every_event_says_who_and_why(tmp_path, db):
    import getpass

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF weights")
    env = {"ITERA_ACTOR": "ci-bot (pipeline 812)"}
    res = run_itera("registry", "register", "--name", "m", "--path", f, "--registry", db, "--reason", "nightly",
                    env=env)
    assert res.record["params"]["actor"] == "ci-bot (pipeline 812)" and res.record["params"]["reason"] == "nightly"
    assert reg_cli(db, "activate", "m@1").returncode == 0  # no ITERA_ACTOR: the OS user
    res = run_itera("registry", "rollback", "m", "--registry", db, "--reason", "bad canary", env=env)
    assert res.returncode == 3  # no last-good: refused, and the refusal says who asked and why
    events = json.loads(reg_cli(db, "history", "m").stdout)["events"]
    assert [(e["event"], e["actor"], e["reason"]) for e in events] == [
        ("register", "ci-bot (pipeline 812)", "nightly"), ("activate", getpass.getuser(), None),
        ("rollback-refused", "ci-bot (pipeline 812)", "bad canary")]
    assert "no last-good version" in events[2]["detail"]["reason"]  # the registry's own reason stays in detail
    before = _tables(db)
    assert_usage_error(run_itera("registry", "activate", "m@1", "--registry", db, env={"ITERA_ACTOR": "a\nb"}),
                       "invalid ITERA_ACTOR")
    assert_usage_error(reg_cli(db, "activate", "m@1", "--reason", "two\nlines"), "invalid --reason")
    assert_usage_error(reg_cli(db, "activate", "m@1", "--reason", " "), "invalid --reason")
    assert _tables(db) == before


def test_a_registry_of_schema_1_is_migrated_only_by_registry_migrate_and_its_old_events_read_without_actor(tmp_path):
    """A registry written before events had an actor and versions could be archived (schema 1):
    every command refuses it, unchanged, naming `itera registry migrate`; that migrates it in
    place, and what it held reads as before."""
    db = tmp_path / "old.db"
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF weights")
    con = sqlite3.connect(db, isolation_level=None)
    for statement in filter(str.strip, MIGRATIONS[0].split(";")):
        con.execute(statement)
    con.execute("PRAGMA user_version = 1")
    from itera.artifacts import describe_artifact

    art = describe_artifact(f, "file", "gguf")
    con.execute("INSERT INTO versions VALUES ('m', 1, ?, 'file', 'gguf', ?, ?, NULL, '{}', '{}', '[]', NULL, NULL, "
                "'2025-01-01T00:00:00Z')", (str(f), art["bytes"], art["sha256"]))
    con.execute("INSERT INTO tags VALUES ('m', 1, 'stage', 'dev')")
    con.execute("INSERT INTO aliases VALUES ('m', 'active', 1, '2025-01-01T00:00:00Z')")
    con.execute("INSERT INTO events (name, version, event, ok, detail, at) VALUES ('m', 1, 'register', 1, "
                "'{\"path\": \"x\"}', '2025-01-01T00:00:00Z')")
    con.close()
    before = db.read_bytes()
    for args in (["list"], ["history", "m"], ["tag", "m@1", "stage=prod"]):
        assert_usage_error(reg_cli(db, *args), f"registry {db} has schema version 1 and this itera uses {len(MIGRATIONS)}: run "
                           f"`itera registry migrate --registry {db}` once (older itera versions cannot open it "
                           "afterwards)")
    assert db.read_bytes() == before  # no command upgraded it as a side effect
    migrated = reg_cli(db, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout) == {"registry": str(db), "schema_before": 1, "schema_after": 3}
    assert migrated.stderr.strip() == f"registry {db}: schema 1 -> 3"
    again = reg_cli(db, "migrate")
    assert json.loads(again.stdout)["schema_before"] == 3
    assert again.stderr.strip() == f"registry {db} is already at schema 3; nothing to do"
    listed = json.loads(reg_cli(db, "list").stdout)["versions"]
    assert [(v["version"], v["tags"], v["aliases"], v["archived"], v["store"]) for v in listed] == [
        (1, {"stage": "dev"}, ["active"], None, None)]
    events = json.loads(reg_cli(db, "history", "m").stdout)["events"]
    assert [(e["event"], e["actor"], e["reason"]) for e in events] == [("register", None, None)]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    con.close()
    assert reg_cli(db, "tag", "m@1", "stage=prod", "--reason", "after the upgrade").returncode == 0


def test_a_mistyped_alias_is_named_with_the_aliases_there_are(tmp_path, db, artifact):
    assert reg_cli(db, "register", "--name", "m", "--path", artifact).returncode == 0
    assert_usage_error(reg_cli(db, "resolve", "m@staging"),
                       "m has no alias 'staging' (it has no aliases); `itera registry alias m@V staging` sets one")
    assert reg_cli(db, "alias", "m@1", "staging").returncode == 0
    assert reg_cli(db, "activate", "m@1").returncode == 0
    assert_usage_error(reg_cli(db, "show", "m@stagin"),
                       "m has no alias 'stagin'; did you mean m@staging? (its aliases: active, staging); "
                       "`itera registry alias m@V stagin` sets one")
    assert_usage_error(reg_cli(db, "show", "m@last-good"), "m has no 'last-good' version yet")


def test_promote_matches_a_file_dataset_by_name_and_says_why_an_older_or_other_text_cannot(tmp_path, db):
    """Evaluate records name a file by its name and content (notes.txt#<sha256[:8]>). `--metric
    notes.txt.perplexity` finds such a figure; an active version whose figure an older itera keyed
    by an absolute path, or that was measured on other contents of notes.txt, is refused in one
    line that says which. Two older, path-keyed versions still compare as they always did."""
    from itera.artifacts import describe_artifact

    proto = {"window": 64, "stride": 32, "bos": False, "max_tokens": 300, "runtime": "llama.cpp"}

    def version(name, i, ds, ppl):
        f = tmp_path / f"{name}{i}.gguf"
        f.write_bytes(f"GGUF weights {name} {i}".encode())
        art = describe_artifact(f, "file", "gguf")
        rec = make_record("evaluate", art, {"datasets": {ds: {"perplexity": ppl, "bits_per_byte": 1.0, "tokens": 299,
                                                             "bytes": 1200, "tokens_per_s": 1.0}}},
                          {**proto, "model": str(f)})
        return reg_cli(db, "register", "--name", name, stdin=json.dumps(rec)).record["params"]["version"]

    old, new, other = "/home/me/runs/notes.txt", "notes.txt#3f2a9c1b", "notes.txt#0badf00d"
    version("m", 1, old, 10.0)
    version("m", 2, new, 10.1)
    version("m", 3, other, 10.0)
    assert reg_cli(db, "activate", "m@1").returncode == 0
    assert_usage_error(reg_cli(db, "promote", "m@2", "--metric", "notes.txt.perplexity", "--max-regression", "5%"),
                       "the active version m@1 has no metric 'datasets.notes.txt#3f2a9c1b.perplexity'",
                       f"'datasets.{old}.perplexity' comes from an older record that named the file by its path",
                       "activate the candidate by hand")
    assert reg_cli(db, "activate", "m@2").returncode == 0
    assert_usage_error(reg_cli(db, "promote", "m@3", "--metric", "notes.txt.perplexity"),
                       "was measured on other contents of that file", f"datasets.{new}.perplexity")
    res = reg_cli(db, "promote", "m@3", "--metric", "perplexity")  # the short leaf finds the one figure, too
    assert res.returncode == 2 and "other contents" in res.stderr
    # older, path-keyed records at one path: as before, and the bare file name finds them now
    version("o", 1, old, 10.0)
    version("o", 2, old, 10.1)
    assert reg_cli(db, "activate", "o@1").returncode == 0
    res = reg_cli(db, "promote", "o@2", "--metric", "notes.txt.perplexity", "--max-regression", "5%")
    assert res.returncode == 0, res.stderr
    assert res.record["params"]["gate"]["metric"] == f"datasets.{old}.perplexity"


def test_artifacts_are_hashed_before_the_write_transaction_not_under_its_lock(tmp_path, db, monkeypatch):
    """activate, mark-good, alias, promote and rollback hash (and for a stored version fetch) the
    artifact before they take the write lock: gigabytes hashed under it would make every other
    writer wait, and on PostgreSQL time out. The verdict is taken inside, once."""
    import itera.registry as registry_module

    inside = []
    real = registry_module.integrity_problem

    def watched(label, row):
        inside.append(reg.storage._depth > 0)
        return real(label, row)

    monkeypatch.setattr(registry_module, "integrity_problem", watched)
    with Registry(db) as reg:
        for i in (1, 2):
            _register_with_metric(reg, tmp_path, "h", i, {"perplexity": 10.0})
        reg.activate(Ref.parse("h@1"))
        reg.mark_good(Ref.parse("h@1"))
        reg.set_alias(Ref.parse("h@2"), "staging")
        reg.promote(Ref.parse("h@2"), "perplexity", 0.02)
        reg.rollback("h")
        assert reg.alias("h", "active") == 1
    assert inside == [False] * 5


def test_promote_against_a_baseline_stops_regressions_adding_up(tmp_path, db):
    """Each version 4% worse than the one before passes a 5% gate against active, and the
    regressions add up; with --baseline g@1 the second step (8.2% over v1) is refused."""
    with Registry(db) as reg:
        for i, ppl in enumerate((10.0, 10.4, 10.816), start=1):
            _register_with_metric(reg, tmp_path, "g", i, {"perplexity": ppl})
    gate = ["--metric", "perplexity", "--max-regression", "5%"]
    assert reg_cli(db, "promote", "g@1", *gate).returncode == 0
    res = reg_cli(db, "promote", "g@2", *gate, "--baseline", "g@1")
    assert res.returncode == 0, res.stderr
    g = res.record["params"]["gate"]
    assert (g["baseline_version"], g["baseline"], g["regression"]) == (1, 10.0, pytest.approx(0.04))
    assert "active" not in g
    from itera.registry.display import event_summary

    with Registry(db) as reg:
        assert "perplexity 10.40 vs 10.00 of baseline v1 (4% worse, max 5%)" in event_summary(reg.history("g")[-1])
    res = reg_cli(db, "promote", "g@3", *gate, "--baseline", "g@1")
    assert res.returncode == 3 and res.stdout == ""
    assert ("perplexity of g@3 is 10.816 against 10 for baseline g@1: +8.16% worse, more than the allowed 5.00%; "
            "g@active stays at version 2") in res.stderr
    assert _aliases(db, "g")["active"] == 2
    assert reg_cli(db, "promote", "g@3", *gate).returncode == 0  # against active (v2): +4%
    assert_usage_error(reg_cli(db, "promote", "g@3", "--metric", "preference", "--feedback-db", tmp_path / "f.db",
                               "--baseline", "g@1"), "--baseline is read by metric gates only")
    assert_usage_error(reg_cli(db, "promote", "g@3", *gate, "--baseline", "h@1"), "--baseline h@1 is not a version of g")
