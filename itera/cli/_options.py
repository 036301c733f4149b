"""What every command shares: option aliases (so help texts read the same everywhere), the input
of a command (an explicit path or the record on stdin), and :func:`execute`, which runs one
library job and emits its record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from itera.jobs import Job

MetricsOut = Annotated[Optional[Path], typer.Option(
    "--metrics-out", help="Also write the record to this file.", dir_okay=False)]
ModelPath = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Checkpoint directory. Default: the artifact of the record on stdin.")]
RunnablePath = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Checkpoint directory, .gguf or .onnx file. Default: the artifact of the record on stdin.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype of a checkpoint: float32, bfloat16 or float16.")]
TrainDtype = Annotated[str, typer.Option("--dtype", help="Training precision: auto (bf16 autocast on CUDA, float32 "
                                         "on the CPU), float32 or bf16.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (cuda when available).")]
TextField = Annotated[str, typer.Option("--text-field", help="The .jsonl/.parquet field (or hub column) holding the "
                                        "text: a string, or chat messages whose contents are joined.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for the runtime (default: its own).", min=1)]
TorchThreads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: "
                                                     "torch's own, the cores this process may use).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (never an input, and never "
                                     "anything that is not a regular file or directory).")]


def model_input(model: Optional[Path], option: str = "--model") -> tuple[Path, Optional[dict]]:
    """The input of a command: the explicit path, else the artifact of the record on stdin, which
    then becomes the parent of this command's record. stdin is read only when no path is given."""
    from itera import record

    parent = record.read_parent() if model is None else None
    return record.input_path(model, parent, option), parent


def execute(command: str, job: Job, opts, parent: Optional[dict], metrics_out: Optional[Path],
            summary: Callable | None = None, **job_kwargs) -> Optional[dict]:
    """Run the job (:class:`itera.jobs.Job`: ``job(opts, console, **job_kwargs)``), show ``summary(console, metrics)``, emit the record.

    Under torchrun every rank runs the job and only rank 0 speaks and emits."""
    from itera import record
    from itera.cli._console import Console

    from itera.fsio import check_job_paths

    console = Console()
    run = record.Run(command, parent=parent)
    check_job_paths(opts.outputs(), opts.inputs(), metrics_out)  # before any expensive work
    outcome = job(opts, console, **job_kwargs)
    if not console.enabled:
        return None
    rec = run.finish(outcome)
    if summary is not None:
        summary(console, rec["metrics"])
    record.emit(rec, metrics_out=metrics_out)
    return rec
