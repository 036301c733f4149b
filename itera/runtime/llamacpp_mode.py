"""How llama.cpp loads weights on this machine: with its CPU "extra buffer types" (weights
repacked into interleaved blocks for the CPU's wide kernels, what llama.cpp's ``--no-repack``
turns off) or without.

Some llama.cpp builds crash in ``llama_decode`` on some CPUs when quantized weights are repacked
(seen on AVX-512/AMX Xeons with llama-cpp-python 0.3.36: every Q8_0/Q4_0/Q4_K_M file segfaults;
F16/F32 files, and every file loaded without repacking, work). So before the first quantized
file is loaded, itera probes once per (llama.cpp build, CPU): in child processes it writes tiny
Q8_0, Q4_0 and Q4_K_M files, decodes them without repacking (the reference), then with it, and
compares. The answer is cached under ``$ITERA_HOME/cache/`` and every record that used llama.cpp
says which mode it ran in (``runtime.repack`` and ``runtime.repack_reason``).

``ITERA_LLAMA_REPACK=on|off`` forces a mode; ``auto`` (the default) probes. Nothing here imports
llama_cpp, torch or onnxruntime: the probe's work runs in :mod:`itera.probe`, in children.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path

from itera.errors import UsageError

ENV = "ITERA_LLAMA_REPACK"
PROBE_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
# Repacked kernels sum in another order than the plain ones: on the probe's model the two agree to
# ~1e-3 (relative RMS of the logits). A larger difference means the repacked path computes
# something else, and it is not used.
AGREEMENT = 0.05
PROBE_TIMEOUT = 600

_lock = threading.Lock()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), sorted."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return [platform.processor() or platform.machine()]


def llama_cpp_lib() -> Path | None:
    """The directory of llama-cpp-python's native libraries, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib if lib.is_dir() else None


def build_id() -> dict:
    """What identifies a llama.cpp build on a CPU: the binding's version, the native libraries'
    names, sizes and modification times, and the CPU's flags (a digest of each)."""
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = None
    lib = llama_cpp_lib()
    files = sorted(lib.iterdir()) if lib else []
    libs = hashlib.sha256("\n".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files
                                    if p.is_file()).encode()).hexdigest()[:16]
    flags = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:16]
    return {"llama_cpp_python": version, "libraries": libs, "cpu_flags": flags}


def _cache_path(build: dict) -> Path:
    from itera.paths import cache_dir

    key = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "llama-cpp" / f"mode-{key}.json"


def forced() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise UsageError(f"{ENV}={value!r} is not a mode; set it to auto (probe this CPU), on or off")
    return value


def mode(reprobe: bool = False) -> dict:
    """``{"repack": bool, "repack_reason": str, ...}``: how llama.cpp should load weights here.
    Probes (once per build and CPU, a few seconds, in child processes) unless forced or cached."""
    choice = forced()
    if choice != "auto":
        return {"repack": choice == "on", "repack_reason": f"forced by {ENV}={choice}", "source": "environment"}
    return _probed(reprobe)


@functools.lru_cache(maxsize=None)
def _cached_answer(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("repack"), bool) else None


