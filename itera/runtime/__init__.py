"""Runtime backends behind one interface (:class:`itera.runtime.base.RuntimeBase`): give token
ids, get logits, next-token NLLs and a KV-cache stepper.

- torch: checkpoint directories (float or itera-quantized), :mod:`itera.runtime.torch_backend`;
- llama.cpp: ``.gguf`` files, :mod:`itera.runtime.llamacpp_backend`;
- onnxruntime: ``.onnx`` files, :mod:`itera.runtime.onnx_backend`.

Which runtime opens which artifact is :data:`RUNTIMES` (and the artifact kinds table,
:mod:`itera.artifacts`). Nothing here imports torch, onnxruntime or llama_cpp until a runtime is
opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from itera.artifacts import check_model_path, runtime_of
from itera.runtime.base import RuntimeBase


def _open_torch(path: Path, dtype: str, device: str, threads: int | None, n_ctx: int) -> RuntimeBase:
    from itera.runtime.torch_backend import TorchRuntime

    return TorchRuntime.load(path, dtype=dtype, device=device, threads=threads)


def _open_llama_cpp(path: Path, dtype: str, device: str, threads: int | None, n_ctx: int) -> RuntimeBase:
    from itera.runtime.llamacpp_backend import LlamaCppRuntime

    return LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx)


def _open_onnxruntime(path: Path, dtype: str, device: str, threads: int | None, n_ctx: int) -> RuntimeBase:
    from itera.runtime.onnx_backend import OnnxRuntime

    return OnnxRuntime(path, threads=threads)


@dataclass(frozen=True)
class Runtime:
    """A runtime itera runs artifacts in: its name (as records and the artifact kinds table name
    it) and how to open an artifact in it (the backend is imported only then)."""

    name: str
    open: Callable[[Path, str, str, int | None, int], RuntimeBase]


RUNTIMES = {r.name: r for r in (Runtime("torch", _open_torch), Runtime("llama.cpp", _open_llama_cpp),
                                Runtime("onnxruntime", _open_onnxruntime))}


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when torch sees a GPU, else cpu. Imports torch, so call it late."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_runtime(path: Path, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                 n_ctx: int = 0) -> RuntimeBase:
    """The backend for ``path``: torch for a checkpoint directory, llama.cpp for .gguf,
    onnxruntime for .onnx. Use it as a context manager (``with open_runtime(p) as rt:``).
    ``n_ctx``: the most tokens the caller will run at once (llama.cpp sizes its buffers for it;
    0: the file's context, at most 32768)."""
    runtime = RUNTIMES[runtime_of(check_model_path(path))]
    return runtime.open(Path(path), dtype, device, threads, n_ctx)
