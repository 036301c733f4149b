"""A team's registry: one real PostgreSQL (tests/pg.py), one ``file://`` artifact store, and two
"runners" that share nothing else (separate ``ITERA_HOME``s, so separate caches); what either
registers, promotes or rolls back the other sees, fetches and checks. Plus the ways it goes wrong:
a tampered blob, an unreachable server, a wrong password, an unknown scheme, a store that is a
file, a copy into a registry that already has the name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_usage_error, clean_environ, run_itera, save_tiny


def _runner(home: Path, registry: str):
    """The CLI as one CI runner: its own ITERA_HOME, the team's registry."""
    def cli(*args, stdin=None):
        return run_itera(*args, stdin=stdin, env={"ITERA_HOME": str(home), "ITERA_REGISTRY": registry})
    return cli


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _gguf(tmp_path: Path, name: str, payload: bytes) -> Path:
    f = tmp_path / f"{name}.gguf"
    f.write_bytes(b"GGUF" + payload)  # the magic is all the registry checks of a GGUF it does not run
    return f


def _blob(store: Path, sha256: str) -> Path:
    return store / "blobs" / "sha256" / sha256[:2] / sha256


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tokenizer_dir):
    """Two tiny models as real GGUF files llama.cpp loads (serve runs them)."""
    d = tmp_path_factory.mktemp("team-models")
    out = []
    for seed in (3, 4):
        ckpt = save_tiny(d / f"m{seed}", tokenizer_dir, seed=seed)
        gguf = d / f"m{seed}.gguf"
        res = run_itera("export", "--model", ckpt, "--format", "gguf", "--gguf-type", "F32", "--out", gguf)
        assert res.returncode == 0, res.stderr
        out.append(gguf)
    out_ckpts.extend([d / "m3", d / "m4"])
    return out


out_ckpts: list[Path] = []  # the checkpoints the GGUFs of ``ggufs`` were exported from


