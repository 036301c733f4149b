"""Native runtimes on the user's machine: llama.cpp's weight-repacking mode, probed once per build
and CPU and cached; native crashes turned into one line (export verification, benchmark workers,
`itera env`'s smokes); the locked install; a test session that survives a crash.

This machine may not be one whose llama.cpp crashes, so the crashes are made on purpose: a child
named in ``ITERA_PROBE_CRASH`` reads address 0 (a real SIGSEGV) before it does its work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_usage_error, run_itera
from itera.record import validate


def _home(tmp_path: Path) -> dict:
    return {"ITERA_HOME": str(tmp_path / "home")}


def _cached(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "home" / "cache" / "llama-cpp").glob("mode-*.json"))


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_a_repacked_decode_that_crashes_falls_back_caches_and_says_so(tiny_ckpt, corpus_file, tmp_path):
    env = {**_home(tmp_path), "ITERA_PROBE_CRASH": "repack"}
    gguf = tmp_path / "m.gguf"
    rec = run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--gguf-type", "Q4_0", "--out", gguf,
                    env=env).record
    validate(rec)
    assert rec["runtime"]["name"] == "llama.cpp" and rec["runtime"]["repack"] is False
    assert "crashed llama.cpp (SIGSEGV) with repacked weights" in rec["runtime"]["repack_reason"]
    [cache] = _cached(tmp_path)
    answer = json.loads(cache.read_text())
    assert answer["repack"] is False and answer["quantized_ok"] is True
    stamp = cache.stat().st_mtime_ns
    # the answer is reused: no crash is asked for now, and nothing probes again
    ev = run_itera("evaluate", "--model", gguf, "-d", corpus_file, "--max-tokens", "64", "--window", "32",
                   env=_home(tmp_path)).record
    validate(ev)
    assert ev["runtime"] == rec["runtime"]
    bench = run_itera("benchmark-power", "--model", gguf, "--runs", "3", "--prompt-tokens", "8", "--gen-tokens", "4",
                      env=_home(tmp_path)).record
    assert bench["runtime"]["repack"] is False
    assert cache.stat().st_mtime_ns == stamp and _cached(tmp_path) == [cache]
    # --reprobe asks again (here without a crash): whatever this CPU answers, it is a fresh probe
    env_rec = run_itera("env", "--reprobe", "--no-smoke", env=_home(tmp_path)).record
    validate(env_rec)
    assert env_rec["metrics"]["llama_cpp"]["source"] == "probe" and cache.stat().st_mtime_ns != stamp


def test_a_forced_mode_is_used_and_named_and_a_bad_one_refused(tiny_ckpt, corpus_file, tmp_path):
    gguf = tmp_path / "m.gguf"
    env = {**_home(tmp_path), "ITERA_LLAMA_REPACK": "off", "ITERA_PROBE_CRASH": "plain,repack"}
    rec = run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--gguf-type", "Q8_0", "--out", gguf,
                    env=env).record
    assert rec["runtime"] == {"name": "llama.cpp", "repack": False, "repack_reason": "forced by ITERA_LLAMA_REPACK=off"}
    assert _cached(tmp_path) == []  # forced: nothing probed
    res = run_itera("evaluate", "--model", gguf, "-d", corpus_file, "--max-tokens", "64",
                    env={**env, "ITERA_LLAMA_REPACK": "sometimes"})
    assert_usage_error(res, "ITERA_LLAMA_REPACK='sometimes' is not a mode; set it to auto (probe this CPU), on or off")


def test_a_record_without_llama_cpp_has_no_runtime_block(tiny_ckpt, corpus_file, tmp_path):
    rec = run_itera("evaluate", "--model", tiny_ckpt, "-d", corpus_file, "--max-tokens", "64",
                    env=_home(tmp_path)).record
    assert "runtime" not in rec


def test_llama_cpp_crashing_while_verifying_an_export_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--gguf-type", "Q4_0", "--out",
                    out / "m.gguf", env={**_home(tmp_path), "ITERA_PROBE_CRASH": "verify"})
    assert res.returncode == 1 and res.stdout == "", (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert re.fullmatch(r"itera: error: llama\.cpp crashed \(SIGSEGV\) while verifying the GGUF file for .*m\.gguf "
                        r"\(its log: .*\.log\); run `itera env` to check this machine's runtimes, and report it with "
                        r"that output", lines[0]), lines[0]
    assert _leftovers(out, set()) == []


def test_a_benchmark_worker_killed_by_a_signal_is_named_with_its_runtime(tiny_ckpt, tmp_path):
    gguf = tmp_path / "m.gguf"
    run_itera("export", "--model", tiny_ckpt, "--format", "gguf", "--out", gguf, env=_home(tmp_path)).record
    res = run_itera("benchmark-power", "--model", gguf, "--runs", "3",
                    env={**_home(tmp_path), "ITERA_PROBE_CRASH": "benchmark-worker"})
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"itera: error: the benchmark worker for {gguf} (llama.cpp) was killed by SIGSEGV; run `itera env` to check "
        "this machine's runtimes"]


def test_env_describes_the_machine_and_every_smoke_passes(tmp_path):
    res = run_itera("env", env=_home(tmp_path))
    rec = res.record
    validate(rec)
    m = rec["metrics"]
    assert m["ok"] is True and m["failures"] == []
    assert set(m["smoke"]) == {"torch", "onnxruntime", "llama.cpp F16", "llama.cpp Q4_0"}
    assert all(s["status"] == "ok" for s in m["smoke"].values()), m["smoke"]
    assert m["smoke"]["llama.cpp Q4_0"]["bytes"] < m["smoke"]["llama.cpp F16"]["bytes"] / 3
    from importlib import metadata

    assert m["packages"]["llama-cpp-python"] == metadata.version("llama_cpp_python")
    assert m["packages"]["torch"] == metadata.version("torch")
    assert m["cpu"]["usable_cores"] >= 1 and m["cpu"]["flags"] and m["memory_bytes"] > 0
    assert set(m["energy_meters"]) == {"rapl", "nvml"}
    assert isinstance(m["llama_cpp"]["repack"], bool) and m["llama_cpp"]["repack_reason"]
    assert rec["runtime"]["repack"] == m["llama_cpp"]["repack"]


def test_each_smoke_failure_is_one_line_naming_its_runtime(tmp_path):
    crash = "smoke-torch,smoke-onnxruntime,smoke-llama.cpp-F16,smoke-llama.cpp-Q4_0"
    res = run_itera("env", env={**_home(tmp_path), "ITERA_PROBE_CRASH": crash})
    rec = res.record  # the record still comes: it is what the user pastes into the report
    assert rec["metrics"]["ok"] is False
    assert rec["metrics"]["failures"] == ["torch", "onnxruntime", "llama.cpp F16", "llama.cpp Q4_0"]
    failed = [ln for ln in res.stderr.splitlines() if "crashed" in ln and "smoke check" in ln
              and not ln.startswith(("|", " ", "llama.cpp: repack"))]
    failed = [ln for ln in failed if re.match(r"^(torch|onnxruntime|llama\.cpp F16|llama\.cpp Q4_0) crashed", ln)]
    assert [ln.split(" crashed")[0] for ln in failed] == ["torch", "onnxruntime", "llama.cpp F16", "llama.cpp Q4_0"]
    assert all("(SIGSEGV) while running its smoke check (its log: " in ln for ln in failed), failed
    assert all(rec["metrics"]["smoke"][n]["signal"] == "SIGSEGV" for n in rec["metrics"]["failures"])


def _makefile_pytest_args() -> list[str]:
    """The options `make test` gives pytest, read from the Makefile."""
    line = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if "-m pytest" in ln)
    return line.split("-m pytest", 1)[1].split()


def test_a_native_crash_fails_its_test_and_the_session_goes_on(tmp_path):
    (tmp_path / "test_crash.py").write_text(
        "import ctypes\n\n"
        "def test_before():\n    assert True\n\n"
        "def test_segfaults():\n    ctypes.string_at(0)\n\n"
        "def test_after():\n    assert True\n")
    args = _makefile_pytest_args()
    assert "xdist" in " ".join(args)
    p = subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "test_crash.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONFAULTHANDLER": ""})
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert re.search(r"1 failed, 2 passed", out), out
    assert "test_crash.py::test_segfaults" in out and "crashed" in out, out


def test_the_environment_holds_exactly_the_locked_versions():
    """`make install` installs the lock file; what CI tests is what it pins (pip freeze diff empty)."""
    from importlib import metadata

    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not running in make install's .venv")
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    locked = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            locked[norm(m.group(1))] = m.group(2)
    installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    pip_pin = re.search(r"^PIP\s*:=\s*pip==(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert installed.pop("pip") == pip_pin
    installed.pop("itera")
    assert installed == locked


def _install_native():
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_native", REPO / "scripts" / "install_native.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llama_cpp_is_built_per_cpu_and_the_rest_installs_from_the_lock(tmp_path):
    """pip's wheel cache is keyed by the sdist, not the CPU: make install builds llama-cpp-python
    under this CPU's key, from the entry the lock pins (with its hash), and the rest of the lock
    still installs with hashes required."""
    mod = _install_native()
    lock = REPO / "requirements" / "lock.txt"
    rest, entry, version = mod.split_lock(lock)
    pinned = re.search(r"^llama-cpp-python==(\S+) \\$", lock.read_text(), re.M).group(1)
    assert version == pinned
    assert entry.startswith(f"llama-cpp-python=={pinned} \\\n") and "--hash=sha256:" in entry
    assert not re.search(r"^llama-cpp-python==", rest, re.M)
    locked = lambda text: re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)  # noqa: E731
    assert sorted(locked(rest) + ["llama-cpp-python"]) == sorted(locked(lock.read_text()))
    assert rest.count("--hash=sha256:") + entry.count("--hash=sha256:") == lock.read_text().count("--hash=sha256:")
    # the key follows the CPU's model and flags, and make's stamp carries it
    key = mod.cpu_key()
    assert re.fullmatch(r"[0-9a-f]{16}", key) and key == mod.cpu_key()
    other = "x86_64|" + mod.cpu_identity().split("|")[1] + "|avx2 fma"
    assert mod.hashlib.sha256(other.encode()).hexdigest()[:16] != key
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "install_native.py"), "--key"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == key
    makefile = (REPO / "Makefile").read_text()
    assert "STAMP   := $(VENV)/.installed-$(CPU_KEY)" in makefile
    assert "scripts/install_native.py --lock $(LOCK)" in makefile
    bad = tmp_path / "lock.txt"
    bad.write_text("numpy==2.0.0 \\\n    --hash=sha256:00\n")
    with pytest.raises(SystemExit, match="does not pin llama-cpp-python"):
        mod.split_lock(bad)
