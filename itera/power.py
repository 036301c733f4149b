"""Energy meters and the generation workload of ``itera benchmark-power``.

Meters, in the order ``--meter auto`` tries them:

- ``rapl``: Linux powercap (``/sys/class/powercap/intel-rapl*``), package and DRAM domains;
  microjoule counters read at phase boundaries, wrap-around handled with ``max_energy_range_uj``.
- ``nvml``: NVIDIA's total-energy counter (nvidia-ml-py) where the GPU has one, else power
  sampled in a background thread and integrated (trapezoids).
- ``none``: energy is not measured; fields are null and the record says why.

``--estimate PROFILE`` (only when asked) replaces measurement with arithmetic on a profile from
``itera.configs/power``: ``energy = idle_w * wall_s + (tdp_w - idle_w) * cpu_s / cores``, with the
process's measured CPU time; the record says ``energy_method: "estimate-tdp"``.

Figures (:func:`summarize`) are per-run first, then the median over runs with the spread next to
it. A run's ``decode_tokens_per_s`` is the rate at its median step time (``1 / p50``): a step
the scheduler delayed does not move it, on a busy machine as on a quiet one. What a user waiting
for a whole answer sees, decode tokens over decode seconds, is ``decode_tokens_per_s_wall``; on
a busy machine it falls far below the other, and the record says the run was not stable.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from itera.errors import UsageError
from itera.options import flag
from itera.runtime.base import Stepper

POWERCAP = Path("/sys/class/powercap")
METERS = ("auto", "rapl", "nvml", "none")


class MeterUnavailable(Exception):
    """This meter cannot measure here; the message is the reason."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------------- RAPL


@dataclass
class RaplDomain:
    name: str
    energy_file: Path
    max_range_uj: int


class RaplMeter:
    """Reads package and DRAM energy counters from a powercap tree (``root`` for tests)."""

    method = "rapl"
    sampling_interval_s = None  # counters are read at phase boundaries, not sampled

    def __init__(self, root: Path = POWERCAP):
        root = Path(root)
        zones = sorted(root.glob("intel-rapl:*")) if root.is_dir() else []
        if not zones:
            raise MeterUnavailable(f"no RAPL domains under {root} (not an Intel/AMD Linux host, or powercap is absent)")
        self.domains: list[RaplDomain] = []
        for z in zones:
            try:
                name = (z / "name").read_text().strip()
                if not (name.startswith("package") or name == "dram"):
                    continue
                max_range = int((z / "max_energy_range_uj").read_text())
                (z / "energy_uj").read_text()
            except PermissionError:
                raise MeterUnavailable(f"{z}/energy_uj is not readable by this user (RAPL counters are root-only "
                                       "on recent kernels; run as root or chmod the files)") from None
            except (OSError, ValueError) as e:
                raise MeterUnavailable(f"{z} could not be read: {e}") from None
            label = name if name == "dram" else f"{name}"
            self.domains.append(RaplDomain(label, z / "energy_uj", max_range))
        if not self.domains:
            raise MeterUnavailable(f"no package or DRAM RAPL domains under {root}")

    def read(self) -> dict[str, int]:
        return {d.name: int(d.energy_file.read_text()) for d in self.domains}

    def joules(self, before: dict[str, int], after: dict[str, int]) -> float:
        """Energy between two readings, summed over domains; a counter that wrapped is unwrapped once."""
        total_uj = 0
        for d in self.domains:
            delta = after[d.name] - before[d.name]
            if delta < 0:
                delta += d.max_range_uj
            total_uj += delta
        return total_uj / 1e6

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- NVML


def integrate_power(samples: list[tuple[float, float]]) -> float:
    """Joules from (time_s, watts) samples by the trapezoidal rule."""
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(samples, samples[1:]))