def test_two_runners_share_versions_through_postgresql_and_a_file_store(tmp_path, pg_url, postgres, ggufs):
    store = tmp_path / "store"
    a, b = _runner(tmp_path / "home-a", pg_url), _runner(tmp_path / "home-b", pg_url)
    # Runner A builds two versions in its workspace, registers them into the store, activates 2.
    work = tmp_path / "runner-a-workspace"
    work.mkdir()
    arts = [Path(shutil.copy(g, work / g.name)) for g in ggufs]
    shas = [_sha(p) for p in arts]
    for i, p in enumerate(arts, 1):
        res = a("registry", "register", "--name", "team", "--path", p, "--store", f"file://{store}")
        assert res.returncode == 0, res.stderr
        assert res.record["params"]["version"] == i and res.record["params"]["store"] == f"file://{store}"
        assert "***" in res.record["params"]["registry"] and postgres.password not in res.stdout + res.stderr
    assert a("registry", "mark-good", "team@1").returncode == 0
    assert a("registry", "activate", "team@2").returncode == 0
    shutil.rmtree(work)  # A's job ends: its workspace is gone, only the store and the database remain

    # Runner B resolves active: fetched into B's cache, bytes checked, not A's path.
    res = b("registry", "resolve", "team@active")
    assert res.returncode == 0, res.stderr
    got = Path(res.stdout.strip())
    assert got == tmp_path / "home-b" / "cache" / "artifacts" / shas[1] / arts[1].name and _sha(got) == shas[1]
    # a second resolve reads the cache, not the store
    os.chmod(_blob(store, shas[1]), 0o644)
    _blob(store, shas[1]).rename(tmp_path / "moved-blob")
    assert b("registry", "resolve", "team@active").stdout.strip() == str(got)
    (tmp_path / "moved-blob").rename(_blob(store, shas[1]))
    # B pulls version 1 to a path of its own
    out = tmp_path / "deploy" / "model.gguf"
    res = b("registry", "pull", "team@1", "--out", out)
    assert res.returncode == 0, res.stderr
    assert _sha(out) == shas[0] and res.record["artifact"]["sha256"] == shas[0]
    assert_usage_error(b("registry", "pull", "team@1", "--out", out), "already exists; pass --force")
    # B rolls back: version 1 is fetched and checked first
    res = b("registry", "rollback", "team", "--reason", "runner B saw a regression")
    assert res.returncode == 0, res.stderr
    assert res.record["params"]["version"] == 1
    # ... and serves NAME@active from its cache; a promotion made by A is noticed and swapped to
    from test_serve import Served

    s = Served("--model", "team@active", "--registry", pg_url, "--feedback-db", tmp_path / "fb.db",
               "--poll-interval", "0.2", env={"ITERA_HOME": str(tmp_path / "home-b")})
    try:
        c = s.client()

        def wait_version(v):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 90:
                h = c.get("/health").json()
                if h["version"] == v:
                    return h
                time.sleep(0.1)
            raise AssertionError(f"no swap to version {v}: {h}; {''.join(s.err)[-2000:]}")

        wait_version(1)
        assert pg_url not in "".join(s.err) and postgres.password not in "".join(s.err)
        postgres.restart()  # the server B follows restarts: B reconnects at a later poll
        assert a("registry", "activate", "team@2", "--reason", "fixed").returncode == 0
        wait_version(2)
        r = c.post("/v1/completions", json={"prompt": "The", "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-itera-model-version"] == "2"
    finally:
        rc, _, err = s.stop()
    assert postgres.password not in err
    # One history, both runners in it, in order.
    events = json.loads(a("registry", "history", "team").stdout)["events"]
    assert [(e["event"], e["version"]) for e in events] == [
        ("register", 1), ("register", 2), ("mark-good", 1), ("activate", 2), ("rollback", 1), ("activate", 2)]
    assert events[4]["reason"] == "runner B saw a regression"
    shown = json.loads(b("registry", "show", "team@2", "--json").stdout)
    assert shown["store"] == f"file://{store}"


def test_a_tampered_blob_is_refused_at_pull_resolve_rollback_and_serve(tmp_path, pg_url):
    store = tmp_path / "store"
    a, b = _runner(tmp_path / "home-a", pg_url), _runner(tmp_path / "home-b", pg_url)
    good, bad = _gguf(tmp_path, "good", b" weights one"), _gguf(tmp_path, "bad", b" weights two")
    for p in (good, bad):
        assert a("registry", "register", "--name", "t", "--path", p, "--store", f"file://{store}").returncode == 0
    assert a("registry", "activate", "t@1").returncode == 0
    blob = _blob(store, _sha(bad))
    os.chmod(blob, 0o644)
    blob.write_bytes(b"GGUF weights 2!!")  # same length, other bytes
    msg = (f"store file://{store}: the blob of bad.gguf of artifact {_sha(bad)[:12]}… is corrupt or tampered; "
           f"re-register it from the original file with --store file://{store}")
    assert_usage_error(b("registry", "resolve", "t@2"), msg)
    assert_usage_error(b("registry", "pull", "t@2", "--out", tmp_path / "x.gguf"), msg)
    assert not (tmp_path / "x.gguf").exists()
    assert not (tmp_path / "home-b" / "cache" / "artifacts" / _sha(bad)).exists()
    res = b("registry", "rollback", "t", "--to", "2")
    assert res.returncode == 3 and msg in res.stderr, res.stderr
    assert_usage_error(b("registry", "activate", "t@2"), msg)
    assert_usage_error(b("serve", "--model", "t@2", "--registry", pg_url), msg)
    assert json.loads(b("registry", "show", "t@active", "--json").stdout)["version"] == 1


def test_bad_team_settings_are_one_line_and_never_echo_the_password(tmp_path, postgres, pg_url):
    pw = postgres.password
    f = _gguf(tmp_path, "m", b" w")
    down = f"postgresql://{postgres.user}:{pw}@127.0.0.1:1/x"
    line = assert_usage_error(run_itera("registry", "list", "--registry", down),
                              f"cannot reach registry postgresql://{postgres.user}:***@127.0.0.1:1/x (")
    assert pw not in line and "Connection refused" in line
    wrong = pg_url.replace(f":{pw}@", ":not-the-password@")
    line = assert_usage_error(run_itera("registry", "register", "--name", "m", "--path", f, "--registry", wrong),
                              "refused the credentials", "password authentication failed",
                              "check the password (in the URL, PGPASSWORD or ~/.pgpass)")
    assert "not-the-password" not in line and ":***@" in line
    # the password from PGPASSWORD instead of the URL works, and is not echoed either
    no_pw = pg_url.replace(f":{pw}@", "@")
    res = run_itera("registry", "register", "--name", "m", "--path", f, "--registry", no_pw, env={"PGPASSWORD": pw})
    assert res.returncode == 0 and pw not in res.stdout + res.stderr, res.stderr
    # ... and from a password file (~/.pgpass, here named by PGPASSFILE), which libpq reads only at mode 0600
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres.port}:*:{postgres.user}:{pw}\n")
    passfile.chmod(0o600)
    res = run_itera("registry", "list", "--registry", no_pw, env={"PGPASSFILE": str(passfile)})
    assert res.returncode == 0 and pw not in res.stdout + res.stderr, res.stderr
    assert_usage_error(run_itera("registry", "list", "--registry", "mysql://u:secret@h/db"),
                       "registry URL mysql://u:***@h/db has an unknown scheme 'mysql'; pass a file path, "
                       "sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE")
    afile = tmp_path / "store-file"
    afile.write_text("not a directory")
    assert_usage_error(run_itera("registry", "register", "--name", "m", "--path", f, "--registry", pg_url,
                                 "--store", f"file://{afile}"),
                       f"store file://{afile} is a file; pass the URL of the store's directory")
    assert_usage_error(run_itera("registry", "register", "--name", "m", "--path", f, "--registry", pg_url,
                                 "--store", "s3://bucket/itera"), "s3://", "supported schemes: file")
    empty = postgres.create_database()
    assert_usage_error(run_itera("registry", "list", "--registry", empty), "holds no itera registry yet")
    # nothing of the refused registrations was written
    assert [v["version"] for v in json.loads(run_itera("registry", "list", "--registry", pg_url).stdout)
            ["versions"]] == [1]