def _probed(reprobe: bool) -> dict:
    build = build_id()
    path = _cache_path(build)
    if not reprobe and (answer := _cached_answer(path)) is not None:
        return {**answer, "source": "cache"}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:  # no writable cache: probe every time rather than guess
        return {**probe(), "source": "probe (not cached: $ITERA_HOME is not writable)"}
    with lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)  # another itera may be probing the same build right now
        _cached_answer.cache_clear()
        if not reprobe and (answer := _cached_answer(path)) is not None:
            return {**answer, "source": "cache"}
        answer = {**probe(), "build": build, "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not answer.get("not_cached"):
            from itera.fsio import write_text_atomic

            write_text_atomic(path, json.dumps(answer, indent=2) + "\n")
            _cached_answer.cache_clear()
    return {**answer, "source": "probe"}


def probe() -> dict:
    """Decode tiny quantized files without repacking (the reference), then with it, each in its
    own child process; repack only if the second neither crashes nor disagrees."""
    import tempfile

    from itera.runtime.isolate import NativeCrash

    types = ", ".join(PROBE_TYPES)
    with tempfile.TemporaryDirectory(prefix="itera-probe-") as d:
        try:
            plain = _decode(d, repack=False)
        except NativeCrash as e:
            return {"repack": False, "quantized_ok": False,
                    "repack_reason": f"tiny {types} files crash llama.cpp even without repacking ({e.signal_name or e}); "
                                     "quantized GGUF files will not run with this build on this CPU"}
        except Exception as e:  # noqa: BLE001 - the probe itself failed: the safe mode, not cached
            return {"repack": False, "not_cached": True,
                    "repack_reason": f"the probe could not run ({' '.join(str(e).split())[:200]}); loading without "
                                     "repacking, the safe mode"}
        if not plain.get("controllable", True):
            return {"repack": True, "quantized_ok": True,
                    "repack_reason": "this llama-cpp-python has no use_extra_bufts parameter; repacking cannot be "
                                     "turned off"}
        try:
            packed = _decode(d, repack=True)
        except Exception as e:  # noqa: BLE001 - a crash, or any other failure with repacked weights
            why = e.signal_name if isinstance(e, NativeCrash) and e.signal_name else "no answer"
            return {"repack": False, "quantized_ok": True,
                    "repack_reason": f"tiny {types} files crashed llama.cpp ({why}) with repacked weights on this CPU "
                                     "and decoded without them; loading without repacking"}
    from itera.runtime.base import compare

    worst = {t: compare(plain["logits"][t], packed["logits"][t])["rel_rms"] for t in PROBE_TYPES}
    bad = {t: v for t, v in worst.items() if not v <= AGREEMENT}
    figures = ", ".join(f"{t} {v:.1e}" for t, v in worst.items())
    if bad:
        return {"repack": False, "quantized_ok": True, "agreement": worst,
                "repack_reason": f"repacked weights gave other logits than the plain kernels ({figures}; limit "
                                 f"{AGREEMENT}); loading without repacking"}
    return {"repack": True, "quantized_ok": True, "agreement": worst,
            "repack_reason": f"tiny {types} files decode with repacked weights and agree with the plain kernels "
                             f"({figures})"}


def _decode(d: str, repack: bool) -> dict:
    """The probe's child: write the tiny files into ``d`` (once) and decode them in one mode."""
    from itera.paths import cache_dir
    from itera.runtime.isolate import call

    how = "with repacked weights" if repack else "without repacking"
    return call("itera.probe:build_and_decode", d, PROBE_TYPES, repack, runtime="llama.cpp",
                what=f"decoding tiny quantized files {how}", crash_name="repack" if repack else "plain",
                timeout=PROBE_TIMEOUT, log_dir=cache_dir() / "llama-cpp" / "logs")


# --------------------------------------------------------------------------- loading in a mode


@contextlib.contextmanager
def model_params(repack: bool):
    """While a ``llama_cpp.Llama`` is constructed inside this block, its model parameters say
    ``use_extra_bufts = repack``. llama-cpp-python has no argument for it, so the default-params
    function its constructor calls is wrapped for the duration (under a lock)."""
    import llama_cpp.llama as high

    with _lock:
        original = high.llama_cpp.llama_model_default_params

        def params():
            p = original()
            if hasattr(p, "use_extra_bufts"):
                p.use_extra_bufts = repack
            return p

        high.llama_cpp.llama_model_default_params = params
        try:
            yield
        finally:
            high.llama_cpp.llama_model_default_params = original


def note_used(m: dict) -> None:
    """Remember that this process opened llama.cpp in mode ``m`` (for the record)."""
    from itera import record

    record.note_runtime({"name": "llama.cpp", "repack": m["repack"], "repack_reason": m["repack_reason"]})
