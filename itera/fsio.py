"""Files on disk: atomic writes and content hashes.

The lowest layer of itera: the model layer, the exporters and the record protocol all write
through here. Every artifact is written to a temporary path in the same directory and renamed
into place (``os.replace``), so a reader sees the old artifact or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from itera.errors import InputError

HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def directory_manifest(path: Path) -> list[tuple[str, int, str]]:
    """(relative path, bytes, sha256) for every regular file under ``path``, sorted by path."""
    rows = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rows.append((p.relative_to(path).as_posix(), p.stat().st_size, sha256_file(p)))
    return rows


def artifact_digest(path: Path) -> tuple[int, str]:
    """(total bytes, sha256) of a file, or of a directory's manifest.

    A directory's digest is the sha256 of its manifest text, one ``<sha256>  <bytes>  <path>``
    line per file in path order, so renaming, adding or changing any file changes it.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, sha256_file(path)
    if path.is_dir():
        rows = directory_manifest(path)
        text = "".join(f"{digest}  {size}  {rel}\n" for rel, size, digest in rows)
        return sum(size for _, size, _ in rows), hashlib.sha256(text.encode()).hexdigest()
    raise InputError(f"artifact {path} does not exist")


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; rename it to ``final`` on success.

    On any exception the temporary directory is removed and ``final`` is untouched. An
    existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; choose another --out or remove it")
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a directory; choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_path_beside(final: Path, suffix: str = "") -> Path:
    """A new, empty temporary file in ``final``'s directory, named ``.NAME.tmp-*``."""
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``final``; rename it to ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