class NvmlMeter:
    """NVIDIA GPU energy: the total-energy counter (mJ) if supported, else sampled power."""

    method = "nvml"

    def __init__(self, index: int = 0, interval_s: float = 0.02):
        try:
            import pynvml
        except ImportError:
            raise MeterUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # pynvml raises NVMLError subclasses
            raise MeterUnavailable(f"NVML found no usable NVIDIA GPU ({e})") from None
        self.nvml = pynvml
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
            self.sampling_interval_s = None
        except Exception:
            self.counter = False
            self.sampling_interval_s = interval_s
            self.samples: list[tuple[float, float]] = []
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000))
            time.sleep(self.sampling_interval_s)

    def read(self):
        if self.counter:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # millijoules
        return time.perf_counter()

    def joules(self, before, after) -> float:
        if self.counter:
            return (after - before) / 1000
        window = [(t, w) for t, w in self.samples if before <= t <= after]
        return integrate_power(window)

    def close(self) -> None:
        if not self.counter:
            self._stop.set()
            self._thread.join(timeout=1)


def open_meter(kind: str, device: str = "cpu"):
    """(meter or None, reason when None). ``auto`` tries NVML on a GPU device, then RAPL."""
    if kind not in METERS:
        raise UsageError(f"unknown --meter {kind!r}; use auto, rapl, nvml or none")
    if kind == "none":
        return None, "no meter requested (--meter none)"
    order = [kind] if kind != "auto" else (["nvml", "rapl"] if device.startswith("cuda") else ["rapl"])
    reasons = []
    for k in order:
        try:
            return (RaplMeter() if k == "rapl" else NvmlMeter()), None
        except MeterUnavailable as e:
            reasons.append(f"{k}: {e}")
    if kind != "auto":
        raise UsageError(f"--meter {kind} cannot measure here: {reasons[0].split(': ', 1)[1]}; use --meter auto or none")
    return None, "; ".join(reasons)


# --------------------------------------------------------------------------- estimates


@dataclass
class PowerProfile:
    name: str
    tdp_w: float
    idle_w: float
    cores: int

    @classmethod
    def load(cls, name_or_path: str) -> "PowerProfile":
        """A preset name or YAML file with tdp_w and idle_w (finite watts, tdp_w > 0, tdp_w >= idle_w
        >= 0) and cores (an integer >= 1); anything else is a UsageError naming the file and field."""
        from itera.paths import load_preset

        need = "tdp_w, idle_w and cores (e.g. tdp_w: 28, idle_w: 4, cores: 8)"
        path, d = load_preset(name_or_path, "power", "power profile", need)
        missing = [k for k in ("tdp_w", "idle_w", "cores") if k not in d]
        if missing:
            raise UsageError(f"power profile {name_or_path} has no {missing[0]}; it needs {need}")
        watts = {}
        for key in ("tdp_w", "idle_w"):
            v = d[key]
            ok = not isinstance(v, bool) and isinstance(v, (int, float))
            watts[key] = float(v) if ok and abs(v) < 1e300 else math.nan
            if not math.isfinite(watts[key]):  # NaN and Infinity would reach every J/token figure
                raise UsageError(f"power profile {name_or_path}: {key} must be a finite number of watts, got {v!r}")
        cores = d["cores"]
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise UsageError(f"power profile {name_or_path}: cores must be an integer >= 1, got {cores!r}")
        p = cls(name=str(d.get("name", Path(str(path)).stem)), tdp_w=watts["tdp_w"], idle_w=watts["idle_w"],
                cores=cores)
        if not (p.tdp_w > 0 and p.tdp_w >= p.idle_w >= 0):
            raise UsageError(f"power profile {name_or_path}: need tdp_w > 0 and tdp_w >= idle_w >= 0 "
                             f"(tdp_w is {p.tdp_w:g}, idle_w {p.idle_w:g})")
        return p

    def joules(self, wall_s: float, cpu_s: float) -> float:
        """idle_w * wall_s + (tdp_w - idle_w) * cpu_s / cores."""
        return self.idle_w * wall_s + (self.tdp_w - self.idle_w) * cpu_s / self.cores


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sched_times() -> dict[str, tuple[int, int]] | None:
    """thread id -> (ns on a CPU, ns runnable but waiting for a CPU) for every thread of this
    process, from ``/proc/self/task/*/schedstat``; None where the kernel does not expose it."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                on_cpu, waiting = f.read().split()[:2]
        except FileNotFoundError:  # the thread ended between listdir and open
            continue
        except (OSError, ValueError):
            return None
        out[tid] = (int(on_cpu), int(waiting))
    return out


def sched_delta(before: dict | None, after: dict | None) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds waiting for one) of this process's threads between two
    :func:`sched_times` readings; a thread started in between counts from zero."""
    if before is None or after is None:
        return None
    run = wait = 0
    for tid, (r1, w1) in after.items():
        r0, w0 = before.get(tid, (0, 0))
        run, wait = run + r1 - r0, wait + w1 - w0
    return run / 1e9, wait / 1e9