def test_copy_moves_a_local_history_into_postgresql_and_refuses_a_name_already_there(tmp_path, pg_url):
    local = tmp_path / "local.db"
    f1, f2 = _gguf(tmp_path, "a", b" one"), _gguf(tmp_path, "b", b" two")
    env = {"ITERA_ACTOR": "alice"}
    for f in (f1, f2):
        assert run_itera("registry", "register", "--name", "mine", "--path", f, "--registry", local,
                         "--reason", "nightly", env=env).returncode == 0
    assert run_itera("registry", "activate", "mine@2", "--registry", local, env=env).returncode == 0
    assert run_itera("registry", "archive", "mine@1", "--reason", "superseded", "--registry", local,
                     env=env).returncode == 0
    res = run_itera("registry", "copy", "--from", f"sqlite://{local}", "--to", pg_url, env={"ITERA_ACTOR": "bob"})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["names"] == ["mine"] and out["versions"] == 2 and out["events"] == 4 and "***" in out["to"]
    before = json.loads(run_itera("registry", "list", "--all", "--registry", local).stdout)["versions"]
    after = json.loads(run_itera("registry", "list", "--all", "--registry", pg_url).stdout)["versions"]
    keep = ("name", "version", "path", "sha256", "tags", "aliases", "archived", "created_at", "metrics")
    assert [{k: v[k] for k in keep} for v in after] == [{k: v[k] for k in keep} for v in before]
    events = json.loads(run_itera("registry", "history", "mine", "--registry", pg_url).stdout)["events"]
    assert [(e["event"], e["actor"], e["reason"]) for e in events] == [
        ("register", "alice", "nightly"), ("register", "alice", "nightly"), ("activate", "alice", None),
        ("archive", "alice", "superseded"), ("copy", "bob", None)]
    assert events[-1]["detail"] == {"source": str(local)}
    # the next version continues the numbering
    f3 = _gguf(tmp_path, "c", b" three")
    assert run_itera("registry", "register", "--name", "mine", "--path", f3, "--registry", pg_url).record[
        "params"]["version"] == 3
    assert_usage_error(run_itera("registry", "copy", "--from", local, "--to", pg_url),
                       "already has mine; copy into a registry without those names")
    assert len(json.loads(run_itera("registry", "history", "mine", "--registry", pg_url).stdout)["events"]) == 6


def test_racing_promote_and_rollback_from_two_runners_keep_one_consistent_history(tmp_path, pg_url):
    """Two runners at once, one promoting, the other rolling back, six times each: every change is
    logged once, and each moved the alias from where the one before left it."""
    from itera.artifacts import describe_artifact
    from itera.record import Run
    from itera.registry import Ref, Registry
    from test_record import MINIMAL

    with Registry(pg_url) as reg:
        for i in (1, 2):
            f = _gguf(tmp_path, f"r{i}", f" racer {i}".encode())
            art = describe_artifact(f, "file", "gguf")
            core, params = MINIMAL["benchmark-power"]
            reg.register("race", art, Run("benchmark-power").record(art, {**core, "perplexity": 10.0}, params))
        reg.mark_good(Ref.parse("race@1"))
        reg.activate(Ref.parse("race@1"))
    script = ("import sys\nfrom itera.registry import Ref, Registry\nreg = Registry(sys.argv[1])\n"
              "for _ in range(6):\n"
              "    reg.promote(Ref.parse('race@2'), 'perplexity', 0.5) if sys.argv[2] == 'promote' "
              "else reg.rollback('race')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, pg_url, what], cwd=REPO, stderr=subprocess.PIPE,
                              text=True, env=clean_environ()) for what in ("promote", "rollback")]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    with Registry(pg_url) as reg:
        moves = [e for e in reg.history("race") if e["event"] in ("promote", "rollback")]
        final = reg.alias("race", "active")
    assert len(moves) == 12 and all(e["ok"] for e in moves)
    previous = 1
    for e in moves:
        assert e["detail"]["previous"] == previous, moves
        previous = e["version"]
    assert final == previous


