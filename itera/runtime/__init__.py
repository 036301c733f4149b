"""Runtime backends behind one interface: give token ids, get logits and next-token NLLs.

- torch: checkpoint directories (float or itera-quantized), :mod:`itera.runtime.torch_backend`;
- llama.cpp: ``.gguf`` files, :mod:`itera.runtime.llamacpp_backend`;
- onnxruntime: ``.onnx`` files, :mod:`itera.runtime.onnx_backend`.
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

    def logits(self, ids: Sequence[int]):
        """(T, vocab) float32 logits for every position of ``ids`` (numpy)."""

    def nll(self, ids: Sequence[int], n_score: int) -> list[float]:
        """Negative log-likelihoods (nats) of the last ``n_score`` tokens of ``ids``, each
        predicted from all tokens before it in ``ids``."""

    def close(self) -> None:
        """Release the runtime's resources."""


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
    if fmt in ("gguf", "onnx"):
        if not path.is_file():
            raise InputError(f"{path} is not a file; pass a .{fmt} file")
        return fmt
    raise InputError(f"{path} is not a checkpoint directory, .gguf or .onnx file; pass one of those")


def open_runtime(path: Path, dtype: str = "float32", device: str = "cpu", threads: int | None = None) -> Runtime:
    """The backend for ``path``: torch for a checkpoint directory, llama.cpp for .gguf, onnxruntime for .onnx."""
    fmt = check_model_path(path)
    if fmt == "gguf":
        from itera.runtime.llamacpp_backend import LlamaCppRuntime

        return LlamaCppRuntime(Path(path), threads=threads)
    if fmt == "onnx":
        from itera.runtime.onnx_backend import OnnxRuntime

        return OnnxRuntime(Path(path), threads=threads)
    from itera.runtime.torch_backend import TorchRuntime

    return TorchRuntime.load(Path(path), dtype=dtype, device=device, threads=threads)
