"""Latency of registry operations on SQLite and PostgreSQL, and artifact-store throughput.

    python scripts/bench_registry.py [--versions 50] [--reads 30] [--cli-repeats 7] [--register-kb 1024]
        [--pull-mb 100] [--pull-repeats 3]

Three configurations side by side, in one run:

- ``sqlite``: a registry file in a temporary directory;
- ``postgresql``: a database on a throwaway PostgreSQL server that this script starts from the
  installed binaries (tests/pg.py: durability off, 127.0.0.1, scram-sha-256 over TCP);
- ``postgresql+store``: another database on that server, every version registered with a
  ``file://`` artifact store in the temporary directory.

1. In-process latency (time.perf_counter around the library API, one Registry kept open per
   configuration, as a long-running process would): ``register`` (a new ~1 MB GGUF-like file each
   time, b"GGUF" then random bytes: describe() hashes it, put_artifact() copies it into the store
   for the store configuration, then Registry.register; no git lookup, commit=None), ``list``
   (Registry.list() with ``--versions`` versions present), ``resolve`` (Registry.get of
   NAME@active plus local_path: for the store configuration a cache hit, the cache having been
   filled once before timing) and ``open`` (Registry(location, create=False) then close: a new
   connection, and for PostgreSQL the TCP + scram handshake).
2. End-to-end CLI wall time of ``python -m itera registry list`` and ``... resolve NAME@active``
   (subprocess.run; includes Python start-up and imports, what a CI script pays per call), next
   to ``python -c pass`` as the floor.
3. Store throughput for one ``--pull-mb`` MB artifact (MB = 10^6 bytes): ``put`` (put_artifact,
   what ``register --store`` does after hashing: hash, then copy while hashing again, fsync; a
   fresh store each repeat), ``describe`` (the hashing register does first), ``pull`` (FileStore.fetch
   into a fresh, empty cache each repeat: copy, hash, fsync) and the cache-hit time of a second
   fetch. The store is a local directory whose blob is warm in the page cache: this is the
   copy/hash/fsync path, not a network filesystem's.

Every configuration is measured round-robin (the order rotates each round), so the machine's
noise hits all of them alike. Each operation reports n, median_ms, p10_ms, p90_ms, min_ms,
max_ms. Prints one JSON object on stdout with the machine facts and parameters; progress goes to
stderr. $ITERA_HOME is a temporary directory for the run; the server is stopped and every
temporary file removed at the end. Exits 1 with the reason on stderr and no JSON when PostgreSQL
cannot be started here. About a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("sqlite", "postgresql", "postgresql+store")
NAME = "bench"
MB = 1_000_000


def log(msg: str) -> None:
    print(f"[bench_registry] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of ``xs``, linearly interpolated."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms_summary(samples_s: list[float]) -> dict:
    ms = [x * 1000 for x in samples_s]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3), "p10_ms": round(pct(ms, 10), 3),
            "p90_ms": round(pct(ms, 90), 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}


def rate_summary(samples_s: list[float], nbytes: int) -> dict:
    rates = [nbytes / MB / s for s in samples_s]
    return {"n": len(rates), "median_MBps": round(statistics.median(rates), 1), "min_MBps": round(min(rates), 1),
            "max_MBps": round(max(rates), 1), "median_s": round(statistics.median(samples_s), 3),
            "samples_s": [round(s, 3) for s in samples_s]}


def rounds(n: int):
    """``n`` rounds of (round, configs in this round's order): the order rotates each round."""
    for i in range(n):
        k = i % len(CONFIGS)
        yield i, CONFIGS[k:] + CONFIGS[:k]


def write_gguf(path: Path, nbytes: int) -> Path:
    """A GGUF-looking file: the magic, then random bytes (unique content, so a new version)."""
    with open(path, "wb") as f:
        f.write(b"GGUF")
        left = nbytes - 4
        while left > 0:
            n = min(left, 8 * MB)
            f.write(os.urandom(n))
            left -= n
    return path


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=50, help="versions registered per configuration (all timed)")
    ap.add_argument("--reads", type=int, default=30, help="in-process list/resolve/open samples per configuration")
    ap.add_argument("--cli-repeats", type=int, default=7, help="CLI list/resolve runs per configuration")
    ap.add_argument("--register-kb", type=int, default=1024, help="size of each registered file, KiB")
    ap.add_argument("--pull-mb", type=int, default=100, help="size of the pull/put artifact, MB (10^6 bytes)")
    ap.add_argument("--pull-repeats", type=int, default=3)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from pg import PostgresServer

    ok, why = PostgresServer.available()
    if not ok:
        log(f"PostgreSQL is not available: {why}")
        return 1

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="itera-bench-registry-"))
    os.environ["ITERA_HOME"] = str(tmp / "home")
    os.environ["ITERA_ACTOR"] = "bench-registry"
    for var in ("ITERA_REGISTRY", "ITERA_STORE"):
        os.environ.pop(var, None)
    server = PostgresServer()
    regs: dict = {}
    try:
        log(f"starting PostgreSQL ({why}) under {tmp}")
        try:
            server.start(tmp / "pg")
        except Exception as e:  # noqa: BLE001 - the reason is what the caller needs
            log(f"PostgreSQL could not be started: {e}")
            return 1
        result = run(args, server, tmp, regs)
        result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    finally:
        for reg in regs.values():
            try:
                reg.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            server.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


