"""``itera benchmark-power``: greedy generation timed on one or more artifacts, with energy from a
meter, or a labelled estimate when asked (meters and the arithmetic live in :mod:`itera.power`).

Each artifact lives in its own worker process (:class:`Worker`, :func:`worker_main`), so its load
time, peak RSS and CPU time are its own and not the sum of everything loaded before it. The parent
only asks for runs: warm-up rounds, then ``runs`` measured rounds, each running every artifact
once in turn (interleaved, so machine noise hits every artifact alike; one worker computes at a
time). Figures are medians over runs with their spread (:func:`itera.power.summarize`).

A result is marked ``stable: false``, with the reasons in ``stability_reason``, when

- fewer than :data:`MIN_RUNS` runs were measured (a spread of one or two values says nothing);
- the coefficient of variation across runs of the decode tokens/s (at the median step, or over
  wall time) is above :data:`MAX_CV`;
- decode tokens over wall time are more than :data:`MAX_STALL` times below the median step's rate
  (steps were delayed: the scheduler, or another process, took the cores);
- the 1-minute load average at the start or the end is at or above the usable cores;
- at the start or the end, other tasks runnable at that instant (``/proc/loadavg``'s running
  count, less this process) are at least as many as the usable cores; or
- the worker's threads spent more than :data:`MAX_CPU_WAIT` of their runnable time waiting for a
  CPU (the kernel's per-thread run-queue wait, ``/proc/self/task/*/schedstat``).

With ``--compare``, each artifact after the first gets ``speedup`` (its median-step decode rate
over the first's) and ``speedup_wall`` (the same for decode tokens over wall time), or both null
with ``speedup_withheld_reason`` when either of the two is not stable: on a busy machine the
ratio measures the scheduler, not the files.

The load average is a one-minute moving average and lags: two busy loops started a second ago
barely move it. The running count sees them at once, and the run-queue wait is what the measured
runs themselves lost to other processes, read around each run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from itera.errors import IteraError, UsageError
from itera.options import flag, nested
from itera.power import PowerProfile, RunTiming, Workload, open_meter, summarize
from itera.progress import SILENT, Reporter
from itera.record import Outcome
from itera.runtime.isolate import NativeCrash, child_env, exit_description, signal_name

MIN_RUNS = 3
MAX_STALL = 1.5  # wall-time decode rate this many times below the median step's rate: steps were delayed
MAX_CV = 0.10
MAX_CPU_WAIT = 0.10


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def loadavg() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def runnable_others() -> int | None:
    """Tasks runnable right now besides the caller (``/proc/loadavg``'s ``running/total`` field
    counts the reader itself), or None where there is no such file."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class BenchmarkOptions:
    model: Path = flag("--model")  # the CLI's default: the artifact of the record on stdin
    compare: list[Path] = flag("--compare", default_factory=list)
    workload: Workload = nested(default_factory=Workload)
    threads: int | None = flag("--threads", default=None)  # None: usable_cores(), resolved by validate()
    meter: str = flag("--meter", default="auto")
    estimate: str | None = flag("--estimate", default=None)  # a power profile name or YAML file

    def validate(self) -> "BenchmarkOptions":
        from itera.artifacts import check_model_path

        self.workload.validate()
        if self.estimate is not None and self.meter not in ("auto", "none"):
            raise UsageError(f"--estimate replaces the meter; drop --meter {self.meter} or --estimate")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
        if self.threads is None:
            self.threads = usable_cores()
        for p in self.paths:
            check_model_path(p)
        return self

    def inputs(self) -> list[Path]:
        return self.paths

    def outputs(self) -> list:
        return []

    @property
    def paths(self) -> list[Path]:
        return [self.model, *self.compare]

    def as_params(self) -> dict:
        w = self.workload
        return {"model": str(self.model), "compare": [str(p) for p in self.compare], "prompt_tokens": w.prompt_tokens,
                "gen_tokens": w.gen_tokens, "runs": w.runs, "warmup": w.warmup, "threads": self.threads,
                "batch_size": 1, "meter": self.meter, "estimate": self.estimate, "decoding": "greedy",
                "isolation": "process-per-artifact", "order": "interleaved"}


# --------------------------------------------------------------------------- the worker process

WORKER_CODE = "from itera.jobs.benchmark import worker_main; worker_main()"


