from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.commands._options import MetricsOut


def report(
    records: Annotated[Optional[list[Path]], typer.Argument(help="Record files (--metrics-out). Default: stdin.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md and its PNG charts.")] = Path("report"),
    fmt: Annotated[str, typer.Option("--format", help="md (report.md + PNGs) or html (one self-contained file).")] = "md",
    metrics_out: MetricsOut = None,
) -> None:
    """Tables and charts from records and their lineage: size, bits per weight, perplexity, bits per
    byte, decode tokens/s, J/token with its method, export parity; a size–quality frontier chart."""
    from itera import record
    from itera.errors import UsageError
    from itera.report import render

    if fmt not in ("md", "html"):
        raise UsageError(f"unknown --format {fmt!r}; use md or html")
    if records:
        recs = [record.read_record_file(p) for p in records]
    else:
        data = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
        recs = [record.parse_record(line.encode()) for line in data.decode("utf-8", "strict").splitlines()
                if line.strip()] if data.strip() else []
    run = record.Run("report", parent=recs[-1] if len(recs) == 1 else None)
    result = render(recs, out, fmt)
    print(f"wrote {result['report']} ({result['artifacts']} artifacts)", file=sys.stderr)
    rec = run.record(record.describe_artifact(out, "report", fmt), {"artifacts": result["artifacts"]},
                     {"records": [str(p) for p in records or []], "format": fmt, "charts": result["charts"]})
    record.emit(rec, metrics_out=metrics_out)
