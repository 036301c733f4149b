"""``itera benchmark-power``: greedy generation timed on one or more artifacts, with energy from a
meter, or a labelled estimate when asked (meters and the arithmetic live in :mod:`itera.power`).

Phases: :func:`open_all` (runtimes and steppers, context checked), :func:`measure` (warm-up,
then interleaved measured runs, so machine noise hits every artifact alike), summaries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from itera.errors import UsageError
from itera.power import PowerProfile, RunTiming, Workload, measure_run, open_meter, prompt_ids, summarize
from itera.progress import SILENT, Reporter
from itera.record import Outcome


@dataclass
class BenchmarkOptions:
    model: Path
    compare: list[Path] = field(default_factory=list)
    workload: Workload = field(default_factory=Workload)
    threads: int | None = None
    meter: str = "auto"
    estimate: str | None = None  # a power profile name or YAML file

    def validate(self) -> "BenchmarkOptions":
        from itera.runtime import check_model_path

        self.workload.validate()
        if self.estimate is not None and self.meter not in ("auto", "none"):
            raise UsageError(f"--estimate replaces the meter; drop --meter {self.meter} or --estimate")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1 (got {self.threads})")
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
                "batch_size": 1, "meter": self.meter, "estimate": self.estimate, "decoding": "greedy"}


def open_all(opts: BenchmarkOptions, stack: contextlib.ExitStack) -> list:
    """(runtime, stepper, prompt ids) per artifact; each runtime closed by ``stack``."""
    from itera.runtime import open_runtime

    w = opts.workload
    out = []
    for p in opts.paths:
        rt = stack.enter_context(open_runtime(p, threads=opts.threads))
        if w.prompt_tokens + w.gen_tokens > rt.max_context:
            raise UsageError(f"--prompt-tokens + --gen-tokens = {w.prompt_tokens + w.gen_tokens} exceeds the "
                             f"context of {p} ({rt.max_context})")
        out.append((rt, rt.stepper(), prompt_ids(rt.tokenizer, w.prompt_tokens)))
    return out


def measure(opened: list, w: Workload, meter, reporter: Reporter) -> list[list[RunTiming]]:
    """Warm-up runs (unmeasured), then ``w.runs`` rounds, each running every artifact once."""
    for _ in range(w.warmup):
        for _, st, ids in opened:
            measure_run(st, ids, w.gen_tokens, None)
    timings: list[list[RunTiming]] = [[] for _ in opened]
    task = reporter.task("benchmark", total=w.runs, unit="rounds")
    try:
        for r in range(w.runs):
            for i, (_, st, ids) in enumerate(opened):
                timings[i].append(measure_run(st, ids, w.gen_tokens, meter))
            task.update(r + 1)
    finally:
        task.close()
    return timings


def run_benchmark(opts: BenchmarkOptions, reporter: Reporter = SILENT) -> Outcome:
    from itera.runtime import describe

    opts.validate()
    profile = PowerProfile.load(opts.estimate) if opts.estimate else None
    if profile is None:
        meter, reason = open_meter(opts.meter)
        method = "unavailable" if meter is None else meter.method
    else:
        meter, reason, method = None, None, "estimate-tdp"
    try:
        with contextlib.ExitStack() as stack:
            opened = open_all(opts, stack)
            timings = measure(opened, opts.workload, meter, reporter)
            results = [summarize(t, opts.workload, method, reason, meter, profile, opts.threads, rt.name)
                       for t, (rt, _, _) in zip(timings, opened)]
    finally:
        if meter is not None:
            meter.close()
    metrics = dict(results[0])
    if opts.compare:
        metrics["compare"] = {str(p): r for p, r in zip(opts.paths, results)}
    return Outcome(describe(opts.model), metrics, opts.as_params())
