"""make install's dependency step: the lock file, with llama-cpp-python built for this CPU.

llama-cpp-python compiles llama.cpp for the CPU it is built on (GGML_NATIVE: AVX-512 and AMX
kernels where the builder has them). pip caches the wheel it builds by the sdist's hash, not by
the machine, so a wheel built on one CPU is reused on any other that shares the cache, and dies
there with SIGILL when that CPU lacks an instruction the build used. So this script

1. installs every locked package except llama-cpp-python, hashes required, as before;
2. builds llama-cpp-python from the sdist the lock pins (its hash checked, pip's wheel cache not
   used) into ``$ITERA_WHEEL_CACHE`` (default ``~/.cache/itera/wheels``) under this CPU's key,
   once per CPU: a CPU's key is a hash of its model name and feature flags;
3. installs that wheel (reinstalling over a build for another CPU).

    python3 scripts/install_native.py --key            # this CPU's key (make install's stamp)
    python3 scripts/install_native.py --lock requirements/lock.txt --python .venv/bin/python

Uses the standard library only: make runs ``--key`` with the system's python3.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

NATIVE = "llama-cpp-python"
WHEEL_PREFIX = "llama_cpp_python-"


def cpu_identity() -> str:
    """What a -march=native build depends on: the CPU's model name and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields = {}
    for line in info.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 / arm64
    model = fields.get("model name") or fields.get("CPU part") or platform.processor()
    if not flags and sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features"],
                             capture_output=True, text=True)
        flags = out.stdout
    return f"{platform.machine()}|{model}|{' '.join(sorted(flags.split()))}"


def cpu_key() -> str:
    return hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]


def split_lock(lock: Path) -> tuple[str, str, str]:
    """(the lock without llama-cpp-python, llama-cpp-python's entry with its hashes, its version)."""
    rest: list[str] = []
    entry: list[str] = []
    inside, version = False, None
    for line in lock.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            inside = re.sub(r"[-_.]+", "-", m.group(1)).lower() == NATIVE
            version = m.group(2) if inside else version
        (entry if inside and not line.lstrip().startswith("#") else rest).append(line)
    if not entry:
        raise SystemExit(f"install_native: {lock} does not pin {NATIVE}")
    return "\n".join(rest) + "\n", "\n".join(entry) + "\n", version


def pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", *args]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def built_wheel(python: str, entry: str, version: str, cache: Path) -> Path:
    """This CPU's wheel of the pinned version, built into ``cache`` unless one is there already."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{WHEEL_PREFIX}{version}-*.whl"))
    if found:
        print(f"install_native: {NATIVE} {version} for this CPU: {found[0]}", file=sys.stderr)
        return found[0]
    print(f"install_native: building {NATIVE} {version} for this CPU ({cpu_identity().split('|')[1]}); "
          "llama.cpp compiles from source, several minutes the first time", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        req = Path(tmp) / "native.txt"
        req.write_text(entry)
        out = Path(tmp) / "wheels"
        pip(python, "wheel", "--no-deps", "--no-cache-dir", "--require-hashes", "-r", str(req), "-w", str(out))
        wheels = sorted(out.glob(f"{WHEEL_PREFIX}{version}-*.whl"))
        if not wheels:
            raise SystemExit(f"install_native: pip wheel left no {WHEEL_PREFIX}{version} wheel in {out}")
        final = cache / wheels[0].name
        os.replace(wheels[0], final)  # complete or absent: a killed build leaves no wheel behind
    (cache / "cpu.txt").write_text(cpu_identity() + "\n")
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", action="store_true", help="print this CPU's key and exit")
    ap.add_argument("--lock", type=Path, default=Path("requirements/lock.txt"))
    ap.add_argument("--python", default=sys.executable, help="the environment's python (pip runs under it)")
    a = ap.parse_args()
    if a.key:
        print(cpu_key())
        return
    rest, entry, version = split_lock(a.lock)
    root = Path(os.environ.get("ITERA_WHEEL_CACHE") or Path.home() / ".cache" / "itera" / "wheels")
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "lock-without-native.txt"
        req.write_text(rest)
        pip(a.python, "install", "--require-hashes", "-r", str(req))
    wheel = built_wheel(a.python, entry, version, root / cpu_key())
    pip(a.python, "install", "--no-deps", "--force-reinstall", "--no-index", "--find-links", str(wheel.parent),
        f"{NATIVE}=={version}")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:  # pip said why above
        raise SystemExit(f"install_native: {' '.join(map(str, e.cmd))} failed with exit status {e.returncode}")
