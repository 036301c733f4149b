from __future__ import annotations

from typing import Annotated

import typer

from itera.cli._options import MetricsOut, execute


def env(
    reprobe: Annotated[bool, typer.Option(help="Probe again whether llama.cpp may repack quantized weights on this "
                                          "CPU, instead of reading the cached answer.")] = False,
    smoke: Annotated[bool, typer.Option(help="Run the two-second smoke check of each runtime (torch, onnxruntime, "
                                        "llama.cpp F16 and Q4_0), each in its own process.")] = True,
    metrics_out: MetricsOut = None,
) -> None:
    """Describe this machine and install for a bug report, and smoke-check every runtime.

    The record holds the versions of every library, the CPU's features, memory, GPUs, which
    energy meters are readable, and whether llama.cpp repacks quantized weights here (and why).
    A runtime that fails or crashes its smoke check is one line on stderr naming it; the record
    says "ok": false and lists it in "failures".

    Examples:

      itera env > env.json

      itera env --reprobe --no-smoke
    """
    from itera.jobs.env import EnvOptions, run_env

    execute("env", run_env, EnvOptions(reprobe=reprobe, smoke=smoke).validate(), None, metrics_out, summary=_table)


def _table(console, metrics: dict) -> None:
    cpu, mode = metrics["cpu"], metrics["llama_cpp"]
    console.log(f"CPU: {cpu['model']} ({cpu['usable_cores']} usable cores; {' '.join(cpu['notable_flags']) or 'no notable flags'})")
    console.log(f"llama.cpp: repack {'on' if mode.get('repack') else 'off'} - {mode.get('repack_reason') or mode.get('error')}")
    rows = [[name, s["status"], f"{s['seconds']:.1f}", s.get("error") or ""] for name, s in metrics["smoke"].items()]
    if rows:
        console.table("smoke checks", ["runtime", "status", "seconds", "error"], rows)
