"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory, pg_ctl start on
127.0.0.1 and a free port, one fresh database per test, pg_ctl stop at the end.

initdb and postgres refuse to run as root; as root (CI) both run as the ``postgres`` user through
``runuser`` (or ``su``), in a directory that user owns under /tmp: pytest's own temporary
directories are private to root (mode 0700), where ``postgres`` could not reach a data directory.
Otherwise they run as the current user under the directory given to :meth:`PostgresServer.start`.

A watchdog process stops the server and removes its files if the test process dies without
stopping it (a crashed pytest-xdist worker, a SIGKILL): nothing else would.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

SERVER_USER = "postgres"  # the OS user the server runs as when the tests run as root
BINARIES = ("initdb", "pg_ctl", "postgres")
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS, with its NUL

# Stops the server when its parent (the test process) goes away without saying "stopped" first:
# the end of stdin is the parent's death, however it died.
_WATCHDOG = """
import shutil, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.stdin.readline().strip() != "stopped":
    subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if sys.argv[1]:
        shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def _version_key(bindir: str) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin, (9, 6) for .../9.6/bin."""
    return tuple(int(p) for p in re.findall(r"\d+", Path(bindir).parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: the newest /usr/lib/postgresql/*/bin
    (Debian and Ubuntu keep the server there, off PATH), then ``pg_config --bindir``, then PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(out.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(str(Path(pg_ctl).resolve().parent))
    for d in candidates:
        if all(os.access(Path(d) / b, os.X_OK) for b in BINARIES):
            return Path(d)
    return None


def _as_root() -> bool:
    return os.geteuid() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One throwaway PostgreSQL cluster: superuser ``itera`` with a password (scram-sha-256) over
    TCP on 127.0.0.1, trust on its unix socket, durability off (fsync, synchronous_commit,
    full_page_writes) since nothing in it outlives the test session."""

    host = "127.0.0.1"
    user = "itera"
    password = "itera-test-pw"

    def __init__(self, bindir: Path | None = None):
        self.bindir = Path(bindir) if bindir else find_bindir()
        self.port: int | None = None
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        self.log_path: Path | None = None
        self._base_dir: Path | None = None
        self._private: list[Path] = []  # directories made outside base_dir, removed by stop()
        self._watchdog: subprocess.Popen | None = None
        self._running = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether a server can be started here, and why not (or where its binaries are)."""
        bindir = find_bindir()
        if bindir is None:
            return False, ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
                           "/usr/lib/postgresql/*/bin, pg_config --bindir or PATH")
        if _as_root():
            import pwd

            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                return False, f"running as root, and there is no {SERVER_USER!r} user to run PostgreSQL as"
            if not (shutil.which("runuser") or shutil.which("su")):
                return False, f"running as root, and neither runuser nor su is there to run PostgreSQL as {SERVER_USER!r}"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return False, "psycopg (3) is not installed"
        return True, f"PostgreSQL in {bindir}"

    # -- running commands -------------------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        """``args`` as the server's user: through runuser (or su) as root, as they are otherwise."""
        if not _as_root():
            return list(args)
        if runuser := shutil.which("runuser"):
            return [runuser, "-u", SERVER_USER, "--", *args]
        return [shutil.which("su"), "-s", "/bin/sh", SERVER_USER, "-c", shlex.join(args)]

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGPORT, PGDATA... of the caller
        env.update(LC_ALL="C", LANG="C")
        return subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=self.data_dir.parent, stdin=subprocess.DEVNULL)

    def _mkdir(self, path: Path) -> Path:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _as_root():
            shutil.chown(path, SERVER_USER, SERVER_USER)
        return path

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)
        if _as_root():
            shutil.chown(path, SERVER_USER, SERVER_USER)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, base_dir: Path) -> PostgresServer:
        """initdb a new cluster and start it; RuntimeError with the end of the server log if it
        does not come up."""
        if self._running:
            raise RuntimeError("this PostgresServer is already running")
        if self.bindir is None:
            raise RuntimeError(PostgresServer.available()[1])
        self._base_dir = Path(base_dir)
        self._base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._initdb()
            for attempt in range(3):  # another process may take the free port before the server binds it
                self.port = _free_port()
                self._configure()
                try:
                    self._pg_ctl_start()
                    break
                except RuntimeError:
                    if attempt == 2 or "could not bind" not in self._log_tail(50):
                        raise
            self._start_watchdog()
        except BaseException:
            self._pg_ctl_stop(check=False)
            self._cleanup()
            raise
        return self

    def _initdb(self) -> None:
        if _as_root():  # pytest's base temp is root's alone (0700): the server user could not reach it
            work = Path(tempfile.mkdtemp(prefix="pg"))
            self._private.append(work)
            self._mkdir(work)
        else:
            work = self._base_dir
        self.data_dir = work / "data"
        self.log_path = work / "server.log"
        self.socket_dir = work / "sock"
        if len(str(self.socket_dir / ".s.PGSQL.65535")) > _SOCKET_PATH_MAX:  # a long TMPDIR (macOS)
            self.socket_dir = Path(tempfile.mkdtemp(prefix="pg"))
            self._private.append(self.socket_dir)
        self._mkdir(self.data_dir)
        self._mkdir(self.socket_dir)
        pwfile = work / "pwfile"
        self._write(pwfile, self.password + "\n")
        try:
            p = self._run(str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                          f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                          "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions", timeout=180)
        finally:
            pwfile.unlink(missing_ok=True)
        if p.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {p.returncode}):\n{(p.stdout + p.stderr).strip()[-2000:]}")

    def _configure(self) -> None:
        """The settings, in a file postgresql.conf includes (written again when the port changes)."""
        conf = self.data_dir / "itera_test.conf"
        self._write(conf, "\n".join([
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 100",
            "logging_collector = off",  # pg_ctl -l writes the log
            "",
        ]))
        main = self.data_dir / "postgresql.conf"
        if "include 'itera_test.conf'" not in main.read_text():
            with main.open("a") as f:
                f.write("\ninclude 'itera_test.conf'\n")

    def _pg_ctl_start(self) -> None:
        p = self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data_dir),
                      "-l", str(self.log_path), timeout=90)
        if p.returncode != 0:
            self._running = False
            raise RuntimeError(f"PostgreSQL did not start (pg_ctl exit {p.returncode}): {p.stderr.strip()}\n"
                               f"last lines of the server log:\n{self._log_tail()}")
        self._running = True

    def _pg_ctl_stop(self, check: bool = True) -> None:
        if self.data_dir is None or not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return
        p = self._run(str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-w", "-t", "60",
                      "-D", str(self.data_dir), timeout=90)
        self._running = False
        if check and p.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed (exit {p.returncode}): {p.stderr.strip()}\n{self._log_tail()}")

    def _start_watchdog(self) -> None:
        stop = self._cmd(str(self.bindir / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.data_dir))
        private = str(self._private[0]) if self._private else ""  # the work dir as root, or the socket dir
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, private, *stop], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                          start_new_session=True, cwd="/")

    def _cleanup(self) -> None:
        """Dismiss the watchdog, keep the server log in base_dir, remove the directories made outside it."""
        if self._watchdog is not None:
            try:
                self._watchdog.stdin.write("stopped\n")
                self._watchdog.stdin.close()
                self._watchdog.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._watchdog.kill()
            self._watchdog = None
        if self.log_path is not None and self._base_dir is not None and self.log_path.parent != self._base_dir:
            try:
                shutil.copy(self.log_path, self._base_dir / "server.log")
            except OSError:
                pass
        for d in self._private:
            shutil.rmtree(d, ignore_errors=True)
        self._private = []

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended) and remove its files outside base_dir."""
        try:
            self._pg_ctl_stop()
        finally:
            self._cleanup()

    def restart(self) -> None:
        """Stop the server and start it again on the same data directory and port."""
        self._pg_ctl_stop()
        self._pg_ctl_start()

    # -- using it ---------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres", password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty, uniquely named database; its URL (with the password)."""
        import psycopg
        from psycopg import sql

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", prefix):
            raise ValueError(f"database name prefix {prefix!r}: lower-case letters, digits and _ only")
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        # Over the unix socket (trust): a TCP connection's scram exchange costs more than the copy.
        # template1 with FILE_COPY was the fastest of {template0, template1} x {WAL_LOG, FILE_COPY}
        # here (PostgreSQL 15, durability off), on disk and on tmpfs. Nothing connects to template1,
        # which CREATE DATABASE from it requires.
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=self.user, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template1 STRATEGY FILE_COPY")
                         .format(sql.Identifier(name)))
        return self.url(name)
