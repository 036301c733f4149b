"""Files on disk: atomic writes, the rules every output follows, and content hashes.

The lowest layer of itera: the model layer, the exporters and the record protocol all write
through here. Every artifact is written to a temporary path in the same directory
(``.NAME.tmp-<pid>-*``) and renamed into place (``os.replace``), so a reader sees the old
artifact or the new one, never half of one; a failure, Ctrl-C or SIGTERM removes the temporary
path, and a run killed outright leaves one that the next run with the same output removes.

Before any expensive work, :func:`check_output` applies the output contract: an output is never
an input, never contains one and never sits inside one; it never replaces anything that is not
a regular file or directory; an existing non-empty output is replaced only with ``--force``;
and its directory must be writable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from itera.errors import InputError, UsageError

HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file or directory"


def _stat(path: Path, name: str, tail: str, error: type[InputError | UsageError]) -> os.stat_result:
    """os.stat(path), links followed; a missing path, a dangling link or an unreadable one is
    ``error("<name> ...<tail>")``."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{name} is a symbolic link to a file that does not exist{tail}") from None
        raise error(f"{name} does not exist{tail}") from None
    except OSError as e:  # a symlink loop, a path through a file, no permission
        raise error(f"{name} cannot be read ({e.strerror}){tail or '; pass a path that resolves to a readable file'}") \
            from None


def check_regular(path: Path, what: str = "artifact") -> os.stat_result:
    """stat() of ``path`` (links followed), refusing anything that is not a regular file or directory:
    hashing a FIFO or /dev/zero would never end."""
    st = _stat(path, f"{what} {path}", "", InputError)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise InputError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; pass a file or directory")
    return st


def check_input_file(path: Path, what: str = "", fix: str = "pass a regular file",
                     error: type[InputError | UsageError] = InputError, where: str = "") -> os.stat_result:
    """stat() of a file the user named as an input (links followed), which itera is about to read:
    it must exist and be a regular file. A FIFO would block the read forever and a device never end,
    so they are refused before anything opens them. Messages read ``<what> <path> (<where>) is ...;
    <fix>``."""
    name = (f"{what} {path}" if what else str(path)) + (f" ({where})" if where else "")
    st = _stat(path, name, f"; {fix}", error)
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{name} is a directory, not a file; {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name} is {_kind(st.st_mode)}, not a regular file; {fix}")
    return st


def directory_manifest(path: Path) -> list[tuple[str, int, str]]:
    """(relative path, bytes, sha256) for every file under ``path``, sorted by path.

    Symbolic links are followed and their targets' content is hashed: a Hugging Face cache
    snapshot is a directory of links into ``blobs/``, and its identity is those blobs' bytes.
    A link that points nowhere, or at something that is not a regular file, is an error."""
    path = Path(path)
    rows = []
    seen_dirs = {os.path.realpath(path)}
    for root, dirs, files in os.walk(path, followlinks=True):
        # a linked directory is walked once: a link cycle would otherwise never end
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen_dirs:
                seen_dirs.add(real)
                keep.append(d)
        dirs[:] = keep
        for name in files:
            p = Path(root, name)
            st = check_regular(p, "file")
            if stat.S_ISDIR(st.st_mode):
                continue
            rows.append((p.relative_to(path).as_posix(), st.st_size, sha256_file(p)))
    return sorted(rows)


def artifact_digest(path: Path, companions: list[Path] = ()) -> tuple[int, str]:
    """(total bytes, sha256) of a file, or of a directory's manifest.

    A directory's digest is the sha256 of its manifest text, one ``<sha256>  <bytes>  <path>``
    line per file in path order, so renaming, adding or changing any file changes it. A file
    with ``companions`` (an ONNX graph's KV-cache graph and external data) is digested the
    same way over itself and them, named relative to its directory.
    """
    path = Path(path)
    st = check_regular(path)
    if stat.S_ISREG(st.st_mode) and not companions:
        return st.st_size, sha256_file(path)
    if stat.S_ISREG(st.st_mode):
        files = [path, *companions]
        rows = sorted((f.name, check_regular(f).st_size, sha256_file(f)) for f in files)
    else:
        rows = directory_manifest(path)
    return sum(size for _, size, _ in rows), manifest_sha256(rows)


def manifest_sha256(rows) -> str:
    """sha256 of a manifest's text: one ``<sha256>  <bytes>  <path>`` line per (path, bytes, sha256)
    row, in path order. The identity of a directory or of a file with companions; the artifact store
    recomputes it from its index, so it is written once, here."""
    text = "".join(f"{digest}  {size}  {rel}\n" for rel, size, digest in sorted(rows))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- the output contract


@dataclass(frozen=True)
class Output:
    """An output a job will write: its path, whether it is a directory or a file, the option
    that named it (for messages), and whether the user passed --force."""

    path: Path
    kind: str = "dir"
    option: str = "--out"
    force: bool = False


def check_job_paths(outputs: list[Output], inputs: list[Path], metrics_out: Path | None = None) -> None:
    """Apply the output contract to every output of a job, and to ``--metrics-out``."""
    inputs = [Path(i) for i in inputs if i is not None]
    for o in outputs:
        check_output(o.path, inputs, o.force, o.kind, o.option)
    if metrics_out is not None:
        check_writable_file(metrics_out, inputs + [o.path for o in outputs])


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p):
        p = p.parent
    return p