def test_a_postgresql_registry_of_an_older_schema_is_migrated_only_by_registry_migrate(pg_url):
    from itera import pg
    from itera.registry.storage import PG_MIGRATIONS

    con = pg.connect(pg_url, "registry", "registry", "--registry", 5)
    try:  # the schema an itera of two migrations ago made
        pg.migrate(con, "registry", PG_MIGRATIONS[:2])
    finally:
        con.close()
    shown = pg.mask(pg_url)
    assert_usage_error(run_itera("registry", "list", "--registry", pg_url),
                       f"registry {shown} has schema version 2 and this itera uses {len(PG_MIGRATIONS)}: run "
                       "`itera registry migrate --registry URL` once")
    res = run_itera("registry", "migrate", "--registry", pg_url)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"registry": shown, "schema_before": 2, "schema_after": len(PG_MIGRATIONS)}
    assert json.loads(run_itera("registry", "list", "--registry", pg_url).stdout)["versions"] == []


def test_two_replicas_write_feedback_into_one_postgresql_through_a_restart_and_dpo_train_reads_it(
        tmp_path, pg_url, postgres, ggufs):
    """Two servers on one PostgreSQL feedback store; the database restarts in the middle of a burst
    of feedback: each request either was stored (201) or was told so and retried (503 with
    Retry-After, nothing stored); no acknowledged row is lost; dpo-train reads the pairs back."""
    import threading

    import httpx

    from itera.feedback import FeedbackStore
    from test_serve import Served

    replicas = [Served("--model", ggufs[0], "--feedback-db", pg_url, env={"ITERA_HOME": str(tmp_path / f"h{i}")})
                for i in range(2)]
    try:
        clients = [r.client() for r in replicas]
        prompts = [f"The {w} fox sees the owl" for w in ("small", "quiet", "brave", "green")]
        pairs = []  # (prompt, id from replica 0, id from replica 1): two answers to one prompt, two servers
        for p in prompts:
            ids = [clients[i].post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 1.0,
                                                            "seed": i + 1}).json()["id"] for i in (0, 1)]
            pairs.append(ids)
        acked, retried, stop = [], [], threading.Event()

        def burst(k):
            c = clients[k % 2]
            n = 0
            while not stop.is_set() and n < 30:
                a, b = pairs[(k + n) % len(pairs)]
                ev = {"type": "ab", "a_id": a, "b_id": b, "winner": "a"}
                try:
                    r = c.post("/v1/feedback", json=ev)
                except httpx.HTTPError:
                    continue
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                    n += 1
                else:
                    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                    body = r.json()["error"]
                    assert body["code"] == "store_unavailable" and "nothing was stored: retry" in body["message"]
                    assert postgres.password not in r.text
                    retried.append(k)
                    time.sleep(0.05)

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while len(acked) < 20 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        postgres.restart()
        for t in threads:
            t.join(timeout=120)
        stop.set()
    finally:
        for r in replicas:
            r.stop()
    assert len(acked) == 120 and retried, (len(acked), retried)  # every thread got through, some after a 503
    with FeedbackStore(pg_url, create=False) as store:
        counts = store.counts()
        rows = {r["id"] for r in store._read("SELECT id FROM feedback")}
        assert store.integrity_ok()
    assert set(acked) <= rows and counts["responses"] == 8
    out = tmp_path / "adapter"
    res = run_itera("dpo-train", "--model", out_ckpts[0], "--feedback-db", pg_url, "--out", out, "--steps", "2",
                    "--batch-size", "2", "--holdout", "0", "--save-pairs", tmp_path / "pairs.jsonl")
    assert res.returncode == 0, res.stderr
    assert postgres.password not in res.stdout + res.stderr and "***" in res.record["params"]["feedback_db"]
    assert res.record["metrics"]["pairs_used"] >= len(prompts)
    got = {json.loads(line)["prompt"] for line in (tmp_path / "pairs.jsonl").read_text().splitlines()}
    assert got == set(prompts)


