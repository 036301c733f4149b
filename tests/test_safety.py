"""Never destroy what the user didn't name; hashes that mean something; exit codes that tell the truth.

Each data-loss case runs the real CLI and checks the user's files and the input model byte for
byte afterwards, with and without --force.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL, assert_usage_error, make_record, run_itera


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 (or the kind of node) of everything under ``path``."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        st = os.lstat(p)
        rel = p.relative_to(path).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else stat.filemode(st.st_mode)
    return out


@pytest.fixture
def model(tiny_ckpt, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture
def userdata(tmp_path) -> Path:
    d = tmp_path / "userdata"
    d.mkdir()
    (d / "thesis.tex").write_text("\\chapter{Years of work}\n")
    (d / "data.csv").write_text("a,b\n1,2\n")
    return d


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------- data loss through --out


def test_existing_directory_is_refused_without_force_and_replaced_only_with_it(model, userdata, tmp_path):
    before = tree(userdata)
    res = run_itera("quantize", "--model", model, "--method", "rtn", "--out", userdata)
    assert_usage_error(res, f"--out {userdata} already exists", "--force")
    assert tree(userdata) == before
    rec = run_itera("quantize", "--model", model, "--method", "rtn", "--out", userdata, "--force").record
    assert rec["artifact"]["format"] == "itera-quant" and not (userdata / "thesis.tex").exists()
    assert _leftovers(tmp_path) == []


def test_report_default_out_keeps_the_users_report_directory(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "thesis.tex").write_text("mine")
    from itera.record import dumps

    rec = make_record("export", {"path": "x.gguf", "kind": "file", "format": "gguf", "bytes": 1, "sha256": "a" * 64})
    (tmp_path / "r.json").write_text(dumps(rec))
    p = subprocess.run([sys.executable, "-m", "itera", "report", str(tmp_path / "r.json")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--out report already exists" in p.stderr and p.stdout == ""
    assert (tmp_path / "report" / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("case", ["quantize-into-itself", "dpo-into-itself", "distill-into-teacher",
                                  "export-into-checkpoint", "quantize-around-input", "metrics-out-into-input"])
def test_an_output_that_is_contains_or_sits_inside_an_input_is_refused_even_with_force(
        case, force, model, tmp_path, distill_corpus):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    argv = {
        "quantize-into-itself": ["quantize", "--model", model, "--method", "rtn", "--out", model],
        "dpo-into-itself": ["dpo-train", "--model", model, "--pairs", pairs, "--out", model],
        "distill-into-teacher": ["distill", "--teacher", model, "--student", "half", "--data", distill_corpus,
                                 "--out", model],
        "export-into-checkpoint": ["export", "--model", model, "--format", "gguf", "--out",
                                   model / "model.safetensors"],
        "quantize-around-input": ["quantize", "--model", model, "--method", "rtn", "--out", tmp_path],
        "metrics-out-into-input": ["quantize", "--model", model, "--method", "rtn", "--out", tmp_path / "q",
                                   "--metrics-out", model / "metrics.json"],
    }[case]
    before = tree(model)
    res = run_itera(*argv, *force)
    line = assert_usage_error(res)
    assert str(model) in line or str(tmp_path) in line
    assert tree(model) == before
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == [] and _leftovers(model) == []


def test_outputs_never_replace_devices_fifos_or_links(model, tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert_usage_error(run_itera("export", "--model", model, "--format", "gguf", "--out", fifo, "--force"),
                       "is a FIFO")
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "elsewhere.gguf")
    assert_usage_error(run_itera("export", "--model", model, "--format", "gguf", "--out", link, "--force"),
                       "is a symbolic link")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert_usage_error(run_itera("export", "--model", model, "--format", "gguf", "--out", "/dev/null", "--force"),
                       "is a device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_metrics_out_writes_through_to_a_device_and_an_existing_file(model, tmp_path, corpus_file):
    args = ["evaluate", "--model", model, "-d", corpus_file, "--max-tokens", "50"]
    rec = run_itera(*args, "--metrics-out", "/dev/null").record
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device, not a regular file
    target = tmp_path / "metrics.json"
    target.write_text("old")
    alias = tmp_path / "alias.json"
    alias.symlink_to(target)
    run_itera(*args, "--metrics-out", alias).record
    assert alias.is_symlink() and json.loads(target.read_text())["command"] == "evaluate"
    assert rec["command"] == "evaluate"


def test_unwritable_output_fails_before_any_work(model, tmp_path, distill_corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    res = run_itera("distill", "--teacher", model, "--student", "half", "--data", distill_corpus,
                    "--out", blocker / "sub" / "student", "--steps", "500", *SMALL)
    assert_usage_error(res, "cannot be created", str(blocker))
    res = run_itera("distill", "--teacher", model, "--student", "half", "--data", distill_corpus,
                    "--out", tmp_path / "s", "--steps", "500", "--metrics-out", blocker / "m.json", *SMALL)
    assert_usage_error(res, "--metrics-out", "cannot be created")
    assert time.perf_counter() - t0 < 30  # failed at once, not after 500 steps
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------- temporaries and modes


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run_with_the_same_out(model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale_dir = tmp_path / f".q.tmp-{dead.pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half-written")
    stale_file = tmp_path / f".q.old-{dead.pid}-def"
    stale_file.write_text("x")
    live = tmp_path / f".q.tmp-{os.getpid()}-ghi"  # a run still going: left alone
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead.pid}-jkl"  # another output's: left alone
    other.mkdir()
    run_itera("quantize", "--model", model, "--method", "rtn", "--out", tmp_path / "q").record
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other.exists()


def _run_with_umask(mask: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itera", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, preexec_fn=lambda: os.umask(mask))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_respect_the_umask(model, tmp_path, mask):
    out = tmp_path / f"q{mask:o}"
    p = _run_with_umask(mask, "quantize", "--model", model, "--method", "rtn", "--out", out,
                        "--metrics-out", tmp_path / f"m{mask:o}.json")
    assert p.returncode == 0, p.stderr
    gguf = tmp_path / f"m{mask:o}.gguf"
    assert _run_with_umask(mask, "export", "--model", model, "--format", "gguf", "--out", gguf).returncode == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~mask
    for f in (out / "model.safetensors", out / "config.json", gguf, tmp_path / f"m{mask:o}.json"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~mask, f


def test_sigterm_removes_temporaries_and_says_so(model, tmp_path, distill_corpus):
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "itera", "distill", "--teacher", str(model), "--student", "half",
                          "--data", str(distill_corpus), "--out", str(out), "--steps", "100000", *SMALL],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    time.sleep(8)  # well into training
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, stderr.decode()[-500:]
    assert stdout == b"" and stderr.decode().strip().splitlines()[-1].startswith("itera: error: terminated")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_distill_keeps_an_earlier_train_state_it_did_not_use(model, tmp_path, distill_corpus):
    state = tmp_path / "s.train-state"
    state.mkdir()
    (state / "notes.txt").write_text("an earlier run's state, kept for a later --resume")
    run_itera("distill", "--teacher", model, "--student", "half", "--data", distill_corpus, "--out", tmp_path / "s",
              "--steps", "2", *SMALL).record
    assert (state / "notes.txt").exists()


# ------------------------------------------------------------------------------- Hugging Face cache snapshots


def hf_snapshot(cache: Path, repo_id: str, ckpt: Path, revision: str = "0123abcd") -> Path:
    """A directory laid out like huggingface_hub's cache: snapshot files are links into blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in sorted(ckpt.iterdir()):
        if not f.is_file():
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def snapshots(tmp_path, tokenizer_dir):
    from conftest import save_tiny

    a = hf_snapshot(tmp_path / "hub", "org/a", save_tiny(tmp_path / "src-a", tokenizer_dir, seed=1))
    b = hf_snapshot(tmp_path / "hub", "org/b", save_tiny(tmp_path / "src-b", tokenizer_dir, seed=2))
    return a, b


