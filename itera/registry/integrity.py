"""The registry's look at the files it names: the artifact block to register (checked and
hashed), whether a registered artifact can still be trusted, and the git commit of the working
directory. What an artifact is (its kinds, companions and hashing) is :mod:`itera.artifacts`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from itera.artifacts import check_artifact, describe, digest
from itera.errors import InputError, IteraError
from itera.record import no_input


def integrity_problem(label: str, row) -> str | None:
    """Why a registered artifact cannot be trusted now (gone, no longer an artifact of its kind,
    its bytes changed), or None. What is not a regular file or a directory of the registered kind
    is refused before anything is hashed: a FIFO would block, a link to /etc would be walked."""
    path = Path(row["path"])
    if not path.exists() and not path.is_symlink():
        return f"{label}'s artifact {path} no longer exists"
    if path.is_dir() != (row["kind"] != "file"):
        return f"{label}'s artifact {path} is no longer a {'file' if row['kind'] == 'file' else 'directory'}"
    try:
        check_artifact(path)
    except IteraError as e:
        return f"{label}'s artifact is no longer one itera can read ({e})"
    if digest(path)[1] != row["sha256"]:
        return f"{label}'s artifact {path} changed since it was registered (sha256 no longer {row['sha256'][:12]}…)"
    return None


def registration(record: dict | None = None, path: Path | None = None) -> dict:
    """The artifact block to register: a bare ``path``, or the artifact of ``record``. Either way
    the path must be an artifact itera can read, and it is hashed here; a record's sha256 that
    disagrees (the artifact changed since it was written) is refused, one that is null is filled in."""
    if path is not None:
        if not Path(path).exists() and not Path(path).is_symlink():
            raise InputError(f"{path} does not exist; pass an existing file or directory with --path")
        return describe(check_artifact(Path(path)))
    if record is None:
        raise no_input("pipe an itera record on stdin, or pass --record FILE or --path ARTIFACT")
    artifact = record.get("artifact")
    if not artifact:
        raise InputError(f"the record from `itera {record.get('command')}` names no artifact to register")
    p = Path(artifact["path"])
    if not p.exists() and not p.is_symlink():
        raise InputError(f"the record's artifact {p} does not exist; register from the directory the pipeline ran in")
    check_artifact(p)
    size, sha256 = digest(p)
    if artifact.get("sha256") and artifact["sha256"] != sha256:
        raise InputError(f"{p} changed since the record was written (sha256 differs); re-run the command that made it")
    return {**artifact, "bytes": size, "sha256": sha256}


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
