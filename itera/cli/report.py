from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import Force, MetricsOut, execute


def report(
    records: Annotated[Optional[list[Path]], typer.Argument(help="Record files (--metrics-out). Default: stdin.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md and its PNG charts.")] = Path("report"),
    fmt: Annotated[str, typer.Option("--format", help="md (report.md + PNGs) or html (one self-contained file).")] = "md",
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Tables and charts (Markdown + PNG, or one HTML file) from records and their lineage.

    One row per artifact: size, bits per weight, perplexity and bits per byte per dataset and
    protocol, median decode tokens/s with its spread and stability, J/token with its method,
    export parity; charts of the size-quality frontier, throughput and energy. Files that are not
    itera records are skipped with a note (an error when no file is a record).

    Examples:

      itera report runs/demo/student-register.json runs/demo/teacher-register.json \\
        --out runs/demo/report

      itera report runs/demo/*.json --out runs/demo/report-html --format html
    """
    from itera.jobs.report import ReportOptions, run_report

    stdin = sys.stdin.buffer.read() if not records and not sys.stdin.isatty() else b""
    opts = ReportOptions(out=out, records=list(records or []), format=fmt, stdin=stdin, force=force).validate()
    execute("report", run_report, opts, opts.parsed[-1] if len(opts.parsed) == 1 else None, metrics_out)