def check_output(out: Path, inputs: list[Path] = (), force: bool = False, kind: str = "dir",
                 option: str = "--out") -> None:
    """Refuse an output that would destroy something the user did not name, before any work.

    ``kind`` is "dir" or "file". Also removes the temporary leftovers of an earlier run with
    this same output that was killed outright (``.NAME.tmp-<pid>-*`` whose process is gone)."""
    out = Path(out)
    real_out = os.path.realpath(out)
    if _inside(os.path.realpath(os.getcwd()), real_out):
        raise UsageError(f"{option} {out} is the working directory or one of its parents; write the output to a new "
                         "path (this is refused even with --force)")
    for inp in inputs:
        if inp is None:
            continue
        real_in = os.path.realpath(inp)
        if _inside(real_out, real_in) or _inside(real_in, real_out):
            rel = "is" if real_out == real_in else ("is inside" if _inside(real_out, real_in) else "contains")
            raise UsageError(f"{option} {out} {rel} the input {inp}; write the output somewhere else "
                             "(this is refused even with --force)")
    if os.path.lexists(out):
        st = os.lstat(out)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise UsageError(f"{option} {out} is {_kind(st.st_mode)}; itera writes only over regular files "
                             "and directories, so choose another path")
        want_dir = kind == "dir"
        if stat.S_ISDIR(st.st_mode) != want_dir:
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
            raise UsageError(f"{option} {out} is {what}; pass a {'directory' if want_dir else 'file'} path")
        # an empty directory is replaced only with --force too: it may be a mount point or one the
        # user made for something else; an empty file (a `touch`ed name) is taken
        empty = (not any(os.scandir(out))) if want_dir else st.st_size == 0
        if (want_dir or not empty) and not force:
            raise UsageError(f"{option} {out} already exists{' (empty)' if empty else ''}; pass --force to replace "
                             "it, or choose another path")
    parent = _nearest_existing(out.parent if str(out.parent) else Path("."))
    if not parent.is_dir():
        raise UsageError(f"{option} {out} cannot be created: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {out} cannot be written: no file can be created in {parent} ({e.strerror}); "
                         "choose another path") from None
    remove_stale_temporaries(out)


_TMP = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-<pid>-*`` and ``.NAME.old-<pid>-*`` beside ``out`` whose process is gone."""
    out = Path(out)
    removed = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TMP.match(p.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    """The process's umask (read from /proc where possible: os.umask() would change it briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_file_mode(path: Path) -> None:
    """The mode ``open()`` would give a new file under the umask (writers may have chosen 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def _apply_umask(directory: Path) -> None:
    """Give a staged directory and everything in it the modes ``mkdir``/``open`` would have: some
    writers (mkdtemp, safetensors) create 0700 directories and 0600 files whatever the umask."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _tmp_prefix(final: Path, kind: str = "tmp") -> str:
    return f".{final.name}.{kind}-{os.getpid()}-"


def temp_path_beside(final: Path, suffix: str = "") -> Path:
    """A new, empty temporary file in ``final``'s directory, named ``.NAME.tmp-<pid>-*``, with
    the mode a plain ``open()`` would give it (the umask's)."""
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(final), suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def temp_dir_beside(final: Path) -> Path:
    """A new private directory in ``final``'s directory, named ``.NAME.tmp-<pid>-*``."""
    final = Path(final)
    return Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; rename it to ``final`` on success.

    On any exception (Ctrl-C and SIGTERM included) the temporary directory is removed and
    ``final`` is untouched. An existing ``final`` is replaced only after the new one is complete.
    The directory gets the umask's mode, like one made by ``mkdir``.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; choose another --out or remove it")
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a directory; choose another --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final, "old"), dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``final``; rename it to ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(final)
    try:
        yield tmp
        set_file_mode(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_text_through(path: Path, text: str) -> None:
    """Write to a file that exists (or a device: ``/dev/null``, ``/dev/stdout``) by opening it, so
    the node itself is kept; create a missing file atomically. For ``--metrics-out``."""
    path = Path(path)
    if os.path.lexists(path):
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise InputError(f"{path} cannot be written ({e.strerror})") from None
        return
    try:
        write_text_atomic(path, text)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EPERM):
            raise InputError(f"{path} cannot be written ({e.strerror})") from None
        raise


def check_writable_file(path: Path, inputs: list[Path] = (), option: str = "--metrics-out") -> None:
    """A file output that is written through (``--metrics-out``): never an input or inside one;
    an existing node must be writable; a new one needs a writable directory."""
    path = Path(path)
    real = os.path.realpath(path)
    for inp in inputs:
        if inp is not None and (_inside(real, os.path.realpath(inp)) or _inside(os.path.realpath(inp), real)):
            raise UsageError(f"{option} {path} is, or is inside, the input {inp}; write it somewhere else")
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise UsageError(f"{option} {path} is a directory; pass a file path")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{option} {path} is not writable")
        if stat.S_ISCHR(os.stat(path).st_mode) and os.path.realpath(path) != os.devnull:
            # a device may refuse every write (/dev/full): find out now, not after the run
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(fd, b"\n")
                finally:
                    os.close(fd)
            except OSError as e:
                raise UsageError(f"{option} {path} cannot be written ({e.strerror}); pass a file path") from None
        return
    parent = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path} cannot be created: {parent} is not a writable directory")
