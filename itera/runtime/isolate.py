"""Run a piece of native-runtime work in a fresh Python process, so that a crash inside native
code (a segfault in llama.cpp's kernels) becomes one line and an exit code instead of killing the
user's command, its pipeline or a test session.

``call("module:function", *args, runtime="llama.cpp", what="verifying out.gguf")`` pickles the
arguments to a temporary file, runs ``python -c`` in a child that imports the function from this
same itera, and returns its pickled result. An :class:`~itera.errors.IteraError` raised in the
child is raised again here as itself; a child killed by a signal raises :class:`NativeCrash`
naming the runtime, the signal and the child's log (what the native code printed).

Nothing here imports torch, onnxruntime or llama_cpp.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from itera.errors import IteraError

CHILD_CODE = "from itera.runtime.isolate import _child_main; _child_main()"
# Test hook: names of probes or smoke checks whose child deliberately segfaults at its start
# (comma-separated, e.g. "repack" or "llama.cpp-q4_0"), to exercise the crash paths on any CPU.
CRASH_ENV = "ITERA_PROBE_CRASH"


class NativeCrash(IteraError):
    """A child process running native code died by a signal (or exited without an answer)."""

    exit_code = 1

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name

    def __reduce__(self):
        return (type(self), (str(self), self.signal_name))


def signal_name(returncode: int) -> str | None:
    """'SIGSEGV' for a child killed by signal 11 (``returncode`` -11), else None."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def exit_description(returncode: int) -> str:
    """How a child ended, in words: 'was killed by SIGSEGV' or 'exited with code 3'."""
    name = signal_name(returncode)
    return f"was killed by {name}" if name else f"exited with code {returncode}"


def child_env(extra: dict | None = None) -> dict:
    """The environment for a child Python that must import this same itera, however this one was
    found (installed, editable, or a checkout on sys.path)."""
    import itera

    root = str(Path(itera.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.update(extra or {})
    return env


def crash_requested(name: str) -> bool:
    return name in {s.strip() for s in os.environ.get(CRASH_ENV, "").split(",") if s.strip()}


def crash_now() -> None:
    """Die the way native code dies: a read of address 0 (SIGSEGV), without Python's handlers."""
    import ctypes
    import faulthandler

    faulthandler.disable()
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    ctypes.string_at(0)


def call(target: str, *args, runtime: str, what: str, crash_name: str | None = None,
         timeout: float | None = None, log_dir: Path | None = None):
    """``module:function(*args)`` in a fresh Python process; its return value.

    ``runtime`` and ``what`` name the work in the error when the child dies ("llama.cpp crashed
    (SIGSEGV) while verifying out.gguf"). What the child prints goes to a temporary log that is
    kept only when the child fails, in ``log_dir`` (default ``$ITERA_HOME/logs``). ``crash_name``
    is the name :data:`CRASH_ENV` uses to make this child crash on purpose (tests)."""
    fd, log_path = tempfile.mkstemp(prefix=re.sub(r"[^A-Za-z0-9]+", "-", runtime) + "-child-", suffix=".log")
    with tempfile.TemporaryDirectory(prefix="itera-child-") as d:
        request, answer = Path(d) / "request.pkl", Path(d) / "answer.pkl"
        with open(request, "wb") as f:
            pickle.dump((target, args, crash_name), f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD_CODE, str(request), str(answer)],
                                  stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=child_env(),
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NativeCrash(f"{runtime} did not finish {what} within {timeout:.0f} s (its log: "
                              f"{_keep(log_path, log_dir)})") from None
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): run() has killed the child; no log is left
            os.unlink(log_path)
            raise
        finally:
            os.close(fd)
        if proc.returncode == 0 and answer.is_file():
            with open(answer, "rb") as f:
                ok, value = pickle.load(f)
            if ok:
                os.unlink(log_path)
                return value
            _keep(log_path, log_dir)
            raise value
    log = _keep(log_path, log_dir)
    name = signal_name(proc.returncode)
    if name:
        raise NativeCrash(f"{runtime} crashed ({name}) while {what} (its log: {log}); run `itera env` to "
                          "check this machine's runtimes, and report it with that output", name)
    raise NativeCrash(f"{runtime} {exit_description(proc.returncode)} while {what} (its log: {log})")


def _keep(log_path: str, log_dir: Path | None) -> str:
    """Move a failed child's log to ``log_dir`` (default ``$ITERA_HOME/logs``); where it ends up."""
    import shutil

    from itera.paths import itera_home

    try:
        target = Path(log_dir) if log_dir is not None else itera_home() / "logs"
        target.mkdir(parents=True, exist_ok=True)
        return shutil.move(log_path, target / Path(log_path).name)
    except OSError:  # no writable ITERA_HOME: the log stays in the temporary directory
        return log_path


def _child_main() -> None:
    """The child's side: read (target, args), run it, write (True, result) or (False, error)."""
    import importlib

    request, answer = sys.argv[1], sys.argv[2]
    with open(request, "rb") as f:
        target, args, crash_name = pickle.load(f)
    if crash_name and crash_requested(crash_name):
        crash_now()
    module, name = target.split(":")
    try:
        result = (True, getattr(importlib.import_module(module), name)(*args))
    except IteraError as e:
        result = (False, e)
    except Exception as e:  # noqa: BLE001 - a bug in the child: reported as one line by the parent
        result = (False, RuntimeError(f"{type(e).__name__}: {e}"))
    tmp = answer + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, answer)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: native libraries' destructors have crashed on exit before
