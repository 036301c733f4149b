"""Option aliases shared by commands, so help texts read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MetricsOut = Annotated[Optional[Path], typer.Option(
    "--metrics-out", help="Also write the record to this file.", dir_okay=False)]
ModelPath = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Checkpoint directory. Default: the artifact of the record on stdin.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (cuda when available).")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for the runtime (default: its own).", min=1)]


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when torch sees a GPU, else cpu. Imports torch, so call it late."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def progress_bar(enabled: bool = True, training: bool = True):
    """A rich progress bar on stderr (a no-op when disabled); ``training`` adds loss and tokens/s
    columns, read from the task fields ``loss`` and ``tps``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    extra = [TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s")] if training else []
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=not enabled)


def model_input(model: Optional[Path], option: str = "--model") -> tuple[Path, Optional[dict]]:
    """The input of a command: the explicit path, else the artifact of the record on stdin, which
    then becomes the parent of this command's record. stdin is read only when no path is given."""
    from itera import record

    parent = record.read_parent() if model is None else None
    return record.input_path(model, parent, option), parent
