from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import MetricsOut, RunnablePath, execute, model_input

Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the runtime "
                                              "(default: the cores this process may use).")]


def benchmark_power(
    model: RunnablePath = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 64,
    gen_tokens: Annotated[int, typer.Option(help="Tokens generated per run (greedy).")] = 64,
    runs: Annotated[int, typer.Option(help="Measured runs.")] = 5,
    warmup: Annotated[int, typer.Option(help="Unmeasured runs first.")] = 1,
    threads: Threads = None,
    meter: Annotated[str, typer.Option(help="auto | rapl | nvml | none.")] = "auto",
    estimate: Annotated[Optional[str], typer.Option(metavar="PROFILE", help="Estimate energy from a power profile (desktop, laptop, "
                                                    "embedded, or a YAML file) and measured CPU time instead "
                                                    "of measuring it.")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="More artifacts to run the same "
                                                          "workload on, interleaved; ratios against the first.")] = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Latency, throughput and energy per token of greedy generation (batch 1) on a checkpoint, .gguf or .onnx.

    Each artifact runs in its own process; loading and warm-up are outside every measured window.
    Throughput and latency are medians over runs, with their IQR and CV; `stable` is false, with the
    reason, when they vary too much or other processes compete for the cores. Energy comes from a
    meter (RAPL, NVML) or is null with the reason; an estimate appears only with --estimate and is
    labelled estimate-tdp.

    Examples:

      itera benchmark-power --model runs/student-q4.gguf --runs 5

      # the teacher against two exports of it, interleaved; energy estimated
      itera benchmark-power --model runs/teacher --compare m.onnx --compare m.gguf \\
        --estimate laptop
    """
    from itera.jobs.benchmark import BenchmarkOptions, run_benchmark
    from itera.power import Workload

    path, parent = model_input(model)
    opts = BenchmarkOptions(model=path, compare=list(compare or []), threads=threads, meter=meter, estimate=estimate,
                            workload=Workload(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, runs=runs,
                                              warmup=warmup))
    execute("benchmark-power", run_benchmark, opts.validate(), parent, metrics_out,
            summary=lambda c, m: _table(c, opts.paths, m))


def _table(console, paths: list[Path], metrics: dict) -> None:
    """The stderr table: per-step and wall-time decode rates side by side, a speed-up against the
    first artifact only where both runs are stable (else one line saying why there is none)."""
    results = list(metrics["compare"].values()) if "compare" in metrics else [metrics]
    base = results[0]

    def fmt(v, f="{:.2f}"):
        return "n/a" if v is None else f.format(v)

    rows, withheld = [], []
    for p, r in zip(paths, results):
        if r is base:
            ratio = "(first)" if len(results) > 1 else ""
        elif r.get("speedup") is not None:
            ratio = f"{r['speedup']:.2f}x" + (f" (wall {r['speedup_wall']:.2f}x)" if r.get("speedup_wall") else "")
        else:
            ratio = "withheld"
            withheld.append(r.get("speedup_withheld_reason") or f"no speed-up of {p}")
        rows.append([str(p), r["runtime"], fmt(r["ttft_ms_p50"]), fmt(r["decode_tokens_per_s"], "{:.1f}"),
                     fmt(r.get("decode_tokens_per_s_wall"), "{:.1f}"), *([ratio] if len(results) > 1 else []),
                     fmt(r["decode_tokens_per_s_cv"]), fmt(r["decode_latency_ms_p50"]), fmt(r["decode_latency_ms_p95"]),
                     fmt(r["decode_latency_ms_p99"]), fmt(r["peak_rss_bytes"] / 2**20, "{:.0f}"),
                     fmt(r["j_per_token"], "{:.4f}"), r["energy_method"]])
    console.table("benchmark-power (medians over runs; decode tok/s at the median step, wall tok/s = decode tokens "
                  "over decode time)",
                  ["artifact", "runtime", "TTFT ms", "decode tok/s", "wall tok/s",
                   *(["speed-up vs first"] if len(results) > 1 else []), "CV", "p50 ms", "p95 ms", "p99 ms",
                   "RSS MiB", "J/token", "method"], rows)
    if base["energy_method"] == "unavailable":
        console.log(f"energy not measured: {base['energy_reason']}")
    if not metrics["stable"]:
        console.log(f"unstable: {metrics['stability_reason']}")
    if withheld:  # one line, however many artifacts were compared
        clauses = dict.fromkeys(c for w in withheld for c in w.split(": ", 1)[-1].split("; "))
        console.log(withheld[0] if len(withheld) == 1 else "no speed-up ratios: " + "; ".join(clauses))
