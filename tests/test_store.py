"""The content-addressed artifact store: put on one machine, fetch on another, trust nothing but the
sha256 the registry recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from itera import artifacts, fsio
from itera.errors import InputError
from itera.registry import store as st


def _tree(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted (links and hidden files included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _store(tmp_path: Path) -> st.FileStore:
    return st.open_store(f"file://{tmp_path / 'store'}", create=True)


def _writable(path: Path) -> None:
    os.chmod(path, 0o644)


def _gguf(tmp_path: Path, payload: bytes = b"weights" * 1000) -> Path:
    p = tmp_path / "src" / "m.gguf"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"GGUF" + payload)
    return p


def _snapshot(tmp_path: Path) -> Path:
    """A Hugging Face cache snapshot: links into ``blobs/``, one of them in a subdirectory, and a
    plain nested file."""
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "blobs" / "aaa").write_text('{"model_type": "llama"}')
    (hub / "blobs" / "bbb").write_bytes(os.urandom(4096))
    snap = hub / "snapshots" / "0123abcd"
    (snap / "sub").mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/aaa")
    (snap / "sub" / "model.safetensors").symlink_to("../../../blobs/bbb")
    (snap / "sub" / "notes.txt").write_text("nested")
    return snap


def _onnx(tmp_path: Path) -> Path:
    d = tmp_path / "onnx"
    d.mkdir()
    (d / "m.onnx").write_bytes(b"\x08\x07graph")
    (d / "m.kv.onnx").write_bytes(b"\x08\x07kv-graph")
    (d / "m.onnx.data").write_bytes(os.urandom(3000))
    return d / "m.onnx"


def _index(store: st.FileStore, sha: str) -> Path:
    return store.root / "artifacts" / f"{sha}.json"


# --------------------------------------------------------------------------- round trips


def test_a_file_round_trips_to_identical_bytes_as_a_regular_file(tmp_path):
    src = _gguf(tmp_path)
    art = artifacts.describe(artifacts.check_artifact(src))
    store = _store(tmp_path)
    entry = store.put(src, art["sha256"])
    assert entry == {"sha256": art["sha256"], "layout": "file", "name": "m.gguf",
                     "files": [["m.gguf", src.stat().st_size, art["sha256"]]]}
    assert store.has(art["sha256"]) and not store.has("0" * 64)
    blob = store.root / "blobs" / "sha256" / art["sha256"][:2] / art["sha256"]
    assert blob.read_bytes() == src.read_bytes()

    cache = tmp_path / "cache"
    got = store.fetch(art["sha256"], cache)
    assert got == cache / art["sha256"] / "m.gguf"
    assert not got.is_symlink() and os.stat(got).st_ino != os.stat(blob).st_ino
    assert got.read_bytes() == src.read_bytes()
    assert artifacts.digest(got) == artifacts.digest(src)
    assert [p.name for p in cache.iterdir()] == [art["sha256"]]  # no temporaries left


def test_a_snapshot_of_links_round_trips_as_regular_files_with_the_same_digest(tmp_path):
    snap = _snapshot(tmp_path)
    size, sha = fsio.artifact_digest(snap)
    store = _store(tmp_path)
    entry = store.put(snap, sha)
    assert entry["layout"] == "dir" and entry["name"] == "0123abcd"
    assert [row[0] for row in entry["files"]] == ["config.json", "sub/model.safetensors", "sub/notes.txt"]

    got = store.fetch(sha, tmp_path / "cache")
    assert got == tmp_path / "cache" / sha / "0123abcd" and got.is_dir()
    assert fsio.artifact_digest(got) == (size, sha)
    files = [p for p in got.rglob("*") if not p.is_dir()]
    assert len(files) == 3 and not any(p.is_symlink() for p in files)
    assert (got / "sub" / "model.safetensors").read_bytes() == (tmp_path / "hub" / "blobs" / "bbb").read_bytes()


def test_an_onnx_graph_round_trips_with_its_companions_beside_it(tmp_path):
    src = _onnx(tmp_path)
    art = artifacts.describe(artifacts.check_artifact(src))
    assert len(art["files"]) == 3  # the graph, its KV-cache graph and its external data
    store = _store(tmp_path)
    entry = store.put(src, art["sha256"], artifacts.companions(src))
    assert entry["layout"] == "files" and entry["name"] == "m.onnx"
    assert [row[0] for row in entry["files"]] == ["m.kv.onnx", "m.onnx", "m.onnx.data"]

    got = store.fetch(art["sha256"], tmp_path / "cache")
    assert got == tmp_path / "cache" / art["sha256"] / "m.onnx"
    assert sorted(p.name for p in artifacts.companions(got)) == ["m.kv.onnx", "m.onnx.data"]
    assert artifacts.digest(got) == artifacts.digest(src)
    assert artifacts.describe(got)["sha256"] == art["sha256"]


def test_putting_an_artifact_twice_writes_nothing(tmp_path):
    snap = _snapshot(tmp_path)
    _, sha = fsio.artifact_digest(snap)
    store = _store(tmp_path)
    first = store.put(snap, sha)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.root.rglob("*")}
    assert store.put(snap, sha) == first
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.root.rglob("*")} == before


def test_a_second_fetch_uses_the_cache_and_never_the_store(tmp_path):
    src = _gguf(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    store.put(src, sha)
    cache = tmp_path / "cache"
    first = store.fetch(sha, cache)
    shutil.rmtree(store.root / "blobs")
    shutil.rmtree(store.root / "artifacts")
    assert store.fetch(sha, cache) == first
    assert artifacts.digest(first)[1] == sha


def test_a_cache_entry_that_lost_a_file_is_fetched_again(tmp_path):
    src = _onnx(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    store.put(src, sha, artifacts.companions(src))
    cache = tmp_path / "cache"
    got = store.fetch(sha, cache)
    (got.parent / "m.onnx.data").unlink()
    assert store.fetch(sha, cache) == got
    assert artifacts.digest(got)[1] == sha
    assert [p.name for p in cache.iterdir()] == [sha]


def test_a_change_in_the_store_does_not_reach_a_cached_artifact(tmp_path):
    src = _gguf(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    store.put(src, sha)
    got = store.fetch(sha, tmp_path / "cache")
    blob = store.root / "blobs" / "sha256" / sha[:2] / sha
    _writable(blob)
    with open(blob, "r+b") as f:  # in place: a hard link or reflink would see it
        f.write(b"XXXX")
    assert got.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- what is refused


def test_a_tampered_blob_is_refused_and_nothing_is_cached(tmp_path):
    src = _gguf(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    store.put(src, sha)
    blob = store.root / "blobs" / "sha256" / sha[:2] / sha
    _writable(blob)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # same length, one bit changed
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as e:
        store.fetch(sha, cache)
    assert str(e.value) == (f"store {store.url}: the blob of m.gguf of artifact {sha[:12]}… is corrupt or tampered; "
                            f"re-register it from the original file with --store {store.url}")
    assert not (cache / sha).exists() and list(cache.iterdir()) == []
    # the fix it names works: storing the original again rewrites the blob
    store.put(src, sha)
    assert artifacts.digest(store.fetch(sha, cache))[1] == sha


def test_an_index_pointing_at_other_blobs_is_refused(tmp_path):
    snap = _snapshot(tmp_path)
    _, sha = fsio.artifact_digest(snap)
    store = _store(tmp_path)
    store.put(snap, sha)
    # point notes.txt at another blob that the store really holds, with its true size
    other = tmp_path / "other.txt"
    other.write_text("evil text")
    other_sha = fsio.sha256_file(other)
    store.put(other, other_sha)
    index = json.loads(_index(store, sha).read_text())
    row = next(r for r in index["files"] if r[0] == "sub/notes.txt")
    row[1:] = [other.stat().st_size, other_sha]
    _index(store, sha).write_text(json.dumps(index))
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as e:
        store.fetch(sha, cache)
    assert str(e.value).startswith(f"store {store.url}: the index entry (its files digest to ")
    assert str(e.value).endswith(f"not {sha[:12]}…) of artifact {sha[:12]}… is corrupt or tampered; re-register it "
                                 f"from the original file with --store {store.url}")
    assert not cache.exists()
    store.put(snap, sha)  # the fix: a put replaces an index entry that does not digest
    assert fsio.artifact_digest(store.fetch(sha, cache))[1] == sha


@pytest.mark.parametrize("layout,name,rel", [
    ("dir", "d", "../evil"),
    ("dir", "d", "a/../../evil"),
    ("dir", "d", "ABS"),
    ("files", "m.onnx", "../evil"),
    ("dir", "..", "evil"),
])
def test_an_index_with_an_unsafe_path_is_refused_and_nothing_is_written(tmp_path, layout, name, rel):
    """The entry is self-consistent (it digests to its sha256, its blob is there): only the path
    check stands between it and a file written outside the cache."""
    store = _store(tmp_path)
    evil = tmp_path / "payload"
    evil.write_bytes(b"pwned")
    digest = fsio.sha256_file(evil)
    store.put(evil, digest)  # the blob
    rel = str(tmp_path / "outside" / "evil") if rel == "ABS" else rel
    rows = [[rel, 5, digest]] + ([["m.onnx", 5, digest]] if layout == "files" else [])
    sha = fsio.manifest_sha256(rows)
    _index(store, sha).write_text(json.dumps({"sha256": sha, "layout": layout, "name": name, "files": rows}))
    cache = tmp_path / "a" / "b" / "cache"
    before = _tree(tmp_path)
    with pytest.raises(InputError, match=r"the index entry \(.*\) of artifact .* is corrupt or tampered"):
        store.fetch(sha, cache)
    assert _tree(tmp_path) == before
    assert not list(tmp_path.rglob("evil"))


def test_a_missing_artifact_is_named_with_the_fix(tmp_path):
    store = _store(tmp_path)
    sha = "ab" * 32
    with pytest.raises(InputError) as e:
        store.fetch(sha, tmp_path / "cache")
    assert str(e.value) == (f"store {store.url} has no artifact sha256 abababababab…; register the version with "
                            f"--store {store.url}, or pass the store it was registered with")
    assert not (tmp_path / "cache").exists()


def test_a_lost_blob_is_named_and_nothing_is_cached(tmp_path):
    src = _onnx(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    store.put(src, sha, artifacts.companions(src))
    data_sha = fsio.sha256_file(src.with_name("m.onnx.data"))
    (store.root / "blobs" / "sha256" / data_sha[:2] / data_sha).unlink()
    cache = tmp_path / "cache"
    with pytest.raises(InputError) as e:
        store.fetch(sha, cache)
    assert str(e.value) == (f"store {store.url} has lost a blob of artifact {sha[:12]}… (m.onnx.data); re-register "
                            f"it from the original file with --store {store.url}")
    assert list(cache.iterdir()) == []


def test_put_with_the_wrong_sha256_writes_no_index_entry(tmp_path):
    src = _gguf(tmp_path)
    _, sha = artifacts.digest(src)
    wrong = hashlib.sha256(b"something else").hexdigest()
    store = _store(tmp_path)
    with pytest.raises(InputError) as e:
        store.put(src, wrong)
    assert str(e.value) == (f"{src} changed while it was being stored in {store.url} (its sha256 is now "
                            f"{sha[:12]}…, not {wrong[:12]}…); register it again once nothing is writing to it")
    assert not store.has(wrong) and not (store.root / "artifacts").exists()


def test_put_refuses_a_file_that_changes_while_it_is_copied(tmp_path, monkeypatch):
    src = _gguf(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    real = st._copy_hashing

    def change_then_copy(a, b):
        src.write_bytes(b"GGUF changed")
        return real(a, b)

    monkeypatch.setattr(st, "_copy_hashing", change_then_copy)
    with pytest.raises(InputError, match=r"changed while it was being stored .*\(m\.gguf no longer hashes to "):
        store.put(src, sha)
    assert not store.has(sha)
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == []  # the temporary blob is gone


@pytest.mark.parametrize("bad", ["", "xyz", "A" * 63, "../" + "a" * 61])
def test_a_malformed_sha256_is_refused_before_it_becomes_a_file_name(tmp_path, bad):
    store = _store(tmp_path)
    for call in (lambda: store.has(bad), lambda: store.fetch(bad, tmp_path / "cache"),
                 lambda: store.put(_gguf(tmp_path), bad)):
        with pytest.raises(InputError, match="is not a sha256 .64 hex digits.; pass the artifact's sha256"):
            call()


# --------------------------------------------------------------------------- opening a store


def test_open_store_accepts_file_urls_and_normalizes_them(tmp_path):
    (tmp_path / "s").mkdir()
    for url in (f"file://{tmp_path}/s", f"file://{tmp_path}/s/", f"file://localhost{tmp_path}/s", f"file:{tmp_path}/s"):
        s = st.open_store(url)
        assert (s.url, s.root) == (f"file://{tmp_path}/s", tmp_path / "s"), url
    spaced = tmp_path / "my store"
    s = st.open_store(f"file://{tmp_path}/my%20store", create=True)
    assert s.root == spaced and spaced.is_dir() and s.url == f"file://{tmp_path}/my%20store"


def test_create_makes_a_missing_store_and_its_parents(tmp_path):
    s = st.open_store(f"file://{tmp_path}/a/b/store", create=True)
    assert s.root.is_dir() and list(s.root.iterdir()) == []  # the write probe is gone


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "store"
    f.write_text("not a store")
    for create in (False, True):
        with pytest.raises(InputError) as e:
            st.open_store(f"file://{f}", create=create)
        assert str(e.value) == f"store file://{f} is a file; pass the URL of the store's directory"
    assert f.read_text() == "not a store"


def test_an_unknown_scheme_is_refused_naming_the_supported_ones():
    with pytest.raises(InputError) as e:
        st.open_store("s3://bucket/x", create=True)
    assert str(e.value) == ("store s3://bucket/x uses the scheme s3://, which itera cannot read; pass a "
                            "file:///absolute/path URL on a filesystem this machine mounts (supported schemes: file)")
    with pytest.raises(InputError, match="uses the scheme http://"):
        st.open_store("http://example.com/store")


def test_a_missing_store_without_create_is_refused(tmp_path):
    url = f"file://{tmp_path}/nope"
    with pytest.raises(InputError) as e:
        st.open_store(url)
    assert str(e.value) == (f"store {url} does not exist; pass the store a version was registered with, or register "
                            f"with --store {url} to create it")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("url,message", [
    ("/shared/store", "store /shared/store is not a URL; pass file:///shared/store (supported schemes: file)"),
    ("store", "store store is not a URL; pass a file:///absolute/path URL (supported schemes: file)"),
    ("file://", "store file:// does not name an absolute path; pass file:///absolute/path (three slashes)"),
    ("file:relative/x", "store file:relative/x does not name an absolute path; pass file:///absolute/path "
                        "(three slashes)"),
    ("file://data/store", "store file://data/store names the host 'data'; itera reads stores through this "
                          "machine's filesystem, so mount the share and pass file:///absolute/path (three slashes)"),
])
def test_a_url_that_names_no_absolute_local_path_is_refused(url, message):
    with pytest.raises(InputError) as e:
        st.open_store(url, create=True)
    assert str(e.value) == message


def test_a_store_that_cannot_be_written_is_refused_when_creating(tmp_path):
    # /proc refuses new files even to root, which a chmod would not stop
    with pytest.raises(InputError, match=r"^store file:///proc cannot be written \(.+\); pass a store directory "
                                         "this user can write$"):
        st.open_store("file:///proc", create=True)
    assert st.open_store("file:///proc").root == Path("/proc")  # reading needs no write access
    with pytest.raises(InputError, match=r"^store file:///proc/itera-store/x cannot be created \(.+\); pass a "
                                         "directory this user can write$"):
        st.open_store("file:///proc/itera-store/x", create=True)
    blocker = tmp_path / "f"
    blocker.write_text("")
    for create in (False, True):
        with pytest.raises(InputError) as e:
            st.open_store(f"file://{blocker}/store", create=create)
        assert str(e.value) == (f"store file://{blocker}/store runs through a file (a part of its path is not a "
                                "directory); pass the URL of the store's directory")


# --------------------------------------------------------------------------- concurrency


def test_concurrent_fetches_of_one_artifact_all_return_the_same_valid_path(tmp_path):
    snap = _snapshot(tmp_path)
    for i in range(20):
        (snap / f"shard-{i}.bin").write_bytes(os.urandom(64 * 1024))
    _, sha = fsio.artifact_digest(snap)
    store = _store(tmp_path)
    store.put(snap, sha)
    cache = tmp_path / "cache"
    n = 8
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = store.fetch(sha, cache)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(set(results)) == 1
    assert results[0] == cache / sha / snap.name
    assert fsio.artifact_digest(results[0])[1] == sha
    assert [p.name for p in cache.iterdir()] == [sha]


def test_a_fetch_that_loses_the_race_keeps_the_winners_entry(tmp_path, monkeypatch):
    """Deterministic: while one fetch fills its temporary directory, another completes."""
    src = _onnx(tmp_path)
    _, sha = artifacts.digest(src)
    store = _store(tmp_path)
    store.put(src, sha, artifacts.companions(src))
    cache = tmp_path / "cache"
    real = st.FileStore._fill
    winner = {}

    def fill_while_another_wins(self, tmp, index):
        real(self, tmp, index)
        if not winner:
            winner["path"] = None
            winner["path"] = self.fetch(sha, cache)  # the whole fetch: its entry is renamed into place
            winner["inode"] = os.stat(winner["path"]).st_ino

    monkeypatch.setattr(st.FileStore, "_fill", fill_while_another_wins)
    got = store.fetch(sha, cache)
    assert got == winner["path"] == cache / sha / "m.onnx"
    assert os.stat(got).st_ino == winner["inode"] and artifacts.digest(got)[1] == sha
    assert [p.name for p in cache.iterdir()] == [sha]
