"""``itera env``: what this machine and this install are, as one record to paste into a bug
report — versions of every runtime and library itera depends on, the CPU's model, features and
cores, memory, GPUs, which energy meters are readable, how llama.cpp loads weights here
(:mod:`itera.runtime.llamacpp_mode`), and a short smoke check of each runtime (torch,
onnxruntime, llama.cpp F16 and Q4_0), each in its own child process so that a crash is one line
naming the runtime instead of the end of this command.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from itera.options import flag
from itera.progress import SILENT, Reporter
from itera.record import Outcome

# Flags that decide which kernels the runtimes pick (a subset of the CPU's flags, for people).
NOTABLE_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                 "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve",
                 "i8mm")
SMOKES = ("torch", "onnxruntime", "llama.cpp F16", "llama.cpp Q4_0")
SMOKE_TIMEOUT = 300


@dataclass
class EnvOptions:
    reprobe: bool = flag("--reprobe", default=False)
    smoke: bool = flag("--smoke", default=True)

    def validate(self) -> "EnvOptions":
        return self

    def inputs(self) -> list[Path]:
        return []

    def outputs(self) -> list:
        return []


def package_versions() -> dict[str, str | None]:
    """The installed version of every package itera requires (its own metadata's list, extras
    included), and of pip itself."""
    names = ["pip"]
    try:
        for req in metadata.requires("itera") or []:
            name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
            if name and name not in names:
                names.append(name)
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        names += ["torch", "numpy", "onnxruntime", "llama-cpp-python", "gguf", "tokenizers", "safetensors"]
    from itera.record import installed_versions

    return installed_versions(names)


def cpu_info() -> dict:
    from itera.record import host_info
    from itera.runtime.llamacpp_mode import cpu_flags

    flags, host = cpu_flags(), host_info()
    return {"model": host["cpu"], "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "usable_cores": host["usable_cores"], "notable_flags": [f for f in NOTABLE_FLAGS if f in flags],
            "flags": flags}


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpus() -> dict:
    """NVIDIA GPUs and driver from ``nvidia-smi`` when it is there (torch is not imported here)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": [], "note": "no nvidia-smi on PATH"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"found": [], "note": f"nvidia-smi failed: {e}"}
    if out.returncode != 0:
        return {"found": [], "note": f"nvidia-smi exited with code {out.returncode}: {' '.join(out.stderr.split())[:200]}"}
    found = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return {"found": found, "note": None}


def energy_meters() -> dict:
    """Each meter ``benchmark-power`` knows: readable here, or why not."""
    from itera.errors import UsageError
    from itera.power import open_meter

    out = {}
    for kind, device in (("rapl", "cpu"), ("nvml", "cuda")):
        try:
            meter, reason = open_meter(kind, device)
        except UsageError as e:
            out[kind] = {"readable": False, "reason": str(e).split(": ", 1)[-1]}
            continue
        if meter is not None:
            out[kind] = {"readable": True, "method": meter.method}
            meter.close()
        else:
            out[kind] = {"readable": False, "reason": reason}
    return out


def _smoke(name: str, d: str, repack: bool) -> tuple[str, dict]:
    from itera.runtime.isolate import NativeCrash, call

    target, args = {"torch": ("itera.probe:smoke_torch", ()),
                    "onnxruntime": ("itera.probe:smoke_onnxruntime", ()),
                    "llama.cpp F16": ("itera.probe:smoke_llama_cpp", (d, "F16", repack)),
                    "llama.cpp Q4_0": ("itera.probe:smoke_llama_cpp", (d, "Q4_0", repack))}[name]
    t0 = time.perf_counter()
    try:
        figures = call(target, *args, runtime=name, what="running its smoke check",
                       crash_name="smoke-" + name.replace(" ", "-"), timeout=SMOKE_TIMEOUT)
    except NativeCrash as e:
        return "failed", {"status": "failed", "error": str(e).split("; run `itera env`")[0], "signal": e.signal_name,
                          "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as e:  # noqa: BLE001 - any failure of a smoke is what this command reports
        return "failed", {"status": "failed", "error": f"{name} failed its smoke check: {type(e).__name__}: "
                                                       f"{' '.join(str(e).split())}",
                          "seconds": round(time.perf_counter() - t0, 3)}
    return "ok", {"status": "ok", "seconds": round(time.perf_counter() - t0, 3), **figures}


def run_env(opts: EnvOptions, reporter: Reporter = SILENT) -> Outcome:
    from itera.errors import IteraError
    from itera.runtime import llamacpp_mode

    metrics: dict = {"python": {"version": platform.python_version(), "executable": sys.executable},
                     "platform": platform.platform(), "cpu": cpu_info(), "memory_bytes": memory_bytes(),
                     "gpus": gpus(), "packages": package_versions(), "energy_meters": energy_meters()}
    try:
        mode = llamacpp_mode.mode(reprobe=opts.reprobe)
        metrics["llama_cpp"] = {**mode, "build": llamacpp_mode.build_id()}
        llamacpp_mode.note_used(mode)
    except IteraError as e:
        mode = {"repack": False}
        metrics["llama_cpp"] = {"repack": None, "error": str(e)}
        reporter.log(f"llama.cpp: mode could not be decided: {e}")
    smoke, failures = {}, []
    if opts.smoke:
        with tempfile.TemporaryDirectory(prefix="itera-env-") as d:
            for name in SMOKES:
                status, smoke[name] = _smoke(name, d, mode["repack"])
                if status != "ok":
                    failures.append(name)
                    reporter.log(smoke[name]["error"])  # one line, naming the runtime
    metrics["smoke"] = smoke
    metrics["failures"] = failures
    metrics["ok"] = not failures
    return Outcome(None, metrics, {"reprobe": opts.reprobe, "smoke": opts.smoke})
