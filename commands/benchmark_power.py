from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.commands._options import MetricsOut, ModelPath, Threads, model_input


def benchmark_power(
    model: ModelPath = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 64,
    gen_tokens: Annotated[int, typer.Option(help="Tokens generated per run (greedy).")] = 64,
    runs: Annotated[int, typer.Option(help="Measured runs.")] = 5,
    warmup: Annotated[int, typer.Option(help="Unmeasured runs first.")] = 1,
    threads: Threads = None,
    meter: Annotated[str, typer.Option(help="auto | rapl | nvml | none.")] = "auto",
    estimate: Annotated[Optional[str], typer.Option(help="Estimate energy from a profile in configs/power/ "
                                                    "(desktop, laptop, embedded) and measured CPU time instead "
                                                    "of measuring it.")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="More artifacts to run the same "
                                                          "workload on, interleaved; ratios against the first.")] = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Latency, throughput and energy per token of greedy generation (batch 1) on a checkpoint, .gguf or .onnx.

    Loading and warm-up are outside every measured window. Energy comes from a meter (RAPL, NVML) or
    is null with the reason; an estimate appears only with --estimate and is labelled estimate-tdp.
    """
    from itera import record
    from itera.errors import UsageError
    from itera.power import PowerProfile, Workload, measure_run, open_meter, prompt_ids, summarize
    from itera.runtime.generate import stepper_for
    from itera.runtime import check_model_path, open_runtime

    w = Workload(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs, warmup=warmup).validate()
    if estimate is not None and meter not in ("auto", "none"):
        raise UsageError(f"--estimate replaces the meter; drop --meter {meter} or --estimate")
    profile = PowerProfile.load(estimate) if estimate else None
    first, parent = model_input(model)
    paths = [first, *(compare or [])]
    formats = [check_model_path(p) for p in paths]
    if profile is None:
        m, reason = open_meter(meter)
        method = "unavailable" if m is None else m.method
    else:
        m, reason, method = None, None, "estimate-tdp"
    run = record.Run("benchmark-power", parent=parent)
    rts = [open_runtime(p, threads=threads) for p in paths]
    for p, rt in zip(paths, rts):
        if w.prompt_tokens + w.gen_tokens > rt.max_context:
            raise UsageError(f"--prompt-tokens + --gen-tokens = {w.prompt_tokens + w.gen_tokens} exceeds the "
                             f"context of {p} ({rt.max_context})")
    steppers = [stepper_for(rt, p, threads) for rt, p in zip(rts, paths)]
    prompts = [prompt_ids(rt.tokenizer, w.prompt_tokens) for rt in rts]
    for _ in range(w.warmup):
        for st, ids in zip(steppers, prompts):
            measure_run(st, ids, w.gen_tokens, None)
    timings: list[list] = [[] for _ in paths]
    for _ in range(w.runs):  # interleaved: machine noise hits every artifact alike
        for i, (st, ids) in enumerate(zip(steppers, prompts)):
            timings[i].append(measure_run(st, ids, w.gen_tokens, m))
    if m is not None:
        m.close()
    results = [summarize(t, w, method, reason, m, profile, threads, rt.name) for t, rt in zip(timings, rts)]
    for rt in rts:
        rt.close()
    _table(paths, results)
    metrics = dict(results[0])
    if len(paths) > 1:
        metrics["compare"] = {str(p): r for p, r in zip(paths, results)}
    params = {"model": str(paths[0]), "compare": [str(p) for p in paths[1:]], "prompt_tokens": w.prompt_tokens,
              "gen_tokens": w.gen_tokens, "runs": w.runs, "warmup": w.warmup, "threads": threads, "batch_size": 1,
              "meter": meter, "estimate": estimate, "decoding": "greedy"}
    kind = "checkpoint" if formats[0] == "checkpoint" else "file"
    from itera.model.checkpoint import checkpoint_format

    fmt = checkpoint_format(paths[0]) if kind == "checkpoint" else formats[0]
    rec = run.record(record.describe_artifact(paths[0], kind, fmt), metrics, params)
    record.emit(rec, metrics_out=metrics_out)


def _table(paths, results) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="benchmark-power (ratios against the first)")
    for c in ("artifact", "runtime", "TTFT ms", "decode tok/s", "p50 ms", "p95 ms", "p99 ms", "J/token", "method"):
        t.add_column(c)
    base = results[0]
    for p, r in zip(paths, results):
        ratio = "" if r is base or not r["decode_tokens_per_s"] else \
            f" ({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x)"
        fmt = (lambda v, f="{:.2f}": "n/a" if v is None else f.format(v))  # noqa: E731
        t.add_row(str(p), r["runtime"], fmt(r["ttft_ms_p50"]), fmt(r["decode_tokens_per_s"], "{:.1f}") + ratio,
                  fmt(r["decode_latency_ms_p50"]), fmt(r["decode_latency_ms_p95"]), fmt(r["decode_latency_ms_p99"]),
                  fmt(r["j_per_token"], "{:.4f}"), r["energy_method"])
    Console(stderr=True).print(t)
    if base["energy_method"] == "unavailable":
        print(f"energy not measured: {base['energy_reason']}", file=sys.stderr)