def run(args, server, tmp: Path, regs: dict) -> dict:
    import psycopg

    import itera
    from itera.artifacts import describe
    from itera.registry import Ref, Registry
    from itera.registry.store import default_cache, open_store, put_artifact

    (tmp / "home").mkdir()
    files = tmp / "files"
    files.mkdir()
    store_url = "file://" + str(tmp / "store")
    locations = {"sqlite": str(tmp / "registry.db"), "postgresql": server.create_database("bench"),
                 "postgresql+store": server.create_database("bench")}
    stores = {"sqlite": None, "postgresql": None, "postgresql+store": store_url}
    with psycopg.connect(locations["postgresql"]) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
    for c in CONFIGS:
        regs[c] = Registry(locations[c])

    samples: dict[str, dict[str, list[float]]] = {op: {c: [] for c in CONFIGS}
                                                  for op in ("register", "list", "resolve", "open")}
    reg_bytes = args.register_kb * 1024

    # -- register: --versions new files per configuration, round-robin
    log(f"register: {args.versions} x {len(CONFIGS)} files of {args.register_kb} KiB")
    for i, order in rounds(args.versions):
        for c in order:
            path = write_gguf(files / f"{c.replace('+', '_')}-{i}.gguf", reg_bytes)
            t0 = time.perf_counter()
            art = describe(path)
            store = put_artifact(stores[c], art) if stores[c] else None
            row = regs[c].register(NAME, art, None, store=store)
            samples["register"][c].append(time.perf_counter() - t0)
            assert row["version"] == i + 1 and not row.get("duplicate_of"), row
    for c in CONFIGS:  # untimed: the alias resolve reads, and (store) the first fetch into the cache
        regs[c].activate(Ref.parse(f"{NAME}@{args.versions}"))
        regs[c].local_path(regs[c].get(Ref.parse(f"{NAME}@active")))

    # -- in-process reads
    log(f"list / resolve / open in process: {args.reads} rounds")
    ref = Ref.parse(f"{NAME}@active")
    resolved: dict[str, str] = {}
    for _, order in rounds(args.reads):
        for c in order:
            t0 = time.perf_counter()
            rows = regs[c].list()
            samples["list"][c].append(time.perf_counter() - t0)
            assert len(rows) == args.versions, len(rows)
            t0 = time.perf_counter()
            p = regs[c].local_path(regs[c].get(ref))
            samples["resolve"][c].append(time.perf_counter() - t0)
            resolved[c] = str(p)
            t0 = time.perf_counter()
            Registry(locations[c], create=False).close()
            samples["open"][c].append(time.perf_counter() - t0)
    cache = default_cache()
    assert resolved["postgresql+store"].startswith(str(cache)), resolved
    assert resolved["sqlite"] == str((files / f"sqlite-{args.versions - 1}.gguf").resolve()), resolved

    # -- CLI end to end
    log(f"CLI list / resolve: {args.cli_repeats} rounds")
    env = dict(os.environ)
    cli: dict[str, dict[str, list[float]]] = {"list": {c: [] for c in CONFIGS}, "resolve": {c: [] for c in CONFIGS},
                                              "python -c pass": {"-": []}}
    py = sys.executable
    for _, order in rounds(args.cli_repeats):
        t0 = time.perf_counter()
        subprocess.run([py, "-c", "pass"], check=True, env=env, stdout=subprocess.DEVNULL)
        cli["python -c pass"]["-"].append(time.perf_counter() - t0)
        for c in order:
            for op, argv in (("list", ["list", "--json"]), ("resolve", ["resolve", f"{NAME}@active"])):
                t0 = time.perf_counter()
                p = subprocess.run([py, "-m", "itera", "registry", *argv, "--registry", locations[c]], env=env,
                                   capture_output=True, text=True, cwd=tmp)
                cli[op][c].append(time.perf_counter() - t0)
                if p.returncode != 0:
                    raise RuntimeError(f"itera registry {' '.join(argv)} ({c}) exit {p.returncode}: {p.stderr[-500:]}")
                if op == "resolve" and p.stdout.strip() != resolved[c]:
                    raise RuntimeError(f"CLI resolve ({c}) printed {p.stdout.strip()!r}, not {resolved[c]!r}")
                if op == "list" and len(json.loads(p.stdout)["versions"]) != args.versions:
                    raise RuntimeError(f"CLI list ({c}) did not list {args.versions} versions")

    # -- store throughput with one big artifact
    big_bytes = args.pull_mb * MB
    log(f"store: put / pull of a {args.pull_mb} MB artifact, {args.pull_repeats} repeats")
    big = write_gguf(files / "big.gguf", big_bytes)
    thr: dict[str, list[float]] = {"describe": [], "put": [], "pull": [], "cache_hit": []}
    art = None
    for r in range(args.pull_repeats):
        t0 = time.perf_counter()
        art = describe(big)
        thr["describe"].append(time.perf_counter() - t0)
        big_store = tmp / f"big-store-{r}"
        t0 = time.perf_counter()
        url = put_artifact("file://" + str(big_store), art)
        thr["put"].append(time.perf_counter() - t0)
        if r > 0:
            shutil.rmtree(tmp / f"big-store-{r - 1}")
    st = open_store(url)
    for r in range(args.pull_repeats):
        c_dir = tmp / f"big-cache-{r}"
        t0 = time.perf_counter()
        got = st.fetch(art["sha256"], c_dir)
        thr["pull"].append(time.perf_counter() - t0)
        assert got.stat().st_size == big_bytes
        for _ in range(5):
            t0 = time.perf_counter()
            assert st.fetch(art["sha256"], c_dir) == got
            thr["cache_hit"].append(time.perf_counter() - t0)
        shutil.rmtree(c_dir)

    return {
        "benchmark": "registry",
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                    "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "psycopg": psycopg.__version__, "postgresql_server": pg_version,
                    "sqlite": sqlite3.sqlite_version, "itera": getattr(itera, "__version__", None)},
        "params": {"configs": list(CONFIGS), "versions": args.versions, "register_bytes": reg_bytes,
                   "reads": args.reads, "cli_repeats": args.cli_repeats, "pull_bytes": big_bytes,
                   "pull_repeats": args.pull_repeats, "cache_hit_samples": len(thr["cache_hit"]),
                   "postgresql": "throwaway server (tests/pg.py): 127.0.0.1 TCP, scram-sha-256, fsync/"
                                 "synchronous_commit/full_page_writes off",
                   "store": "file:// directory on the same local disk as the cache"},
        "in_process": {op: {c: ms_summary(v) for c, v in per.items()} for op, per in samples.items()},
        "cli": {op: {c: ms_summary(v) for c, v in per.items()} for op, per in cli.items()},
        "store_throughput": {
            "pull_empty_cache": rate_summary(thr["pull"], big_bytes),
            "cache_hit": ms_summary(thr["cache_hit"]),
            "put": rate_summary(thr["put"], big_bytes),
            "describe_hash": rate_summary(thr["describe"], big_bytes),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