# --------------------------------------------------------------------------- the workload


@dataclass
class RunTiming:
    prefill_s: float
    decode_latencies_s: list[float]
    prefill_j: float | None = None
    decode_j: float | None = None
    prefill_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    wall_s: float = 0.0
    on_cpu_s: float | None = None  # the process's threads on a CPU during the run (schedstat)
    cpu_wait_s: float | None = None  # ... and runnable but waiting for a CPU: contention

    @property
    def cpu_s(self) -> float:
        return self.prefill_cpu_s + self.decode_cpu_s


@dataclass
class Workload:
    prompt_tokens: int = flag("--prompt-tokens", default=64)
    gen_tokens: int = flag("--gen-tokens", default=64)
    runs: int = flag("--runs", default=5)
    warmup: int = flag("--warmup", default=1)

    def validate(self) -> "Workload":
        for name in ("prompt_tokens", "gen_tokens", "runs"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.warmup < 0:
            raise UsageError(f"--warmup must not be negative (got {self.warmup})")
        return self


PROMPT_TEXT = ("Once upon a time, in a small town by the river, an old clockmaker kept a shop full of ticking "
               "clocks. Every morning he opened the shutters, wound the great clock by the door, and wrote the "
               "day's orders in a thick book. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT, add_bos=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure_run(stepper: Stepper, ids: list[int], gen_tokens: int, meter) -> RunTiming:
    """One measured generation: prefill (to the first token), then ``gen_tokens - 1`` decode steps,
    each timed; energy read at the phase boundaries."""
    s0 = sched_times()
    c0 = cpu_seconds()
    e0 = meter.read() if meter else None
    t0 = time.perf_counter()
    tok = stepper.prefill(ids)
    t1 = time.perf_counter()
    c1 = cpu_seconds()
    e1 = meter.read() if meter else None
    lat = []
    for _ in range(gen_tokens - 1):
        s = time.perf_counter()
        tok = stepper.step(tok)
        lat.append(time.perf_counter() - s)
    t2 = time.perf_counter()
    e2 = meter.read() if meter else None
    r = RunTiming(prefill_s=t1 - t0, decode_latencies_s=lat, prefill_cpu_s=c1 - c0, decode_cpu_s=cpu_seconds() - c1,
                  wall_s=t2 - t0)
    if meter:
        r.prefill_j, r.decode_j = meter.joules(e0, e1), meter.joules(e1, e2)
    sched = sched_delta(s0, sched_times())
    if sched is not None:
        r.on_cpu_s, r.cpu_wait_s = sched
    return r


def spread(values: list[float]) -> tuple[float, float, float | None]:
    """(median, interquartile range, coefficient of variation) of per-run values. The CV is the
    sample standard deviation over the mean; None for fewer than 2 values or a zero mean."""
    med = statistics.median(values)
    iqr = percentile(values, 75) - percentile(values, 25)
    mean = statistics.fmean(values)
    cv = statistics.stdev(values) / mean if len(values) > 1 and mean else None
    return med, iqr, cv


def per_run_figures(r: RunTiming, w: Workload) -> dict[str, float | None]:
    """One run's throughput and latency figures (the decode ones None when ``gen_tokens == 1``)."""
    lat = r.decode_latencies_s
    return {
        "ttft_ms": r.prefill_s * 1e3,
        "prefill_tokens_per_s": w.prompt_tokens / r.prefill_s,
        "decode_tokens_per_s": 1 / percentile(lat, 50) if lat else None,
        "decode_tokens_per_s_wall": len(lat) / sum(lat) if lat else None,
        "decode_latency_ms_p50": percentile(lat, 50) * 1e3 if lat else None,
        "decode_latency_ms_p95": percentile(lat, 95) * 1e3 if lat else None,
        "decode_latency_ms_p99": percentile(lat, 99) * 1e3 if lat else None,
        "decode_latency_ms_mean": sum(lat) / len(lat) * 1e3 if lat else None,
    }


# record key of the median over runs -> per-run figure; each also gets ``<key>_iqr`` and ``<key>_cv``
FIGURES = {"ttft_ms_p50": "ttft_ms", "prefill_tokens_per_s": "prefill_tokens_per_s",
           "decode_tokens_per_s": "decode_tokens_per_s", "decode_tokens_per_s_wall": "decode_tokens_per_s_wall",
           "decode_latency_ms_p50": "decode_latency_ms_p50",
           "decode_latency_ms_p95": "decode_latency_ms_p95", "decode_latency_ms_p99": "decode_latency_ms_p99",
           "decode_latency_ms_mean": "decode_latency_ms_mean"}


def summarize(runs: list[RunTiming], w: Workload, energy_method: str, reason: str | None, meter,
              profile: PowerProfile | None, threads: int | None, runtime: str) -> dict:
    """The record's metrics from measured runs: each throughput and latency figure is the median
    over runs of that run's figure, with its IQR and CV across runs (``_iqr``, ``_cv``) and the
    per-run values (``per_run``); times, CPU and energy are sums over the runs."""
    per = [per_run_figures(r, w) for r in runs]
    wall = sum(r.wall_s for r in runs)
    cpu = sum(r.cpu_s for r in runs)
    n_prompt, n_gen = w.prompt_tokens * len(runs), w.gen_tokens * len(runs)
    n_decoded = sum(len(r.decode_latencies_s) for r in runs)
    m: dict = {"runs": len(runs), "prompt_tokens": w.prompt_tokens, "gen_tokens": w.gen_tokens}
    for key, fig in FIGURES.items():
        values = [p[fig] for p in per]
        med, iqr, cv = spread(values) if None not in values else (None, None, None)
        m.update({key: med, f"{key}_iqr": iqr, f"{key}_cv": cv})
    m["per_run"] = {fig: [p[fig] for p in per] for fig in dict.fromkeys(FIGURES.values())}
    waits = [r.cpu_wait_s for r in runs]
    on_cpu = [r.on_cpu_s for r in runs]
    contended = None not in waits and None not in on_cpu and sum(waits) + sum(on_cpu) > 0
    m.update({
        "wall_s": wall, "cpu_s": cpu, "cpu_utilisation": cpu / wall,
        "cpu_wait_s": sum(waits) if contended else None,
        "cpu_wait_fraction": sum(waits) / (sum(waits) + sum(on_cpu)) if contended else None,
        "energy_method": energy_method, "energy_reason": reason,
        "sampling_interval_s": getattr(meter, "sampling_interval_s", None) if meter else None,
        "runtime": runtime, "threads": threads,
        "energy_prefill_j": None, "energy_decode_j": None, "energy_j": None,
        "j_per_token": None, "tokens_per_j": None, "avg_power_w": None,
    })
    if meter is not None:
        ep, ed = sum(r.prefill_j for r in runs), sum(r.decode_j for r in runs)
    elif profile is not None:  # each phase from its own wall and CPU time
        ep = sum(profile.joules(r.prefill_s, r.prefill_cpu_s) for r in runs)
        ed = sum(profile.joules(r.wall_s - r.prefill_s, r.decode_cpu_s) for r in runs)
        m["profile"] = {"name": profile.name, "tdp_w": profile.tdp_w, "idle_w": profile.idle_w, "cores": profile.cores}
    else:
        return m
    total = ep + ed
    m.update(energy_prefill_j=ep, energy_decode_j=ed, energy_j=total, j_per_token=total / (n_prompt + n_gen),
             decode_j_per_token=ed / max(1, n_decoded), tokens_per_j=(n_prompt + n_gen) / total if total > 0 else None,
             avg_power_w=total / wall)
    return m