def test_snapshot_of_links_evaluates_and_hashes_by_content(snapshots, corpus_file):
    from itera.fsio import artifact_digest

    a, b = snapshots
    assert all(p.is_symlink() for p in a.iterdir())
    ev = run_itera("evaluate", "--model", a, "-d", corpus_file, "--max-tokens", "60").record
    size, digest = artifact_digest(a)
    assert ev["artifact"]["sha256"] == digest and size > 10_000  # the blobs' bytes, not an empty manifest
    assert digest != hashlib.sha256(b"").hexdigest() and artifact_digest(b)[1] != digest


def test_two_snapshots_register_with_different_hashes_and_a_changed_blob_blocks_rollback(snapshots, tmp_path):
    a, b = snapshots
    db = tmp_path / "r.db"
    ra = run_itera("registry", "register", "--name", "m", "--path", a, "--registry", db).record
    rb = run_itera("registry", "register", "--name", "m", "--path", b, "--registry", db).record
    assert ra["artifact"]["sha256"] != rb["artifact"]["sha256"]
    for args in (["activate", "m@1"], ["mark-good", "m@1"], ["activate", "m@2"]):
        assert run_itera("registry", *args, "--registry", db).returncode == 0
    blob = (a / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights, changed in the blob the link points to
    blob.write_bytes(bytes(data))
    res = run_itera("registry", "rollback", "m", "--registry", db)
    assert res.returncode == 3 and "changed since it was registered" in res.stderr and res.stdout == ""


def test_reference_cache_is_not_shared_between_different_snapshots(snapshots, tmp_path):
    a, b = snapshots
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"The fox {i}.", "chosen": " The happy owl.",
                                         "rejected": " The lonely owl."}) + "\n" for i in range(6)))
    home = {"ITERA_HOME": str(tmp_path / "home")}
    args = ["--pairs", pairs, "--steps", "1", "--batch-size", "2", "--holdout", "0"]
    first = run_itera("dpo-train", "--model", a, "--out", tmp_path / "da", *args, env=home).record
    other = run_itera("dpo-train", "--model", b, "--out", tmp_path / "db", *args, env=home).record
    again = run_itera("dpo-train", "--model", a, "--out", tmp_path / "da2", *args, env=home).record
    assert first["metrics"]["reference_cache_hit"] is False
    assert other["metrics"]["reference_cache_hit"] is False  # another model's weights: not reused
    assert again["metrics"]["reference_cache_hit"] is True