@pytest.mark.parametrize("url,shown", [
    ("postgresql://ci:s3cret@db:5432/itera", "postgresql://ci:***@db:5432/itera"),
    ("postgresql://ci:p@ss@db/itera", "postgresql://ci:***@db/itera"),  # an unescaped @ in the password
    ("postgresql://ci@db/itera?password=s3cret&sslpassword=k3y&sslmode=require",
     "postgresql://ci@db/itera?password=***&sslpassword=***&sslmode=require"),
    ("postgresql:///itera", "postgresql:///itera"),  # a socket URL stays a URL that can be pasted back
    ("postgresql:///?service=team", "postgresql:///?service=team"),
])
def test_a_url_is_shown_as_written_with_every_password_masked(url, shown):
    from itera import pg

    assert pg.mask(url) == shown


def test_what_is_not_a_path_nor_a_known_url_is_refused_before_it_becomes_a_file(tmp_path):
    for option, args in (("--registry", ["registry", "list", "--registry"]),
                         ("--feedback-db", ["dpo-train", "--model", tmp_path, "--out", tmp_path / "o",
                                            "--feedback-db"])):
        line = assert_usage_error(run_itera(*args, "host=db user=ci password=s3cret dbname=itera", cwd=tmp_path),
                                  f"{option} 'host=db user=ci password=*** dbname=itera' looks like a libpq "
                                  "connection string; pass it as a URL")
        assert "s3cret" not in line
        line = assert_usage_error(run_itera(*args, "postgresq://ci:s3cret@db/itera", cwd=tmp_path),
                                  "URL postgresq://ci:***@db/itera has an unknown scheme 'postgresq'")
    assert list(tmp_path.iterdir()) == []  # no file named after either


def test_registering_stored_bytes_again_with_a_store_makes_the_old_version_reachable(tmp_path, pg_url):
    store = tmp_path / "store"
    f = _gguf(tmp_path, "m", b" weights")
    a = _runner(tmp_path / "home-a", pg_url)
    assert a("registry", "register", "--name", "d", "--path", f).record["params"]["store"] is None
    res = a("registry", "register", "--name", "d", "--path", f, "--store", f"file://{store}")
    assert res.returncode == 0 and res.record["params"]["duplicate_of"] == 1
    assert res.record["params"]["store"] == f"file://{store}"
    events = json.loads(a("registry", "history", "d").stdout)["events"]
    assert [(e["event"], e["detail"].get("store")) for e in events] == [("register", None),
                                                                        ("store", f"file://{store}")]
    f.unlink()  # the original is gone: the store still has it
    b = _runner(tmp_path / "home-b", pg_url)
    assert _sha(Path(b("registry", "resolve", "d@1").stdout.strip())) == hashlib.sha256(b"GGUF weights").hexdigest()


def test_a_cached_copy_that_no_longer_matches_is_fetched_again(tmp_path, pg_url):
    store = tmp_path / "store"
    a = _runner(tmp_path / "home", pg_url)
    for name in ("one", "two"):
        f = _gguf(tmp_path, name, f" weights {name}".encode())
        assert a("registry", "register", "--name", "c", "--path", f, "--store", f"file://{store}").returncode == 0
    assert a("registry", "mark-good", "c@1").returncode == 0 and a("registry", "activate", "c@2").returncode == 0
    cached = Path(a("registry", "resolve", "c@1").stdout.strip())
    os.chmod(cached, 0o644)
    cached.write_bytes(b"GGUF weights onf")  # same size, other bytes: a disk error in the cache
    res = a("registry", "rollback", "c")
    assert res.returncode == 0, res.stderr
    assert cached.read_bytes() == b"GGUF weights one"  # fetched from the store again, checked


def test_feedback_with_a_nul_is_kept_on_postgresql_as_sqlite_keeps_it(pg_url):
    from itera.feedback import FeedbackStore

    with FeedbackStore(pg_url) as store:
        for rid, text in (("r1", "a\x00b"), ("r2", "c")):
            store.add_response({"id": rid, "endpoint": "/v1/completions", "model": "m", "version": None,
                                "sha256": "0" * 64, "prompt": "P\x00", "response": text, "finish_reason": "stop",
                                "prompt_tokens": 2, "completion_tokens": 1, "request": {}})
        store.add_feedback({"type": "correction", "response_id": "r2", "corrected": "d\x00"})
        assert [(e["prompt"], e.get("response"), e.get("corrected")) for e in store.events()] == [
            ("P\ufffd", "c", "d\ufffd")]
        assert store.response("r1")["response"] == "a\ufffdb"
