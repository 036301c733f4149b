"""Runtime backends behind one interface: give token ids, get next-token log-probabilities.

Only the torch backend (checkpoint directories) exists so far; ``open_runtime`` says so
clearly for other artifacts rather than pretending.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from itera.errors import InputError
from itera.model.checkpoint import PICKLE_SUFFIXES, check_checkpoint_dir


class Runtime(Protocol):
    name: str
    tokenizer: object
    max_context: int

    def nll(self, ids: Sequence[int], n_score: int) -> list[float]:
        """Negative log-likelihoods (nats) of the last ``n_score`` tokens of ``ids``, each
        predicted from all tokens before it in ``ids``."""


def artifact_format(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        return "checkpoint"
    suffix = path.suffix.lower()
    if suffix in (".gguf", ".onnx", ".pt2"):
        return suffix[1:]
    return "unknown"


def check_model_path(path: Path) -> str:
    """Validate that ``path`` is an artifact some backend can run; return its format."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a checkpoint directory")
    fmt = artifact_format(path)
    if fmt == "checkpoint" or path.suffix.lower() in PICKLE_SUFFIXES:
        check_checkpoint_dir(path)
        return "checkpoint"
    if fmt in ("gguf", "onnx", "pt2"):
        raise InputError(f"{path}: running .{fmt} files is not built yet in this version of itera; "
                         "pass the checkpoint directory it was exported from")
    raise InputError(f"{path} is not a checkpoint directory; pass a directory with config.json")


def open_runtime(path: Path, dtype: str = "float32", device: str = "cpu", threads: int | None = None) -> Runtime:
    fmt = check_model_path(path)
    assert fmt == "checkpoint"
    from itera.runtime.torch_backend import TorchRuntime

    return TorchRuntime.load(Path(path), dtype=dtype, device=device, threads=threads)