# ------------------------------------------------------------------------------- the registry tells the truth


@pytest.fixture
def registry(tmp_path):
    db = tmp_path / "r.db"
    arts = []
    for i in (1, 2):
        f = tmp_path / f"v{i}.gguf"
        f.write_bytes(b"GGUF " + bytes([i]) * 64)
        arts.append(f)
        assert run_itera("registry", "register", "--name", "m", "--path", f, "--registry", db).returncode == 0
    assert run_itera("registry", "activate", "m@1", "--registry", db).returncode == 0
    return db, arts


def _db_bytes(db: Path) -> bytes:
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return db.read_bytes()


@pytest.mark.parametrize("argv", [["register", "--name", "m", "--path", "ART"], ["activate", "m@2"],
                                  ["promote", "m@2", "--metric", "x", "--higher-is-better"], ["mark-good", "m@2"],
                                  ["rollback", "m", "--to", "2"]])
def test_a_change_with_an_unwritable_metrics_out_changes_nothing(registry, tmp_path, argv):
    db, arts = registry
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created under it")
    before = _db_bytes(db)
    argv = [str(arts[0]) if a == "ART" else a for a in argv]
    res = run_itera("registry", *argv, "--registry", db, "--metrics-out", blocker / "m.json")
    assert_usage_error(res, "--metrics-out")
    assert _db_bytes(db) == before


def test_a_record_with_nan_registers_nothing(registry, tmp_path):
    db, arts = registry
    from itera.artifacts import describe_artifact
    from itera.record import dumps

    text = dumps(make_record("benchmark-power", describe_artifact(arts[1], "file", "gguf"), {"x": 1.5}))
    before = _db_bytes(db)
    res = run_itera("registry", "register", "--name", "m", "--registry", db, stdin=text.replace("1.5", "NaN"))
    assert_usage_error(res, "NaN")
    assert _db_bytes(db) == before


def test_a_newer_schema_is_refused_before_any_write(registry):
    import sqlite3

    db, arts = registry
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.close()
    before = _db_bytes(db)
    assert_usage_error(run_itera("registry", "activate", "m@2", "--registry", db), "created by a newer itera")
    assert _db_bytes(db) == before


def test_a_locked_registry_waits_a_bounded_time_then_says_it_is_busy(registry):
    import sqlite3

    db, _ = registry
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.perf_counter()
        res = run_itera("registry", "activate", "m@2", "--registry", db, env={"ITERA_REGISTRY_BUSY_S": "1"})
        assert_usage_error(res, "is busy", "1 s")
        assert time.perf_counter() - t0 < 20
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# ------------------------------------------------------------------------------- report markup


def test_html_report_of_hostile_names_holds_no_markup(tmp_path):
    from itera.record import dumps

    evil = "<script>alert(1)</script>"
    art = {"path": f"runs/{evil}.gguf", "kind": "file", "format": "<b onmouseover=alert(2)>gguf",
           "bytes": 1234, "sha256": "c" * 64}
    ev = make_record("evaluate", art, {"datasets": {"<img src=x onerror=alert(3)>": {
        "perplexity": 12.5, "bits_per_byte": 1.5, "tokens": 100, "bytes": 400, "tokens_per_s": 10.0}}})
    (tmp_path / "r.json").write_text(dumps(ev))
    run_itera("report", tmp_path / "r.json", "--out", tmp_path / "h", "--format", "html").record
    html = (tmp_path / "h" / "report.html").read_text()
    lowered = html.lower()
    assert "<script" not in lowered and "<img src=x" not in lowered and "<b onmouseover" not in lowered
    assert "&lt;img src=x onerror=alert(3)&gt;" in html and "&lt;b onmouseover=alert(2)&gt;gguf" in html
    assert "12.500" in html
    run_itera("report", tmp_path / "r.json", "--out", tmp_path / "m").record
    md = (tmp_path / "m" / "report.md").read_text()
    assert "<script" not in md.lower() and "<img src=x" not in md.lower()
