"""A content-addressed artifact store, so that a version registered on one machine can be fetched
on another: the team's shared filesystem, named by a ``file://`` URL.

Layout under the store's directory::

    blobs/sha256/<first 2 hex>/<sha256>   every file of every artifact, named by its content
    artifacts/<sha256>.json               one index entry per artifact (its registry sha256)

An index entry says how the blobs make the artifact: ``{"sha256", "layout", "name", "files"}``
with ``layout`` "file" (one file), "files" (a file and its companions, side by side: an ONNX
graph with its KV-cache graph and external data) or "dir" (a directory; a Hugging Face snapshot's
links are stored as their targets' bytes), and ``files`` the ``[relpath, bytes, sha256]`` rows
that :func:`itera.fsio.artifact_digest` hashes. So the artifact's sha256 can be recomputed from
its index alone, and every blob from its name: a reader trusts neither the index nor the blobs,
only the sha256 the registry recorded.

Writes are atomic (a temporary name in the same directory, then a rename): a blob or an index
entry is there whole or not at all, and two machines storing the same artifact at once write the
same bytes. A blob already there is checked, not rewritten; a put that was interrupted leaves at
most blobs that no index names, which are harmless.

:meth:`FileStore.fetch` copies an artifact into a local cache (``$ITERA_HOME/cache/artifacts`` by
default) as ``<cache>/<sha256>/<name>``: regular files, never links into the store, so a later
change to the store cannot change what a model loads. A complete cache entry is used without
reading the store; an entry is renamed into place only once every byte is checked.

Stdlib only, no torch: the registry commands that use it start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from itera import paths
from itera.errors import InputError
from itera.fsio import (HASH_CHUNK, _umask, atomic_file, check_regular, directory_manifest, manifest_sha256,
                        remove_stale_temporaries, sha256_file, temp_dir_beside, temp_path_beside)

SCHEMES = ("file",)
LAYOUTS = ("file", "files", "dir")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CACHE_INDEX = ".itera-store.json"  # beside a cached artifact: its index entry, so a cache hit needs no store
_URL_FIX = "pass file:///absolute/path (three slashes)"


def default_cache() -> Path:
    """Where fetched artifacts are kept: ``$ITERA_HOME/cache/artifacts``."""
    return paths.cache_dir() / "artifacts"


# --------------------------------------------------------------------------- opening a store


def _store_path(url: str) -> Path:
    """The absolute path a ``file://`` URL names (``file:///p``, ``file://localhost/p``, ``file:/p``;
    percent-escapes decoded), or an InputError that says what to pass instead."""
    scheme, colon, rest = url.partition(":")
    if not colon or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) or len(scheme) == 1:
        fix = f"pass file://{url}" if url.startswith("/") else "pass a file:///absolute/path URL"
        raise InputError(f"store {url} is not a URL; {fix} (supported schemes: {', '.join(SCHEMES)})")
    if scheme.lower() not in SCHEMES:
        raise InputError(f"store {url} uses the scheme {scheme.lower()}://, which itera cannot read; pass a "
                         f"file:///absolute/path URL on a filesystem this machine mounts (supported schemes: "
                         f"{', '.join(SCHEMES)})")
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise InputError(f"store {url} names the host {host!r}; itera reads stores through this machine's "
                             f"filesystem, so mount the share and {_URL_FIX}")
        path = slash + path
    else:
        path = rest
    path = urllib.parse.unquote(path)
    if not path.startswith("/") or "\0" in path:
        raise InputError(f"store {url} does not name an absolute path; {_URL_FIX}")
    return Path(path)


def open_store(url: str, create: bool = False) -> "FileStore":
    """The store at ``url`` (a ``file://`` URL of a directory). With ``create`` a missing directory
    is made (parents too) and the store must be writable: both are checked here, before anyone
    hashes gigabytes. Without it the directory must exist (a fetch only reads)."""
    root = _store_path(url)
    normalized = "file://" + urllib.parse.quote(str(root))
    try:
        st = os.stat(root)
    except FileNotFoundError:
        if not create:
            raise InputError(f"store {url} does not exist; pass the store a version was registered with, or "
                             f"register with --store {normalized} to create it") from None
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"store {url} cannot be created ({e.strerror}); pass a directory this user can "
                             "write") from None
        st = os.stat(root)
    except NotADirectoryError:
        raise InputError(f"store {url} runs through a file (a part of its path is not a directory); pass the URL of "
                         "the store's directory") from None
    except OSError as e:  # no permission on a parent, a link loop
        raise InputError(f"store {url} cannot be read ({e.strerror}); pass a store directory this user can "
                         "read") from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a file" if stat.S_ISREG(st.st_mode) else "not a directory"
        raise InputError(f"store {url} is {what}; pass the URL of the store's directory")
    if create:
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"store {url} cannot be written ({e.strerror}); pass a store directory this user "
                             "can write") from None
    return FileStore(normalized, root)


# --------------------------------------------------------------------------- index entries


def _check_sha256(sha256: str) -> str:
    """A sha256 as 64 lower-case hex digits: it becomes a file name, so nothing else is let through."""
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256.lower()):
        raise InputError(f"{sha256!r} is not a sha256 (64 hex digits); pass the artifact's sha256 as the "
                         "registry records it")
    return sha256.lower()


def _name_problem(rel: object, single: bool) -> str | None:
    """Why ``rel`` cannot be a path inside a cache entry (absolute, ``..``, ...), or None.
    ``single``: it must be one plain file name."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r} is not a file name"
    if rel.startswith("/"):
        return f"{rel!r} is an absolute path"
    if any(c in rel for c in "\\\0\n\r"):
        return f"{rel!r} holds a backslash, NUL or line break"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return f"{rel!r} has an empty, '.' or '..' part"
    if single and "/" in rel:
        return f"{rel!r} is not a plain file name"
    if single and rel == CACHE_INDEX:
        return f"{rel!r} is the name the cache keeps its index under"
    return None


def index_problem(index: object, sha256: str) -> str | None:
    """Why ``index`` is not a well-formed index entry whose files digest to ``sha256``, or None.

    The digest is recomputed as :func:`itera.fsio.artifact_digest` computes it (a lone file: its
    own sha256; else the manifest's), so an entry edited to point at other blobs, other names or
    paths outside the cache entry is refused before a byte is copied."""
    if not isinstance(index, dict):
        return "not a JSON object"
    if index.get("sha256") != sha256:
        return f"it describes sha256 {str(index.get('sha256'))[:12]}…"
    layout, name, files = index.get("layout"), index.get("name"), index.get("files")
    if layout not in LAYOUTS:
        return f"unknown layout {layout!r}"
    if problem := _name_problem(name, single=True):
        return f"its name {problem}"
    if not isinstance(files, list) or not all(isinstance(row, list) and len(row) == 3 for row in files):
        return "its files are not [path, bytes, sha256] rows"
    rels = []
    for rel, size, digest in files:
        if problem := _name_problem(rel, single=layout != "dir"):
            return f"its file {problem}"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{rel!r} has no size in bytes"
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            return f"{rel!r} has no sha256"
        rels.append(rel)
    if len(set(rels)) != len(rels):
        return "it names a file twice"
    parents = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
    if parents & set(rels):
        return "it names a file that is also a directory"
    if layout == "file" and rels != [name]:
        return "a single-file artifact must list exactly its own file"
    if layout == "files" and name not in rels:
        return "it does not list its own file"
    got = files[0][2] if layout == "file" else manifest_sha256(files)
    if got != sha256:
        return f"its files digest to {got[:12]}…, not {sha256[:12]}…"
    return None


def _read_json(path: Path) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- copying


class _ReadError(Exception):
    """An OSError while reading the source of a copy (the store's or the user's side, by caller)."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


def _copy_hashing(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` over ``dst`` (which may exist, empty), hashing the bytes as they pass: (bytes, sha256).

    Errors reading ``src`` are :class:`_ReadError`; errors writing ``dst`` stay OSError, so each
    caller can say which side failed and what to do about it."""
    h, n = hashlib.sha256(), 0
    try:
        fin = open(src, "rb")
    except OSError as e:
        raise _ReadError(e) from None
    with fin, open(dst, "wb") as fout:
        while True:
            try:
                chunk = fin.read(HASH_CHUNK)
            except OSError as e:
                raise _ReadError(e) from None
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return n, h.hexdigest()


def _read_only(path: Path) -> None:
    """r--r--r-- less the umask: nothing in a blob or a cache entry should ever be written again."""
    os.chmod(path, 0o444 & ~_umask())


def _host_tag() -> str:
    """This machine's name, for temporary names in a cache that may be on a shared home directory:
    leftovers are removed only by the machine whose process ids they carry."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "host")[:64]


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class FileStore:
    """A store in a directory (usually on a shared filesystem). See the module docstring."""

    url: str
    root: Path

    def _blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def _index_path(self, sha256: str) -> Path:
        return self.root / "artifacts" / f"{sha256}.json"

    def has(self, sha256: str) -> bool:
        """Whether the store has an index entry for the artifact ``sha256`` (its blobs are checked
        only by :meth:`fetch`)."""
        return self._index_path(_check_sha256(sha256)).is_file()

    # ------------------------------------------------------------------ put

    def put(self, path: Path, sha256: str, companions: list[Path] = ()) -> dict:
        """Copy the artifact at ``path`` (with ``companions``, as :func:`itera.fsio.artifact_digest`
        takes them; ignored for a directory, as there) into the store; return its index entry.

        The artifact is hashed first and must digest to ``sha256``; then each file whose blob is
        missing or does not hold its bytes is copied, hashed again on the way, so a file that
        changes meanwhile is caught. The index entry is written last: once it is there, every
        blob it names is complete. Storing an artifact that is already there writes nothing."""
        sha256 = _check_sha256(sha256)
        path = Path(os.path.abspath(path))
        layout, sources, rows = self._scan(path, [Path(c) for c in companions])
        got = rows[0][2] if layout == "file" else manifest_sha256(rows)
        if got != sha256:
            raise self._changed(path, got, sha256)
        index = {"sha256": sha256, "layout": layout, "name": path.name, "files": [list(r) for r in rows]}
        if problem := index_problem(index, sha256):
            raise InputError(f"{path} cannot be stored: {problem}; rename it")
        for (_, size, digest), src in zip(rows, sources):
            self._put_blob(path, src, size, digest)
        return self._put_index(path, index)

    def _scan(self, path: Path, companions: list[Path]) -> tuple[str, list[Path], list[tuple[str, int, str]]]:
        """(layout, source file per row, manifest rows sorted by path) of the artifact at ``path``."""
        try:
            st = check_regular(path)
            if stat.S_ISDIR(st.st_mode):
                rows = directory_manifest(path)
                return "dir", [path / rel for rel, _, _ in rows], rows
            files = [path, *companions]
            if len({f.name for f in files}) != len(files):
                raise InputError(f"{path} cannot be stored: two of its files have the same name; pass companions "
                                 "with distinct names")
            found = sorted(((f.name, check_regular(f).st_size, sha256_file(f)), f) for f in files)
        except OSError as e:
            raise InputError(f"{path} cannot be read ({e.strerror}: {e.filename}); pass an artifact this user can "
                             "read") from None
        return ("files" if companions else "file"), [f for _, f in found], [r for r, _ in found]

    def _changed(self, path: Path, got: str, sha256: str) -> InputError:
        return InputError(f"{path} changed while it was being stored in {self.url} (its sha256 is now {got[:12]}…, "
                          f"not {sha256[:12]}…); register it again once nothing is writing to it")

    def _write_error(self, path: Path, e: OSError) -> InputError:
        return InputError(f"store {self.url} cannot take {path} ({e.strerror}); free space in the store or pass "
                          "a store this user can write")

    def _put_blob(self, path: Path, src: Path, size: int, digest: str) -> None:
        """Make blob ``digest`` hold ``src``'s bytes: kept if it already does, else copied to a
        temporary name beside it and renamed over it."""
        blob = self._blob(digest)
        if _holds(blob, size, digest):
            return
        try:
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path_beside(blob)
        except OSError as e:
            raise self._write_error(path, e) from None
        try:
            n, got = _copy_hashing(src, tmp)
            if (n, got) != (size, digest):
                raise InputError(f"{path} changed while it was being stored in {self.url} ({src.name} no longer "
                                 f"hashes to {digest[:12]}…); register it again once nothing is writing to it")
            _read_only(tmp)
            os.replace(tmp, blob)
        except _ReadError as e:
            tmp.unlink(missing_ok=True)
            raise InputError(f"{path} cannot be read ({e.error.strerror}: {src}); pass an artifact this user can "
                             "read") from None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._write_error(path, e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _put_index(self, path: Path, index: dict) -> dict:
        """Write the index entry unless a valid one is there (the first artifact stored under a
        sha256 keeps its name); one that is corrupt is replaced. Returns the entry in the store."""
        target = self._index_path(index["sha256"])
        try:
            existing = _read_json(target)
        except (OSError, ValueError):
            existing = None
        if existing is not None and index_problem(existing, index["sha256"]) is None:
            return existing
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as tmp:
                tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise self._write_error(path, e) from None
        return index

    # ------------------------------------------------------------------ fetch

    def fetch(self, sha256: str, cache: Path) -> Path:
        """The artifact ``sha256`` as a local path, ``<cache>/<sha256>/<name>`` (a file with its
        companions beside it, or a directory), copied from the store unless the cache has it.

        A cache entry is complete once it exists (it is renamed into place whole); its files are
        checked by size, and one that lost a file is fetched again. The store's index entry must
        digest to ``sha256`` and every blob must hash to its name, else nothing is left in the
        cache. When two processes fetch at once, the first to finish wins and both return its path."""
        sha256 = _check_sha256(sha256)
        cache = Path(cache)
        final = cache / sha256
        if (hit := _cached(final, sha256)) is not None:
            return hit
        index = self._read_index(sha256)
        key = cache / f"{sha256}@{_host_tag()}"  # temporaries: .<sha256>@<host>.tmp-<pid>-*
        try:
            cache.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(key)
            tmp = temp_dir_beside(key)
        except OSError as e:
            raise self._cache_error(cache, e) from None
        try:
            self._fill(tmp, index)
            for attempt in (1, 2):
                try:
                    os.rename(tmp, final)
                    break
                except OSError:
                    if (hit := _cached(final, sha256)) is not None:  # another process got there first
                        shutil.rmtree(tmp, ignore_errors=True)
                        return hit
                    if attempt == 2 or not os.path.lexists(final):
                        raise
                    _discard(final, key)  # an entry that lost a file: replaced by this complete one
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._cache_error(cache, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / index["name"]

    def _tampered(self, sha256: str, what: str) -> InputError:
        return InputError(f"store {self.url}: {what} of artifact {sha256[:12]}… is corrupt or tampered; re-register "
                          f"it from the original file with --store {self.url}")

    def _cache_error(self, cache: Path, e: OSError) -> InputError:
        return InputError(f"artifact cache {cache} cannot be written ({e.strerror}); pass a cache directory this "
                          "user can write (by default $ITERA_HOME/cache/artifacts)")

    def _read_index(self, sha256: str) -> dict:
        """The store's index entry for ``sha256``, checked (:func:`index_problem`)."""
        try:
            index = _read_json(self._index_path(sha256))
        except FileNotFoundError:
            raise InputError(f"store {self.url} has no artifact sha256 {sha256[:12]}…; register the version with "
                             f"--store {self.url}, or pass the store it was registered with") from None
        except OSError as e:
            raise InputError(f"store {self.url} cannot be read ({e.strerror}); pass a store this user can "
                             "read") from None
        except ValueError:
            raise self._tampered(sha256, "the index entry (not JSON)") from None
        if problem := index_problem(index, sha256):
            raise self._tampered(sha256, f"the index entry ({problem})")
        return index

    def _fill(self, tmp: Path, index: dict) -> None:
        """Copy the artifact's blobs into the fresh directory ``tmp``, each checked against its
        sha256, and write its index entry beside it. Files and the entry end read-only."""
        sha256, base = index["sha256"], tmp
        if index["layout"] == "dir":
            base = tmp / index["name"]
            base.mkdir()
        for rel, size, digest in index["files"]:
            dst = base / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                n, got = _copy_hashing(self._blob(digest), dst)
            except _ReadError as e:
                if isinstance(e.error, FileNotFoundError):
                    raise InputError(f"store {self.url} has lost a blob of artifact {sha256[:12]}… ({rel}); "
                                     f"re-register it from the original file with --store {self.url}") from None
                raise InputError(f"store {self.url} cannot be read ({e.error.strerror}); pass a store this user "
                                 "can read") from None
            if (n, got) != (size, digest):
                raise self._tampered(sha256, f"the blob of {rel}")
            _read_only(dst)
        (tmp / CACHE_INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        _read_only(tmp / CACHE_INDEX)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's is 0700; the entry gets mkdir's mode


def _holds(blob: Path, size: int, digest: str) -> bool:
    """Whether ``blob`` is a regular file of ``size`` bytes that hash to ``digest`` (a blob that
    was tampered with is rewritten by the next put of an artifact that has it)."""
    try:
        st = os.stat(blob)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        h = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == digest


def _cached(final: Path, sha256: str) -> Path | None:
    """The artifact's path in the cache entry ``final`` when the entry is complete: its index is
    there and valid, and every file it lists is a regular file of the listed size. Reads no store."""
    try:
        index = _read_json(final / CACHE_INDEX)
    except (OSError, ValueError):
        return None
    if index_problem(index, sha256) is not None:
        return None
    base = final / index["name"] if index["layout"] == "dir" else final
    for rel, size, _ in index["files"]:
        try:
            st = os.lstat(base / rel)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
    return final / index["name"]


def _discard(final: Path, key: Path) -> None:
    """Move an incomplete cache entry aside and remove it (a rename first: a reader never sees
    half of one being deleted)."""
    if not os.path.lexists(final):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{key.name}.old-{os.getpid()}-", dir=final.parent))
    try:
        os.replace(final, old / "x")
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(old, ignore_errors=True)  # read-only files go: their directories are writable


def put_artifact(url: str, artifact: dict) -> str:
    """Copy a record's artifact block (path, sha256; an ONNX graph's companion files found beside
    it) into the store at ``url``, creating the store where needed; the store's URL as the
    registry records it. Done before the registry's write transaction: copying gigabytes must not
    hold the lock every other writer waits on."""
    from itera.artifacts import companions

    store = open_store(url, create=True)
    path = Path(artifact["path"])
    store.put(path, artifact["sha256"], companions(path))
    return store.url


def forget(artifact: Path) -> None:
    """Drop the cache entry holding ``artifact`` (a path :meth:`FileStore.fetch` returned), so that
    the next fetch copies it from the store again: a cached copy that no longer matches its sha256
    (a disk error, a hand edit) is not used forever."""
    entry = Path(artifact).parent
    if not (entry / CACHE_INDEX).is_file():
        return
    _discard(entry, entry)