class WorkerFailed(NativeCrash):
    """A worker process died or answered something that is not the protocol: one line naming the
    artifact, its runtime and how the worker ended (exit 1)."""


class Worker:
    """One artifact loaded in its own Python process. Requests and replies are JSON lines over
    the child's stdin and a private copy of its stdout (see :func:`worker_main`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.info: dict = {}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=child_env(), text=True, bufsize=1)

    def load(self, threads: int, w: Workload, meter_kind: str | None) -> dict:
        """Load the artifact in the worker; its load time, runtime name and peak RSS so far."""
        self.info = self._ask({"path": str(self.path), "threads": threads, "prompt_tokens": w.prompt_tokens,
                               "gen_tokens": w.gen_tokens, "meter": meter_kind})
        return self.info

    def _ask(self, message: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.wait(timeout=30)
            from itera.artifacts import artifact_format, runtime_of

            runtime = runtime_of(artifact_format(self.path))
            raise WorkerFailed(f"the benchmark worker for {self.path} ({runtime}) {exit_description(code)}; run "
                               "`itera env` to check this machine's runtimes", signal_name(code))
        reply = json.loads(line)
        if not reply.get("ok"):
            import itera.errors

            cls = getattr(itera.errors, reply.get("error", ""), None)
            if isinstance(cls, type) and issubclass(cls, IteraError):
                raise cls(reply["message"])
            raise WorkerFailed(f"the benchmark worker for {self.path} failed: {reply.get('message')}")
        return reply

    def run(self, measured: bool) -> tuple[RunTiming, int]:
        """One generation; (its timing, the worker's peak RSS in bytes so far)."""
        reply = self._ask({"cmd": "run", "measured": measured})
        return RunTiming(**reply["timing"]), reply["peak_rss_bytes"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def worker_main() -> None:
    """A worker's life: read the job (path, threads, workload, meter) from stdin, load the artifact
    and answer ``{"ok", "load_seconds", "runtime", "peak_rss_bytes"}``, then answer each
    ``{"cmd": "run"}`` with one run's timing, until stdin closes. Errors are answered as
    ``{"ok": false, "error": <itera error class>, "message"}``."""
    from itera.runtime.isolate import crash_now, crash_requested

    if crash_requested("benchmark-worker"):  # tests: a worker that dies as a native crash would
        crash_now()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a runtime prints goes to stderr; the protocol has its own descriptor

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        _serve(json.loads(sys.stdin.readline()), sys.stdin, send)
    except IteraError as e:
        send({"ok": False, "error": type(e).__name__, "message": str(e)})
    except Exception as e:  # anything else is a bug; the parent reports it with exit code 1
        send({"ok": False, "error": "internal", "message": f"{type(e).__name__}: {e}"})


def _serve(job: dict, requests, send) -> None:
    from itera.power import measure_run, peak_rss_bytes, prompt_ids
    from itera.runtime import open_runtime

    meter = open_meter(job["meter"])[0] if job["meter"] else None
    try:
        t0 = time.perf_counter()
        with open_runtime(Path(job["path"]), threads=job["threads"],
                          n_ctx=job["prompt_tokens"] + job["gen_tokens"] + 1) as rt:
            need = job["prompt_tokens"] + job["gen_tokens"]
            if need > rt.max_context:
                raise UsageError(f"--prompt-tokens + --gen-tokens = {need} exceeds the context of {job['path']} "
                                 f"({rt.max_context})")
            runtime_threads = _use_threads(rt, job["threads"])
            stepper = rt.stepper()
            ids = prompt_ids(rt.tokenizer, job["prompt_tokens"])
            send({"ok": True, "load_seconds": time.perf_counter() - t0, "runtime": rt.name,
                  "runtime_threads": runtime_threads, "peak_rss_bytes": peak_rss_bytes()})
            for line in requests:
                msg = json.loads(line)
                r = measure_run(stepper, ids, job["gen_tokens"], meter if msg["measured"] else None)
                send({"ok": True, "timing": asdict(r), "peak_rss_bytes": peak_rss_bytes()})
    finally:
        if meter is not None:
            meter.close()


def _use_threads(rt, threads: int) -> dict[str, int]:
    """The threads the runtime reports computing prompts and single tokens with (opened with
    ``threads``; ``--threads 1`` must mean one thread for the prompt too, which the record shows)."""
    if rt.name == "llama.cpp":
        import llama_cpp

        return {"decode": llama_cpp.llama_n_threads(rt.llm.ctx), "prompt": llama_cpp.llama_n_threads_batch(rt.llm.ctx)}
    if rt.name == "torch":
        import torch

        return {"decode": torch.get_num_threads(), "prompt": torch.get_num_threads()}
    return {"decode": threads, "prompt": threads}  # onnxruntime: one intra-op pool, set when the sessions were made


# --------------------------------------------------------------------------- phases


def start_workers(opts: BenchmarkOptions, meter_kind: str | None, stack: contextlib.ExitStack,
                  reporter: Reporter) -> list[Worker]:
    """One worker per artifact, loaded one after the other so loads do not compete; each closed by ``stack``."""
    workers = []
    from itera.artifacts import artifact_format, runtime_of

    if any(runtime_of(artifact_format(Path(p))) == "llama.cpp" for p in opts.paths):
        from itera.runtime import llamacpp_mode

        # probe here (once per build and CPU) rather than in each worker, and say the mode in the record
        llamacpp_mode.note_used(llamacpp_mode.mode())
    for p in opts.paths:
        worker = Worker(p)
        stack.callback(worker.close)
        worker.load(opts.threads, opts.workload, meter_kind)
        reporter.log(f"loaded {p} in {worker.info['load_seconds']:.2f} s ({worker.info['runtime']}, "
                     f"{opts.threads} threads)")
        workers.append(worker)
    return workers


def measure(workers: list[Worker], w: Workload, reporter: Reporter) -> tuple[list[list[RunTiming]], list[int]]:
    """Warm-up rounds (unmeasured), then ``w.runs`` rounds, each running every artifact once;
    returns every artifact's timings and its worker's peak RSS."""
    peaks = [worker.info["peak_rss_bytes"] for worker in workers]
    for _ in range(w.warmup):
        for i, worker in enumerate(workers):
            peaks[i] = worker.run(measured=False)[1]
    timings: list[list[RunTiming]] = [[] for _ in workers]
    task = reporter.task("benchmark", total=w.runs, unit="rounds")
    try:
        for r in range(w.runs):
            for i, worker in enumerate(workers):
                timing, peaks[i] = worker.run(measured=True)
                timings[i].append(timing)
            task.update(r + 1)
    finally:
        task.close()
    return timings, peaks


def stability(m: dict) -> tuple[bool, str | None]:
    """Whether one artifact's figures can be trusted, and if not, why (the rules in the module docstring)."""
    reasons = []
    if m["runs"] < MIN_RUNS:
        reasons.append(f"only {m['runs']} measured run(s); the spread needs at least {MIN_RUNS}")
    for key, what in (("decode_tokens_per_s", "decode tokens/s"),
                      ("decode_tokens_per_s_wall", "decode tokens/s over wall time")):
        cv = m.get(f"{key}_cv")
        if cv is not None and cv > MAX_CV:
            reasons.append(f"{what} varies across runs (CV {cv:.2f} > {MAX_CV:.2f})")
    step, wall = m.get("decode_tokens_per_s"), m.get("decode_tokens_per_s_wall")
    if step and wall and wall < step / MAX_STALL:
        reasons.append(f"decode steps were delayed: tokens over wall time ({wall:.1f}/s) are {step / wall:.1f}x "
                       f"below the rate of a median step ({step:.1f}/s)")
    for when in ("start", "end"):
        load = m.get(f"loadavg_{when}")
        if load is not None and load >= m["usable_cores"]:
            reasons.append(f"load average {load:.2f} at the {when} is at or above the {m['usable_cores']} usable cores")
        others = m.get(f"runnable_{when}")
        if others is not None and others >= m["usable_cores"]:
            reasons.append(f"{others} other tasks were runnable at the {when} ({m['usable_cores']} usable cores)")
    wait = m.get("cpu_wait_fraction")
    if wait is not None and wait > MAX_CPU_WAIT:
        reasons.append(f"the runtime's threads waited for a CPU {wait:.0%} of the time they were runnable "
                       f"(> {MAX_CPU_WAIT:.0%}: other processes compete for the cores)")
    return not reasons, "; ".join(reasons) or None


def speedup(base_path, base: dict, path, result: dict) -> dict:
    """A compared artifact's decode speed against the first artifact's: ``speedup`` (ratio of the
    median-step rates), ``speedup_wall`` (ratio of the wall-time rates), or both None with
    ``speedup_withheld_reason`` when either run is not stable (a ratio of figures the scheduler
    distorted says nothing: a busy machine once made one file look 3,000x faster than another)
    or a rate is missing."""
    out = {"speedup": None, "speedup_wall": None, "speedup_withheld_reason": None}
    unstable = [(p, r) for p, r in ((base_path, base), (path, result)) if not r.get("stable")]
    if unstable:
        why = "; ".join(f"{p} is not stable ({(r.get('stability_reason') or 'no reason recorded').split('; ')[0]})"
                        for p, r in unstable)
        out["speedup_withheld_reason"] = f"no speed-up of {path} against {base_path}: {why}"
        return out
    for key, rate in (("speedup", "decode_tokens_per_s"), ("speedup_wall", "decode_tokens_per_s_wall")):
        if base.get(rate) and result.get(rate):
            out[key] = result[rate] / base[rate]
    if out["speedup"] is None:
        out["speedup_withheld_reason"] = (f"no speed-up of {path} against {base_path}: no decode rate "
                                          "(--gen-tokens 1 decodes nothing)")
    return out


def compare_keys(paths: list[Path]) -> dict[str, tuple[Path, str]]:
    """Each compared artifact's key in ``metrics.compare``, the same on every machine: its file
    name plus the first 8 hex digits of its sha256 as the record's artifact block computes it
    (``a.gguf#9e1c04d2``), mapped to (path, sha256). The same bytes under the same name twice
    would be one key: refused, as comparing a file with itself."""
    from itera.artifacts import digest
    from itera.data import KEY_HASH_CHARS, KEY_SEP

    keys: dict[str, tuple[Path, str]] = {}
    for p in paths:
        sha = digest(p)[1]
        key = f"{Path(p).name}{KEY_SEP}{sha[:KEY_HASH_CHARS]}"
        if key in keys:
            raise UsageError(f"{keys[key][0]} and {p} are the same bytes under the same name; compare different "
                             "artifacts")
        keys[key] = (Path(p), sha)
    return keys


def run_benchmark(opts: BenchmarkOptions, reporter: Reporter = SILENT) -> Outcome:
    from itera.artifacts import describe

    opts.validate()
    keys = compare_keys(opts.paths) if opts.compare else {}
    profile = PowerProfile.load(opts.estimate) if opts.estimate else None
    if profile is None:
        meter, reason = open_meter(opts.meter)
        method = "unavailable" if meter is None else meter.method
        if meter is not None:
            meter.close()  # each worker reads its own; this one only says what the meter is
    else:
        meter, reason, method = None, None, "estimate-tdp"
    cores, load_start, runnable_start = usable_cores(), loadavg(), runnable_others()
    with contextlib.ExitStack() as stack:
        workers = start_workers(opts, meter.method if meter is not None else None, stack, reporter)
        timings, peaks = measure(workers, opts.workload, reporter)
        infos = [worker.info for worker in workers]
    load_end, runnable_end = loadavg(), runnable_others()
    results = []
    for t, info, peak in zip(timings, infos, peaks):
        m = summarize(t, opts.workload, method, reason, meter, profile, opts.threads, info["runtime"])
        m.update(peak_rss_bytes=peak, load_seconds=info["load_seconds"], runtime_threads=info["runtime_threads"],
                 usable_cores=cores,
                 loadavg_start=load_start, loadavg_end=load_end, runnable_start=runnable_start,
                 runnable_end=runnable_end)
        m["stable"], m["stability_reason"] = stability(m)
        results.append(m)
    metrics = dict(results[0])
    if opts.compare:
        for p, r in zip(opts.compare, results[1:]):
            r.update(speedup(opts.model, results[0], p, r))
        # keyed by what each artifact is, not where it sits; the path stays inside the result
        metrics["compare"] = {key: {**r, "path": os.path.abspath(p), "sha256": sha}
                              for (key, (p, sha)), r in zip(keys.items(), results)}
        unstable = [f"{p}: {r['stability_reason']}" for p, r in zip(opts.paths, results) if not r["stable"]]
        # the comparison holds only if every artifact's figures do
        metrics["stable"], metrics["stability_reason"] = not unstable, " | ".join(unstable) or None
    return Outcome(describe(opts.model), metrics, opts.as_params())
